"""Stage 1: run the teacher once over the corpus and write the 37-byte/position cache.

    python -m pipeline.cache --teacher PATH_OR_ID --data PATH --out DIR \
        [--seq-len 2048] [--num-classes 12] [--sampler priority] [--batch-size 4]
    mpiexec -n 64 python -m pipeline.cache ...     # or: srun --mpi=pmi2 (slurm/cache.sh)

The corpus is cut once into work units (pipeline.stage1_cache.units: byte ranges of ~--unit-bytes of
.jsonl files, parquet row groups, one .txt file each) whose boundaries do not depend on the
number of ranks. Ranks claim units from a ledger in the cache directory (pipeline.stage1_cache.ledger:
atomic file creation on the shared filesystem, no server), so a fast rank takes more units
and only the rank that holds a unit reads its documents. Per unit: its documents + EOS are
tokenized and cut into windows of T tokens (the last partial window is dropped), the teacher
runs in micro-batches with lm_head on chunks of positions (the [B, T, V] logits never exist),
sample_classes -> codebooks -> RecordCodec.pack -> one WebDataset sample per window:
`__key__` = u{unit:07d}-w{window:07d}, `tokens.u32` (T x uint32 LE), `kd.bin` (T x 37 B).
docs/CACHE_FORMAT.md has the byte layout.

Instruction data (--data-format chat): rows of conversations (--messages-field, or
--prompt-field/--response-field with an optional --system-field) are rendered with the
teacher's chat template (or --chat-template FILE.jinja), tokenized and packed into windows
(pipeline.common.chat, pipeline.stage1_cache.packing); only positions whose next token belongs to an assistant
turn are trainable. The teacher sees every window whole, but masked positions hold no class
records, and each sample gains `trainable.bits` (format version 3; text caches stay version 2).

Crash safety and elasticity: a unit's shards are written as `*.tar.tmp`, fsynced, hashed and
renamed; the unit counts as cached only once its done record (listing them) is in the
ledger. A restart, with any number of ranks, verifies the done units' shards (spread over
the ranks), takes over the units claimed by launches that are no longer alive (their
partial shards are deleted) and caches exactly the units not done; finished shards are
never rewritten, and a unit recomputed later gets new shard names (the launch number is in
the name). A damaged shard stops the restart with an error naming the repair: `python
tools/inspect_cache.py OUT --verify --quarantine`. Window k of unit u is seeded by (seed, u,
k), so the records depend neither on ranks nor on restarts. Under MPI a rank that fails
aborts the whole job, after writing its traceback to stderr and OUT/errors/rank{rank:04d}.txt.
"""

# The stage (this module: its config, the launch's flow from the teacher to the manifest)
# uses pipeline.stage1_cache.teacher (loading, identity, V, chunked logits), pipeline.stage1_cache.launch (a launch's
# checks, unit plan and takeover before caching), pipeline.cache_format.shards (a unit's records and
# shards) and pipeline.stage1_cache.ledger (which rank caches which unit). The docstring above is the
# --help text.

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common import config as C
from pipeline.common.chat import ChatStats
from pipeline.cache_format.codec import MAX_ALLOCATED, RecordCodec
from pipeline.common.text import ChatDataSpec, DataSpec
from pipeline.common.distributed import (DistInfo, TorchComm, abort_job_on_error, init_distributed,
                                  log)
from pipeline.stage1_cache.ledger import Ledger
from pipeline.cache_format.manifest import MANIFEST, merge_units, repair_command
from pipeline.common.files import write_json_atomic
from pipeline.common.phases import PhaseTimer
from pipeline.common.progress import StageProgress
from pipeline.stage1_cache.launch import setup_launch, verify_done
from pipeline.stage1_cache.class_budget import DEFAULT_CEILING_FACTOR, budget_records, check_budget
from pipeline.stage1_cache.class_budget import sample_allocated
from pipeline.stage1_cache.class_sampler import DEFAULT_CHUNK, METHODS, sample_classes
from pipeline.stage1_cache.header import build_header
from pipeline.cache_format.shards import UnitWriter, encode_window, window_generators
from pipeline.stage1_cache.teacher import (cache_vocab_size, load_teacher, split_padded, teacher_logit_chunks,
                              teacher_weight_hashes, tokenizer_classes)
from pipeline.stage1_cache.packing import chat_unit_windows, resolve_chat_template, unit_windows
from pipeline.stage1_cache.units import DEFAULT_UNIT_BYTES, UnitReader, UnitStats

# Names tests and tools import from this module, wherever they are defined.
__all__ = ["CacheConfig", "Hooks", "UnitWriter", "build_header", "cache_vocab_size", "load_teacher",
           "main", "run", "split_padded", "tokenizer_classes", "window_generators"]


@dataclass(frozen=True)
class CacheConfig:
    teacher: str = C.opt(None, "teacher: local HF checkpoint directory or hub id")
    data: str = C.opt(None, "corpus: a local jsonl/json/parquet/txt file or folder (work units need local files)")
    out: str = C.opt(None, "output cache directory")
    text_field: str = C.opt("text", "column holding the document text")
    data_format: str = C.opt("text", "text: documents; chat: rows of conversations (assistant "
                             "turns trainable, the cache's other positions masked)",
                             choices=("text", "chat"))
    messages_field: str = C.opt("messages", "chat: field holding a list of {role, content}")
    prompt_field: str = C.opt("prompt", "chat: field of the user prompt (with --response-field)")
    response_field: str = C.opt("response", "chat: field of the assistant response")
    system_field: str = C.opt("system", "chat: optional system prompt of a prompt/response row")
    chat_template: str | None = C.opt(None, "chat: a Jinja chat template FILE.jinja to render "
                                      "with (default: the teacher tokenizer's)")
    seq_len: int = C.opt(2048, "window length T in tokens")
    num_classes: int = C.opt(12, "U: sampled classes stored per position (the fixed-U format; "
                             "--class-budget allocates instead)")
    class_budget: float | None = C.opt(None, "B: allocate U_t records per position from the "
                                       "teacher's distribution, B per position on average over "
                                       "each window (format 4: 2 + 3B bytes a position; 11.67 "
                                       "costs today's 37 B); priority sampler, text data")
    class_ceiling: int | None = C.opt(None, "U_max: the most records a position gets under "
                                      "--class-budget (default 4B, at most 255)")
    sampler: str = C.opt("priority", "class sampler", choices=METHODS)
    rskd_draws: int = C.opt(50, "rskd: draws with replacement per position")
    rskd_tau: float = C.opt(1.0, "rskd: proposal temperature tau_s")
    teacher_temperature: float = C.opt(1.0, "temperature applied to teacher logits before sampling")
    seed: int = C.opt(0, "seed; every window's randomness derives from (seed, unit, window)")
    batch_size: int = C.opt(1, "windows per teacher forward pass")
    chunk_positions: int = C.opt(2048, "positions per lm_head call (bounds [chunk, V] logits)")
    sampler_chunk: int = C.opt(DEFAULT_CHUNK, "positions per sampler pass (cache-sized passes "
                               "are faster; the draws depend on it, so it is recorded and a resume "
                               "must use the cache's value: 2048 for caches written before it was)")
    max_windows: int | None = C.opt(None, "use only the first N windows of the corpus (in unit "
                                    "order; rank 0 tokenizes that prefix once to plan it)")
    shard_samples: int = C.opt(256, "windows per shard (256 x 2048 tokens = 21 MB)")
    unit_bytes: int = C.opt(DEFAULT_UNIT_BYTES, "work unit size in bytes of corpus text (32 MiB "
                            "~ 8M tokens: the dropped last partial window of a unit loses ~T/2 "
                            "tokens, 0.013% at T=2048)")
    lease_s: float = C.opt(60.0, "a launch whose heartbeat is older than this is dead: its "
                           "unfinished units are taken over (a restart after a kill waits this long)")
    device: str = C.opt("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, or cuda")
    device_map: str | None = C.opt(None, "'auto' spreads a teacher too big for one GPU over the node")
    dtype: str = C.opt("auto", "teacher dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16",
                       choices=("auto", "float32", "bfloat16", "float16"))

    def validate(self) -> None:
        problems = []
        for name, value in (("teacher", self.teacher), ("data", self.data), ("out", self.out)):
            if not value:
                problems.append(f"--{name} is required")
        if self.seq_len < 2:
            problems.append(f"--seq-len {self.seq_len} must be >= 2")
        if self.num_classes < 1:
            problems.append(f"--num-classes {self.num_classes} must be >= 1")
        if self.class_budget is not None:
            try:
                check_budget(self.class_budget, 1, self.ceiling, self.sampler)
            except ValueError as e:
                problems.append(str(e))
            if self.ceiling > MAX_ALLOCATED:
                problems.append(f"--class-ceiling {self.ceiling} must be in [1, {MAX_ALLOCATED}] "
                                "(a position's count is one byte)")
            if self.data_format == "chat":
                problems.append("--class-budget applies to text caches; a chat cache keeps a fixed "
                                "U (--num-classes)")
        elif self.class_ceiling is not None:
            problems.append(f"--class-ceiling {self.class_ceiling} applies with --class-budget")
        if (self.batch_size < 1 or self.chunk_positions < 1 or self.shard_samples < 1
                or self.sampler_chunk < 1):
            problems.append("--batch-size, --chunk-positions, --shard-samples and --sampler-chunk must "
                            "be >= 1")
        if self.unit_bytes < 1 or self.lease_s <= 0:
            problems.append(f"--unit-bytes {self.unit_bytes} must be >= 1 and --lease-s "
                            f"{self.lease_s} > 0")
        if self.max_windows is not None and self.max_windows < 1:
            problems.append(f"--max-windows {self.max_windows} must be >= 1")
        if self.data_format == "text" and self.chat_template is not None:
            problems.append(f"--chat-template {self.chat_template} applies to --data-format chat")
        if self.teacher_temperature <= 0:
            problems.append(f"--teacher-temperature {self.teacher_temperature} must be > 0")
        if self.sampler == "rskd" and self.rskd_tau != 1.0:
            # count/N * p/q can exceed 1 when q is flatter than p; the version-1 weight
            # codebook ends at 1.0 and nothing is clipped.
            problems.append(f"--rskd-tau {self.rskd_tau}: only 1.0 is supported by the cache's "
                            "weight codebook (weights count/N * p/q may exceed 1)")
        C.raise_if(problems, "cache")

    @property
    def data_spec(self) -> DataSpec:
        # Work units read local files directly: no split, hub configuration or streaming.
        if self.data_format == "chat":
            return ChatDataSpec(self.data, messages_field=self.messages_field,
                                prompt_field=self.prompt_field, response_field=self.response_field,
                                system_field=self.system_field)
        return DataSpec(self.data, self.text_field)

    @property
    def ceiling(self) -> int:
        """U_max of an allocated cache: --class-ceiling, or 4B capped at the count byte's 255."""
        if self.class_ceiling is not None:
            return self.class_ceiling
        return min(MAX_ALLOCATED, max(1, math.ceil(DEFAULT_CEILING_FACTOR * self.class_budget)))

    def window_records(self) -> int | None:
        """R, the records of a window under --class-budget (None: fixed U)."""
        return None if self.class_budget is None else budget_records(self.class_budget, self.seq_len)

    @property
    def sampler_args(self) -> dict:
        return {"num_draws": self.rskd_draws, "tau_s": self.rskd_tau} if self.sampler == "rskd" else {}


def _no_op(rank: int) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """What tests and benchmarks change in a launch, given to `main`/`run`; the defaults are
    the stage's own behaviour. (`python -m pipeline.cache` under mpiexec gets them from
    tests/hooks/sitecustomize.py, which test helpers put on PYTHONPATH.)"""

    after_batch: Callable[[int], None] = _no_op
    """Called with the rank after each teacher batch (tests slow ranks down to kill or race them)."""
    static_units: bool = False
    """Unit u goes to rank u % world instead of the ledger's next free unit: the static split
    that dynamic claiming is measured against (tools/bench_assign.py)."""


def _pick_device(cfg: CacheConfig, info: DistInfo) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(cfg.device)


def run(cfg: CacheConfig, hooks: Hooks = Hooks()) -> dict | None:
    """Cache the corpus; returns the merged manifest on rank 0, None on other ranks."""
    info, comm = init_distributed()
    if comm is None:                                  # torchrun / srun without MPI
        import torch.distributed as dist

        dist.init_process_group("gloo")
        comm = TorchComm()
    # Under MPI a rank that raises would leave the others blocked in a collective forever:
    # its traceback goes to OUT/errors/rank{rank:04d}.txt and stderr, then every rank aborts.
    with abort_job_on_error(info, comm, "pipeline.cache", cfg.out):
        return _run(cfg, info, comm, hooks)


def _run(cfg: CacheConfig, info: DistInfo, comm, hooks: Hooks) -> dict | None:
    device = _pick_device(cfg, info)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, model = load_teacher(cfg, device)
    V = cache_vocab_size(tok, model)   # the tokenizer's classes; padded logits are dropped
    try:
        codec = (RecordCodec(V, cfg.num_classes) if cfg.class_budget is None else
                 RecordCodec(V, cfg.ceiling, seq_len=cfg.seq_len, window_records=cfg.window_records()))
    except ValueError as e:
        raise ValueError(f"--teacher {cfg.teacher}: {e}") from e
    max_pos = model.config.get_text_config().to_dict().get("max_position_embeddings")
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the teacher's context "
                         f"(max_position_embeddings={max_pos}); use --seq-len <= {max_pos}")
    # Chat: the template text (file or tokenizer) is fixed once, before anything is written.
    template = resolve_chat_template(tok, cfg.chat_template) if cfg.data_format == "chat" else None
    setup, launch = None, None
    try:
        if info.rank == 0:
            setup, launch = _rank0_setup(cfg, out, tok, model, codec, info, template)
        return _work(cfg, info, comm, out, setup, launch, tok, model, codec, V, device, template,
                     hooks)
    except BaseException as e:
        # One process: end the launch here (its heartbeat thread would otherwise outlive the
        # error in this process). Several ranks: the job is aborted (MPI) or torn down
        # (torchrun) and the heartbeat stops with it; marking the launch ended while other
        # ranks may still be working would let a new launch take over their units.
        if launch is not None and info.world_size == 1:
            launch.stop("failed", reason=f"{type(e).__name__}: {e}"[:500])
        raise


def _rank0_setup(cfg: CacheConfig, out: Path, tok, model, codec: RecordCodec, info: DistInfo,
                 template: str | None):
    """Rank 0 alone hashes the teacher's weights and plans; the others receive the result."""
    t_hash = time.perf_counter()
    weights = teacher_weight_hashes(cfg.teacher)
    log(f"teacher identity: sha256 of {len(weights or {})} weight file(s) in "
        f"{time.perf_counter() - t_hash:.1f} s", info)
    header = build_header(cfg, tok, model, codec, teacher_weights=weights, chat_template=template)
    header, plan, launch = setup_launch(cfg, out, header, tok, info, _windows_of(cfg, tok, template))
    return (header, plan, launch.number), launch


def _work(cfg: CacheConfig, info: DistInfo, comm, out: Path, setup, launch, tok, model,
          codec: RecordCodec, V: int, device, template: str | None, hooks: Hooks) -> dict | None:
    # The broadcast is also the barrier the ledger needs: no rank claims before rank 0 has
    # taken over the units of dead launches.
    header, plan, launch_no = comm.bcast_object(setup)
    ledger = Ledger(out, len(plan["units"]), launch_no, info.rank, info.world_size)
    problems = [p for part in comm.allgather_object(verify_done(out, ledger.done(), info))
                for p in part]
    if problems:
        raise ValueError(f"{out}: {len(problems)} cached shard(s) failed verification: "
                         + "; ".join(problems[:5]) + f". Run `{repair_command(out)}` (it moves "
                         f"damaged units' shards into {out}/quarantine/ and drops their done "
                         "records), then rerun this command: those units are recomputed")
    mine = _cache_units(cfg, info, out, ledger, plan, header, tok, model, codec, V, device,
                        template, hooks)
    everyone = comm.gather_object(mine)       # every rank has finished claiming and writing
    if info.rank != 0:
        return None
    done = ledger.done()
    missing = [u["unit"] for u in plan["units"] if u["unit"] not in done]
    if missing:
        raise ValueError(f"{out}: unit(s) {missing[:10]} are not cached after this launch; "
                         "rerun the same command to finish them")
    manifest = merge_units(header, plan, done, everyone)
    if not manifest["shards"]:
        raise ValueError(f"--data {cfg.data}: no complete window of {cfg.seq_len} tokens "
                         f"(every unit is shorter than one window)")
    write_json_atomic(out / MANIFEST, manifest)
    launch.stop()
    _summary(manifest, out)
    return manifest


def _windows_of(cfg: CacheConfig, tok, template: str | None):
    """(reader, counts, chat_stats) -> the unit's (tokens [T], trainable [T] or None)
    windows; chat: conversations counted into `chat_stats` (a pipeline.common.chat.ChatStats)."""
    def windows_of(reader: UnitReader, counts: UnitStats | None = None, chat_stats=None):
        if cfg.data_format == "chat":
            return chat_unit_windows(reader, tok, cfg.seq_len, template, counts, chat_stats)
        return ((t, None) for t in unit_windows(reader.documents(), tok, cfg.seq_len, counts))
    return windows_of


def _cache_units(cfg, info, out, ledger, plan, header, tok, model, codec, V, device,
                 template, hooks: Hooks) -> dict:
    """Claim units until none is left; cache each. Returns this rank's reading counts."""
    prog = StageProgress("teacher cache", None, "tokens", prefix=f"[rank {info.rank}] ",
                         unit_of_steps=f"windows of {cfg.seq_len} tokens")
    only = (lambda u: u % info.world_size == info.rank) if hooks.static_units else None
    mine = {"rank": info.rank, "launch": ledger.launch, "node": info.node, "units": [],
            "documents": 0, "tokens": 0, "bytes": 0, "windows": 0}
    t0 = time.perf_counter()
    windows_of = _windows_of(cfg, tok, template)
    try:
        while (u := ledger.claim_next(only)) is not None:
            _cache_unit(cfg, info, out, ledger, plan, header, u, windows_of, model, codec, V, device,
                        prog, hooks, mine)
    finally:
        prog.close()      # before any error message: no progress text glued to it
    mine["wall_time_s"] = time.perf_counter() - t0
    return mine


def _cache_unit(cfg, info, out, ledger, plan, header, u: int, windows_of, model, codec, V, device,
                prog, hooks: Hooks, mine: dict) -> None:
    """Cache unit `u` and record it done (its done record in the ledger)."""
    unit = plan["units"][u]
    reader = UnitReader(cfg.data_spec, plan, u)
    counts = UnitStats()
    writer = UnitWriter(out, u, ledger.launch, header)
    cap = unit.get("max_windows")
    batch: list[tuple[int, np.ndarray, np.ndarray | None]] = []
    cstats = ChatStats() if cfg.data_format == "chat" else None
    try:
        for k, (tokens, trainable) in enumerate(windows_of(reader, counts, cstats)):
            if cap is not None and k >= cap:
                break
            if int(tokens.max()) >= V:
                raise ValueError(f"unit {u}, window {k}: token id {int(tokens.max())} >= teacher V={V}")
            batch.append((k, tokens, trainable))
            if len(batch) == cfg.batch_size:
                _flush(cfg, model, codec, device, u, batch, writer, prog)
                hooks.after_batch(info.rank)
        if batch:
            _flush(cfg, model, codec, device, u, batch, writer, prog)
            hooks.after_batch(info.rank)
    except BaseException:
        writer.abandon()
        raise
    shards = writer.close()
    # sha256 of the unit's bytes: complete once its documents were read to the end (a
    # --max-windows cap may stop the last unit early: then None).
    stats = writer.stats
    if cstats is not None:     # rows read (up to a --max-windows cap), per unit
        stats = {**stats, "conversations": cstats.conversations,
                 "skipped_no_assistant": cstats.skipped_no_assistant}
    rec = {"shards": shards, "stats": stats, "windows": sum(s["samples"] for s in shards),
           "documents": reader.n_documents, "tokens": counts.tokens, "bytes": reader.n_bytes,
           "sha256": reader.sha256, "node": info.node}
    ledger.mark_done(u, rec)
    mine["units"].append(u)
    for k in ("documents", "tokens", "bytes", "windows"):
        mine[k] += rec[k]


def _flush(cfg, model, codec, device, unit: int, batch, writer: UnitWriter, prog,
           timer: PhaseTimer | None = None) -> None:
    """Cache one batch of windows: teacher logits chunk by chunk, sampling, packing, writing.
    `timer` (tools/bench_cache.py) times each of those phases."""
    timer = timer or PhaseTimer()
    # (k, tokens, trainable or None); (k, tokens) for text (tools/bench_cache.py)
    items = [(x[0], x[1], x[2] if len(x) > 2 else None) for x in batch]
    ids_in = torch.from_numpy(np.stack([t for _, t, _ in items]).astype(np.int64)).to(device)
    per_window: dict[int, list] = {b: [] for b in range(len(batch))}
    gens = [window_generators(cfg.seed, unit, k, device) for k, _, _ in items]
    stats: dict = {}
    for b, start, logits, dropped in teacher_logit_chunks(model, ids_in, cfg.chunk_positions,
                                                          cfg.teacher_temperature, codec.vocab_size,
                                                          timer):
        with timer("sample"):
            before = stats.get("rskd_truncated_positions", 0)
            sizes = None
            if codec.allocated:
                # this chunk's share of the window's records: R(end) - R(start), which sums
                # to R(T) = window_records over the window's chunks
                end = start + logits.shape[0]
                records = (budget_records(cfg.class_budget, end)
                           - budget_records(cfg.class_budget, start))
                ids, w, h, sizes = sample_allocated(logits, records, codec.num_classes, gens[b][0],
                                                    chunk_size=cfg.sampler_chunk,
                                                    sentinel=codec.sentinel)
                sizes = sizes.cpu()
            else:
                ids, w, h = sample_classes(logits, cfg.num_classes, cfg.sampler, gens[b][0],
                                           chunk_size=cfg.sampler_chunk, sentinel=codec.sentinel,
                                           stats=stats, **cfg.sampler_args)
            per_window[b].append((ids.cpu(), w.cpu(), h.cpu(),
                                  stats.get("rskd_truncated_positions", 0) - before, dropped.cpu(),
                                  sizes))
    for b, (k, tokens, trainable) in enumerate(items):
        parts = per_window[b]
        ids = torch.cat([p[0] for p in parts]).numpy()
        w = torch.cat([p[1] for p in parts]).numpy()
        h = torch.cat([p[2] for p in parts]).numpy()
        dm = torch.cat([p[4] for p in parts]).numpy()
        counts = torch.cat([p[5] for p in parts]).numpy() if codec.allocated else None
        with timer("pack"):
            records, ec, n_distinct = encode_window(codec, ids, w, h, gens[b][1], trainable, counts)
        with timer("write"):
            writer.write(k, tokens, records, ec, n_distinct, sum(p[3] for p in parts), dm,
                         trainable)
    prog.update(len(batch), len(batch) * cfg.seq_len)
    batch.clear()


def _summary(m: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"teacher cache: {out}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    bpp = m["bytes"] / max(m["positions"], 1)
    for k, v in [("units", len(m["units"])), ("launches", len(m["launches"])),
                 ("shards", len(m["shards"])),
                 ("windows", m["samples"]), ("positions", f"{m['positions']:,}"),
                 ("bytes on disk", f"{m['bytes']:,}"), ("bytes / position", f"{bpp:.2f}"),
                 ("V / id bits / w bits", f"{m['vocab_size']} / {m['id_bits']} / {m['w_bits']}"),
                 ("sampler", f"{m['sampler']} U={m['num_classes']}" if m.get("window_records") is None
                  else f"{m['sampler']}, allocated U_t <= {m['num_classes']}, "
                       f"{m['class_budget']} records a position"),
                 ("wall time (this launch)", f"{m['wall_time_s']:.1f} s")]:
        t.add_row(k, str(v))
    Console(stderr=True).print(t)


def main(argv: list[str] | None = None, hooks: Hooks = Hooks()) -> None:
    """The stage on `argv`; bad input raises ValueError (the command line prints it as one
    line, pipeline.common.errors). `hooks`: what tests and benchmarks change (`Hooks`)."""
    from pipeline.common.errors import alike_on_every_rank

    with alike_on_every_rank():
        cfg = C.parse(CacheConfig, argv, __doc__)
    run(cfg, hooks)
    import torch.distributed as dist

    if dist.is_initialized():     # torchrun/srun without MPI: as pipeline.stage2_distill.trainer.main
        dist.destroy_process_group()

