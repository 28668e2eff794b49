"""Validation during training: held-out metrics of the student every `--val-every` steps.

`--val-cache DIR` is a stage-1 cache of held-out text written by the same teacher, with the
same tokenizer and V as the training cache (refused otherwise, naming the mismatch, and
refused when it was built from the training corpus). Its first `--val-windows` windows, in
manifest order, are the fixed validation set; rank r evaluates windows r, r + world, ... with
the model as it trains (ZeRO-3 gathers each layer for the forward, as in training: no full
copy of the model on one rank), and one all-reduce of float64 sums gives every rank the same
numbers whatever the world size. Over the positions t = 0..T-2 of every window (trainable
ones, for a chat cache), with s_t the student's softmax and x_{t+1} the next token:

    ce      = mean_t -log s_t(x_{t+1})                 ppl = exp(ce)
    kl      = mean_t (L_t - H_t),  L_t = -sum_{i in S_t} p_hat_i log s_t(i)
              the unbiased estimate of KL(teacher || student) from the cached classes S_t and
              the entropy byte H_t, as the training log's kl_est (pipeline.stage2_distill.losses)
    kl_se   = its standard error over positions
    acc     = mean_t [argmax s_t == x_{t+1}]
    ece     = expected calibration error, 15 bins of top-1 confidence (pipeline.common.heldout)

The same positions as `pipeline.common.heldout` on the same text and T, so `ce` equals its NLL per
token and `kl` estimates its exact `kl_to_teacher`.

Text the student trains on makes every validation number optimistic. A validation cache
built from the training corpus's files is refused at start-up; one built from other files
that hold training documents is refused at the first step that reads such a document: every
training window of the first epoch is cut at its EOS tokens and each complete document of
at least MIN_DOC_TOKENS tokens is looked up among the validation set's complete documents
(sha256 of the token ids; a document is recognised where it lies whole in a validation
window and in a training window, as most documents much shorter than T do).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common.heldout import Calibration

ECE_BINS = 15
# Runs of at least this many tokens between two EOS are compared as documents when the
# validation text is checked against the training windows (shorter runs repeat by chance).
MIN_DOC_TOKENS = 32


def check_val_cache(val: dict, train: dict, val_dir: str, train_dir: str) -> None:
    """Refuse a validation cache of another teacher, tokenizer, V or temperature, or one
    built from the training corpus; every problem named with both caches' values."""
    problems = []
    for key, what in (("teacher_weights", "teacher weights"), ("tokenizer_fingerprint", "tokenizer"),
                      ("vocab_size", "V"), ("teacher_temperature", "teacher temperature")):
        if val.get(key) != train.get(key):
            a, b = str(val.get(key))[:80], str(train.get(key))[:80]
            problems.append(f"{what}: --val-cache {a}, --cache {b}")
    same_path = (val.get("dataset") or {}).get("path") == (train.get("dataset") or {}).get("path")
    if same_path or (val.get("dataset_fingerprint") and
                     val.get("dataset_fingerprint") == train.get("dataset_fingerprint")):
        problems.append(f"corpus: both were built from {(val.get('dataset') or {}).get('path')} "
                        "(validation needs text the student does not train on)")
    if problems:
        raise ValueError(f"--val-cache {val_dir} does not fit --cache {train_dir}: "
                         + "; ".join(problems))


def documents(tokens: np.ndarray, eos: int | None) -> list[bytes]:
    """sha256 digests of the complete documents in a window: the runs of at least
    MIN_DOC_TOKENS tokens that lie between two EOS tokens (the cache appends EOS to every
    document)."""
    if eos is None:
        return []
    ends = np.flatnonzero(tokens == eos)
    out = []
    for a, b in zip(ends[:-1], ends[1:]):
        if b - a - 1 >= MIN_DOC_TOKENS:
            out.append(hashlib.sha256(np.ascontiguousarray(tokens[a + 1:b], dtype="<u4").tobytes()).digest())
    return out


@dataclass
class ValWindows:
    """This rank's share of the validation set as tensors, and what it covers."""

    input_ids: torch.Tensor     # [n, T] int64
    ids: torch.Tensor           # [n, T, U]
    weights: torch.Tensor       # [n, T, U]
    entropy: torch.Tensor       # [n, T]
    trainable: torch.Tensor     # [n, T] bool
    real: torch.Tensor          # [n] bool: False for a padding window (a rank with fewer)
    total: int                  # windows in the whole validation set


def load_windows(samples: list[dict], rank: int, world: int) -> ValWindows:
    """Rank r's share r::world of the decoded validation windows (`CacheReader.first_windows`),
    padded with copies of the first window (marked not real) so every rank runs the same
    number of forwards (ZeRO-3's gathers are collective)."""
    total = len(samples)
    mine = samples[rank::world]
    per = -(-total // world)
    real = [True] * len(mine) + [False] * (per - len(mine))
    mine = mine + [samples[0]] * (per - len(mine))
    stack = lambda k: torch.from_numpy(np.stack([s[k] for s in mine]))  # noqa: E731
    return ValWindows(stack("tokens").long(), stack("ids"), stack("weights"), stack("entropy"),
                      stack("trainable"), torch.tensor(real), total)


class Validator:
    """The validation set of one run and its evaluation (module docstring)."""

    def __init__(self, reader, n_windows: int, rank: int, world: int, device, batch: int,
                 eos: int | None, chunk_rows: int = 512):
        self.dir = reader.dir
        samples = reader.first_windows(n_windows)
        self.win = load_windows(samples, rank, world)
        self.device, self.batch, self.chunk = device, max(batch, 1), chunk_rows
        self.cache_vocab = int(reader.manifest["vocab_size"])
        self.docs = {d for s in samples for d in documents(s["tokens"], eos)}
        self.eos = eos

    def shared_document(self, tokens: torch.Tensor) -> bool:
        """Whether a training window [T] holds a complete document of the validation set."""
        return bool(self.docs) and any(d in self.docs for d in documents(tokens.cpu().numpy(), self.eos))

    @torch.no_grad()
    def evaluate(self, model, sum_over_ranks) -> dict:
        """The metrics of `model` (a ZeRO-3 engine's module; every rank calls this together)."""
        import deepspeed

        from pipeline.stage2_distill.objectives import head_logits, head_params

        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        head = model.get_output_embeddings()
        w = self.win
        sums = torch.zeros(5, dtype=torch.float64)       # n, nll, kl, kl^2, correct
        calib = Calibration(ECE_BINS)
        try:
            for a in range(0, w.input_ids.shape[0], self.batch):
                x = w.input_ids[a:a + self.batch].to(self.device)
                h = model.get_decoder()(input_ids=x).last_hidden_state          # [B,T,H]
                T = x.shape[1]
                keep = w.trainable[a:a + self.batch, :T - 1] & w.real[a:a + self.batch, None]
                keep = keep.reshape(-1).to(self.device)
                rows = h[:, :T - 1].reshape(-1, h.shape[-1])[keep]
                y = x[:, 1:].reshape(-1)[keep]
                U = w.ids.shape[-1]
                ids = w.ids[a:a + self.batch, :T - 1].reshape(-1, U).to(self.device)[keep]
                p_hat = w.weights[a:a + self.batch, :T - 1].reshape(-1, U).to(self.device)[keep]
                ent = w.entropy[a:a + self.batch, :T - 1].reshape(-1).to(self.device)[keep]
                with deepspeed.zero.GatheredParameters(head_params(head)):
                    logits_of = head_logits(head)
                    for s in range(0, y.numel(), self.chunk):
                        e = min(s + self.chunk, y.numel())
                        ls = torch.log_softmax(logits_of(rows[s:e]).float(), dim=-1)   # [C,V]
                        nll = -ls.gather(1, y[s:e, None]).squeeze(1)
                        used = ids[s:e] < self.cache_vocab
                        got = ls.gather(1, torch.where(used, ids[s:e], 0))
                        L = -(torch.where(used, p_hat[s:e] * got, torch.zeros_like(got))).sum(1)
                        kl = L - ent[s:e]
                        conf, pred = ls.max(dim=-1)
                        calib.add(conf.exp(), pred == y[s:e])
                        sums += torch.stack([torch.tensor(float(e - s), dtype=torch.float64),
                                             nll.double().sum().cpu(), kl.double().sum().cpu(),
                                             (kl.double() ** 2).sum().cpu(),
                                             (pred == y[s:e]).double().sum().cpu()])
        finally:
            model.train(was_training)
        flat = torch.cat([sums, torch.from_numpy(np.concatenate([calib.n, calib.conf, calib.correct]))])
        flat = sum_over_ranks(flat)
        n, nll, kl, kl2, correct = flat[:5].tolist()
        calib.n, calib.conf, calib.correct = (flat[5 + i * ECE_BINS:5 + (i + 1) * ECE_BINS].numpy()
                                              for i in range(3))
        if n == 0:
            raise ValueError(f"--val-cache {self.dir}: no position to validate on in "
                             f"{w.total} window(s)")
        mean = kl / n
        var = max(kl2 / n - mean * mean, 0.0) * n / max(n - 1, 1)
        return {"val_ce": nll / n, "val_ppl": math.exp(nll / n), "val_kl": mean,
                "val_kl_se": math.sqrt(var / n), "val_acc": correct / n, "val_ece": calib.ece(),
                "val_positions": int(n), "val_windows": w.total,
                "val_time_s": time.perf_counter() - t0}


def val_dir_problems(val_cache: str | None, val_every: int, val_windows: int) -> list[str]:
    """Configuration problems of the validation flags."""
    p = []
    if val_every < 0 or val_windows < 1:
        p.append(f"--val-every {val_every} must be >= 0 and --val-windows {val_windows} >= 1")
    if val_every and not val_cache:
        p.append(f"--val-every {val_every} needs --val-cache (a stage-1 cache of held-out text)")
    if val_cache and not (Path(val_cache) / "manifest.json").is_file():
        p.append(f"--val-cache {val_cache}: no manifest.json (a finished pipeline.cache output)")
    return p
