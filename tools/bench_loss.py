"""Loss cost side by side: dense KD on all positions vs sparse KD vs sampled softmax KD.

    python tools/bench_loss.py                      # V=151,936, T=1,024, H=512, 25%, M=1,024

Cases (fp32, CPU, student hidden states h [T, H] and lm_head weight W [V, H] are leaves):
  (a)   dense_kd(lm_head(h), teacher_logits) on all T positions
  (b)   sparse_kd_linear(h[sel], W, ids, p_hat) on 25% of positions: the sparse KD of
        pipeline.distill (its default --kd-head fused): chunked, gradients made in forward,
        the [N, V] logits and their gradient never exist
  (b1)  sparse_kd(lm_head(h[sel]), ids, p_hat): the same loss on materialized logits
        (distill's --kd-head logits, and its path when CE shares the selected rows)
  (b')  (b1)'s loss through plain autograd (logsumexp + gather): what the hand-written
        backward of `sparse_kd` saves
  (c)   sampled_softmax_kd(h[sel], W, ids, p_hat, M) on the same rows
  (c2)  the same with exact_ids = the K classes with the most cached mass (stratified)
Time = forward + backward of the case; rounds run every case once (order rotating, one
warm-up round), so load from other processes on the CPU falls on all cases alike; the
table gives medians over --repeats rounds. Inputs (h, W, teacher logits for (a), cache
targets) exist before timing and are not counted.

Peak memory: each case runs in its own subprocess with MALLOC_MMAP_THRESHOLD_=65536, so
every tensor of 64 KiB or more is its own mmap and goes back to the OS when freed (RSS
follows live tensors). Before each repeat the process resets its peak RSS (writes 5 to
/proc/self/clear_refs, Linux >= 4.0); peak = VmHWM - VmRSS at the start of the repeat,
read from /proc/self/status: everything the case allocates, including the [V, H] weight
gradient (params' .grad is set to None before each repeat, as zero_grad does).

Bias of (c) and (c2) against (b): the same selected rows and cache targets, R draws of the
M shared negatives; relative error of the loss and of d loss / d h[sel], both of the mean over draws
(bias) and per draw (bias + noise). Problem (`make_problem`): class log-frequencies follow
a Zipf law (exponent 1.1); each position boosts K=4 plausible classes by a random margin
(so teacher entropies spread from ~0 to several nats); the student (h, W) reproduces the
prior and the boosts with noise, as a partly trained student would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.stage2_distill.losses import (  # noqa: E402
    dense_kd,
    sparse_kd,
    sparse_kd_linear,
)
from pipeline.stage2_distill.sampled_softmax import sampled_softmax_kd  # noqa: E402
from pipeline.stage1_cache.class_sampler import sample_classes  # noqa: E402

CASES = ("dense", "sparse_linear", "sparse", "sparse_autograd", "sampled", "sampled_exact")
LABELS = {
    "dense": "(a) dense_kd(lm_head(h)), all rows",
    "sparse_linear": "(b) sparse_kd_linear(h[sel], W) (distill's KD head)",
    "sparse": "(b1) sparse_kd(lm_head(h[sel]))",
    "sparse_autograd": "(b') (b1)'s loss, plain autograd",
    "sampled": "(c) sampled_softmax_kd(h[sel], W)",
    "sampled_exact": "(c2) same + exact_ids (K most cached)",
}


def make_problem(vocab: int, positions: int, hidden: int, seed: int, k: int = 4):
    """(h [T, H], W [V, H], teacher_logits [T, V]) with Zipf-like, peaked distributions."""
    g = torch.Generator().manual_seed(seed)
    log_freq = -1.1 * torch.log1p(torch.randperm(vocab, generator=g).float())  # Zipf prior
    r = torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)
    u = torch.randn(hidden, generator=g)
    u /= u.norm()
    r -= (r @ u)[:, None] * u  # random part orthogonal to the prior direction u
    weight = r + log_freq[:, None] * u  # z_j = h . r_j + log_freq_j * (h . u)
    # K plausible next tokens per position, drawn from the prior, boosted by a margin
    # whose scale varies per position: some positions are near-certain, some are not.
    plausible = torch.multinomial(torch.softmax(log_freq, 0), positions * k, replacement=True,
                                  generator=g).view(positions, k)
    scale = torch.rand(positions, 1, generator=g) * 14 + 2
    margin = scale * torch.rand(positions, k, generator=g).sort(1, descending=True).values
    rows = r[plausible]  # [T, K, H]
    h = u + (margin[:, :, None] * rows / rows.pow(2).sum(-1, keepdim=True)).sum(1)
    h += 0.02 * torch.randn(positions, hidden, generator=g)  # the student's own noise
    teacher = log_freq.expand(positions, vocab).clone()
    teacher.scatter_add_(1, plausible, margin + 1.5 * torch.randn(positions, k, generator=g))
    teacher += torch.randn(positions, vocab, generator=g)
    return h, weight, teacher


def _mem() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, rest = line.split(":")
                vals[key] = int(rest.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cache_head(args, teacher: torch.Tensor) -> torch.Tensor:
    """`exact_ids` for the stratified estimator: the K classes with the most cached mass
    (sum of p_hat over all T positions), as a pass over the cache would find them."""
    ids, w, _ = sample_classes(teacher, 12, "priority", torch.Generator().manual_seed(args.seed + 5))
    ok = ids < args.vocab
    mass = torch.zeros(args.vocab).index_add_(0, ids[ok], w[ok])
    return torch.argsort(mass, descending=True)[: args.exact]


def _setup(args, case: str):
    """(h, W, aux, sel, ids, p_hat, entropy); aux = the teacher logits for (a), exact_ids
    for (c2), None otherwise (the cache replaces the teacher: its logits are not in memory)."""
    h, weight, teacher = make_problem(args.vocab, args.positions, args.hidden, args.seed)
    n_sel = int(round(args.fraction * args.positions))
    sel = torch.randperm(args.positions, generator=torch.Generator().manual_seed(args.seed + 1))
    sel = sel[:n_sel].sort().values
    ids, w, entropy = sample_classes(teacher[sel], 12, "priority",
                                     torch.Generator().manual_seed(args.seed + 2))
    aux = None
    if case == "dense":
        aux = teacher
    elif case == "sampled_exact":
        aux = _cache_head(args, teacher)
    del teacher
    return h.requires_grad_(), weight.requires_grad_(), aux, sel, ids, w, entropy


def _step(case, args, h, weight, aux, sel, ids, w, gen):
    if case == "dense":
        loss, count = dense_kd(F.linear(h, weight), aux)
    elif case == "sparse":
        loss, count = sparse_kd(F.linear(h[sel], weight), ids, w)
    elif case == "sparse_linear":
        loss, count = sparse_kd_linear(h[sel], weight, ids, w)
    elif case == "sparse_autograd":
        z = F.linear(h[sel], weight)
        valid = ids < z.shape[1]
        idx, wv = torch.where(valid, ids, 0), torch.where(valid, w, 0.0)
        lse = torch.logsumexp(z.float(), 1)
        loss = (wv.sum(1) * lse - (wv * z.gather(1, idx)).sum(1)).sum()
        count = valid.any(1).sum()
    elif case == "sampled_exact":
        loss, count = sampled_softmax_kd(h[sel], weight, ids, w, args.negatives, gen,
                                         exact_ids=aux)
    else:
        loss, count = sampled_softmax_kd(h[sel], weight, ids, w, args.negatives, gen)
    (loss / count).backward()


def worker(args, case: str) -> None:
    """Set the case up, then one timed fwd+bwd per "run" line on stdin, a JSON line each."""
    torch.manual_seed(args.seed)
    h, weight, aux, sel, ids, w, _ = _setup(args, case)
    gen = torch.Generator().manual_seed(args.seed + 3)
    print(json.dumps({"ready": case}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        h.grad = weight.grad = None
        _reset_peak()
        rss0, _ = _mem()
        t0 = time.perf_counter()
        _step(case, args, h, weight, aux, sel, ids, w, gen)
        dt = time.perf_counter() - t0
        _, hwm = _mem()
        print(json.dumps({"time_s": dt, "peak_bytes": hwm - rss0}), flush=True)


def bias(args) -> tuple[dict, list[dict]]:
    """Error of (c) against (b) at several M over --draws draws of the negatives.

    Rows: (K exact classes, M uniform negatives); K = 0 is the plain estimator (c). Per row:
    `bias` = |mean over draws - exact| (the loss: its standard error beside it; the
    gradient: sqrt(||mean - exact||^2 - tr(Cov)/R), the squared norm of the mean's error
    less its expected noise), and `err/draw` = mean over draws of |draw - exact|; all
    relative to |exact| or ||exact||. Context: the same for (b) against dense KD (one cache
    draw against the full teacher: the noise the cache itself adds).
    """
    h, weight, teacher, sel, ids, w, entropy = _setup(args, "dense")
    weight = weight.detach()
    hs = h.detach()[sel].clone().requires_grad_()
    exact, _ = sparse_kd(F.linear(hs, weight), ids, w)
    (g_exact,) = torch.autograd.grad(exact, hs)
    dense, _ = dense_kd(F.linear(hs, weight), teacher[sel])
    (g_dense,) = torch.autograd.grad(dense, hs)
    with torch.no_grad():  # how much student mass the cached classes hold: what M must cover
        valid = ids < args.vocab
        s_in = torch.softmax(F.linear(hs, weight), 1).gather(1, torch.where(valid, ids, 0))
    context = {
        "teacher_entropy": entropy.mean().item(),
        "kl": dense.item() / len(sel),
        "student_mass_in_S": (s_in * valid).sum(1).mean().item(),
        "cache_grad_err": ((g_exact - g_dense).norm() / g_dense.norm()).item(),
        "cache_loss_err": abs(exact.item() - entropy.sum().item() - dense.item()) / dense.item(),
    }
    head = _cache_head(args, teacher)
    out = []
    for k, m in [(0, 256), (0, args.negatives), (0, 4 * args.negatives),
                 (args.exact, 256), (args.exact, args.negatives)]:
        gen = torch.Generator().manual_seed(args.seed + 4)
        losses, grads = [], []
        for _ in range(args.draws):
            loss, _ = sampled_softmax_kd(hs, weight, ids, w, m, gen, exact_ids=head if k else None)
            (g,) = torch.autograd.grad(loss, hs)
            losses.append(loss.item())
            grads.append(g)
        gs, ls, ex = torch.stack(grads).double(), torch.tensor(losses, dtype=torch.float64), exact.item()
        r, gnorm = len(losses), g_exact.norm().item()
        noise = (gs - gs.mean(0)).pow(2).sum() / (r - 1) / r
        out.append({
            "K": k,
            "M": m,
            "loss_bias": abs(ls.mean().item() - ex) / abs(ex),
            "loss_se": (ls.std() / r**0.5).item() / abs(ex),
            "loss_err": (ls - ex).abs().mean().item() / abs(ex),
            "grad_bias": max(0.0, ((gs.mean(0) - g_exact).pow(2).sum() - noise).item()) ** 0.5 / gnorm,
            "grad_err": (gs - g_exact).flatten(1).norm(dim=1).mean().item() / gnorm,
        })
    return context, out


def _child(args, case: str) -> subprocess.Popen:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--worker", case] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker"
    ]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read(proc: subprocess.Popen, case: str):
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"bench case {case} exited with {proc.wait()} (see its stderr above)")
    return json.loads(line)


def measure(args) -> dict[str, dict]:
    """Interleaved repeats: round r runs every case once (rotating the order), so load from
    other processes on the 2 cores falls on all cases alike. One warm-up round first."""
    procs = {}
    for case in CASES:  # set up one at a time: each setup briefly holds ~2 GB
        procs[case] = _child(args, case)
        _read(procs[case], case)
    runs = {case: [] for case in CASES}
    for rnd in range(args.repeats + 1):
        k = rnd % len(CASES)
        for case in CASES[k:] + CASES[:k]:
            procs[case].stdin.write("run\n")
            procs[case].stdin.flush()
            res = _read(procs[case], case)
            if rnd:
                runs[case].append(res)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return {case: {"time_s": statistics.median(r["time_s"] for r in rs),
                   "peak_bytes": statistics.median(r["peak_bytes"] for r in rs),
                   "times": [r["time_s"] for r in rs]} for case, rs in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--positions", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--negatives", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--exact", type=int, default=1024,
                   help="K most cached classes computed exactly in the stratified rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=CASES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args, args.worker)
        return

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    res = measure(args)
    a = res["dense"]
    table = Table(title=f"fwd+bwd, V={args.vocab:,} T={args.positions} H={args.hidden} "
                        f"fraction={args.fraction} M={args.negatives}, {torch.get_num_threads()} "
                        f"threads, median of {args.repeats}")
    for col in ("case", "time s", "a/x time", "peak MiB", "x/a peak"):
        table.add_column(col, justify="right" if col != "case" else "left")
    for case in CASES:
        r = res[case]
        table.add_row(escape(LABELS[case]), f"{r['time_s']:.4f}", f"{a['time_s'] / r['time_s']:.1f}x",
                      f"{r['peak_bytes'] / 2**20:.0f}", f"{100 * r['peak_bytes'] / a['peak_bytes']:.1f}%")
    ctx, rows = bias(args)
    bt = Table(title=f"(c), (c2) against (b), same rows and cache targets, {args.draws} draws of the "
                     f"negatives; relative errors")
    for col in ("exact K", "M", "loss bias (se)", "loss err/draw", "grad_h bias", "grad_h err/draw"):
        bt.add_column(col, justify="right")
    for r in rows:
        bt.add_row(str(r["K"]), str(r["M"]), f"{r['loss_bias']:.2e} ({r['loss_se']:.1e})", f"{r['loss_err']:.2e}",
                   f"{r['grad_bias']:.2e}", f"{r['grad_err']:.2e}")
    console = Console()
    console.print(table)
    console.print(bt)
    console.print(f"problem: mean teacher entropy {ctx['teacher_entropy']:.2f} nats, dense KL "
                  f"{ctx['kl']:.2f} nats/position, student mass on the cached classes "
                  f"{ctx['student_mass_in_S']:.3f}; for scale, (b) against dense KD (one cache "
                  f"draw): KL estimate rel. err {ctx['cache_loss_err']:.2e}, grad_h rel. err "
                  f"{ctx['cache_grad_err']:.2e}")
    b, b1, c = res["sparse_linear"], res["sparse"], res["sampled"]
    console.print(f"targets: a/b time {a['time_s'] / b['time_s']:.1f}x (>= 3x; b1: "
                  f"{a['time_s'] / b1['time_s']:.1f}x), b peak {100 * b['peak_bytes'] / a['peak_bytes']:.1f}% "
                  f"of a (<= 35%; b1: {100 * b1['peak_bytes'] / a['peak_bytes']:.1f}%), a/c time "
                  f"{a['time_s'] / c['time_s']:.1f}x (>= 20x)")


if __name__ == "__main__":
    main()
