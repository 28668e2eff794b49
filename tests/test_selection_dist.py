"""Position selection inside the real 2-rank ZeRO-3 distillation (pipeline.distill) on CPU.

ONE `torchrun --nproc_per_node 2` launch of a test-only driver calls `pipeline.stage2_distill.trainer.run`
for every job below (process start-up dominates on 2 cores); tiny Llama models (hidden 32,
1 layer), a 16-window cache of 32 positions (8 steps per epoch per rank at micro-batch 1).

1. Every rule once and every score once, 2 steps each: topk/kl, topk/combined,
   percentile_band(50,100)/student_entropy, positional/student_ce, gls/teacher_entropy,
   gls/random, learned linucb, learned mlp, all.
2. GLS over 2 ranks: with --log-all-ranks, each step's threshold is bit-identical on both
   ranks and equals an independent single-process reference: a Python FIFO of the
   concatenated per-step scores (rank 0's, then rank 1's) and `np.quantile(.., 1 - frac,
   method="linear")`. The teacher_entropy scores are the cached entropies of the windows
   `CacheReader(cache, r, 2, 1, seed)` hands rank r; the random scores are each rank's
   `torch.rand` stream.
3. Resume: the GLS run (10 steps, crossing an epoch, checkpoint every 4) is copied and its
   `ckpt/latest` rewound to step 4 (what a kill -9 after that checkpoint leaves); `--resume`
   to step 10 must reproduce every threshold bit for bit. The saved FIFOs
   (`ckpt/<tag>/rank{r:04d}_state.pt`) equal the reference FIFO at their step.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_runs import DRIVERS, DS_TEST, ENV, REPO, TEXTS, TIMEOUT, torchrun

SEQ, WINDOWS, SHARD = 32, 16, 4          # 4 shards, 2 per rank: 8 windows = 8 steps per epoch
FRAC, LR = 0.25, 1e-3
POS = SEQ * 2                            # positions per step (micro 1 x T x world 2)
K = math.ceil(FRAC * SEQ)                # top-k per sequence
GLS_STEPS, GLS_QUEUE, GLS_WARMUP, GLS_CKPT, REWIND = 10, 160, 128, 4, 4  # Q: not a multiple of POS

# name -> flags; every rule once and every score once (learned/all ignore --select-score)
POLICIES: dict[str, dict] = {
    "topk_kl": dict(select="topk", select_score="kl"),
    "topk_combined": dict(select="topk", select_score="combined"),
    "band_student_entropy": dict(select="percentile_band", select_score="student_entropy",
                                 select_band=[50, 100]),
    "positional_student_ce": dict(select="positional", select_score="student_ce"),
    "gls_teacher_entropy": dict(select="gls", select_score="teacher_entropy", steps=GLS_STEPS,
                                gls_queue=GLS_QUEUE, gls_warmup=GLS_WARMUP, checkpoint_every=GLS_CKPT),
    "gls_random": dict(select="gls", select_score="random", gls_queue=GLS_QUEUE, gls_warmup=POS),
    "learned_linucb": dict(select="learned", learned_kind="linucb"),
    "learned_mlp": dict(select="learned", learned_kind="mlp"),
    "all": dict(select="all"),
}
TEACHER_SHARPEN = 10.0
GLS = "gls_teacher_entropy"
RESUMED = "gls_resumed"


def sharpen(model_dir: Path, factor: float) -> None:
    """Scale the final norm's weight (= the logits) of a saved model by `factor`, in place.

    A randomly initialised tiny LM is near uniform: every cached entropy falls on the same
    codebook level (ln V), which makes a GLS threshold test vacuous. Times 10 spreads the
    entropies over about 1.8 to 5.5 nats, i.e. dozens of levels.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    model.save_pretrained(model_dir, safe_serialization=True)


def argv(a: dict, out: Path, **flags) -> list[str]:
    opts = {"student": a["student"], "cache": a["cache"], "out": out, "deepspeed": DS_TEST,
            "steps": 2, "lr": LR, "select_frac": FRAC, "checkpoint_every": 0,
            "log_all_ranks": True, "export": False, **flags}
    out_argv = []
    for k, v in opts.items():
        flag = f"--{k.replace('_', '-')}"
        if isinstance(v, bool):
            out_argv.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif isinstance(v, list):
            out_argv += [flag, *map(str, v)]
        else:
            out_argv += [flag, str(v)]
    return out_argv


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Assets, then the one driver launch; returns paths, the driver's results and its log."""
    from pipeline.stage1_cache import run as cache
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("selection_dist")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    kw = dict(arch="llama", hidden=32, layers=1, heads=4, texts=TEXTS)
    teacher = build_tiny_model(root / "teacher", seed=0, **kw)
    sharpen(teacher, TEACHER_SHARPEN)
    student = build_tiny_model(root / "student", seed=1, **kw)
    cache.main(["--teacher", str(teacher), "--data", str(data), "--out", str(root / "cache"),
                "--seq-len", str(SEQ), "--max-windows", str(WINDOWS), "--shard-samples", str(SHARD)])
    a = {"root": root, "student": student, "cache": root / "cache"}
    jobs = [{"name": n, "argv": argv(a, root / n, **f)} for n, f in POLICIES.items()]
    jobs.append({"rewind": [str(root / GLS), str(root / RESUMED), f"step{REWIND:08d}"]})
    jobs.append({"name": RESUMED, "argv": argv(a, root / RESUMED, **POLICIES[GLS], resume=True)})
    spec = root / "driver.json"
    spec.write_text(json.dumps({"jobs": jobs, "result": str(root / "result.json")}, default=str))
    proc = subprocess.run(torchrun([str(DRIVERS / "distill_jobs.py"), str(spec)]), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = {r["name"]: r for r in json.loads((root / "result.json").read_text())}
    return {**a, "results": results, "log": proc.stderr}


def rank_metrics(run: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (run / f"metrics-rank{rank}.jsonl").read_text().splitlines() if x]


def rank_state(run: Path, step: int, rank: int) -> dict:
    path = run / "ckpt" / f"step{step:08d}" / f"rank{rank:04d}_state.pt"
    return torch.load(path, weights_only=True)["selector"]


# ------------------------------------------------------------------ independent references
def entropy_scores(cache: Path, steps: int, seed: int = 0) -> tuple[list[np.ndarray], list[list[str]]]:
    """Per step: the global batch's cached entropies [2*T] (rank 0's window, then rank 1's,
    row-major) and the window keys, epoch after epoch, as each rank's reader yields them."""
    from pipeline.cache_format.reader import CacheReader

    readers = [CacheReader(cache, r, 2, micro_batch=1, seed=seed) for r in range(2)]
    scores, keys, epoch = [], [], 0
    while len(scores) < steps:
        for pair in zip(*(rd.batches(epoch) for rd in readers)):
            scores.append(np.concatenate([b.entropy.numpy().astype(np.float64).ravel() for b in pair]))
            keys.append([k for b in pair for k in b.keys])
        epoch += 1
    return scores[:steps], keys[:steps]


def random_scores(steps: int, seed: int = 0) -> list[np.ndarray]:
    """Per step: each rank's U[0,1) scores [1,T] from its own stream, rank order."""
    from pipeline.stage2_distill.selection import rank_seed

    gens = [torch.Generator().manual_seed(rank_seed(seed, r)) for r in range(2)]
    return [np.concatenate([torch.rand((1, SEQ), generator=g).double().numpy().ravel() for g in gens])
            for _ in range(steps)]


def gls_reference(step_scores: list[np.ndarray], queue: int, warmup: int, frac: float):
    """Plain FIFO + np.quantile. Per step: (threshold or None, selected fraction, FIFO), the
    fraction as a closed interval: positions above the threshold always count, positions
    tied with it count with probability p = (frac |FIFO| - #FIFO above) / #FIFO tied, so the
    fraction is exact when p is 0 or 1 (or nothing ties) and lies between the bounds else."""
    fifo: list[float] = []
    seen, out = 0, []
    for s in step_scores:
        fifo = (fifo + [float(np.float32(x)) for x in s])[-queue:]
        seen += len(s)
        if seen < warmup:               # warm-up: per-sequence top-k, no threshold
            out.append((None, (frac, frac), list(fifo)))
            continue
        f = np.asarray(fifo, dtype=np.float64)
        thr = float(np.quantile(f, 1.0 - frac, method="linear"))
        s64 = np.asarray(s, dtype=np.float64)
        above, tied = int((s64 > thr).sum()), int((s64 == thr).sum())
        p = (frac * f.size - int((f > thr).sum())) / max(int((f == thr).sum()), 1)
        lo = above + (tied if p >= 1 else 0)
        hi = above + (tied if p > 0 else 0)
        out.append((thr, (lo / len(s), hi / len(s)), list(fifo)))
    return out


# ------------------------------------------------------------------ 1. every policy runs
@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_runs_in_two_rank_zero3(runs, name):
    r = runs["results"][name]
    assert r["ok"], r.get("error")
    run = runs["root"] / name
    recs = [rank_metrics(run, rank) for rank in (0, 1)]
    steps = POLICIES[name].get("steps", 2)
    assert [x["step"] for x in recs[0]] == list(range(1, steps + 1))
    for a, b in zip(*recs):               # global quantities: identical on both ranks
        for k in ("loss", "kd_loss", "kl_est", "selected_frac", "select_threshold", "keys"):
            assert a[k] == b[k], (k, a[k], b[k])
        assert all(math.isfinite(a[k]) for k in ("loss", "kd_loss", "kl_est")), a
        assert a["loss"] > 0 and a["loss"] == pytest.approx(a["kd_loss"], abs=1e-6)
        f = a["selected_frac"]
        rule = POLICIES[name]["select"]
        if rule in ("topk", "positional", "learned"):
            assert f == K / SEQ, a        # exactly ceil(frac*T) per sequence
        elif rule == "percentile_band":   # scores in [median, max]: half (ties could add a few)
            assert 0.5 <= f <= 0.5 + 2 / SEQ, a
        elif rule == "all":
            assert f == 1.0, a
        else:                             # gls: exact values are checked below
            assert 0 < f <= 1, a
    if POLICIES[name]["select"] != "gls":
        assert all(x["select_threshold"] is None for x in recs[0])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", ["learned_linucb", "learned_mlp", GLS, "gls_random"])
def test_selector_state_is_identical_on_both_ranks(runs, name):
    """The GLS FIFO and the learned model are replicated; checkpointed per rank, they match."""
    steps = POLICIES[name].get("steps", 2)
    s0, s1 = (rank_state(runs["root"] / name, steps, r) for r in (0, 1))
    key = "learned" if name.startswith("learned") else "gls"
    assert s0[key] is not None and s1[key] is not None
    if key == "gls":
        assert torch.equal(s0["gls"]["buf"], s1["gls"]["buf"]) and s0["gls"]["seen"] == steps * POS
        return
    assert s0["learned"]["updates"] == s1["learned"]["updates"] == steps
    # linucb: the ridge statistics A, b; mlp: the network's weights (the optimizer follows them)
    p0, p1 = ({"A": s["learned"]["A"], "b": s["learned"]["b"]} if name == "learned_linucb"
              else s["learned"]["mlp"] for s in (s0, s1))
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    if name == "learned_linucb":   # it did learn from both steps' gathered losses
        assert s0["learned"]["b"].abs().sum() > 0


# ------------------------------------------------------------------ 2. GLS threshold over 2 ranks
@pytest.mark.dist
@pytest.mark.slow
def test_gls_threshold_is_global_and_matches_single_process_reference(runs):
    run = runs["root"] / GLS
    recs = [rank_metrics(run, r) for r in (0, 1)]
    scores, keys = entropy_scores(runs["cache"], GLS_STEPS)
    ref = gls_reference(scores, GLS_QUEUE, GLS_WARMUP, FRAC)
    assert [x["keys"] for x in recs[0]] == keys                       # the reference saw these windows
    assert [x["rank_keys"] for x in recs[1]] == [k[1:] for k in keys]
    assert {x["epoch"] for x in recs[0]} == {0, 1}                    # crossed an epoch
    n_tie_steps = 0
    for step, (r0, r1, (thr, (lo, hi), _)) in enumerate(zip(*recs, ref), 1):
        assert r0["select_threshold"] == r1["select_threshold"] == thr, (step, r0, r1, thr)
        assert r0["selected_frac"] == r1["selected_frac"], (step, r0, r1)   # a global value
        assert lo <= r0["selected_frac"] <= hi, (step, r0["selected_frac"], lo, hi)
        n_tie_steps += lo < hi
    assert n_tie_steps < len(ref)                  # some steps pin the fraction exactly
    assert recs[0][0]["select_threshold"] is None                     # warm-up: per-sequence top-k
    assert all(x["select_threshold"] is not None for x in recs[0][1:])
    assert len({x["select_threshold"] for x in recs[0][1:]}) > 1      # the FIFO moved


@pytest.mark.dist
@pytest.mark.slow
def test_gls_random_scores_are_gathered_across_ranks(runs):
    """Per-rank random streams differ, so equal thresholds need the all-gather."""
    recs = [rank_metrics(runs["root"] / "gls_random", r) for r in (0, 1)]
    ref = gls_reference(random_scores(2), GLS_QUEUE, POS, FRAC)
    for r0, r1, (thr, (lo, hi), _) in zip(*recs, ref):
        assert thr is not None
        assert r0["select_threshold"] == r1["select_threshold"] == thr
        assert lo <= r0["selected_frac"] <= hi and hi - lo < 0.01   # continuous: ties are rare


# ------------------------------------------------------------------ 3. checkpoint / resume
@pytest.mark.dist
@pytest.mark.slow
def test_saved_gls_fifo_equals_reference_fifo(runs):
    run = runs["root"] / GLS
    ref = gls_reference(entropy_scores(runs["cache"], GLS_STEPS)[0], GLS_QUEUE, GLS_WARMUP, FRAC)
    tags = sorted(p.name for p in (run / "ckpt").glob("step*"))
    assert tags == [f"step{s:08d}" for s in (4, 8, 10)]
    for step in (4, 8, 10):
        want = torch.tensor(ref[step - 1][2], dtype=torch.float32)
        assert want.shape[0] == min(GLS_QUEUE, step * POS)
        for rank in (0, 1):
            g = rank_state(run, step, rank)["gls"]
            assert g["seen"] == step * POS and g["capacity"] == GLS_QUEUE
            assert g["buf"].dtype == torch.float32 and torch.equal(g["buf"], want), (step, rank)


@pytest.mark.dist
@pytest.mark.slow
def test_resume_restores_gls_fifo_and_reproduces_thresholds(runs):
    assert runs["results"][RESUMED]["ok"], runs["results"][RESUMED].get("error")
    m = re.search(r"resumed from \S+ at step (\d+)", runs["log"])
    assert m and int(m.group(1)) == REWIND, runs["log"][-4000:]
    for rank in (0, 1):
        got, ref = rank_metrics(runs["root"] / RESUMED, rank), rank_metrics(runs["root"] / GLS, rank)
        assert [x["step"] for x in got] == list(range(1, GLS_STEPS + 1))   # one record per step
        for g, r in zip(got[REWIND:], ref[REWIND:]):                        # the recomputed steps
            assert g["select_threshold"] == r["select_threshold"], (g, r)  # bit-identical
            assert g["selected_frac"] == r["selected_frac"] and g["keys"] == r["keys"]
            assert g["loss"] == pytest.approx(r["loss"], abs=1e-5)
        a, b = (rank_state(runs["root"] / n, GLS_STEPS, rank)["gls"] for n in (RESUMED, GLS))
        assert torch.equal(a["buf"], b["buf"]) and a["seen"] == b["seen"]
