"""Fidelity frontier: cache bytes per position vs the sparse-KD gradient's error, no training.

    python tools/fidelity_frontier.py                       # default: ~4 min on 2 cores
    python tools/fidelity_frontier.py --formats priority:12 topk:12 topk+bucket:12 \\
        --json frontier.json --plot frontier.png
    python tools/fidelity_frontier.py --teacher none --positions 8 --draws 200   # tiny LM, ~1 min

Teacher distributions p = softmax(z) come from a real causal LM on held-out text
(`--teacher DIR`, default the SmolLM2-135M teacher in assets_cache/teacher, V = 49,152;
`--heldout` JSONL of {"text": ...}): `--lm-positions` positions of 8 windows after `--skip`
tokens of context, of which a seeded random `--positions` enter the Monte-Carlo.
`--teacher none` trains the tiny Llama of tools/bench_estimators.py (V <= 2,048) for
`--tiny-steps` steps on `--train` instead (for tests).
Student: s = softmax(z / TEMP + NOISE * N(0, 1)), `--student NAME:TEMP:NOISE` (repeatable;
default near:1.0:0.5, the first of bench_estimators' default students).

Formats (`--formats`, FAMILY:PARAM; the default is the list below). Bytes per position count
the cache's records: 3 bytes per stored class (id_bits + w_bits = 24, pipeline/cache_format/codec.py)
plus the entropy byte.
  priority:U     priority sampling, U = 4, 8, 12, 24, 48 (what the cache stores; unbiased);
                 3U + 1 bytes (37 at U = 12).
  topk:k         the k most probable classes renormalised, k = 12, 50, 128 (deterministic,
                 biased: the tail's mass moves onto the head); 3k + 1 bytes.
  topk+bucket:k  the top k with their exact p, plus one bucket holding the remaining mass
                 r = 1 - sum_K p, k = 12, 50: loss
                     L = -sum_{i in K} p_i log s_i - r log(sum_{j not in K} s_j),
                 gradient s_i - p_i on K and s_j - r s_j / S_R outside K (S_R = the student's
                 mass outside K): exact on K, the tail spread as the student spreads it
                 (biased unless the student's tail has the teacher's shape). 3k + 2 bytes:
                 k records, the entropy byte and one byte for r (an 8-bit code on the cache's
                 log-spaced codebook, 2^-20..2, stochastically rounded; the bucket needs no
                 id, it is the complement of the k stored ids).
  rskd:N         N = 50 draws with replacement from q = p (tau_s = 1), weight count/N * p/q
                 = count/N, EVERY distinct drawn class stored (unbiased): a variable-length
                 record count, bytes = 3 * (distinct classes drawn, mean over positions and
                 draws) + 1. The fixed-U = 12 cache stores instead the 12 largest counts
                 (37 bytes, biased when more than 12 distinct classes are drawn: 64% of
                 SmolLM2 positions, BENCHMARKS.md); that is bench_estimators' rskd row.
Each sampled format is drawn `--draws` times per position (even; split in two halves);
top-k and top-k+bucket are deterministic, only their weights' quantization is redrawn.

Measures (tools/bench_estimators.py, section (b)), for the gradient w.r.t. the student's
logits of L = -sum_i w_i log s_i, g_hat = s * sum(w) - w, against full KD's g = s - p, pooled
over positions as ratios of sums (sum ||.||^2 / sum ||g||^2):
  bias ± SE   debiased ||E g_hat - g|| / ||g||: the signed square root of the split-half
              estimate of the squared bias (0 ± SE for an unbiased format); SE of the bias
              from that of its square, sqrt(|b^2| + SE(b^2)) - sqrt(|b^2|) (the delta
              method's SE / 2b when the bias is resolved, sqrt(SE) when it is 0); z =
              b^2 / SE(b^2) ("exact" where no Monte-Carlo noise is left);
  rel err     per-draw E||g_hat - g|| / ||g||, ± SE across positions;
  rel MSE     E||g_hat - g||^2 / ||g||^2 (= bias^2 + variance).
Reported variant (`--weights`): by default the cache's quantized weights (stochastic rounding
onto the w_bits codebook of V: 8 bits at V = 49,152), as the unbiased target p_hat (the loss's
default, self_normalize=False); `--weights fp32` reports the weights as sampled.

Output: a rich table on stdout; `--json PATH` a list of rows (format, family, param,
bytes_per_position, grad_bias, grad_bias_se, grad_err, grad_rel_mse, positions, draws, and
student, weights, grad_bias_z, grad_bias2, grad_bias2_se, grad_err_se, grad_rel_mse_se,
rskd_mean_distinct); `--plot PATH.png` per-draw error (solid) and bias ± SE (dashed)
against bytes per position on a log axis, one series per family, one panel per student.
Cost (1 thread, V = 49,152, 2,000 draws): ~1.5-2 s per position for each sampled format (the
sampler's passes over [draws, V]: 6 of the 11 default formats), ~0.05 s for a deterministic
one; so ~10 s per position, ~4 min for the default 24 positions (teacher load ~10 s).
Caveat: the synthetic student is the teacher plus noise, so its tail has nearly the teacher's
shape, which is where top-k + bucket is at its best (its bias is ||p_R - r s_R / S_R||).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.cache_format.codec import RECORD_BITS, WeightCodebook, weight_max  # noqa: E402


def _load_bench_estimators():
    """tools/bench_estimators.py as a module (tools/ is not a package)."""
    if "bench_estimators" in sys.modules:
        return sys.modules["bench_estimators"]
    spec = importlib.util.spec_from_file_location("bench_estimators", ROOT / "tools" / "bench_estimators.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_estimators"] = mod     # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


be = _load_bench_estimators()
console = be.console

FAMILIES = ("priority", "topk", "topk+bucket", "rskd")
DEFAULT_FORMATS = ("priority:4", "priority:8", "priority:12", "priority:24", "priority:48",
                   "topk:12", "topk:50", "topk:128", "topk+bucket:12", "topk+bucket:50", "rskd:50")
RECORD_BYTES = RECORD_BITS // 8              # 3: id_bits + w_bits = 24
BUCKET_BITS = 8                              # the bucket's weight byte
TARGET = "unbiased"                          # the loss's default target (self_normalize=False)


@dataclass(frozen=True)
class Format:
    family: str
    param: int

    @property
    def name(self) -> str:
        return f"{self.family}:{self.param}"


def parse_format(spec: str) -> Format:
    """'priority:12', 'topk:50', 'topk+bucket:12' (or 'bucket:12'), 'rskd:50'."""
    fam, _, param = spec.partition(":")
    fam = "topk+bucket" if fam == "bucket" else fam
    try:
        n = int(param)
    except ValueError:
        n = 0
    if fam not in FAMILIES or n < 1:
        raise SystemExit(f"--formats {spec!r}: expected FAMILY:N with FAMILY in {FAMILIES} and N >= 1")
    return Format(fam, n)


def weight_codebook(V: int, U: int = 12) -> WeightCodebook:
    """The cache's weight codebook for vocabulary V (w_bits = 24 - bit_length(V)) and U
    records (its top level is `pipeline.cache_format.codec.weight_max(U)`: 256 at U = 4, 2 from U = 12)."""
    return WeightCodebook(RECORD_BITS - int(V).bit_length(), w_max=weight_max(U))


def format_bytes(fmt: Format, V: int, mean_distinct: float | None = None) -> float:
    """Bytes per position of a format (module docstring); rskd needs its mean distinct count."""
    if fmt.family == "priority":
        return RECORD_BYTES * fmt.param + 1.0
    if fmt.family == "topk":
        return RECORD_BYTES * min(fmt.param, V) + 1.0
    if fmt.family == "topk+bucket":
        return RECORD_BYTES * min(fmt.param, V) + 1.0 + BUCKET_BITS / 8
    if mean_distinct is None:
        raise ValueError("rskd's bytes need the mean number of distinct classes drawn")
    return RECORD_BYTES * mean_distinct + 1.0


# ----------------------------------------------------------------------------- top-k (+ bucket)

def bucket_grad(student_logits: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, r: float) -> torch.Tensor:
    """Dense gradient w.r.t. student logits [V] of L = -sum_{i in K} w_i log s_i - r log S_R,
    K = ids, S_R = sum_{j not in K} s_j. With c = sum w + r:
        dL/dz_i = c s_i - w_i          (i in K)
        dL/dz_j = c s_j - r s_j / S_R  (j not in K)
    (d log s_i = e_i - s, d log S_R = s 1_R / S_R - s); with w = p_K, r = 1 - sum p_K (c = 1):
    s_i - p_i on K and s_j - r s_j / S_R outside."""
    s = torch.softmax(student_logits.double(), -1)
    inK = torch.zeros_like(s, dtype=torch.bool)
    inK[ids] = True
    S_R = s[~inK].sum()
    c = w.double().sum() + r
    g = c * s - (r * s / S_R if S_R > 0 else torch.zeros_like(s))
    g[ids] = c * s[ids] - w.double()
    return g


def sparse_bucket_stats(p: torch.Tensor, s: torch.Tensor, ids: torch.Tensor, W: torch.Tensor,
                        R: torch.Tensor | None = None) -> dict:
    """Gradient statistics of a fixed class set K = ids [k] with per-draw weights W [D, k]
    and optional per-draw bucket weights R [D], for students s [S, V] and teacher p [V]
    (float64). Per draw, g_hat = c s - w on K and c s - R s / S_R outside K (c = sum w + R;
    no bucket: R = 0), so the error e = g_hat - (s - p) is
        e_K = (c - 1) s_K + p_K - w,    e_R = a s_R + p_R,   a = c - 1 - R / S_R,
    and every statistic needs O(k) per draw: ||e_R||^2 = ||a0 s_R + p_R||^2
    + 2 (a - a0) <s_R, a0 s_R + p_R> + (a - a0)^2 ||s_R||^2 around a0 = mean a (one dense
    pass per position; no cancellation when the bucket is nearly exact).

    Returns {"grad": [per student]} with the keys bench_estimators' _Variant.finish gives
    (gg, b2, noise2, split, split_se, mse, err), so be.summarize_grad pools it."""
    D = W.shape[0]
    if D < 4 or D % 2:
        raise ValueError(f"D={D} draws: need an even number >= 4 (two halves)")
    half = D // 2
    inK = torch.zeros_like(p, dtype=torch.bool)
    inK[ids] = True
    pK, sK = p[ids], s[:, ids]                                       # [k], [S, k]
    pR = torch.where(inK, 0.0, p)
    sR = torch.where(inK[None], 0.0, s)                              # [S, V]
    S_R = sR.sum(1)                                                  # [S]
    Rd = torch.zeros(D, dtype=W.dtype) if R is None else R
    c = W.sum(1) + Rd                                                # [D]
    inv = torch.where(S_R > 0, 1.0 / S_R.clamp_min(1e-300), 0.0)     # [S]
    a = (c - 1)[None] - Rd[None] * inv[:, None]                      # [S, D]
    a0 = a.mean(1, keepdim=True)
    d = a - a0                                                       # [S, D]
    t = a0 * sR + pR                                                 # [S, V] e_R at a0
    TT, ST, SS = (t * t).sum(1, keepdim=True), (sR * t).sum(1, keepdim=True), (sR * sR).sum(1, keepdim=True)
    eK = (c - 1)[None, :, None] * sK[:, None] + pK - W[None]         # [S, D, k]
    sq = ((eK * eK).sum(-1) + TT + 2 * d * ST + d * d * SS).clamp_min(0)   # ||e||^2, [S, D]
    gg = ((s - p) ** 2).sum(1)                                       # [S]
    eb, db = eK.mean(1), d.mean(1, keepdim=True)
    b2 = (eb * eb).sum(-1) + (TT + 2 * db * ST + db * db * SS)[:, 0]
    trcov = eK.var(1).sum(-1) + d.var(1) * SS[:, 0]                  # tr Cov(g_hat), D - 1
    vA, dA = eK[:, :half].mean(1), d[:, :half].mean(1, keepdim=True)  # half A's mean error
    dB = d[:, half:]
    x = (eK[:, half:] * vA[:, None]).sum(-1) + TT + (dA + dB) * ST + dA * dB * SS   # [S, D/2]
    out = []
    for j in range(s.shape[0]):
        out.append({"gg": float(gg[j]), "b2": float(b2[j]), "noise2": max(float(trcov[j]), 0.0) / D,
                    "split": float(x[j].mean()), "split_se": float(x[j].std() / math.sqrt(half)),
                    "mse": float(sq[j].mean() / gg[j]), "err": float(sq[j].sqrt().mean() / gg[j].sqrt())})
    return {"grad": out}


def deterministic_draws(p: torch.Tensor, fmt: Format, D: int, quantized: bool,
                        codebook: WeightCodebook, rng: np.random.Generator):
    """(ids [k], W [D, k], R [D] or None) float64 for topk / topk+bucket at p [V] (k <= V).

    fp32: the weights as the sampler gives them (float32), identical in every draw;
    quantized: stochastically rounded per draw, the records onto `codebook`, the bucket's r
    onto the 8-bit codebook."""
    k = min(fmt.param, p.numel())
    ids = torch.topk(p, k).indices
    pK = p[ids]
    if fmt.family == "topk":
        w0, r0 = pK / pK.sum(), None
    else:
        keep = torch.ones_like(p, dtype=torch.bool)
        keep[ids] = False
        w0, r0 = pK, p[keep].sum()                                   # tail summed, not 1 - head
    w32 = w0.float().numpy()
    if quantized:
        W = codebook.decode(codebook.encode(np.broadcast_to(w32, (D, k)), rng))
    else:
        W = np.broadcast_to(w32, (D, k))
    R = None
    if r0 is not None:
        r32 = np.full(D, float(r0), dtype=np.float32)
        bcb = WeightCodebook(BUCKET_BITS)
        R = torch.from_numpy(np.asarray(bcb.decode(bcb.encode(r32, rng)) if quantized else r32, np.float64))
    return ids, torch.from_numpy(np.array(W, dtype=np.float64)), R


# ----------------------------------------------------------------------------- one format

def run_format(z: torch.Tensor, student_logits: torch.Tensor, fmt: Format, draws: int, seed: int) -> dict:
    """Per-position gradient statistics of one format: z [P, V] teacher logits,
    student_logits [S, P, V]. Returns {"pos": [{(quantized, "unbiased"): {"grad": [...]}}],
    "bytes": bytes per position, "mean_distinct": rskd's mean distinct classes or None}.

    priority and rskd go through bench_estimators.position_stats (U = the format's U; rskd
    with U = N so that every distinct drawn class is kept); topk and topk+bucket through
    `sparse_bucket_stats` (any k <= V)."""
    P, V = z.shape
    cb = weight_codebook(V, min(fmt.param, V - 1))
    tag = zlib.crc32(fmt.name.encode())
    gen = torch.Generator().manual_seed(seed * 1_000_003 + tag)
    rng = np.random.default_rng([seed, tag])
    stats: dict = {}
    pos = []
    if fmt.family in ("priority", "rskd"):
        if fmt.param >= V:
            raise SystemExit(f"{fmt.name}: needs {fmt.param} < V = {V}")
        cfg = be.EstConfig(num_classes=fmt.param, draws=draws, seed=seed,
                           rskd_draws=fmt.param if fmt.family == "rskd" else be.EstConfig.rskd_draws,
                           head=min(be.EstConfig.head, fmt.param))
        for i in range(P):
            r = be.position_stats(z[i], student_logits[:, i], fmt.family, cfg, cb, gen, rng, stats)
            pos.append({(q, TARGET): {"grad": r[(q, TARGET)]["grad"]} for q in (False, True)})
    else:
        for i in range(P):
            p = torch.softmax(z[i].double(), 0)
            s = torch.softmax(student_logits[:, i].double(), -1)
            pos.append({(q, TARGET): sparse_bucket_stats(p, s, *deterministic_draws(p, fmt, draws, q, cb, rng))
                        for q in (False, True)})
    mean_distinct = stats["rskd_distinct_sum"] / stats["rskd_positions"] if fmt.family == "rskd" else None
    return {"pos": pos, "bytes": format_bytes(fmt, V, mean_distinct), "mean_distinct": mean_distinct}


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarize(fmt: Format, res: dict, k: int, student: str, quantized: bool, draws: int) -> dict:
    """One output row: student k's pooled statistics (be.summarize_grad) of a format."""
    g = be.summarize_grad(res["pos"], (quantized, TARGET), k)
    b2, b2se = float(g["bias2"]), float(g["bias2_se"])
    return {"format": fmt.name, "family": fmt.family, "param": fmt.param,
            "bytes_per_position": res["bytes"], "grad_bias": g["bias_deb"],
            "grad_bias_se": math.sqrt(abs(b2) + b2se) - math.sqrt(abs(b2)),
            "grad_err": float(g["err"]), "grad_rel_mse": float(g["mse"]), "positions": g["P"], "draws": draws,
            "student": student, "weights": "quantized" if quantized else "fp32",
            "grad_bias_z": _num(g["z"]), "grad_bias2": b2, "grad_bias2_se": b2se,
            "grad_err_se": _num(g["err_se"]), "grad_rel_mse_se": _num(g["mse_se"]),
            "rskd_mean_distinct": res["mean_distinct"]}


def frontier(z: torch.Tensor, specs, formats, draws: int, seed: int, quantized: bool = True) -> list[dict]:
    """All rows: z [P, V] teacher logits, specs [(name, temp, noise)] students (as
    bench_estimators makes them), formats [Format]; sorted by family, then bytes."""
    students = be.make_students(z, specs, seed)
    rows = []
    for fmt in formats:
        t0 = time.perf_counter()
        res = run_format(z, students, fmt, draws, seed)
        rows += [summarize(fmt, res, k, name, quantized, draws) for k, (name, _, _) in enumerate(specs)]
        console.log(f"{fmt.name}: {z.shape[0]} positions x {draws} draws in {time.perf_counter() - t0:.1f} s")
    fam, stu = {f: i for i, f in enumerate(FAMILIES)}, {n: i for i, (n, _, _) in enumerate(specs)}
    return sorted(rows, key=lambda r: (stu[r["student"]], fam[r["family"]], r["bytes_per_position"]))


# ----------------------------------------------------------------------------- report

def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    multi = len({r["student"] for r in rows}) > 1
    cols = (["student"] if multi else []) + ["format", "bytes/position", "bias ± SE", "z",
                                             "per-draw rel err ± SE", "rel MSE ± SE"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("student", "format") else "right")
    group = None
    for r in rows:
        if group is not None and (r["student"], r["family"]) != group:
            t.add_section()
        group = (r["student"], r["family"])
        z = r["grad_bias_z"]
        nan = lambda x: math.nan if x is None else x                  # noqa: E731
        cells = ([r["student"]] if multi else []) + [
            r["format"] + (f" ({r['rskd_mean_distinct']:.1f} distinct)" if r["family"] == "rskd" else ""),
            f"{r['bytes_per_position']:.1f}", be._pm(r["grad_bias"], r["grad_bias_se"]),
            "exact" if z is None else f"{z:.1f}", be._pm(r["grad_err"], nan(r["grad_err_se"]), ".3f"),
            be._pm(r["grad_rel_mse"], nan(r["grad_rel_mse_se"]))]
        t.add_row(*cells)
    return t


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    students = list(dict.fromkeys(r["student"] for r in rows))
    fig, axes = plt.subplots(1, len(students), figsize=(7.5 * len(students), 5.2), squeeze=False,
                             constrained_layout=True)
    colors = dict(zip(FAMILIES, ("tab:blue", "tab:red", "tab:orange", "tab:green")))
    for ax, st in zip(axes[0], students):
        for fam in FAMILIES:
            rs = sorted((r for r in rows if r["student"] == st and r["family"] == fam),
                        key=lambda r: r["bytes_per_position"])
            if not rs:
                continue
            x = [r["bytes_per_position"] for r in rs]
            ax.plot(x, [r["grad_err"] for r in rs], "-o", color=colors[fam], label=f"{fam}: per-draw error")
            ax.errorbar(x, [r["grad_bias"] for r in rs], yerr=[r["grad_bias_se"] for r in rs], fmt="--s",
                        mfc="none", color=colors[fam], capsize=3, label=f"{fam}: bias")
            for r in rs:
                ax.annotate(str(r["param"]), (r["bytes_per_position"], r["grad_err"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        ax.xaxis.set_major_locator(FixedLocator([t for t in (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
                                                 if lo <= t <= hi]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set(xlabel="bytes per position (log)", ylabel="relative to ||s - p|| (full KD)",
               title=f"{title}\nstudent {st}")
        ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def read_texts(path: Path) -> list[str]:
    """JSONL of {"text": ...} (one document a line) or a plain text file."""
    if not path.exists():
        raise SystemExit(f"{path}: no such file")
    raw = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(x)["text"] for x in raw.splitlines() if x.strip()]
    return [raw]


def teacher_logits(args) -> tuple[torch.Tensor, str]:
    """[positions, V] teacher logits: a seeded random subset of --lm-positions positions."""
    texts = read_texts(args.heldout)
    if args.teacher == "none":
        model, tok = be.tiny_trained_lm(read_texts(args.train), args.tiny_steps, args.seed)
        name = "tiny-llama (trained)"
    else:
        if not (args.teacher / "config.json").exists():
            raise SystemExit(f"--teacher {args.teacher}: no config.json there (an HF model dir, or 'none')")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args.teacher)
        t = args.teacher.resolve()
        name = str(t.relative_to(ROOT)) if t.is_relative_to(ROOT) else str(t)
    z_all = be.lm_logits(model, tok, texts, args.lm_positions, args.skip)
    pick = torch.randperm(z_all.shape[0], generator=torch.Generator().manual_seed(args.seed))
    return z_all[pick[: args.positions]].contiguous(), name


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(ROOT / "assets_cache" / "teacher"),
                    help="HF model dir, or 'none' = the tiny LM trained here")
    ap.add_argument("--heldout", type=Path, default=ROOT / "assets_cache" / "corpus" / "heldout.jsonl",
                    help="held-out text (JSONL of {'text': ...}, or plain text)")
    ap.add_argument("--train", type=Path, default=ROOT / "assets_cache" / "corpus" / "train.jsonl",
                    help="training text of the tiny LM (--teacher none only)")
    ap.add_argument("--tiny-steps", type=int, default=300, help="training steps of the tiny LM")
    ap.add_argument("--positions", type=int, default=24, help="LM positions in the Monte-Carlo")
    ap.add_argument("--lm-positions", type=int, default=256,
                    help="LM positions whose logits are computed (the MC uses a random subset)")
    ap.add_argument("--skip", type=int, default=32, help="leading positions of a window skipped")
    ap.add_argument("--draws", type=int, default=2000, help="draws per position and format (even)")
    ap.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS), metavar="FAMILY:N",
                    help=f"subset or other sizes; families {', '.join(FAMILIES)}")
    ap.add_argument("--student", action="append", default=None,
                    help="NAME:TEMP:NOISE, repeatable (default near:1.0:0.5)")
    ap.add_argument("--weights", choices=("quantized", "fp32"), default="quantized",
                    help="report the cache's quantized weights (default) or the fp32 ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here (a JSON list)")
    ap.add_argument("--plot", type=Path, default=None, metavar="PATH.png", help="write the frontier plot")
    args = ap.parse_args(argv)
    args.teacher = args.teacher if args.teacher == "none" else Path(args.teacher)
    formats = list(dict.fromkeys(parse_format(f) for f in args.formats))
    specs = [be.parse_student(s) for s in (args.student or ["near:1.0:0.5"])]
    if len({s[0] for s in specs}) != len(specs):
        raise SystemExit(f"--student names must be unique: {[s[0] for s in specs]}")
    if not 1 <= args.positions <= args.lm_positions:
        raise SystemExit(f"--positions {args.positions}: need 1 <= positions <= "
                         f"--lm-positions {args.lm_positions}")
    if args.draws < 4 or args.draws % 2:
        raise SystemExit(f"--draws {args.draws}: need an even number >= 4 (two halves)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()

    z, name = teacher_logits(args)
    P, V = z.shape
    H = -(torch.softmax(z.double(), -1) * torch.log_softmax(z.double(), -1)).sum(-1)
    console.log(f"teacher {name}: V = {V:,}, w_bits = {weight_codebook(V).w_bits}, {P} positions, "
                f"entropy mean {H.mean():.2f} [median {H.median():.2f}] nats")
    quantized = args.weights == "quantized"
    rows = frontier(z, specs, formats, args.draws, args.seed, quantized)

    wdesc = (f"{weight_codebook(V).w_bits}-bit quantized weights (bucket byte {BUCKET_BITS}-bit)"
             if quantized else "fp32 weights")
    title = (f"fidelity frontier, teacher {name} (V = {V:,}), {P} positions x {args.draws} draws, "
             f"{wdesc}, unbiased target; gradient errors relative to ||s - p||, pooled over positions")
    st = "; ".join(f"{n} = softmax(z/{t:g} + {s:g}·N(0,1))" for n, t, s in specs)
    console.print(table(rows, f"{title}\nstudent {st}"))
    console.print(f"{torch.get_num_threads()} threads, wall {time.perf_counter() - t_start:.0f} s, "
                  f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot, f"teacher {name} (V = {V:,}), {P} positions x {args.draws} draws\n{wdesc}")
    return rows


if __name__ == "__main__":
    main()
