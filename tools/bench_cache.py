"""Stage 1 against its floor: the real cache stage vs a bare teacher forward on the same windows.

    python tools/bench_cache.py [--seq-lens 256 1024] [--positions 8192] [--batch-size 4] \
        [--repeats 3] [--threads 2] [--work DIR] [--json FILE]

Per T, `--repeats` interleaved rounds of two processes with the same threads and batch:
  (b) stage  `python -m pipeline.cache` on the demo corpus's first documents holding the
             windows (`corpus_for`), one rank, --max-windows positions / T; its time is
             the caching loop's own wall time (claims, reading,
             tokenizing, forward, sampling, packing, hashing and writing; the manifest's
             `this_launch[0].wall_time_s`), model loading excluded;
  (a) floor  the same windows (read back from (b)'s cache) in batches of --batch-size
             through `pipeline.stage1_cache.teacher.teacher_logit_chunks`: the decoder once per batch,
             lm_head chunk by chunk (--chunk-positions rows), logits discarded; then, in the
             same process, the stage's own per-batch function (`pipeline.stage1_cache.run._flush`) on
             the same batches into a scratch directory, with its phases timed: forward,
             lm_head, sample (entropy + priority sampling), pack (codec), write (tar,
             sha256). The rest of (b)'s time is reading, tokenizing and the ledger.
Printed per T: medians of (a), (b), (b)/(a), and of each phase.

`--class-budget B` adds (c) per round: the same stage writing an allocated cache (format 4,
`--class-budget B`) on the same corpus, run beside (b) with the order alternating per
round; printed: the median of (c) and of the per-round ratio (c)/(b) (issue 25's target:
allocation within 1.05x of fixed U's stage time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("SAMPLEDKD_ASSETS", REPO / "assets_cache"))
PHASES = ("forward", "lm_head", "sample", "pack", "write")


class _NoProgress:
    def update(self, *args) -> None:
        pass


def floor_and_phases(cache: Path, teacher: Path, batch_size: int, chunk: int, result: Path) -> None:
    """(a) in this process: the bare forward, then the stage's per-batch path with timers."""
    import numpy as np
    import torch

    from pipeline.stage1_cache import run as stage
    from pipeline.cache_format.codec import RecordCodec
    from pipeline.cache_format.manifest import load_manifest
    from pipeline.common.phases import PhaseTimer
    from pipeline.cache_format.reader import CacheReader
    from pipeline.cache_format.shards import UnitWriter
    from pipeline.stage1_cache.teacher import teacher_logit_chunks

    m = load_manifest(cache)
    reader = CacheReader(cache, 0, 1, micro_batch=batch_size, seed=0, shuffle_buffer=1)
    batches = [b.input_ids for b in reader.batches(0)]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    V = int(m["vocab_size"])
    t0 = time.perf_counter()
    for ids in batches:
        for _ in teacher_logit_chunks(model, ids, chunk, 1.0, V):
            pass
    bare = time.perf_counter() - t0

    cfg = stage.CacheConfig(teacher=str(teacher), data="-", out=str(result.parent / "scratch"),
                            seq_len=int(m["seq_len"]), batch_size=batch_size, chunk_positions=chunk)
    codec = RecordCodec(V, cfg.num_classes)
    header = dict(m)
    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    writer = UnitWriter(out, 0, 1, header)
    timer = PhaseTimer(enabled=True)
    t0 = time.perf_counter()
    for i, ids in enumerate(batches):
        batch = [(i * batch_size + j, ids[j].numpy().astype(np.int32)) for j in range(ids.shape[0])]
        stage._flush(cfg, model, codec, torch.device("cpu"), 0, batch, writer, _NoProgress(), timer)
    writer.close()
    flush = time.perf_counter() - t0
    result.write_text(json.dumps({"bare_s": bare, "flush_s": flush, **timer.pop()}))


def sampler_pair(teacher: Path, T: int, positions: int, budget: float, repeats: int,
                 chunk: int) -> dict:
    """The stage's sampling phase alone, fixed U = 12 (`sample_classes`) against allocated
    (`sample_allocated` at `budget`, per lm_head chunk as `_flush` calls it), on the real
    teacher's logits of the demo corpus's first windows; `repeats` interleaved rounds,
    alternating which goes first; everything else the stage does is the same for both."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stage1_cache.class_budget import DEFAULT_CEILING_FACTOR, budget_records, sample_allocated
    from pipeline.stage1_cache.class_sampler import sample_classes
    from pipeline.stage1_cache.teacher import teacher_logit_chunks

    tok = AutoTokenizer.from_pretrained(teacher)
    ids: list[int] = []
    for line in (ASSETS / "corpus" / "train.jsonl").read_text().splitlines():
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= positions:
            break
    x = torch.tensor(ids[:positions // T * T]).view(-1, T)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    V = len(tok)
    chunks = [(s, z.clone()) for _, s, z, _ in teacher_logit_chunks(model, x, chunk, 1.0, V)]
    ceiling = math.ceil(DEFAULT_CEILING_FACTOR * budget)

    def fixed():
        g = torch.Generator().manual_seed(0)
        for _, z in chunks:
            sample_classes(z, 12, "priority", g)

    def allocated():
        g = torch.Generator().manual_seed(0)
        for s, z in chunks:
            n = budget_records(budget, s + z.shape[0]) - budget_records(budget, s)
            sample_allocated(z, n, ceiling, g)

    times: dict[str, list[float]] = {"fixed": [], "allocated": []}
    for r in range(repeats):
        for name, fn in ((("fixed", fixed), ("allocated", allocated)) if r % 2 == 0
                         else (("allocated", allocated), ("fixed", fixed))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = [a / f for a, f in zip(times["allocated"], times["fixed"])]
    return {"positions": int(x.numel()), "fixed_s": statistics.median(times["fixed"]),
            "allocated_s": statistics.median(times["allocated"]),
            "ratio": statistics.median(ratios), "ratios": [round(v, 3) for v in ratios]}


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def corpus_for(path: Path, teacher: Path, tokens: int) -> Path:
    """The demo corpus's first documents holding at least `tokens` tokens: the stage then
    tokenizes what it caches and no more (with the whole corpus, --max-windows would stop
    the stage inside a 256-document tokenizer batch, work a full run spreads over all of its
    windows: at full scale tokenizing costs ~0.1% of the teacher's forward)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    lines, n = [], 0
    for line in (ASSETS / "corpus" / "train.jsonl").read_text().splitlines():
        lines.append(line)
        n += len(tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]) + 1
        if n >= tokens:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--positions", type=int, default=8192, help="positions per run (windows = this / T)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--chunk-positions", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_cache")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--class-budget", type=float, default=None,
                    help="also time the stage writing an allocated cache at this budget (c)")
    ap.add_argument("--sampler-only", action="store_true",
                    help="with --class-budget: time only the sampling phase, fixed U = 12 against "
                         "allocated, on the teacher's logits of --positions positions per T")
    ap.add_argument("--floor", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    teacher = ASSETS / "teacher"
    if args.sampler_only:
        if args.class_budget is None:
            ap.error("--sampler-only needs --class-budget B")
        torch_threads(args.threads)
        rows = {}
        print("| T | positions | fixed U=12 sampling s | allocated s | allocated / fixed (per round) |")
        print("|---:|---:|---:|---:|---|")
        for T in args.seq_lens:
            r = rows[T] = sampler_pair(teacher, T, args.positions, args.class_budget, args.repeats,
                                       args.chunk_positions)
            print(f"| {T} | {r['positions']} | {r['fixed_s']:.3f} | {r['allocated_s']:.3f} | "
                  f"**{r['ratio']:.3f}x** {r['ratios']} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    if args.floor:
        cache, result = args.floor
        return floor_and_phases(Path(cache), teacher, args.batch_size, args.chunk_positions, Path(result))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    rows = {}
    for T in args.seq_lens:
        corpus = corpus_for(args.work / f"T{T}" / "corpus.jsonl", teacher, args.positions + T)
        runs = []
        for r in range(args.repeats):
            out = args.work / f"T{T}" / f"round{r}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            def stage(name: str, *extra: str) -> float:
                subprocess.run([sys.executable, "-m", "pipeline.cache", "--teacher", str(teacher),
                                "--data", str(corpus), "--out", str(out / name),
                                "--seq-len", str(T), "--max-windows", str(args.positions // T),
                                "--batch-size", str(args.batch_size), "--chunk-positions",
                                str(args.chunk_positions), *extra], cwd=REPO, env=env, check=True,
                               stdout=subprocess.DEVNULL)
                return json.loads((out / name / "manifest.json").read_text())["this_launch"][0]["wall_time_s"]

            alloc = {}
            if args.class_budget is not None and r % 2:      # alternate which of the two runs first
                alloc = {"alloc_s": stage("alloc", "--class-budget", str(args.class_budget))}
            stage_s = stage("cache")
            if args.class_budget is not None and not r % 2:
                alloc = {"alloc_s": stage("alloc", "--class-budget", str(args.class_budget))}
            if alloc:
                alloc["alloc_ratio"] = alloc["alloc_s"] / stage_s
            subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size),
                            "--chunk-positions", str(args.chunk_positions),
                            "--floor", str(out / "cache"), str(out / "floor.json")],
                           cwd=REPO, env=env, check=True)
            runs.append({"stage_s": stage_s, **alloc, **json.loads((out / "floor.json").read_text())})
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in
               ("stage_s", "bare_s", "flush_s", *PHASES, "alloc_s", "alloc_ratio")}
        med["alloc_ratios"] = [round(r.get("alloc_ratio", 0.0), 4) for r in runs]
        rows[T] = med
        print(f"\n### T = {T}: {args.positions // T} windows, batch {args.batch_size}, "
              f"{args.threads} threads, medians of {args.repeats} interleaved rounds\n")
        print("| (a) bare forward s | (b) cache stage s | (b) / (a) | stage per-batch path s | "
              + " | ".join(PHASES) + " |")
        print("|---:" * (4 + len(PHASES)) + "|")
        print(f"| {med['bare_s']:.2f} | {med['stage_s']:.2f} | {med['stage_s'] / med['bare_s']:.2f}x | "
              f"{med['flush_s']:.2f} | " + " | ".join(f"{med[p]:.2f}" for p in PHASES) + " |", flush=True)
        if args.class_budget is not None:
            print(f"\n(c) allocated stage, --class-budget {args.class_budget}: median "
                  f"{med['alloc_s']:.2f} s; (c) / (b) per round {med['alloc_ratios']}, median "
                  f"**{med['alloc_ratio']:.3f}x**", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
