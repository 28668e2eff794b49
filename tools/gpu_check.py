"""The whole pipeline on CUDA with tiny models: one table that says whether the GPU path works.

    bash scripts/gpu_check.sh                      # installs .venv if needed, then runs this
    python tools/gpu_check.py --out /tmp/gpu_check [--keep]

CI and the developers' machines have no GPU, so the CUDA/NCCL path of the same code is only
exercised here. Steps (each a subprocess, as a user runs it; each row of the table says
ok/FAILED, wall time and what it measured):
  1. stage 1 on cuda: `python -m pipeline.cache` with a tiny Qwen2 teacher (V = 151,936,
     padded vocabulary) in bf16;
  2. stage 2, 1 rank: `torchrun --nproc_per_node 1 -m pipeline.distill` (ZeRO-3, bf16, the
     fused KD head on an untied student, GLS selection);
  3. stage 2, 2 ranks over NCCL when at least 2 GPUs are visible (else the row says skipped);
  4. a resume of the 1-rank run (checkpoint written on CUDA, loaded weights_only);
  5. stage 3: `python -m pipeline.evaluate` on the export, offline fixture tasks, 2 items.
Needs nothing the repository does not install. Exit status: 0 all ran, 1 a step failed,
2 no CUDA device. The table also goes to OUT/gpu_check.md for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"The quick brown fox {i} jumps over the lazy dog; a teacher answers {7 * i} "
         "questions because distillation trains a small student." for i in range(400)]


def _run(name: str, cmd: list[str], log: Path, rows: list[dict], env: dict, timeout: int = 900) -> bool:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    ok = rc == 0
    rows.append({"step": name, "status": "ok" if ok else f"FAILED (rc {rc}, see {log})",
                 "wall_s": round(time.perf_counter() - t0, 1), "detail": ""})
    return ok


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); "
              "run it on a GPU machine", file=sys.stderr)
        return 2
    from pipeline.demo.tiny import build_tiny_model

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    kw = dict(arch="qwen2", hidden=64, layers=2, heads=4, texts=TEXTS, vocab_size=151_936)
    teacher = build_tiny_model(out / "teacher", seed=0, **kw)
    student = build_tiny_model(out / "student", seed=1, tie_word_embeddings=False, **kw)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DS_ACCELERATOR", None)                      # DeepSpeed picks cuda
    py = sys.executable
    gpus = torch.cuda.device_count()
    rows: list[dict] = []
    cache = out / "cache"
    ok = _run("cache (1 rank, cuda, bf16)",
              [py, "-m", "pipeline.cache", "--teacher", str(teacher), "--data", str(data),
               "--out", str(cache), "--seq-len", "256", "--max-windows", "64", "--shard-samples", "4",
               "--batch-size", "4", "--device", "cuda"], out / "cache.log", rows, env)
    if ok:
        m = json.loads((cache / "manifest.json").read_text())
        rows[-1]["detail"] = (f"{m['samples']} windows, {m['bytes'] / m['positions']:.1f} B/position, "
                              f"dtype {m['teacher_dtype']}")
    distill = ["-m", "pipeline.distill", "--student", str(student), "--cache", str(cache),
               "--deepspeed", "ds_configs/zero3.json", "--select", "gls", "--gls-warmup", "256",
               "--select-frac", "0.25", "--lr", "1e-3", "--micro-batch", "2", "--checkpoint-every", "4"]
    runs = [("distill (1 rank, ZeRO-3, bf16, fused head, untied)", 1, out / "run1")]
    if gpus >= 2:
        runs.append(("distill (2 ranks, NCCL, ZeRO-3, bf16)", 2, out / "run2"))
    for name, nproc, run in runs:
        if ok:
            ok = _run(name, [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), *distill, "--out", str(run), "--steps", str(args.steps)],
                      out / f"{run.name}.log", rows, env)
        if ok:
            recs = _metrics(run)
            rows[-1]["detail"] = (f"loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f} over "
                                  f"{len(recs)} steps, {recs[-1]['tokens_per_s']:.0f} tokens/s")
    if gpus < 2:
        rows.append({"step": "distill (2 ranks, NCCL)", "status": f"skipped ({gpus} GPU visible)",
                     "wall_s": 0.0, "detail": ""})
    if ok:
        ok = _run("resume of the 1-rank run (+4 steps)",
                  [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *distill,
                   "--out", str(out / "run1"), "--steps", str(args.steps + 4), "--resume"],
                  out / "resume.log", rows, env)
        if ok:
            rows[-1]["detail"] = f"{len(_metrics(out / 'run1'))} steps in metrics.jsonl"
    if ok:
        ok = _run("evaluate (lm-eval, fixtures, 2 items)",
                  [py, "-m", "pipeline.evaluate", "--model", str(out / "run1" / "export"),
                   "--tasks", "arc_easy,piqa", "--data-dir", "pipeline/stage3_evaluate/tasks/fixtures", "--limit", "2",
                   "--out", str(out / "eval"), "--device", "cuda"], out / "eval.log", rows, env)
    name = torch.cuda.get_device_name(0)
    lines = [f"GPU check on {gpus} x {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", "",
             "| step | status | wall s | detail |", "|---|---|---:|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['wall_s']} | {r['detail']} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    (out / "gpu_check.md").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
