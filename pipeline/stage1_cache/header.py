"""A cache's header: what determines its records (docs/CACHE_FORMAT.md, "Manifest fields").

Written by a launch's rank 0 into header.json and compared by every restart
(pipeline.cache_format.manifest.check_compatible); training settings never enter it.
"""

from __future__ import annotations

from pipeline.cache_format.codec import FORMAT_VERSION, RecordCodec
from pipeline.cache_format.manifest import ALLOCATED_FORMAT_VERSION, MASKED_FORMAT_VERSION, layout
from pipeline.common.text import tokenizer_fingerprint
from pipeline.stage1_cache.packing import resolve_chat_template, template_sha256


def build_header(cfg, tok, model, codec: RecordCodec,
                 teacher_weights: dict[str, str] | None = None,
                 chat_template: str | None = None) -> dict:
    """The header; a chat cache's `dataset` also records the sha256 of the chat template
    text used (`chat_template`, resolved from cfg and tok when not given): masks depend on it."""
    chat = cfg.data_format == "chat"
    dataset = cfg.data_spec.to_json()
    if chat:
        text = chat_template if chat_template is not None else resolve_chat_template(
            tok, cfg.chat_template)
        dataset["chat_template_sha256"] = template_sha256(text)
    return {
        "format_version": (MASKED_FORMAT_VERSION if chat else ALLOCATED_FORMAT_VERSION
                           if codec.allocated else FORMAT_VERSION),
        "teacher": cfg.teacher,
        "teacher_parameters": sum(p.numel() for p in model.parameters()),
        "teacher_weights": teacher_weights,
        "teacher_dtype": str(model.dtype).removeprefix("torch."),
        "teacher_logits": model.get_output_embeddings().weight.shape[0],
        "vocab_size": codec.vocab_size,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "eos_token_id": tok.eos_token_id,
        "seq_len": cfg.seq_len,
        "num_classes": codec.num_classes,
        "id_bits": codec.id_bits,
        "w_bits": codec.w_bits,
        "sentinel": codec.sentinel,
        "bytes_per_position": codec.bytes_per_position,
        "sampler": cfg.sampler,
        "sampler_args": cfg.sampler_args,
        # The lm_head chunking sets how a window's random stream is consumed: part of the records.
        "chunk_positions": cfg.chunk_positions,
        "sampler_chunk": cfg.sampler_chunk,
        "teacher_temperature": cfg.teacher_temperature,
        "seed": cfg.seed,
        "dataset": dataset,
        # Sizes and mtimes of the planned files (units.json); each unit's bytes are hashed by
        # the rank that caches it (its done record), so no rank reads the whole corpus.
        "dataset_fingerprint": None,       # set from the unit plan (cache_launch.corpus_fingerprint)
        "unit_bytes": cfg.unit_bytes,
        "max_windows": cfg.max_windows,
        "shard_samples": cfg.shard_samples,
        "weight_codebook": codec.weight_codebook().levels.tolist(),
        "entropy_codebook": codec.entropy_codebook().levels.tolist(),
        "entropy_max_error": codec.entropy_codebook().max_error,
        "layout": layout(masked=chat, allocated=codec.allocated),
    } | ({"class_budget": cfg.class_budget, "class_ceiling": codec.num_classes,
          "window_records": codec.window_records} if codec.allocated else {})
