"""Held-out language-modeling metrics of a model: perplexity, NLL/token, KL to a teacher.

The text is cut exactly as the cache stage cuts its corpus (`pipeline.common.text`: documents
tokenized without special tokens, EOS appended, concatenated, consecutive windows of T
tokens, the incomplete tail dropped), so the numbers are comparable with the KD loss the
student trained on. In each window the T-1 positions 0..T-2 predict tokens 1..T-1:

    nll_per_token = (1/N) * sum_{w,t} -log s_t(x_{t+1})       N = windows * (T-1)
    perplexity    = exp(nll_per_token)
    kl_to_teacher = (1/N) * sum_{w,t} sum_v p_t(v) (log p_t(v) - log s_t(v))   = KL(p || s)

with `s` the student's and `p` the teacher's softmax (KL only when both share the
tokenizer and the output vocabulary size). Calibration of the next-token prediction is the
expected calibration error over M = 15 equal-width bins of top-1 confidence c_t = max_v s_t(v)
(Guo et al. 2017; bin m holds (m-1)/M < c <= m/M):

    ece = sum_m (n_m / N) * |acc_m - conf_m|    acc_m: fraction of argmax_v s_t(v) == x_{t+1}
                                                conf_m: mean c_t, both over the n_m rows in bin m Memory stays bounded whatever V: each model
runs its base network on a [B,T] batch for hidden states [B,T,H], and the output head runs
on `chunk_positions` rows at a time, so at most a few [chunk, V] fp32 arrays exist at
once (never [B,T,V]). Sums accumulate in float64.

    python -m pipeline.evaluate --model OUT/export --heldout held.jsonl --teacher TEACHER --out EVAL
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from pipeline.common.text import DataSpec, load_documents, token_stream, tokenizer_fingerprint, windows

log = logging.getLogger(__name__)

# Config attributes of architectures whose logits are not just `lm_head(hidden)`.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _load(model_dir: str | Path, flag: str, dtype: torch.dtype, device: str):
    """(model, tokenizer) from a saved HF directory (pipeline.common.models), eval mode, on
    `device`; refused when its logits are more than `lm_head(hidden)`."""
    from pipeline.common.models import load_model

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a model saved with save_pretrained")
    tok, model = load_model(path, flag, dtype, device)
    for attr in _LOGIT_TRANSFORMS:
        if getattr(model.config, attr, None) not in (None, 1.0):  # HF config: optional attribute
            raise ValueError(f"{path}: {type(model).__name__} transforms its logits ({attr}="
                             f"{getattr(model.config, attr)}); heldout_metrics applies only lm_head")
    return model, tok


def _head_parts(model):
    """(base network returning hidden states, output head) of a causal LM."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return model.base_model, head


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def teacher_mismatch(student, s_tok, teacher, t_tok) -> str | None:
    """Why KL(teacher || student) is undefined for this pair, or None when it is defined."""
    if tokenizer_fingerprint(s_tok) != tokenizer_fingerprint(t_tok):
        return "the tokenizers differ (vocabulary or EOS)"
    if _vocab(student) != _vocab(teacher):
        return f"output vocabularies differ: student {_vocab(student)}, teacher {_vocab(teacher)}"
    return None


class Calibration:
    """Top-1 confidence bins for the expected calibration error (module docstring).

    Bin m (1-based) of M holds (m-1)/M < c <= m/M; c = 0 (impossible for a softmax) joins bin 1.
    Counts and sums accumulate in float64, so rows can come chunk by chunk.
    """

    def __init__(self, bins: int = 15):
        if bins < 1:
            raise ValueError(f"ece bins {bins} must be >= 1")
        self.n = np.zeros(bins, np.float64)
        self.conf = np.zeros(bins, np.float64)
        self.correct = np.zeros(bins, np.float64)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """confidence [N] in [0, 1], correct [N] bool."""
        M = len(self.n)
        c = confidence.detach().double().cpu()
        m = (torch.ceil(c * M).long() - 1).clamp_(0, M - 1).numpy()
        np.add.at(self.n, m, 1.0)
        np.add.at(self.conf, m, c.numpy())
        np.add.at(self.correct, m, correct.detach().cpu().double().numpy())

    def ece(self) -> float:
        total = self.n.sum()
        if total == 0:
            raise ValueError("ece of no predictions")
        return float(np.abs(self.correct - self.conf).sum() / total)

    def bins(self) -> list[dict]:
        """Per bin: upper edge, rows, mean confidence, accuracy (None for an empty bin)."""
        M = len(self.n)
        return [{"upper": (m + 1) / M, "n": int(n),
                 "confidence": float(c / n) if n else None, "accuracy": float(a / n) if n else None}
                for m, (n, c, a) in enumerate(zip(self.n, self.conf, self.correct))]


def _batches(wins, batch_size: int, max_windows: int | None):
    """Group an iterator of ([T] uint32 window, [T-1] bool scored targets) into int64 arrays
    [B,T] and bool [B,T-1] (the last batch may be short)."""
    batch: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (w, m) in enumerate(wins):
        if max_windows is not None and i >= max_windows:
            break
        batch.append((w.astype(np.int64), m))
        if len(batch) == batch_size:
            yield np.stack([b[0] for b in batch]), np.stack([b[1] for b in batch])
            batch = []
    if batch:
        yield np.stack([b[0] for b in batch]), np.stack([b[1] for b in batch])


def _text_windows(texts: Path, tok, seq_len: int):
    docs = load_documents(DataSpec(path=str(texts), text_field="text"))
    every = np.ones(seq_len - 1, dtype=bool)
    return ((w, every) for w in windows(token_stream(docs, tok), seq_len))


def _chat_windows(texts: Path, tok, seq_len: int, chat_template: str | None):
    """Conversations packed as the cache packs them; scored targets = assistant tokens."""
    import datasets

    from pipeline.common.chat import chat_windows, encode_rows, target_mask

    rows = datasets.load_dataset("json", data_files=str(texts), split="train")
    convs = encode_rows(rows, tok, str(texts), chat_template=chat_template)
    return ((w, target_mask(m)) for w, m in chat_windows(convs, seq_len))


@torch.no_grad()
def heldout_metrics(model_dir: str | Path, texts_jsonl: str | Path, seq_len: int,
                    teacher_dir: str | Path | None = None, max_windows: int | None = None,
                    batch_size: int = 4, chunk_positions: int = 512, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, progress=None,
                    teacher_cache: dict | None = None, ece_bins: int = 15,
                    data_format: str = "text", chat_template: str | None = None) -> dict:
    """Perplexity of `model_dir` on `texts_jsonl` (field `text`), and KL to `teacher_dir`.

    Returns `{"perplexity", "nll_per_token", "tokens", "windows", "seq_len"}` plus
    `"kl_to_teacher"` (mean per-token KL(teacher || student), nats) when a teacher is given
    and shares the student's tokenizer and vocabulary; otherwise a warning says why not.
    `tokens` = windows * (seq_len - 1) predicted tokens; `ece` the calibration error over
    `ece_bins` bins (`calibration` holds the bins). `progress`: an optional
    `rich.progress.Progress` to report windows on. `teacher_cache`: a dict kept by the caller
    across calls with the same teacher, text and windows (e.g. a study evaluating many
    students): the teacher's log-probabilities are computed once and read from it after.
    `data_format="chat"`: rows of conversations (`messages` or `prompt`/`response`, as the
    cache stage reads them), rendered with the student tokenizer's chat template (or the
    `chat_template` text) and packed as the cache packs them; every metric is then taken
    over the assistant tokens only (pipeline.common.chat's trainable tokens), `tokens` counts them.
    """
    if data_format not in ("text", "chat"):
        raise ValueError(f"--heldout-format {data_format!r}: expected 'text' or 'chat'")
    if batch_size < 1 or chunk_positions < 1:
        raise ValueError(f"batch_size={batch_size} and chunk_positions={chunk_positions} must be >= 1")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--heldout-max-windows {max_windows} must be >= 1")
    texts = Path(texts_jsonl)
    if not texts.is_file():
        raise FileNotFoundError(f"--heldout {texts}: no such file (JSONL with a 'text' field)")

    student, tok = _load(model_dir, "--model", dtype, device)
    teacher = None
    if teacher_dir is not None:
        teacher, t_tok = _load(teacher_dir, "--teacher", dtype, device)
        reason = teacher_mismatch(student, tok, teacher, t_tok)
        if reason is not None:
            log.warning("heldout: no kl_to_teacher for teacher %s: %s", teacher_dir, reason)
            teacher = None
    s_base, s_head = _head_parts(student)
    t_base, t_head = _head_parts(teacher) if teacher is not None else (None, None)

    wins = (_chat_windows(texts, tok, seq_len, chat_template) if data_format == "chat"
            else _text_windows(texts, tok, seq_len))
    task = progress.add_task("held-out windows", total=max_windows) if progress is not None else None

    nll_sum = 0.0  # float64 accumulators: N can reach 1e8 tokens
    kl_sum = 0.0
    n_tokens = 0
    n_windows = 0
    calib = Calibration(ece_bins)
    for b, (batch, scored) in enumerate(_batches(wins, batch_size, max_windows)):
        x = torch.from_numpy(batch).to(device)                           # [B,T]
        keep = torch.from_numpy(scored).reshape(-1).to(device)           # [N_b] scored targets
        h = s_base(input_ids=x).last_hidden_state[:, :-1]                # [B,T-1,H]
        h = h.reshape(-1, h.shape[-1])[keep]                             # [N_b,H]
        y = x[:, 1:].reshape(-1)[keep]                                   # [N_b]
        ht = None
        for s in range(0, y.numel(), chunk_positions):
            e = min(s + chunk_positions, y.numel())
            ls = torch.log_softmax(s_head(h[s:e]).float(), dim=-1)       # [C,V]
            nll_sum -= ls.gather(1, y[s:e, None]).double().sum().item()
            conf, pred = ls.max(dim=-1)
            calib.add(conf.exp(), pred == y[s:e])
            if teacher is not None:
                key = (str(teacher_dir), str(texts), seq_len, batch_size, chunk_positions, b, s)
                lt = None if teacher_cache is None else teacher_cache.get(key)
                if lt is None:
                    if ht is None:
                        ht = t_base(input_ids=x).last_hidden_state[:, :-1]
                        ht = ht.reshape(-1, ht.shape[-1])[keep]
                    lt = torch.log_softmax(t_head(ht[s:e]).float(), dim=-1)  # [C,V]
                    if teacher_cache is not None:
                        teacher_cache[key] = lt
                p = lt.exp()
                # p*(log p - log s), with 0*log 0 = 0 where the teacher gives a class no mass
                kl = torch.where(p > 0, p * (lt - ls), torch.zeros_like(p))
                kl_sum += kl.double().sum().item()
        n_tokens += y.numel()
        n_windows += x.shape[0]
        if task is not None:
            progress.advance(task, x.shape[0])
    if n_windows == 0:
        raise ValueError(f"--heldout {texts}: the text gives no complete window of --seq-len "
                         f"{seq_len} tokens; use a shorter --seq-len or more text")
    if n_tokens == 0:
        raise ValueError(f"--heldout {texts}: no assistant token in {n_windows} window(s) of "
                         f"--seq-len {seq_len}; nothing to score")
    out = {"perplexity": math.exp(nll_sum / n_tokens), "nll_per_token": nll_sum / n_tokens,
           "tokens": n_tokens, "windows": n_windows, "seq_len": seq_len, "ece": calib.ece(),
           "calibration": calib.bins()}
    if teacher is not None:
        out["kl_to_teacher"] = kl_sum / n_tokens
    return out
