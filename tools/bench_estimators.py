"""Estimator bias and gradient error of the class samplers vs full KD (DESIGN.md sections 3, 9).

    python tools/bench_estimators.py                       # default: ~3 min on 2 cores
    python tools/bench_estimators.py --positions 32 --zipf-positions 3   # ~4x the work

Sources of teacher distributions p = softmax(z):
  teacher  a real causal LM on held-out real text: `--teacher DIR` (HF format; default the
           SmolLM2-135M teacher in assets_cache/teacher when it exists, V = 49,152). Without
           one (`--teacher none`), a tiny Llama from `pipeline.demo.tiny` is TRAINED for
           `--tiny-steps` steps on the local text so its predictions are peaked like an LM's.
  zipf-a   synthetic p_r ~ r**-a over a random permutation of V = 151,936 (Qwen), for each
           exponent a in `--zipf` (with small log-normal noise).
For each position, each sampler (priority / rskd N=50 / topk, U = 12) is drawn D = `--draws`
times (topk is deterministic: drawn once, only its quantization is redrawn). Each draw is
scored four ways: weights as sampled (fp32) or stochastically rounded onto the cache's
weight codebook (w_bits of V), and as the cache's unbiased target p_hat or the loss's
self-normalised target p_hat / sum(p_hat).

(a) class probabilities, with w_bar = mean over draws of the target (per-class sums are
    accumulated with index_add, never a [draws, V] array):
    L1     = sum_i |w_bar_i - p_i|: includes Monte-Carlo noise (> 0 even when unbiased);
    L1 ho  = sum_i sign_i (w_bar^B_i - p_i), the signs taken from the first half of the draws
             and the mean from the second: an unbiased estimate of a lower bound on the
             bias's L1 (0 for an unbiased estimator), with a per-draw Monte-Carlo SE;
    head   = the same restricted to the 12 most probable classes; tail = E[sum of the
             target outside them] - true tail mass, +- SE.
(b) gradient w.r.t. student logits of L = -sum_i w_i log s_i: g_hat = s * sum(w) - w, full KD
    g = s - p, pooled over positions as ratios of sums (sum ||.||^2 / sum ||g||^2). "bias (MC)"
    = ||mean g_hat - g|| includes the Monte-Carlo noise sqrt(tr Cov / D) ("noise floor");
    "bias debiased" = sqrt of the split-half estimate <mean_A g_hat - g, mean_B g_hat - g>,
    unbiased for ||E g_hat - g||^2, with its z-score (|z| < ~3 for an unbiased estimator).
    Per draw: E||g_hat - g|| / ||g|| and the relative MSE E||g_hat - g||^2 / ||g||^2, from the
    U gathered values of each draw (expanded norms, no dense [V] vector per draw).
(c) self-normalised vs unbiased target: their MSE ratio, and the number of positions n below
    which self-normalisation still wins once n per-position gradients are averaged (noise
    shrinks as 1/n, a coherent bias does not): the loss default follows.
Students: s = softmax(z / temp + noise * N(0, 1)), `--student NAME:TEMP:NOISE` (repeatable).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.cache_format.codec import RecordCodec, WeightCodebook  # noqa: E402
from pipeline.stage1_cache.class_sampler import METHODS, sample_classes  # noqa: E402

TARGETS = ("unbiased", "selfnorm")
console = Console(width=240)


@dataclass(frozen=True)
class EstConfig:
    """Monte-Carlo settings shared by every source."""

    num_classes: int = 12            # U, records per position
    draws: int = 2000                # D draws per position and sampler (split in two halves)
    rskd_draws: int = 50             # N of the rskd sampler
    head: int = 12                   # the "head" = this many most probable classes
    batch_elems: int = 1 << 24       # rows per sample_classes call = batch_elems // V
    seed: int = 0

    def __post_init__(self) -> None:
        if self.draws < 4 or self.draws % 2:
            raise ValueError(f"--draws {self.draws}: need an even number >= 4 (two halves)")
        if self.head < 1:
            raise ValueError(f"head={self.head} must be >= 1")


class _Variant:
    """Accumulators of one (quantized?, target) scoring of the draws of one position."""

    def __init__(self, p: torch.Tensor, s: torch.Tensor, head: torch.Tensor):
        self.p, self.s, self.head = p, s, head                       # [V], [K, V], [V] bool
        self.sum_w = torch.zeros_like(p)
        self.sign: torch.Tensor | None = None                        # set after half A
        self.rows: dict[str, list[torch.Tensor]] = {k: [] for k in
                                                    ("c", "head", "f", "fh", "sq", "gn", "x")}
        self.ss, self.sp, self.pp = (s * s).sum(1), s @ p, p @ p     # [K], [K], scalar

    def add(self, idx: torch.Tensor, w: torch.Tensor) -> None:
        """idx [r, U] class ids (invalid slots: any id with w = 0), w [r, U] float64."""
        self.sum_w.index_add_(0, idx.flatten(), w.flatten())
        c = w.sum(1)
        hw = w * self.head[idx]
        pw, ww = (self.p[idx] * w).sum(1), (w * w).sum(1)
        sw = (self.s[:, idx] * w).sum(-1)                            # [K, r]
        # ||g_hat - g||^2 with g_hat = c s - w (w sparse, ids distinct), g = s - p, expanded
        # so each draw costs O(U): (c-1)^2|s|^2 + 2(c-1)<s,p> + |p|^2 - 2(c-1)<s,w> - 2<p,w> + |w|^2
        a = c - 1
        sq = (a * a * self.ss[:, None] + 2 * a * self.sp[:, None] + self.pp
              - 2 * a * sw - 2 * pw + ww)
        gn = c * c * self.ss[:, None] - 2 * c * sw + ww               # ||g_hat||^2
        for k, v in (("c", c), ("head", hw.sum(1)), ("sq", sq.clamp_min(0)), ("gn", gn)):
            self.rows[k].append(v)
        if self.sign is not None:                                     # half B: held-out signs
            sg = self.sign[idx] * w
            self.rows["f"].append(sg.sum(1))
            self.rows["fh"].append((sg * self.head[idx]).sum(1))
            # <v, g_hat - g> with v = (mean of half A's g_hat) - g: its mean over half B is an
            # unbiased estimate of ||E g_hat - g||^2 (the halves are independent)
            self.rows["x"].append(a * self.vs[:, None] + self.vp[:, None]
                                  - (self.v[:, idx] * w).sum(-1))

    def end_half_a(self, n: int) -> None:
        wbar = self.sum_w / n
        self.sign = torch.sign(wbar - self.p)
        c_a = torch.cat(self.rows["c"]).mean()
        self.v = c_a * self.s - wbar - (self.s - self.p)              # [K, V]
        self.vs, self.vp = (self.v * self.s).sum(1), self.v @ self.p

    def finish(self, D: int) -> dict:
        p, s, head, sign = self.p, self.s, self.head, self.sign
        r = {k: torch.cat(v, -1) for k, v in self.rows.items()}
        wbar = self.sum_w / D
        se = lambda x: float(x.std() / math.sqrt(x.numel()))         # noqa: E731
        out = {"l1": float((wbar - p).abs().sum()),
               "l1_ho": float(r["f"].mean() - sign @ p), "l1_ho_se": se(r["f"]),
               "head_ho": float(r["fh"].mean() - (sign * head) @ p), "head_ho_se": se(r["fh"]),
               "tail_bias": float((r["c"] - r["head"]).mean() - p[~head].sum()),
               "tail_bias_se": se(r["c"] - r["head"]), "grad": []}
        cbar = r["c"].mean()
        for k in range(s.shape[0]):
            g = s[k] - p
            gbar = cbar * s[k] - wbar
            gg = float(g @ g)
            b2 = float((gbar - g) @ (gbar - g))
            trcov = (float(r["gn"][k].mean()) - float(gbar @ gbar)) * D / (D - 1)
            out["grad"].append({"gg": gg, "b2": b2, "noise2": max(trcov, 0.0) / D,
                                "split": float(r["x"][k].mean()), "split_se": se(r["x"][k]),
                                "mse": float(r["sq"][k].mean()) / gg,
                                "err": float(r["sq"][k].sqrt().mean()) / math.sqrt(gg)})
        return out


def _draw_batches(z: torch.Tensor, method: str, cfg: EstConfig, gen: torch.Generator,
                  stats: dict, n: int):
    """Yield (ids [r, U], weights [r, U] float32) for n draws of one position z [V]."""
    V = z.numel()
    rows = max(1, cfg.batch_elems // V)
    args = {"num_draws": cfg.rskd_draws, "stats": stats} if method == "rskd" else {}
    if method == "topk":                          # deterministic: one draw, tiled
        ids, w, _ = sample_classes(z[None], cfg.num_classes, "topk", gen)
    done = 0
    while done < n:
        r = min(rows, n - done)
        if method == "topk":
            yield ids.expand(r, -1), w.expand(r, -1)
        else:
            ids_b, w_b, _ = sample_classes(z[None].expand(r, V), cfg.num_classes, method, gen, **args)
            yield ids_b, w_b
        done += r


def position_stats(z: torch.Tensor, student_logits: torch.Tensor, method: str, cfg: EstConfig,
                   codebook: WeightCodebook, gen: torch.Generator, rng: np.random.Generator,
                   stats: dict) -> dict[tuple[bool, str], dict]:
    """Monte-Carlo statistics of one sampler at one position.

    z [V] teacher logits, student_logits [K, V]. Returns {(quantized, target): finish()}.
    """
    V = z.numel()
    p = torch.softmax(z.double(), 0)
    s = torch.softmax(student_logits.double(), -1)
    head = torch.zeros(V, dtype=torch.bool)
    head[torch.topk(p, cfg.head).indices] = True
    var = {(q, t): _Variant(p, s, head) for q in (False, True) for t in TARGETS}
    half = cfg.draws // 2
    for h in range(2):
        for ids, w in _draw_batches(z, method, cfg, gen, stats, half):
            valid = ids < V
            idx = torch.where(valid, ids, 0)
            w = torch.where(valid, w, 0.0)
            wq = codebook.decode(codebook.encode(w.numpy(), rng))   # the cache's rounding
            for q, wv in ((False, w.double()), (True, torch.from_numpy(wq).double())):
                c = wv.sum(1, keepdim=True)
                var[(q, "unbiased")].add(idx, wv)
                var[(q, "selfnorm")].add(idx, torch.where(c > 0, wv / c.clamp_min(1e-300), 0.0))
        if h == 0:
            for v in var.values():
                v.end_half_a(half)
    return {k: v.finish(cfg.draws) for k, v in var.items()}


def run_source(logits: torch.Tensor, student_logits: torch.Tensor, cfg: EstConfig,
               methods=METHODS) -> dict:
    """All positions of one source: logits [P, V], student_logits [K, P, V].

    Returns {"stats": {method: sampler counters}, "pos": {method: [position_stats per position]}}.
    """
    V = logits.shape[1]
    codebook = RecordCodec(V, cfg.num_classes).weight_codebook()
    out = {"stats": {}, "pos": {}, "V": V, "w_bits": codebook.w_bits}
    for mi, m in enumerate(methods):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + mi)
        rng = np.random.default_rng(cfg.seed * 1000 + mi)
        stats: dict = {}
        out["pos"][m] = [position_stats(logits[i], student_logits[:, i], m, cfg, codebook, gen,
                                        rng, stats) for i in range(logits.shape[0])]
        out["stats"][m] = stats
    return out


def summarize_prob(per_pos: list[dict], key: tuple[bool, str]) -> dict:
    """Mean over positions; SE = Monte-Carlo SE of the mean (positions are independent)."""
    rows = [d[key] for d in per_pos]
    P = len(rows)
    res = {"l1": float(np.mean([r["l1"] for r in rows]))}
    for name in ("l1_ho", "head_ho", "tail_bias"):
        res[name] = float(np.mean([r[name] for r in rows]))
        res[name + "_se"] = math.sqrt(sum(r[name + "_se"] ** 2 for r in rows)) / P
    return res


def _ratio_se(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """R = sum(num) / sum(den) over positions and its delta-method SE across positions."""
    R = float(num.sum() / den.sum())
    n = len(num)
    if n < 2:
        return R, float("nan")
    return R, float(np.sqrt(((num - R * den) ** 2).sum() * n / (n - 1)) / den.sum())


def summarize_grad(per_pos: list[dict], key: tuple[bool, str], k: int) -> dict:
    """Gradient errors for student k, pooled over positions (ratios of sums, so positions
    where ||s - p|| is tiny do not dominate): bias = sqrt(sum ||E g_hat - g||^2 / sum ||g||^2).

    `bias_mc` includes the Monte-Carlo noise `noise` (sqrt of tr Cov / D, pooled);
    `bias_deb` = sign * sqrt(|sum split / sum ||g||^2|) from the split-half estimate of the
    squared bias, with z = its Monte-Carlo z-score (0 +- 1 for an unbiased estimator).
    """
    g = [d[key]["grad"][k] for d in per_pos]
    col = lambda name: np.array([x[name] for x in g])                 # noqa: E731
    gg = col("gg")
    split, split_se = float(col("split").sum()), float(np.sqrt((col("split_se") ** 2).sum()))
    excess = split / gg.sum()
    mse, mse_se = _ratio_se(col("mse") * gg, gg)                      # E||g_hat - g||^2, summed
    err, err_se = _ratio_se(col("err") * np.sqrt(gg), np.sqrt(gg))    # E||g_hat - g||, summed
    return {"bias_mc": math.sqrt(col("b2").sum() / gg.sum()),
            "noise": math.sqrt(col("noise2").sum() / gg.sum()),
            "bias_deb": math.copysign(math.sqrt(abs(excess)), excess),
            "bias2": excess, "bias2_se": split_se / gg.sum(), "mse": mse, "mse_se": mse_se,
            # exact (no Monte-Carlo noise, e.g. topk in fp32): SE at float-rounding level
            "z": split / split_se if split_se > 1e-9 * abs(split) else math.nan,
            "err": err, "err_se": err_se, "err_med": float(np.median(col("err"))),
            "mse_abs": col("mse") * gg, "P": len(g)}


# ----------------------------------------------------------------------------- sources

def zipf_logits(P: int, V: int, a: float, gen: torch.Generator, noise: float = 0.3) -> torch.Tensor:
    """[P, V] logits: -a log(rank) + noise * N(0,1), ranks randomly permuted per row."""
    base = -a * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    z = base[None] + noise * torch.randn(P, V, generator=gen)
    return torch.stack([row[torch.randperm(V, generator=gen)] for row in z])


def local_texts() -> tuple[list[str], list[str]]:
    """(train, held-out) texts: the corpus pages in assets_cache/corpus if present, else
    Python's LICENSE.txt and stdlib module docstrings (split 90/10)."""
    d = ROOT / "assets_cache" / "corpus"
    read = lambda f: [json.loads(x)["text"] for x in f.read_text().splitlines() if x.strip()]  # noqa: E731
    if (d / "train.jsonl").exists() and (d / "heldout.jsonl").exists():
        return read(d / "train.jsonl"), read(d / "heldout.jsonl")
    console.log(f"no corpus in {d}: using Python's LICENSE.txt and stdlib docstrings")
    mods = ("argparse", "collections", "dataclasses", "json", "pathlib", "subprocess", "threading",
            "typing", "asyncio", "unittest", "logging", "email", "http.server", "decimal")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text() + "\n\n".join(
        importlib.import_module(m).__doc__ or "" for m in mods)
    cut = int(0.8 * len(text))
    return [text[:cut]], [text[cut:]]


@torch.no_grad()
def lm_logits(model, tok, texts: list[str], n_pos: int, skip: int, windows: int = 8) -> torch.Tensor:
    """Logits [n_pos, V]: positions skip..skip+m of up to `windows` texts (m = n_pos / windows),
    so the positions come from several documents; short texts are concatenated."""
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    m = -(-n_pos // windows)
    if ids.numel() < windows * (skip + m):
        raise ValueError(f"text has {ids.numel()} tokens, need {windows * (skip + m)}: lower --lm-positions")
    stride = ids.numel() // windows               # windows spread over the whole text
    x = torch.stack([ids[i * stride: i * stride + skip + m] for i in range(windows)])
    return model(input_ids=x).logits[:, skip:].reshape(-1, model.config.vocab_size)[:n_pos].float()


def tiny_trained_lm(train: list[str], steps: int, seed: int):
    """A tiny Llama (pipeline.demo.tiny, V = 2,048) trained on `train`: peaked, LM-like predictions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.demo.tiny import build_tiny_model
    with tempfile.TemporaryDirectory() as d:
        build_tiny_model(d, "llama", hidden=128, layers=2, heads=4, seed=seed,
                         tokenizer_vocab=2048, texts=train)
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
    data = tok("\n\n".join(train), return_tensors="pt").input_ids[0]
    T, B = 128, 16
    if data.numel() < 4 * T:
        raise ValueError(f"only {data.numel()} training tokens for the tiny model")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        start = torch.randint(0, data.numel() - T - 1, (B,), generator=g).tolist()
        x = torch.stack([data[i:i + T] for i in start])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            console.log(f"tiny LM step {step}: train loss {loss.item():.3f}")
    return model.eval(), tok


# ----------------------------------------------------------------------------- report

def _pm(m: float, se: float, fmt: str = ".4f", sep: str = " ± ") -> str:
    return f"{m:{fmt}}{sep}{se:{fmt}}" if math.isfinite(se) else f"{m:{fmt}}{sep}n/a"   # n/a: 1 position


def _n_str(n: float) -> str:
    return "never" if n == 0 else "always" if math.isinf(n) else f"{n:,.0f}"


def prob_table(results: dict[str, dict]) -> Table:
    t = Table(title="(a) class-probability bias of the cached target p_hat (mean over positions; "
                    "± = Monte-Carlo SE; held-out-sign L1 and tail bias are 0 for an unbiased estimator)")
    for c in ("source", "sampler", "weights", "L1 Σ|E p̂-p| (MC, incl. noise)", "L1 held-out ± SE",
              "z", "head-12 held-out ± SE", "tail-mass bias ± SE", "tail mass", "self-norm L1 held-out"):
        t.add_column(c, justify="left" if c in ("source", "sampler", "weights") else "right")
    for src, res in results.items():
        tail = np.mean([1 - float(x) for x in res["head_mass"]])
        for m, per_pos in res["pos"].items():
            for q in (False, True):
                a = summarize_prob(per_pos, (q, "unbiased"))
                sn = summarize_prob(per_pos, (q, "selfnorm"))
                z = a["l1_ho"] / a["l1_ho_se"] if a["l1_ho_se"] > 1e-9 * abs(a["l1_ho"]) else math.inf
                t.add_row(src, m, f"{res['w_bits']}-bit" if q else "fp32", f"{a['l1']:.4f}",
                          _pm(a["l1_ho"], a["l1_ho_se"]), f"{z:.1f}" if math.isfinite(z) else "exact",
                          _pm(a["head_ho"], a["head_ho_se"]), _pm(a["tail_bias"], a["tail_bias_se"]),
                          f"{tail:.4f}", _pm(sn["l1_ho"], sn["l1_ho_se"]))
        t.add_section()
    return t


def break_even(u: dict, n: dict) -> float:
    """Positions n below which the self-normalised target has the lower MSE of a gradient
    averaged over n positions whose biases add coherently (the worst case for a biased
    target; the noise averages away as 1/n): MSE_n = bias^2 + var / n, with the pooled
    relative quantities of `summarize_grad` and the self-normalised bias^2 at its upper
    2-SE bound (so a bias lost in the noise still gives a finite, conservative n).
    0: never; inf: always."""
    b_u, b_n = max(u["bias2"], 0.0), max(n["bias2"] + 2 * n["bias2_se"], 0.0)
    v_u, v_n = u["mse"] - b_u, n["mse"] - b_n
    if v_n >= v_u:
        return 0.0
    return math.inf if b_n <= b_u else (v_u - v_n) / (b_n - b_u)


def grad_table(results: dict[str, dict], k: int, student: str) -> tuple[Table, list[dict]]:
    t = Table(title=f"(b, c, d) sparse-KD gradient vs full KD, student {student}: errors relative to "
                    "||s - p||, pooled over positions (ratio of sums) ± SE across positions")
    cols = ("source", "sampler", "weights", "bias (MC)", "noise floor", "bias debiased", "z",
            "E rel err ± SE [median]", "rel MSE ± SE", "SN bias deb.", "SN rel MSE ± SE",
            "MSE SN/unb", "SN wins", "SN better if n <")
    for c in cols:
        t.add_column(c, justify="left" if c in cols[:3] else "right")
    verdicts = []
    for src, res in results.items():
        for m, per_pos in res["pos"].items():
            for q in (False, True):
                u = summarize_grad(per_pos, (q, "unbiased"), k)
                n = summarize_grad(per_pos, (q, "selfnorm"), k)
                wins = float(np.mean(n["mse_abs"] < u["mse_abs"]))
                ratio = float(n["mse_abs"].sum() / u["mse_abs"].sum())
                n_star = break_even(u, n)
                verdicts.append({"source": src, "sampler": m, "quantized": q, "student": student,
                                 "ratio": ratio, "selfnorm_wins": wins, "break_even_n": n_star,
                                 **{f"{tag}_{key}": v for tag, d in (("unbiased", u), ("selfnorm", n))
                                    for key, v in d.items() if key != "mse_abs"}})
                t.add_row(src, m, f"{res['w_bits']}-bit" if q else "fp32", f"{u['bias_mc']:.4f}",
                          f"{u['noise']:.4f}", f"{u['bias_deb']:+.4f}",
                          f"{u['z']:.1f}" if math.isfinite(u["z"]) else "exact",
                          f"{_pm(u['err'], u['err_se'], '.3f', '±')} [{u['err_med']:.3f}]",
                          _pm(u["mse"], u["mse_se"]), f"{n['bias_deb']:+.4f}",
                          _pm(n["mse"], n["mse_se"]), f"{ratio:.3f}", "-" if m == "topk" else f"{wins:.0%}",
                          "-" if m == "topk" else _n_str(n_star))
        t.add_section()
    return t, verdicts


def source_table(results: dict[str, dict]) -> Table:
    t = Table(title="teacher distributions (positions used in the Monte-Carlo)")
    for c in ("source", "V", "w_bits", "positions", "entropy mean [median] nats",
              "head-12 mass mean", "rskd: truncated (> U distinct)", "rskd mean distinct"):
        t.add_column(c, justify="left" if c == "source" else "right")
    for src, res in results.items():
        st = res["stats"].get("rskd", {})
        n = st.get("rskd_positions", 0)
        H = np.array(res["entropy"])
        t.add_row(src, f"{res['V']:,}", str(res["w_bits"]), str(len(H)),
                  f"{H.mean():.2f} [{np.median(H):.2f}]", f"{np.mean(res['head_mass']):.3f}",
                  f"{st['rskd_truncated_positions'] / n:.1%}" if n else "-",
                  f"{st['rskd_distinct_sum'] / n:.1f}" if n else "-")
    return t


# ----------------------------------------------------------------------------- main

def parse_student(spec: str) -> tuple[str, float, float]:
    name, *rest = spec.split(":")
    try:
        temp, noise = map(float, rest)
    except ValueError as e:
        raise SystemExit(f"--student {spec!r}: expected NAME:TEMP:NOISE, e.g. far:2.0:1.0 ({e})")
    if temp <= 0 or noise < 0:
        raise SystemExit(f"--student {spec!r}: need TEMP > 0 and NOISE >= 0")
    return name, temp, noise


def make_students(z: torch.Tensor, specs, seed: int) -> torch.Tensor:
    """[K, P, V] student logits z / temp + noise * N(0, 1), one seeded generator per student."""
    out = []
    for k, (_, temp, noise) in enumerate(specs):
        g = torch.Generator().manual_seed(seed + 7919 * (k + 1))
        out.append(z / temp + noise * torch.randn(z.shape, generator=g))
    return torch.stack(out)


def analyse(name: str, z: torch.Tensor, specs, cfg: EstConfig, methods, results: dict) -> None:
    t0 = time.perf_counter()
    res = run_source(z, make_students(z, specs, cfg.seed), cfg, methods)
    p = torch.softmax(z.double(), -1)
    res["entropy"] = (-(p * torch.log_softmax(z.double(), -1)).sum(-1)).tolist()
    res["head_mass"] = torch.topk(p, cfg.head, -1).values.sum(-1).tolist()
    results[name] = res
    console.log(f"{name}: {z.shape[0]} positions x V={z.shape[1]:,} x {cfg.draws} draws x "
                f"{len(methods)} samplers in {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="auto",
                    help="HF model dir; 'auto' = assets_cache/teacher if present else the tiny LM; "
                         "'none' = always the tiny LM trained here")
    ap.add_argument("--positions", type=int, default=12, help="LM positions in the Monte-Carlo")
    ap.add_argument("--lm-positions", type=int, default=256,
                    help="LM positions whose logits are computed (the MC uses a random subset)")
    ap.add_argument("--skip", type=int, default=32, help="leading positions skipped (short context)")
    ap.add_argument("--tiny-steps", type=int, default=300, help="training steps of the tiny LM")
    ap.add_argument("--zipf", type=float, nargs="*", default=[1.0, 1.5, 2.0], help="Zipf exponents")
    ap.add_argument("--zipf-vocab", type=int, default=151_936)
    ap.add_argument("--zipf-positions", type=int, default=1, help="positions per Zipf exponent")
    ap.add_argument("--draws", type=int, default=2000, help="draws per position and sampler")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--student", action="append", default=None,
                    help="NAME:TEMP:NOISE, repeatable (default near:1.0:0.5 and far:2.0:1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the summaries here")
    args = ap.parse_args(argv)
    specs = [parse_student(s) for s in (args.student or ["near:1.0:0.5", "far:2.0:1.0"])]
    if len({s[0] for s in specs}) != len(specs):
        raise SystemExit(f"--student names must be unique: {[s[0] for s in specs]}")
    if args.positions > args.lm_positions:
        raise SystemExit(f"--positions {args.positions} > --lm-positions {args.lm_positions}")
    cfg = EstConfig(draws=args.draws, seed=args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    results: dict[str, dict] = {}

    if args.positions > 0:
        teacher = ROOT / "assets_cache" / "teacher" if args.teacher == "auto" else Path(args.teacher)
        train, texts = local_texts()
        if args.teacher != "none" and (teacher / "config.json").exists():
            from transformers import AutoModelForCausalLM, AutoTokenizer
            model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
            tok, name = AutoTokenizer.from_pretrained(teacher), f"LM {teacher.name}"
        elif args.teacher not in ("auto", "none"):
            raise SystemExit(f"--teacher {teacher}: no config.json there (an HF model dir, 'auto' or 'none')")
        else:
            model, tok = tiny_trained_lm(train, args.tiny_steps, args.seed)
            name = "LM tiny-llama (trained)"
        z_all = lm_logits(model, tok, texts, args.lm_positions, args.skip)
        del model
        pick = torch.randperm(z_all.shape[0], generator=torch.Generator().manual_seed(args.seed))
        analyse(name, z_all[pick[: args.positions]].contiguous(), specs, cfg, args.methods, results)
        H = -(torch.softmax(z_all.double(), -1) * torch.log_softmax(z_all.double(), -1)).sum(-1)
        console.log(f"{name}: entropy over all {len(H)} positions: mean {H.mean():.2f}, median {H.median():.2f}")
    g = torch.Generator().manual_seed(args.seed + 1)
    for a in args.zipf if args.zipf_positions > 0 else []:
        analyse(f"zipf a={a:g}", zipf_logits(args.zipf_positions, args.zipf_vocab, a, g),
                specs, cfg, args.methods, results)

    console.print(source_table(results))
    console.print(prob_table(results))
    verdicts = []
    for k, (sname, temp, noise) in enumerate(specs):
        t, v = grad_table(results, k, f"{sname}: softmax(z/{temp:g} + {noise:g}·N(0,1))")
        console.print(t)
        verdicts += v
    prod = [v for v in verdicts if v["sampler"] == "priority" and v["quantized"]]
    console.print("loss default, priority + quantized cache: MSE self-normalised / unbiased per position, "
                  "and break-even n (self-normalised wins only when fewer positions are averaged): "
                  + "; ".join(f"{v['source']} / {v['student'].split(':')[0]}: {v['ratio']:.2f}, "
                              f"n = {_n_str(v['break_even_n'])}" for v in prod))
    console.print(f"U={cfg.num_classes}, rskd N={cfg.rskd_draws}, D={cfg.draws} draws/position, "
                  f"{torch.get_num_threads()} threads, wall {time.perf_counter() - t_start:.0f} s, "
                  f"load average {os.getloadavg()[0]:.1f}")
    if args.json:                                 # summaries only (break_even_n may be Infinity)
        prob = {src: {m: {f"{'q' if q else 'fp32'}/{t}": summarize_prob(pp, (q, t)) for q in (False, True)
                          for t in TARGETS} for m, pp in res["pos"].items()} for src, res in results.items()}
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)},
                                         "verdicts": verdicts, "prob": prob}, indent=1))


if __name__ == "__main__":
    main()
