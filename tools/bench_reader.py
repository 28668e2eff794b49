"""Reader throughput on one core, and cache-stage scaling from 1 to 2 ranks (DESIGN.md 9).

    python tools/bench_reader.py                       # both parts, medians of 5 repeats
    python tools/bench_reader.py --part reader --profile
    python tools/bench_reader.py --part stage --stage-windows 32 --repeats 5

(a) reader: a synthetic cache written without a teacher (random ids/weights/entropies,
    valid records: pipeline.cache_format.shards.UnitWriter + pipeline.cache_format.codec, the same shards and
    manifest the stage writes) at T=2048, U=12, V=151,936; CacheReader.batches() decodes
    it into training tensors on ONE core (torch.set_num_threads(1), CPU affinity pinned to
    one core). positions/s = B x T per batch / wall time of one epoch, with and without the
    sha256 check; positions/CPU-s divides by this thread's CPU time instead (what the work
    costs with the core to itself, which a shared, loaded machine does not give). A
    breakdown times each decode step on its own (same data), so a missed target points at
    its cause; `--profile` adds a cProfile of one epoch. Target: >= 1,000,000 positions/s.
(b) stage: `mpiexec -n 1` vs `mpiexec -n 2` of `python -m pipeline.cache` over the same
    windows (tiny llama, hidden 64, V=32,000, T=512), OMP_NUM_THREADS=1 per rank, so the
    ratio is the scaling over processes/cores. tokens/s = positions / manifest
    `wall_time_s` (the stage's own loop time, max over ranks: model load and imports
    excluded; reading and tokenizing the units a rank claims included; `--stage-unit-bytes`
    small so the tiny corpus has several units per rank). A third row, 1 rank with 2
    threads, shows what intra-op threads give instead. Runs are interleaved; "CPU s" is the
    user+sys time of all the run's processes (imports and model load included); every
    window's records are compared across all runs (they must not depend on the rank count). On an oversubscribed machine the scheduler gives 2 ranks about twice the
    CPU share of 1, so read the ratio together with the load average printed per run.
    Target ratio >= 1.6.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.cache_format.codec import FORMAT_VERSION, RecordCodec
from pipeline.cache_format.manifest import MANIFEST, merge_units
from pipeline.common.files import write_json_atomic

console = Console(highlight=False, width=max(Console().width, 120))
WORDS = ("the quick brown fox jumps over lazy dog knowledge distillation trains small student "
         "imitate large teacher output distribution carries information numbers answer "
         "question because").split()


# -- (a) reader ---------------------------------------------------------------------------------
def synthetic_records(codec: RecordCodec, T: int, rng: np.random.Generator,
                      pad_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid records for one window: `(records [T, 3U+1] uint8, entropy codes [T],
    distinct counts [T])`. Ids are U distinct classes per position (sorted draws + 0..U-1
    offsets are distinct), a `pad_fraction` of positions keeps only U/2 and pads the rest
    with the sentinel (weight code 0), as a sampler does for a peaked distribution."""
    U, V = codec.num_classes, codec.vocab_size
    ids = np.sort(rng.integers(0, V - U + 1, (T, U)), axis=1) + np.arange(U)
    wc = rng.integers(1, 1 << codec.w_bits, (T, U))
    n = np.where(rng.random(T) < pad_fraction, U // 2, U)
    pad = np.arange(U)[None, :] >= n[:, None]
    ids[pad], wc[pad] = codec.sentinel, 0
    ec = rng.integers(0, 256, T)
    return codec.pack(ids, wc, ec), ec, n


def write_synthetic_cache(out: Path, windows: int, T: int, V: int, U: int, shard_samples: int,
                          seed: int = 0) -> dict:
    """A complete cache directory (shards + manifest.json) without a teacher: one unit."""
    from pipeline.stage1_cache.run import UnitWriter

    codec = RecordCodec(V, U)
    header = {
        "format_version": FORMAT_VERSION, "teacher": "synthetic (tools/bench_reader.py)",
        "teacher_parameters": 0, "teacher_dtype": None, "vocab_size": V,
        "tokenizer_fingerprint": "synthetic",
        "eos_token_id": 0, "seq_len": T, "num_classes": U, "id_bits": codec.id_bits,
        "w_bits": codec.w_bits, "sentinel": codec.sentinel,
        "bytes_per_position": codec.bytes_per_position, "sampler": "synthetic",
        "sampler_args": {}, "teacher_temperature": 1.0, "seed": seed, "dataset": None,
        "dataset_fingerprint": "synthetic", "max_windows": windows, "shard_samples": shard_samples,
        "weight_codebook": codec.weight_codebook().levels.tolist(),
        "entropy_codebook": codec.entropy_codebook().levels.tolist(),
        "entropy_max_error": codec.entropy_codebook().max_error,
    }
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = UnitWriter(out, 0, 1, header)
    for w in range(windows):
        records, ec, n = synthetic_records(codec, T, rng)
        writer.write(w, rng.integers(0, V, T).astype(np.uint32), records, ec, n, 0)
    shards = writer.close()
    plan = {"files": [{"path": "synthetic"}], "units": [{"unit": 0, "file": 0, "last_file": 0,
                                                        "start": 0, "end": 0}]}
    done = {0: {"shards": shards, "stats": writer.stats, "windows": windows, "documents": 0,
                "tokens": windows * T, "bytes": 0, "sha256": None, "launch": 1, "rank": 0}}
    manifest = merge_units(header, plan, done, [{"rank": 0, "wall_time_s": 0.0}])
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def median_time(fn, repeats: int) -> tuple[float, float, list[float]]:
    """Median wall seconds, median CPU seconds of this thread, and every wall time.

    CPU time is what the work costs when the core is ours alone; on a shared, loaded
    machine wall time also holds the waits for a core."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), statistics.median(cpus), walls


def reader_epoch(cache: Path, micro_batch: int, verify: bool) -> int:
    """One epoch of CacheReader batches; returns the positions delivered."""
    from pipeline.cache_format.reader import CacheReader

    reader = CacheReader(cache, 0, 1, micro_batch=micro_batch, seed=0, verify=verify)
    n = 0
    for b in reader.batches(0):
        n += b.ids.shape[0] * b.ids.shape[1]
    return n


def decode_breakdown(cache: Path, m: dict, micro_batch: int,
                     repeats: int) -> list[tuple[str, float, float]]:
    """(step, wall s, CPU s) per epoch of each decode step on its own, over the same shards."""
    import torch
    import webdataset as wds
    from webdataset import tariterators

    codec = RecordCodec.from_header(m)
    wl = np.asarray(m["weight_codebook"], np.float32)
    el = np.asarray(m["entropy_codebook"], np.float32)
    blobs = [(cache / s["file"]).read_bytes() for s in m["shards"]]
    members = []
    for data in blobs:
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            members += [tf.extractfile(i).read() for i in tf if i.isfile()]
    kds = [b for b in members if len(b) == codec.bytes_per_position * m["seq_len"]]
    toks = [b for b in members if len(b) == 4 * m["seq_len"]]
    unpacked = [codec.unpack(kd) for kd in kds]

    def read():
        for s in m["shards"]:
            (cache / s["file"]).read_bytes()

    def sha():
        for d in blobs:
            hashlib.sha256(d).hexdigest()

    def tar():   # the reader's own stages: tar_file_expander + group_by_keys
        streams = [{"url": str(i), "stream": io.BytesIO(d)} for i, d in enumerate(blobs)]
        for _ in tariterators.group_by_keys(tariterators.tar_file_expander(
                streams, handler=wds.reraise_exception), handler=wds.reraise_exception):
            pass

    def unpack():
        for kd in kds:
            codec.unpack(kd)

    def check():
        for ids, wc, _ in unpacked:
            bad = (ids >= codec.vocab_size) & (ids != codec.sentinel)
            bad.any() or (wc[ids == codec.sentinel] != 0).any()

    def dequant():
        for _, wc, ec in unpacked:
            wl[wc], el[ec]

    def collate():
        for i in range(0, len(unpacked) - micro_batch + 1, micro_batch):
            grp = unpacked[i:i + micro_batch]
            torch.from_numpy(np.stack([np.frombuffer(t, "<u4") for t in toks[i:i + micro_batch]])
                             .astype(np.int64))
            torch.from_numpy(np.stack([g[0] for g in grp]))
            torch.from_numpy(np.stack([wl[g[1]] for g in grp]))
            torch.from_numpy(np.stack([el[g[2]] for g in grp]))

    steps = [("read shard files", read), ("sha256", sha), ("tar members -> samples (wds)", tar),
             ("codec.unpack (int64)", unpack), ("id/sentinel checks", check),
             ("codebook lookup", dequant), ("np.stack + torch collate", collate)]
    return [(name, *median_time(fn, repeats)[:2]) for name, fn in steps]


def bench_reader(args) -> None:
    import torch

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})   # one core, for real
    work = Path(args.workdir) / "reader-cache"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    m = write_synthetic_cache(work, args.windows, args.seq_len, args.vocab, 12, args.shard_samples)
    console.print(f"synthetic cache: {m['samples']} windows x T={args.seq_len}, V={args.vocab}, "
                  f"{len(m['shards'])} shards, {m['bytes']:,} B, written in "
                  f"{time.perf_counter() - t0:.1f} s -> {work}")
    positions = (m["samples"] // args.micro_batch) * args.micro_batch * args.seq_len
    reader_epoch(work, args.micro_batch, True)                         # warm the page cache
    t = Table(title=f"(a) CacheReader, 1 core, B={args.micro_batch}, T={args.seq_len}, U=12, "
                    f"V={args.vocab:,}, median of {args.repeats}")
    for c in ("sha256", "positions", "wall s", "positions/s", "CPU s", "positions/CPU-s",
              "wall s, every repeat"):
        t.add_column(c, justify="right")
    for verify in (False, True):
        wall, cpu, ts = median_time(lambda: reader_epoch(work, args.micro_batch, verify), args.repeats)
        assert reader_epoch(work, args.micro_batch, verify) == positions
        t.add_row("on" if verify else "off", f"{positions:,}", f"{wall:.3f}", f"{positions / wall:,.0f}",
                  f"{cpu:.3f}", f"{positions / cpu:,.0f}", " ".join(f"{x:.3f}" for x in ts))
    console.print(t)
    console.print("target: >= 1,000,000 positions/s on one core. CPU s = this thread's CPU time "
                  "(time.thread_time): the cost with the core to itself; wall s includes waiting "
                  "for the core when the machine is shared.")
    b = Table(title="decode steps on their own (same shards, 1 core, median): where the time goes")
    for c in ("step", "wall s/epoch", "CPU s/epoch", "share of CPU", "positions/CPU-s if alone"):
        b.add_column(c, justify="right")
    rows = decode_breakdown(work, m, args.micro_batch, args.repeats)
    total = sum(r[2] for r in rows)
    for name, wall, cpu in rows:
        b.add_row(name, f"{wall:.4f}", f"{cpu:.4f}", f"{100 * cpu / total:.0f}%",
                  f"{positions / cpu:,.0f}" if cpu > 0 else "-")
    b.add_row("sum", f"{sum(r[1] for r in rows):.4f}", f"{total:.4f}", "100%", f"{positions / total:,.0f}")
    console.print(b)
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(reader_epoch, work, args.micro_batch, True)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
        console.print("cProfile of one verified epoch, top 15 by own time:\n" + s.getvalue())


# -- (b) cache stage: 1 vs 2 ranks ------------------------------------------------------------------
def write_corpus(path: Path, docs: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(50, 400))))}) + "\n")


# `python -m pipeline.cache` plus this rank's CPU time inside the stage's loop: the call of
# _cache_units (claim, read, tokenize, teacher, write every unit). CPU time does not count
# waiting for a core, so it gives the scaling that two idle cores would show even on a
# shared, loaded machine.
LOOP_CPU_WRAPPER = """
import json, os, sys, time
import pipeline.stage1_cache.run as c
cache_units = c._cache_units
def timed(cfg, info, *a, **k):
    t0 = time.process_time()
    mine = cache_units(cfg, info, *a, **k)
    out = os.path.join(os.environ["BENCH_LOOP_CPU_DIR"], f"r{info.rank}.json")
    with open(out, "w") as f:
        json.dump({"loop_cpu_s": time.process_time() - t0}, f)
    return mine
c._cache_units = timed
c.main(sys.argv[1:])
"""


def stage_run(ranks: int, threads: int, teacher: Path, data: Path, out: Path, args) -> dict:
    """One `mpiexec -n ranks python -m pipeline.cache` run (through LOOP_CPU_WRAPPER):
    manifest numbers, process wall and CPU time, and each rank's loop CPU time."""
    shutil.rmtree(out, ignore_errors=True)
    cpu_dir = out.with_name(out.name + "-loopcpu")
    shutil.rmtree(cpu_dir, ignore_errors=True)
    cpu_dir.mkdir(parents=True)
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-c", LOOP_CPU_WRAPPER, "--teacher",
           str(teacher), "--data", str(data), "--out", str(out), "--seq-len", str(args.stage_seq_len),
           "--max-windows", str(args.stage_windows), "--shard-samples", "4",
           "--unit-bytes", str(args.stage_unit_bytes),
           "--batch-size", str(args.stage_batch)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "BENCH_LOOP_CPU_DIR": str(cpu_dir)}
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = json.loads((out / MANIFEST).read_text())
    if m["world_size"] != ranks:
        raise RuntimeError(f"{out}: world_size {m['world_size']} != {ranks} (mpiexec/mpi4py mismatch)")
    loop_cpu = [json.loads((cpu_dir / f"r{r}.json").read_text())["loop_cpu_s"] for r in range(ranks)]
    return {"positions": m["positions"], "loop_s": m["wall_time_s"], "process_s": wall,
            "cpu_s": cpu, "loop_cpu_s": max(loop_cpu), "loop_cpu_ranks": loop_cpu,
            "windows": window_digests(out, m)}


def window_digests(out: Path, m: dict) -> dict[str, str]:
    """window key -> sha256 of its tokens + records. Which rank cached a unit differs
    between runs, the windows must not."""
    digests = {}
    for s in m["shards"]:
        with tarfile.open(out / s["file"]) as tf:
            files = {i.name: tf.extractfile(i).read() for i in tf if i.isfile()}
        for name, kd in files.items():
            if name.endswith(".kd.bin"):
                key = name.removesuffix(".kd.bin")
                h = hashlib.sha256(files[key + ".tokens.u32"] + kd).hexdigest()
                digests[key] = h
    return digests


def bench_stage(args) -> None:
    from pipeline.demo.tiny import build_tiny_model

    work = Path(args.workdir) / "stage"
    work.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher"
    if not (teacher / "config.json").exists():
        build_tiny_model(teacher, arch="llama", vocab_size=args.stage_vocab, hidden=args.stage_hidden)
    data = work / "corpus.jsonl"
    write_corpus(data, docs=max(50, args.stage_windows * args.stage_seq_len // 150))
    configs = [(1, 1), (2, 1), (1, 2)]
    stage_run(1, 1, teacher, data, work / "warmup", args)      # datasets' cache, page cache
    results: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    for i in range(args.repeats):                               # interleaved: drift hits all alike
        for ranks, threads in configs:
            r = stage_run(ranks, threads, teacher, data, work / f"n{ranks}t{threads}-{i}", args)
            results[(ranks, threads)].append(r)
            console.print(f"  repeat {i}: {ranks} rank(s) x {threads} thread(s): loop "
                          f"{r['loop_s']:.2f} s, loop CPU per rank "
                          f"{' '.join(f'{x:.2f}' for x in r['loop_cpu_ranks'])} s, process "
                          f"{r['process_s']:.2f} s, CPU {r['cpu_s']:.1f} s, load "
                          f"{os.getloadavg()[0]:.1f}", style="dim")
    same = {tuple(sorted(r["windows"].items())) for rs in results.values() for r in rs}
    t = Table(title=f"(b) cache stage, tiny llama hidden {args.stage_hidden}, V={args.stage_vocab:,}, "
                    f"T={args.stage_seq_len}, {args.stage_windows} windows, batch "
                    f"{args.stage_batch}, median of {args.repeats}")
    for c in ("ranks x threads", "positions", "loop s", "tokens/s", "vs 1x1", "loop CPU s",
              "tokens/CPU-s", "vs 1x1, CPU", "process s", "CPU s, all"):
        t.add_column(c, justify="right")
    base = base_cpu = None
    for (ranks, threads), rs in results.items():
        loop = statistics.median(r["loop_s"] for r in rs)
        loop_cpu = statistics.median(r["loop_cpu_s"] for r in rs)
        tps, tpc = rs[0]["positions"] / loop, rs[0]["positions"] / loop_cpu
        base, base_cpu = base or tps, base_cpu or tpc
        t.add_row(f"{ranks} x {threads}", f"{rs[0]['positions']:,}", f"{loop:.2f}", f"{tps:,.0f}",
                  f"{tps / base:.2f}x", f"{loop_cpu:.2f}", f"{tpc:,.0f}",
                  f"{tpc / base_cpu:.2f}x" if threads == 1 else "-",   # CPU of 2 threads adds up
                  f"{statistics.median(r['process_s'] for r in rs):.1f}",
                  f"{statistics.median(r['cpu_s'] for r in rs):.1f}")
    console.print(t)
    console.print("loop s: manifest wall_time_s (max over ranks). loop CPU s: CPU time inside the "
                  "loop of the slowest rank; with one thread per rank, tokens/CPU-s = positions / "
                  "it is the rate idle cores would give. CPU s, all: user+sys of every process of "
                  "the run, imports and model load included.")
    console.print(f"every window's tokens + records identical across all runs and rank counts: "
                  f"{len(same) == 1} ({len(next(iter(same)))} windows)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("reader", "stage", "all"), default="all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--windows", type=int, default=64, help="(a) windows in the synthetic cache")
    ap.add_argument("--seq-len", type=int, default=2048, help="(a) T")
    ap.add_argument("--vocab", type=int, default=151_936, help="(a) V")
    ap.add_argument("--micro-batch", type=int, default=4, help="(a) windows per batch")
    ap.add_argument("--shard-samples", type=int, default=16, help="(a) windows per shard")
    ap.add_argument("--profile", action="store_true", help="(a) cProfile one epoch")
    ap.add_argument("--stage-windows", type=int, default=32)
    ap.add_argument("--stage-seq-len", type=int, default=512)
    ap.add_argument("--stage-vocab", type=int, default=32_000)
    ap.add_argument("--stage-hidden", type=int, default=64)
    ap.add_argument("--stage-batch", type=int, default=4)
    ap.add_argument("--stage-unit-bytes", type=int, default=4096,
                    help="work unit size: small, so the tiny corpus has units for every rank")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_reader-") as tmp:
        args.workdir = args.workdir or tmp
        console.print(f"machine: {os.cpu_count()} CPU cores visible, load average "
                      f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; python {sys.version.split()[0]}")
        if args.part in ("stage", "all"):       # before (a): (a) pins this process to one core
            bench_stage(args)
        if args.part in ("reader", "all"):
            bench_reader(args)


if __name__ == "__main__":
    main()
