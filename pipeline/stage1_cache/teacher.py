"""The teacher as the cache stage uses it: loading, identity, vocabulary V, logits in chunks.

`load_teacher` loads the tokenizer and model; `teacher_weight_hashes` is the teacher's
identity in the cache header (sha256 of its weight files); `cache_vocab_size` is the cache's
V (the classes the tokenizer can produce; a padded output layer's extra logits are dropped
by `split_padded`); `teacher_logit_chunks` runs the decoder once per micro-batch and lm_head
on chunks of positions, so the [B, T, V] logits never exist.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.common.models import load_model, resolve_dtype
from pipeline.common.phases import PhaseTimer

from pipeline.common.files import sha256_file


def load_teacher(cfg, device: torch.device):
    """(tokenizer, model in eval mode) of `cfg.teacher` (a pipeline.stage1_cache.run.CacheConfig: its
    teacher, dtype and device_map), on `device` unless a device_map spreads it. The stage's
    checks of it follow: `cache_vocab_size`, the context length (run.py)."""
    return load_model(cfg.teacher, "--teacher", resolve_dtype(cfg.dtype, device), device,
                      cfg.device_map)


def _is_weight_file(name: str) -> bool:
    # The files from_pretrained loads weights from (safetensors or torch .bin, sharded or
    # not) and their shard indexes. training_args.bin (a Trainer pickle) holds no weights.
    return (name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
            and name != "training_args.bin")


def teacher_weight_hashes(teacher: str) -> dict[str, str] | None:
    """`{file name: sha256}` of the teacher's weight files: its identity in the cache header.

    The path or hub id alone does not identify a model (weights replaced in place, a new
    upload under the same name); a restart whose weights differ is refused (HEADER_KEYS).
    A local directory is hashed directly; a hub id is resolved offline to the local
    snapshot from_pretrained just loaded (huggingface_hub's cache, revision main).
    Returns None only when a hub id has no local snapshot to hash (the model came from
    somewhere huggingface_hub's cache lookup does not see, e.g. another cache_dir): the
    header then records null and such a cache is identified by the id and parameter count
    only.
    """
    folder = Path(teacher).expanduser()
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(teacher, "config.json")
        if not isinstance(found, str):
            return None
        folder = Path(found).parent
    files = sorted(f for f in folder.iterdir() if f.is_file() and _is_weight_file(f.name))
    if not files:
        raise ValueError(f"--teacher {teacher}: no weight files (*.safetensors, *.bin) in "
                         f"{folder}, so its identity cannot be recorded; save the teacher with "
                         "save_pretrained")
    return {f.name: sha256_file(f) for f in files}


def tokenizer_classes(tok) -> int:
    """The number of classes a tokenizer can produce: 1 + the largest id it can emit, i.e.
    `max(len(tok), 1 + max(tok.get_vocab().values()))`. `len(tok)` counts the base
    vocabulary plus the added (special) tokens; it equals 1 + the largest id when the ids
    are contiguous (Qwen2.5: 151,665; Llama 3: 128,256), and the max guards tokenizers
    whose added tokens leave a gap in the ids."""
    ids = tok.get_vocab().values()
    return max(len(tok), 1 + max(ids, default=-1))


def cache_vocab_size(tok, model) -> int:
    """The cache's V: `tokenizer_classes(tok)` (see there). Class ids < V are what records
    and tokens may hold. Teacher logits beyond V (a padded output layer, as Qwen2.5-7B's
    152,064 logits over 151,665 tokens) are dropped before sampling (`split_padded`);
    a teacher with fewer logits than V cannot score every token and is refused."""
    V = tokenizer_classes(tok)
    n_logits = model.get_output_embeddings().weight.shape[0]
    if n_logits < V:
        raise ValueError(f"the teacher has {n_logits} logits, fewer than the {V} classes its "
                         f"tokenizer can produce (V = len(tokenizer) = {len(tok)}, or 1 + its "
                         "largest token id); the checkpoint's output layer does not match its "
                         "tokenizer")
    return V


def split_padded(logits: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n, V_teacher]` logits -> (`[n, V]` fp32 contiguous logits of the classes < V,
    `[n]` fp32 probability mass the softmax over ALL `V_teacher` logits puts on the dropped
    columns >= V). Sampling and the entropy then see the distribution renormalised over
    the V kept classes. No extra pass when nothing is dropped (V_teacher == V). A NaN or
    +inf logit anywhere in a row (dropped columns included) is refused."""
    n, v_teacher = logits.shape
    if v_teacher < V:
        raise ValueError(f"logits have {v_teacher} columns, fewer than V={V}")
    if v_teacher == V:
        return logits, torch.zeros(n, dtype=torch.float32, device=logits.device)
    z = logits.float()
    lse_all = torch.logsumexp(z, dim=-1)
    bad = torch.isnan(lse_all) | torch.isposinf(lse_all)
    if bad.any():
        rows = torch.nonzero(bad).flatten()
        raise ValueError(f"logits contain NaN or inf at positions {rows[:5].tolist()} "
                         f"({rows.numel()} positions in all)")
    dropped = torch.exp(torch.logsumexp(z[:, V:], dim=-1) - lse_all)
    # a row of -inf only (no distribution) is refused by the sampler; report 0 for it here
    dropped = torch.where(torch.isneginf(lse_all), 0.0, dropped)
    return z[:, :V].contiguous(), dropped


def teacher_logit_chunks(model, input_ids: torch.Tensor, chunk: int, temperature: float,
                         vocab: int | None = None, timer: PhaseTimer | None = None):
    """Yield `(b, start, logits [n, V], dropped_mass [n])` per window b and chunk of positions.

    `vocab`: the cache's V (`cache_vocab_size`; None: every teacher logit). The logits are
    the teacher's first V, divided by the temperature; `dropped_mass` is the probability the
    softmax over all of the teacher's logits (temperature applied) puts on the columns >= V
    (`split_padded`; zeros when there are none). The decoder runs once per micro-batch;
    lm_head runs on `chunk` positions at a time, so at V = 151,936 the logits never take
    more than chunk x V floats. `timer` (tools/bench_cache.py) times "forward" (the
    decoder) and "lm_head" (the chunks' logits and the padded split).
    """
    timer = timer or PhaseTimer()
    base, head = model.get_decoder(), model.get_output_embeddings()
    if model.config.get_text_config().to_dict().get("final_logit_softcapping"):
        raise ValueError("teachers with final_logit_softcapping are not supported yet")
    with torch.inference_mode():
        with timer("forward"):
            hidden = base(input_ids=input_ids).last_hidden_state
        for b in range(hidden.shape[0]):
            for s in range(0, hidden.shape[1], chunk):
                with timer("lm_head"):
                    h = hidden[b, s:s + chunk].to(head.weight.device)
                    logits = head(h).float() / temperature
                    out = split_padded(logits, logits.shape[-1] if vocab is None else vocab)
                yield b, s, *out
