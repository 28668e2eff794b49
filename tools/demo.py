"""The whole pipeline on the embedded default: real SmolLM2-135M-Instruct teacher, real
Wikipedia text, 2 CPU ranks per stage. Run through `bash scripts/demo.sh`.

    python tools/demo.py [--out runs/demo] [--steps 48] [--max-windows 192] [--tiny]

The demo's settings (T, windows, steps, the loss recipe, the evaluation's fixtures and
limits) live in scripts/demo.env and nowhere else; a variable set in the environment wins.

1. assets (cached after the first run): teacher, a 6-layer student cut (teacher layers
   0-2 and 27-29), train/held-out text;
2. stage 1 through slurm/cache.sh (mpiexec, 2 ranks, U=12 priority samples, T=256);
   and of the held-out pages (the validation set);
3. stage 2 through slurm/distill.sh (torchrun, 2 ranks, ZeRO-3): the SampledKD student
   (the pipeline's default, the recommended recipe: pipeline/stage2_distill/recipes/) and a no-KD student
   (RECIPE=no-kd: CE on every position) on the same windows and steps, both validated on
   the held-out pages every VAL_EVERY steps;
4. stage 3: held-out perplexity and KL to the teacher for teacher, initial student, no-KD
   and SampledKD students; the nine offline fixture tasks for the two trained students;
5. the storage table (tools/inspect_cache.py), the comparison table, and PNG plots
   (entropy histogram, loss curves, comparison) under OUT/plots.
`--tiny` swaps in tiny random models and a few windows (the CI smoke test of this path).
`--chat` runs the same stages on conversations made from the same pages
(pipeline.demo.chat_data): stage 1 with `--data-format chat` (the teacher's chat template;
only assistant tokens are trainable), stage 2 unchanged (the masks come with the cache),
stage 3 scoring the assistant tokens of held-out conversations (`--heldout-format chat`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEMO_ENV = REPO / "scripts" / "demo.env"


def demo_settings(path: Path = DEMO_ENV, environ: dict | None = None) -> dict[str, str]:
    """scripts/demo.env (KEY=VALUE lines, shell quoting and comments, no expansion); a
    variable set in `environ` (default os.environ) wins over the file."""
    environ = os.environ if environ is None else environ
    settings = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        key, eq, value = words[0].partition("=")
        if len(words) != 1 or not eq or not key.isidentifier():
            raise SystemExit(f"demo: {path}:{n}: expected KEY=VALUE, got {line!r}")
        settings[key] = environ.get(key, value)
    return settings


def sh(cmd: list[str], env: dict, what: str) -> float:
    """Run a stage with its output streaming; fail loudly with the stage's name."""
    print(f"\n=== {what} ===\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, cwd=REPO).returncode
    if rc:
        sys.exit(f"demo: {what} failed with exit code {rc}")
    dt = time.perf_counter() - t0
    print(f"--- {what}: {dt:.0f} s", flush=True)
    return dt


def tiny_assets(out: Path) -> dict:
    """Tiny random teacher/student sharing a tokenizer, and a few paragraphs of text."""
    from pipeline.demo.tiny import build_tiny_model

    d = out / "tiny-assets"
    text = [p for f in sorted((REPO / "pipeline").rglob("*.py")) for p in f.read_text().split("\n\n")]
    d.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train.jsonl", text * 3), ("heldout.jsonl", text[:20])):
        with open(d / name, "w") as f:
            for i, t in enumerate(lines):
                if t.strip():   # a title too, as the real pages have, for the --chat data
                    f.write(json.dumps({"text": t, "title": f"paragraph {i}"}) + "\n")
    teacher = build_tiny_model(d / "teacher", "llama", hidden=48, layers=2, seed=0)
    student = build_tiny_model(d / "student", "llama", hidden=48, layers=1, seed=1)
    return {"teacher": str(teacher), "student": str(student), "train": str(d / "train.jsonl"),
            "heldout": str(d / "heldout.jsonl")}


def loss_plot(runs: dict[str, Path], png: Path) -> None:
    """Left: each run's training loss terms; right: its validation KL and perplexity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    twin = ax[1].twinx()
    for name, run in runs.items():
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in recs]
        if any(r["ce_loss"] for r in recs):
            ax[0].plot(steps, [r["ce_loss"] for r in recs], label=f"{name}: CE")
        if any(r["kd_loss"] for r in recs):
            ax[0].plot(steps, [r["kd_loss"] for r in recs], "--", label=f"{name}: KD")
        val = run / "validation.jsonl"
        if val.exists():
            v = [json.loads(x) for x in val.read_text().splitlines() if x.strip()]
            line, = ax[1].plot([r["step"] for r in v], [r["val_kl"] for r in v], "o-", label=f"{name}: KL")
            twin.plot([r["step"] for r in v], [r["val_ppl"] for r in v], "x:", color=line.get_color(),
                      label=f"{name}: perplexity")
    # Each term is a mean over its own positions.
    ax[0].set(xlabel="step", ylabel="nats per position", title="training loss terms")
    ax[1].set(xlabel="step", ylabel="KL(teacher || student), nats (o)",
              title="validation on the held-out pages (--val-cache)")
    twin.set_ylabel("perplexity (x)")
    twin.set_yscale("log")
    for a in (ax[0], ax[1]):
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    ap.add_argument("--assets", type=Path, default=None, help="asset cache (default $SAMPLEDKD_ASSETS or ./assets_cache)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CI smoke test)")
    ap.add_argument("--chat", action="store_true",
                    help="conversations made from the pages; train and score assistant tokens only")
    args = ap.parse_args()
    if args.chat and args.out == REPO / "runs" / "demo":
        args.out = REPO / "runs" / "demo-chat"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    t_all = time.perf_counter()

    if args.tiny:
        assets = tiny_assets(out)
    else:
        from pipeline.demo.assets import prepare_assets
        cache = args.assets or Path(os.environ.get("SAMPLEDKD_ASSETS", REPO / "assets_cache"))
        print(f"=== assets ({cache}) ===", flush=True)
        t0 = time.perf_counter()
        assets = prepare_assets(cache)
        print(f"--- assets: {time.perf_counter() - t0:.0f} s", flush=True)
    s = demo_settings()
    if args.tiny:
        s.update(SEQ_LEN="64", MICRO_BATCH="1", HELDOUT_MAX_WINDOWS="8")
    if args.max_windows or args.tiny:
        s["MAX_WINDOWS"] = str(args.max_windows or 24)
    if args.steps or args.tiny:
        s["STEPS"] = str(args.steps or 4)
    seq = s["SEQ_LEN"]
    heldout_args = []
    if args.chat:
        from pipeline.demo.chat_data import build_chat_corpus

        for split in ("train", "heldout"):
            counts = build_chat_corpus(assets[split], out / "chat" / f"{split}.jsonl")
            print(f"chat {split}: {counts}", flush=True)
            assets[split] = str(out / "chat" / f"{split}.jsonl")
        s["CACHE_ARGS"] += " --data-format chat"
        heldout_args = ["--heldout-format", "chat"]
    # The job scripts read their settings from the environment: the demo's, then the paths.
    env = dict(os.environ, **s, PYTHON=PY, TEACHER=assets["teacher"], DATA=assets["train"],
               STUDENT=assets["student"], CACHE_DIR=str(out / "cache"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    times = {"cache": sh(["bash", "slurm/cache.sh"], dict(env, EXTRA_ARGS=s["CACHE_ARGS"]),
                         f"stage 1: teacher cache ({s['NTASKS']} ranks)")}
    # The held-out pages too (the validation set of both students; stage 3 scores the same
    # text): the same teacher, T and format, another corpus.
    val_cache = out / "val_cache"
    times["val_cache"] = sh(["bash", "slurm/cache.sh"], dict(
        env, DATA=assets["heldout"], CACHE_DIR=str(val_cache), MAX_WINDOWS=s["HELDOUT_MAX_WINDOWS"],
        EXTRA_ARGS=s["CACHE_ARGS"]), "stage 1: teacher cache of the held-out pages (validation)")
    env.update(VAL_CACHE=str(val_cache), VAL_WINDOWS=s["HELDOUT_MAX_WINDOWS"])
    runs = {"sampledkd": out / "sampledkd", "no_kd": out / "no_kd"}
    # The SampledKD student: no recipe variable, so the pipeline's default (the recommended
    # recipe); the no-KD student trains on CE at every position instead.
    times["sampledkd"] = sh(["bash", "slurm/distill.sh"], dict(env, RUN_DIR=str(runs["sampledkd"])),
                            "stage 2: SampledKD student (2 ranks, ZeRO-3, the recommended recipe)")
    times["no_kd"] = sh(["bash", "slurm/distill.sh"], dict(env, RUN_DIR=str(runs["no_kd"]), RECIPE="no-kd"),
                        "stage 2: no-KD student (same windows and steps, CE on every position)")

    models = {"teacher": assets["teacher"], "student_init": assets["student"],
              "no_kd": str(runs["no_kd"] / "export"), "sampledkd": str(runs["sampledkd"] / "export")}
    hw = s["HELDOUT_MAX_WINDOWS"]
    # One process per model: let torch use every core (the 2-rank stages pinned 1 thread each).
    eval_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS" or "OMP_NUM_THREADS" in os.environ}
    for name, model in models.items():
        tasks = ["--tasks", s["TASKS"], "--data-dir", s["EVAL_DATA_DIR"], "--limit", s["LIMIT"],
                 "--max-gen-toks", s["MAX_GEN_TOKS"]] if name in ("no_kd", "sampledkd") else []
        kl = [] if name == "teacher" else ["--teacher", assets["teacher"]]  # KL to itself is 0
        cmd = [PY, "-m", "pipeline.evaluate", "--model", model, "--out", str(out / "eval" / name),
               "--heldout", assets["heldout"], *heldout_args, *kl, "--seq-len", seq,
               "--heldout-max-windows", hw, *tasks]
        times[f"eval_{name}"] = sh(cmd, eval_env, f"stage 3: evaluate {name}")
        run_dir = runs.get(name)
        if run_dir is not None:
            info = json.loads((run_dir / "run_info.json").read_text())
            info["name"] = name
            (out / "eval" / name / "run_info.json").write_text(json.dumps(info))

    sh([PY, "tools/inspect_cache.py", str(out / "cache"), "--plot", str(plots / "entropy.png")],
       env, "storage: tools/inspect_cache.py")
    sh([PY, "tools/compare_runs.py", *[f"{n}={out / 'eval' / n}" for n in ("no_kd", "sampledkd")],
        "--out", str(plots / "comparison"), "--title",
        f"offline fixture tasks, {s['LIMIT']} examples each: proves the lm-eval path, not a score"],
       env, "comparison: tools/compare_runs.py")
    loss_plot(runs, plots / "loss_curves.png")

    from rich.console import Console
    from rich.table import Table

    t = Table(title="held-out language modelling (real Wikipedia text the student never saw"
                    + ("; assistant tokens of conversations only)" if args.chat else ")"))
    for c in ("model", "perplexity", "KL(teacher || model) nats/token", "tokens"):
        t.add_column(c, justify="right")
    ppl = {}
    for name in models:
        h = json.loads((out / "eval" / name / "results.json").read_text())["heldout"]
        ppl[name] = h["perplexity"]
        kl = 0.0 if name == "teacher" else h.get("kl_to_teacher")
        t.add_row(name, f"{h['perplexity']:.2f}", "-" if kl is None else f"{kl:.4f}", str(h["tokens"]))
    con = Console()
    con.print(t)
    # Training throughput, median over the steps after warm-up (tools/bench_step.py measures
    # the same ratio step by step, BENCHMARKS.md "Training step overhead").
    tps = {}
    for name in ("sampledkd", "no_kd"):
        recs = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        tps[name] = statistics.median(r["tokens_per_s"] for r in recs[2:] or recs)
    con.print(f"training: SampledKD {tps['sampledkd']:.0f} tokens/s, no-KD {tps['no_kd']:.0f} tokens/s "
              f"(median per step; time per step {tps['no_kd'] / tps['sampledkd']:.2f}x no-KD's)")
    verdict = "lower" if ppl["sampledkd"] < ppl["no_kd"] else "NOT lower"
    con.print(f"SampledKD student perplexity {ppl['sampledkd']:.2f} is {verdict} than no-KD's "
              f"{ppl['no_kd']:.2f} (same windows, same steps); teacher {ppl['teacher']:.2f}.")
    summary = {"data": "chat" if args.chat else "text", "perplexity": ppl, "tokens_per_s": tps, "stage_seconds": times,
               "total_seconds": time.perf_counter() - t_all, "plots": sorted(str(p) for p in plots.glob("*.png"))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    con.print(f"plots: {', '.join(summary['plots'])}\nsummary: {out / 'summary.json'} "
              f"(total {summary['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
