"""One training step per loss recipe, side by side, through the real pipeline.distill path.

    python tools/bench_step.py [--shapes demo qwen] [--repeats 5] [--work DIR] [--json FILE]

Each shape is ONE `torchrun --nproc_per_node 2` launch (ZeRO-3, ds_configs/zero3.json,
gloo on CPU) that builds a `pipeline.stage2_distill.trainer.Trainer` per case, runs warm-up steps, then
times `Trainer.train_step` (forward, selection, loss, backward, optimizer step) for every
case in turn, `--repeats` rounds, the case order rotated each round. Printed: the median
step time, its ratio to `no_kd` of the same launch, the step's peak memory above what was
resident before it (CPU: the process's high-water RSS, reset before the step through
/proc/self/clear_refs, allocations >= 64 KiB returned to the OS on free; CUDA:
max_memory_allocated), and the median of each phase (pipeline.common.phases):
  body_fwd     the decoder's forward          select     scores + rule (+ GLS all-gather)
  head_loss    lm_head and the loss (one fused pass where the recipe allows)
  teacher_fwd  dense_kd's online teacher      stats      the all-reduce of sums and counts
  backward     DeepSpeed's backward (ZeRO-3 gathers, reduce-scatter)
  optimizer    DeepSpeed's step
Phase boundaries synchronize CUDA; on CPU they cost nothing measurable.

Shapes:
  demo  the demo's student (SmolLM2-135M's layers 0,1,2,27,28,29; V = 49,152, tied head) on
        a cache of the demo corpus at T = 256, 2 windows per rank (the demo's settings)
  qwen  a Qwen2 body of 1 layer, hidden 256, V = 151,936 (tied) on a T = 1,024 cache of the
        same corpus (a 512-class tokenizer: the head's cost is V's, the targets are real)
Cases (recipes of pipeline/stage2_distill/recipes/): no-kd (CE everywhere); kd-all (the recommended: KD
everywhere); gls25-kd-ce-rest (GLS top 25% by teacher entropy: KD there, CE on the rest,
0.75/0.75); KD only at the GLS 25% with the fused head; the same with --kd-loss
sampled_softmax; se-kd-student-entropy (a no-grad lm_head pass for the student's entropy);
dense-kd (the online teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("SAMPLEDKD_ASSETS", REPO / "assets_cache"))
# Every case is a recipe of pipeline/stage2_distill/recipes/ (`--recipe`), plus at most a flag or two.
CASES = {
    "no_kd": ["--recipe", "no-kd"],
    "kd-all (recommended: KD everywhere)": ["--recipe", "kd-all"],
    "gls25-kd-ce-rest (CE unselected + KD GLS 25%)": ["--recipe", "gls25-kd-ce-rest"],
    "KD only, GLS 25%, fused head": ["--recipe", "gls25-kd-ce-rest", "--ce-weight", "0", "--kd-weight", "1"],
    "KD only, GLS 25%, sampled softmax": ["--recipe", "gls25-kd-ce-rest", "--ce-weight", "0", "--kd-weight",
                                          "1", "--kd-loss", "sampled_softmax"],
    "se-kd-student-entropy (KD top 20% by student entropy + CE)": ["--recipe", "se-kd-student-entropy"],
    "dense_kd (online teacher)": ["--recipe", "dense-kd"],
}
PHASES = ("body_fwd", "select", "teacher_fwd", "head_loss", "stats", "backward", "optimizer")
WARMUP_STEPS = 3


# ----------------------------------------------------------------------------- assets
def _cache(teacher: Path, out: Path, seq_len: int, windows: int, env: dict) -> Path:
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.cache", "--teacher", str(teacher), "--data",
                        str(ASSETS / "corpus" / "train.jsonl"), "--out", str(out), "--seq-len",
                        str(seq_len), "--max-windows", str(windows), "--batch-size", "2"],
                       cwd=REPO, env=env, check=True)
    return out


def demo_shape(work: Path, env: dict) -> dict:
    student, teacher = ASSETS / "student-L0-1-2-27-28-29", ASSETS / "teacher"
    if not student.exists():
        sys.exit(f"bench_step: {student} missing: run `bash scripts/demo.sh` (or python -m "
                 "pipeline.demo.assets) first to build the demo's assets")
    cache = _cache(teacher, work / "demo_cache", 256, 48, env)
    return {"student": student, "teacher": teacher, "cache": cache, "micro_batch": 2,
            "what": "demo: SmolLM2 cut, V 49,152, T 256, 2 windows/rank"}


def qwen_shape(work: Path, env: dict) -> dict:
    from pipeline.demo.tiny import build_tiny_model

    texts = [json.loads(line)["text"] for line in
             (ASSETS / "corpus" / "train.jsonl").read_text().splitlines()[:200]]
    kw = dict(arch="qwen2", vocab_size=151_936, hidden=256, layers=1, heads=4, texts=texts)
    teacher = work / "qwen_teacher"
    student = work / "qwen_student"
    if not (teacher / "config.json").exists():
        build_tiny_model(teacher, seed=0, **kw)
        build_tiny_model(student, seed=1, **kw)
    cache = _cache(teacher, work / "qwen_cache", 1024, 24, env)
    return {"student": student, "teacher": teacher, "cache": cache, "micro_batch": 1,
            "what": "qwen: 1-layer Qwen2 body, hidden 256, V 151,936, T 1,024, 1 window/rank"}


# ----------------------------------------------------------------------------- worker
def _rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # reset the high-water RSS (VmHWM)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker(spec_path: str) -> None:
    import torch

    from pipeline.common import config as C
    from pipeline.stage2_distill.checkpoint import DataPosition
    from pipeline.stage2_distill.trainer import DistillConfig, Trainer, batches_forever

    spec = json.loads(Path(spec_path).read_text())
    cases = {}
    for name, argv in spec["cases"].items():
        tr = Trainer(C.parse(DistillConfig, argv))
        tr.timer.enabled = True
        cases[name] = [tr, batches_forever(tr, DataPosition()), 0]
    cuda = torch.cuda.is_available()

    def step(name: str) -> dict:
        tr, data, n = cases[name]
        micro = [next(data) for _ in range(tr.cfg.grad_accum)]
        tr.comm.barrier()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _rss_reset()
            base = _status_kib("VmRSS") * 1024
        tr.timer.pop()
        t0 = time.perf_counter()
        tr.train_step(micro, n)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - base
        cases[name][2] = n + 1
        return {"step_s": dt, "peak_bytes": peak, **tr.timer.pop()}

    names = list(cases)
    for _ in range(WARMUP_STEPS):
        for name in names:
            step(name)
    records: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(spec["repeats"]):
        for name in names[r % len(names):] + names[:r % len(names)]:
            records[name].append(step(name))
    # every rank's peaks: the table shows the larger rank
    parts = [None] * cases[names[0]][0].world
    torch.distributed.all_gather_object(parts, records)
    if cases[names[0]][0].rank == 0:
        Path(spec["result"]).write_text(json.dumps(parts))
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- parent
def run_shape(shape: dict, repeats: int, work: Path, env: dict) -> dict:
    ds = REPO / "ds_configs" / "zero3.json"
    cases = {}
    for name, flags in CASES.items():
        extra = ["--teacher", str(shape["teacher"])] if "dense-kd" in flags else []
        cases[name] = ["--student", str(shape["student"]), "--cache", str(shape["cache"]),
                       "--out", str(work / "runs" / f"case{len(cases)}"), "--deepspeed", str(ds),
                       "--micro-batch", str(shape["micro_batch"]), "--steps", "1000", "--lr", "1e-4",
                       "--no-export", "--no-tensorboard", *flags, *extra]
    spec, result = work / "spec.json", work / "result.json"
    spec.write_text(json.dumps({"cases": cases, "repeats": repeats, "result": str(result)}))
    # allocations >= 64 KiB go back to the OS on free, so each step's RSS peak is its own
    wenv = dict(env, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    "2", __file__, "--worker", str(spec)], cwd=REPO, env=wenv, check=True)
    return json.loads(result.read_text())


def summarize(parts: list[dict]) -> dict:
    out = {}
    for name in parts[0]:
        recs = parts[0][name]                                   # rank 0's times
        row = {"step_s": statistics.median(r["step_s"] for r in recs),
               "peak_mib": max(r["peak_bytes"] for p in parts for r in p[name]) / 2**20}
        for ph in PHASES:
            row[ph] = statistics.median(r.get(ph, 0.0) for r in recs)
        out[name] = row
    return out


def table(title: str, rows: dict) -> str:
    base = rows["no_kd"]
    head = ["case", "step s", "/ no_kd", "peak MiB", "/ no_kd", *PHASES]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, r in rows.items():
        cells = [name, f"{r['step_s']:.3f}", f"{r['step_s'] / base['step_s']:.2f}x",
                 f"{r['peak_mib']:.0f}", f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x",
                 *(f"{r[ph]:.3f}" for ph in PHASES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["demo", "qwen"], choices=["demo", "qwen"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_step")
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR=
               os.environ.get("DS_ACCELERATOR", "cpu"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = {}
    for name in args.shapes:
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        shape = (demo_shape if name == "demo" else qwen_shape)(work, env)
        results[name] = summarize(run_shape(shape, args.repeats, work, env))
        print(table(f"{shape['what']}; medians of {args.repeats} interleaved rounds", results[name]),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
