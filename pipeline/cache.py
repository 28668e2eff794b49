"""Stage 1: run the teacher once over the corpus and write the 37-byte/position cache.

    python -m pipeline.cache --teacher PATH_OR_ID --data PATH --out DIR \
        [--seq-len 2048] [--num-classes 12] [--sampler priority] [--batch-size 4]
    mpiexec -n 64 python -m pipeline.cache ...     # or: srun --mpi=pmi2 (slurm/cache.sh)

The corpus is cut once into work units (pipeline.units: byte ranges of ~--unit-bytes of
.jsonl files, parquet row groups, one .txt file each) whose boundaries do not depend on the
number of ranks. Ranks claim units from a ledger in the cache directory (pipeline.ledger:
atomic file creation on the shared filesystem, no server), so a fast rank takes more units
and only the rank that holds a unit reads its documents. Per unit: its documents + EOS are
tokenized and cut into windows of T tokens (the last partial window is dropped), the teacher
runs in micro-batches with lm_head on chunks of positions (the [B, T, V] logits never exist),
sample_classes -> codebooks -> RecordCodec.pack -> one WebDataset sample per window:
`__key__` = u{unit:07d}-w{window:07d}, `tokens.u32` (T x uint32 LE), `kd.bin` (T x 37 B).
docs/CACHE_FORMAT.md has the byte layout.

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

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import config as C
from pipeline.codec import FORMAT_VERSION, RecordCodec
from pipeline.data import DataSpec, tokenizer_fingerprint
from pipeline.distributed import (DistInfo, TorchComm, abort_job_on_error, init_distributed,
                                  log)
from pipeline.ledger import Ledger, done_name, launch_name, ledger_dir
from pipeline.manifest import (HEADER, LAYOUT, MANIFEST, UNITS, check_compatible, merge_units,
                               read_json, repair_command, sha256_file, shard_path,
                               unit_shard_name, window_key, write_json_atomic)
from pipeline.progress import StageProgress
from pipeline.sampling import METHODS, sample_classes
from pipeline.units import UnitReader, UnitStats, check_plan, plan_units, unit_windows


@dataclass(frozen=True)
class CacheConfig:
    teacher: str = C.opt(None, "teacher: local HF checkpoint directory or hub id")
    data: str = C.opt(None, "corpus: a local jsonl/json/parquet/txt file or folder (work units need local files)")
    out: str = C.opt(None, "output cache directory")
    text_field: str = C.opt("text", "column holding the document text")
    seq_len: int = C.opt(2048, "window length T in tokens")
    num_classes: int = C.opt(12, "U: sampled classes stored per position")
    sampler: str = C.opt("priority", "class sampler", choices=METHODS)
    rskd_draws: int = C.opt(50, "rskd: draws with replacement per position")
    rskd_tau: float = C.opt(1.0, "rskd: proposal temperature tau_s")
    teacher_temperature: float = C.opt(1.0, "temperature applied to teacher logits before sampling")
    seed: int = C.opt(0, "seed; every window's randomness derives from (seed, unit, window)")
    batch_size: int = C.opt(1, "windows per teacher forward pass")
    chunk_positions: int = C.opt(2048, "positions per lm_head call (bounds [chunk, V] logits)")
    max_windows: int | None = C.opt(None, "use only the first N windows of the corpus (in unit "
                                    "order; rank 0 tokenizes that prefix once to plan it)")
    shard_samples: int = C.opt(256, "windows per shard (256 x 2048 tokens = 21 MB)")
    unit_bytes: int = C.opt(32 << 20, "work unit size in bytes of corpus text (32 MiB ~ 8M tokens: "
                            "the dropped last partial window of a unit loses ~T/2 tokens, 0.013% "
                            "at T=2048)")
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
        if self.batch_size < 1 or self.chunk_positions < 1 or self.shard_samples < 1:
            problems.append("--batch-size, --chunk-positions and --shard-samples must be >= 1")
        if self.unit_bytes < 1 or self.lease_s <= 0:
            problems.append(f"--unit-bytes {self.unit_bytes} must be >= 1 and --lease-s "
                            f"{self.lease_s} > 0")
        if self.max_windows is not None and self.max_windows < 1:
            problems.append(f"--max-windows {self.max_windows} must be >= 1")
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
        return DataSpec(self.data, self.text_field)

    @property
    def sampler_args(self) -> dict:
        return {"num_draws": self.rskd_draws, "tau_s": self.rskd_tau} if self.sampler == "rskd" else {}


def _pick_device(cfg: CacheConfig, info: DistInfo) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(cfg.device)


def load_teacher(cfg: CacheConfig, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.teacher)
    except (OSError, ValueError) as e:
        raise ValueError(f"--teacher {cfg.teacher}: cannot load its tokenizer ({e})") from e
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    kw = {"device_map": cfg.device_map} if cfg.device_map else {}
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=dtype, **kw)
    if not cfg.device_map:
        model.to(device)
    model.eval()
    return tok, model


def _is_weight_file(name: str) -> bool:
    # The files from_pretrained loads weights from (safetensors or torch .bin, sharded or
    # not) and their shard indexes. training_args.bin (a Trainer pickle) holds no weights.
    return (name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
            and name != "training_args.bin")


def teacher_weight_hashes(teacher: str) -> dict[str, str] | None:
    """`{file name: sha256}` of the teacher's weight files: its identity in the cache header.

    The path or hub id alone does not identify a model (weights replaced in place, a new
    upload under the same name); a restart whose weights differ is refused (HEADER_KEYS).
    A local directory is hashed directly; a hub id is resolved offline to the local
    snapshot from_pretrained just loaded (huggingface_hub's cache, revision main).
    Returns None only when a hub id has no local snapshot to hash (the model came from
    somewhere huggingface_hub's cache lookup does not see, e.g. another cache_dir): the
    header then records null and such a cache is identified by the id and parameter count
    only.
    """
    folder = Path(teacher).expanduser()
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(teacher, "config.json")
        if not isinstance(found, str):
            return None
        folder = Path(found).parent
    files = sorted(f for f in folder.iterdir() if f.is_file() and _is_weight_file(f.name))
    if not files:
        raise ValueError(f"--teacher {teacher}: no weight files (*.safetensors, *.bin) in "
                         f"{folder}, so its identity cannot be recorded; save the teacher with "
                         "save_pretrained")
    return {f.name: sha256_file(f) for f in files}


def tokenizer_classes(tok) -> int:
    """The number of classes a tokenizer can produce: 1 + the largest id it can emit, i.e.
    `max(len(tok), 1 + max(tok.get_vocab().values()))`. `len(tok)` counts the base
    vocabulary plus the added (special) tokens; it equals 1 + the largest id when the ids
    are contiguous (Qwen2.5: 151,665; Llama 3: 128,256), and the max guards tokenizers
    whose added tokens leave a gap in the ids."""
    ids = tok.get_vocab().values()
    return max(len(tok), 1 + max(ids, default=-1))


def cache_vocab_size(tok, model) -> int:
    """The cache's V: `tokenizer_classes(tok)` (see there). Class ids < V are what records
    and tokens may hold. Teacher logits beyond V (a padded output layer, as Qwen2.5-7B's
    152,064 logits over 151,665 tokens) are dropped before sampling (`split_padded`);
    a teacher with fewer logits than V cannot score every token and is refused."""
    V = tokenizer_classes(tok)
    n_logits = model.get_output_embeddings().weight.shape[0]
    if n_logits < V:
        raise ValueError(f"the teacher has {n_logits} logits, fewer than the {V} classes its "
                         f"tokenizer can produce (V = len(tokenizer) = {len(tok)}, or 1 + its "
                         "largest token id); the checkpoint's output layer does not match its "
                         "tokenizer")
    return V


def split_padded(logits: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n, V_teacher]` logits -> (`[n, V]` fp32 contiguous logits of the classes < V,
    `[n]` fp32 probability mass the softmax over ALL `V_teacher` logits puts on the dropped
    columns >= V). Sampling and the entropy then see the distribution renormalised over
    the V kept classes. No extra pass when nothing is dropped (V_teacher == V). A NaN or
    +inf logit anywhere in a row (dropped columns included) is refused."""
    n, v_teacher = logits.shape
    if v_teacher < V:
        raise ValueError(f"logits have {v_teacher} columns, fewer than V={V}")
    if v_teacher == V:
        return logits, torch.zeros(n, dtype=torch.float32, device=logits.device)
    z = logits.float()
    lse_all = torch.logsumexp(z, dim=-1)
    bad = torch.isnan(lse_all) | torch.isposinf(lse_all)
    if bad.any():
        rows = torch.nonzero(bad).flatten()
        raise ValueError(f"logits contain NaN or inf at positions {rows[:5].tolist()} "
                         f"({rows.numel()} positions in all)")
    dropped = torch.exp(torch.logsumexp(z[:, V:], dim=-1) - lse_all)
    # a row of -inf only (no distribution) is refused by the sampler; report 0 for it here
    dropped = torch.where(torch.isneginf(lse_all), 0.0, dropped)
    return z[:, :V].contiguous(), dropped


def teacher_logit_chunks(model, input_ids: torch.Tensor, chunk: int, temperature: float,
                         vocab: int | None = None):
    """Yield `(b, start, logits [n, V], dropped_mass [n])` per window b and chunk of positions.

    `vocab`: the cache's V (`cache_vocab_size`; None: every teacher logit). The logits are
    the teacher's first V, divided by the temperature; `dropped_mass` is the probability the
    softmax over all of the teacher's logits (temperature applied) puts on the columns >= V
    (`split_padded`; zeros when there are none). The decoder runs once per micro-batch;
    lm_head runs on `chunk` positions at a time, so at V = 151,936 the logits never take
    more than chunk x V floats.
    """
    base, head = model.get_decoder(), model.get_output_embeddings()
    if model.config.get_text_config().to_dict().get("final_logit_softcapping"):
        raise ValueError("teachers with final_logit_softcapping are not supported yet")
    with torch.inference_mode():
        hidden = base(input_ids=input_ids).last_hidden_state
        for b in range(hidden.shape[0]):
            for s in range(0, hidden.shape[1], chunk):
                h = hidden[b, s:s + chunk].to(head.weight.device)
                logits = head(h).float() / temperature
                yield b, s, *split_padded(logits, logits.shape[-1] if vocab is None else vocab)


class UnitWriter:
    """The shards of one work unit: `cache-u{unit:07d}-l{launch:06d}-{n:04d}.tar`.

    Each shard is written as `*.tar.tmp`, fsynced, hashed and renamed when it holds
    --shard-samples windows (or at the unit's end); the unit counts as cached only when the
    ledger holds its done record, which lists these entries. The launch number in the name
    means a unit recomputed by a later launch (after a kill or a quarantine) never reuses a
    name; keys and bytes do not depend on it.
    """

    def __init__(self, out: Path, unit: int, launch: int, header: dict):
        self.out, self.unit, self.launch, self.header = out, unit, launch, header
        self.entries: list[dict] = []
        self.writer = None
        self.stats = empty_stats(header["num_classes"])
        self.shard = self._fresh()

    def _fresh(self) -> dict:
        return {"samples": 0, "positions": 0, "windows": []}

    def _finish_shard(self, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())     # durable before the done record names its hash
        self.entries.append({"file": final.name, "unit": self.unit, **self.shard,
                             "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)})
        os.replace(tmp, final)
        self.shard = self._fresh()

    def write(self, k: int, tokens: np.ndarray, records: np.ndarray, ecodes, n_distinct,
              truncated: int, dropped_mass: np.ndarray | None = None) -> None:
        import webdataset as wds

        if self.writer is None:
            # mtime must be the int 0: a float mtime makes tarfile (PAX format; webdataset
            # does not pass its `format` on) add a 1 KiB PAX header to every member, 2 KiB
            # per window = +2.4% at T=2048.
            pattern = str(self.out / unit_shard_name(self.unit, self.launch, 0)).replace(
                "-0000.tar", "-%04d.tar.tmp")
            self.writer = wds.ShardWriter(pattern, maxcount=self.header["shard_samples"],
                                          post=self._finish_shard, verbose=0, encoder=False,
                                          mtime=0)
        self.writer.write({"__key__": window_key(self.unit, k),
                           "tokens.u32": tokens.astype("<u4").tobytes(),
                           "kd.bin": records.tobytes()})
        self.shard["samples"] += 1
        self.shard["positions"] += len(tokens)
        self.shard["windows"].append(k)
        add_stats(self.stats, ecodes, n_distinct, truncated, len(tokens), dropped_mass)
        if self.writer.count >= self.writer.maxcount:
            # Finish (hash, rename) a full shard now, not when the next window arrives.
            self.writer.finish()

    def close(self) -> list[dict]:
        if self.writer is not None:
            self.writer.close()
        return self.entries


def empty_stats(num_classes: int) -> dict:
    # distinct_hist[k] = positions with k distinct classes, k = 0..U
    return {"entropy_code_hist": [0] * 256, "distinct_hist": [0] * (num_classes + 1),
            "positions": 0, "samples": 0, "rskd_truncated_positions": 0,
            "dropped_mass_sum": 0.0, "dropped_mass_max": 0.0}


def add_stats(st: dict, ecodes, n_distinct, truncated: int, positions: int,
              dropped_mass: np.ndarray | None) -> None:
    st["samples"] += 1
    st["positions"] += positions
    st["entropy_code_hist"] = (np.asarray(st["entropy_code_hist"])
                               + np.bincount(ecodes, minlength=256)).tolist()
    st["distinct_hist"] = (np.asarray(st["distinct_hist"])
                           + np.bincount(n_distinct, minlength=len(st["distinct_hist"]))).tolist()
    st["rskd_truncated_positions"] += int(truncated)
    if dropped_mass is not None and len(dropped_mass):
        st["dropped_mass_sum"] += float(np.sum(dropped_mass, dtype=np.float64))
        st["dropped_mass_max"] = max(st["dropped_mass_max"], float(np.max(dropped_mass)))


def build_header(cfg: CacheConfig, tok, model, codec: RecordCodec,
                 teacher_weights: dict[str, str] | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "teacher": cfg.teacher,
        "teacher_parameters": sum(p.numel() for p in model.parameters()),
        "teacher_weights": teacher_weights,
        "teacher_dtype": str(model.dtype).removeprefix("torch."),
        "teacher_logits": model.get_output_embeddings().weight.shape[0],
        "vocab_size": codec.vocab_size,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "eos_token_id": tok.eos_token_id,
        "seq_len": cfg.seq_len,
        "num_classes": cfg.num_classes,
        "id_bits": codec.id_bits,
        "w_bits": codec.w_bits,
        "sentinel": codec.sentinel,
        "bytes_per_position": codec.bytes_per_position,
        "sampler": cfg.sampler,
        "sampler_args": cfg.sampler_args,
        # The lm_head chunking sets how a window's random stream is consumed: part of the records.
        "chunk_positions": cfg.chunk_positions,
        "teacher_temperature": cfg.teacher_temperature,
        "seed": cfg.seed,
        "dataset": cfg.data_spec.to_json(),
        # Sizes and mtimes of the planned files (units.json); each unit's bytes are hashed by
        # the rank that caches it (its done record), so no rank reads the whole corpus.
        "dataset_fingerprint": None,       # set from the unit plan (corpus_fingerprint)
        "unit_bytes": cfg.unit_bytes,
        "max_windows": cfg.max_windows,
        "shard_samples": cfg.shard_samples,
        "weight_codebook": codec.weight_codebook().levels.tolist(),
        "entropy_codebook": codec.entropy_codebook().levels.tolist(),
        "entropy_max_error": codec.entropy_codebook().max_error,
        "layout": LAYOUT,
    }


def encode_window(codec: RecordCodec, ids, w, h, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    wc = codec.weight_codebook().encode(w, rng)
    ec = codec.entropy_codebook().encode(h)
    return codec.pack(ids, wc, ec), ec


def window_generators(seed: int, unit: int, k: int, device: torch.device):
    """Independent torch (sampling) and numpy (rounding) streams for window k of a unit:
    the records depend only on (seed, unit, window), not on ranks, batches or launches."""
    ss = np.random.SeedSequence([seed, unit, k])
    s_torch, s_np = ss.generate_state(2, dtype=np.uint64)
    gen = torch.Generator(device=device).manual_seed(int(s_torch) & (2**63 - 1))
    return gen, np.random.default_rng(int(s_np))


def plan_with_cap(spec: DataSpec, unit_bytes: int, tok, seq_len: int, max_windows: int | None) -> dict:
    """The unit plan; with --max-windows N, cut to the first N windows in plan order.

    Window counts are known only after tokenizing, so for a cap rank 0 tokenizes units in
    order until N windows are reached (reading only that prefix: a cap is for tests, demos
    and slices of a corpus) and records the last unit's `max_windows`."""
    plan = plan_units(spec, unit_bytes)
    if max_windows is None:
        return plan
    total = 0
    for i, u in enumerate(plan["units"]):
        n = sum(1 for _ in unit_windows(UnitReader(spec, plan, u["unit"]).documents(), tok, seq_len))
        if total + n >= max_windows:
            plan["units"] = plan["units"][:i + 1]
            plan["units"][i]["max_windows"] = max_windows - total
            return plan
        total += n
    return plan


def run(cfg: CacheConfig) -> dict | None:
    """Cache the corpus; returns the merged manifest on rank 0, None on other ranks."""
    info, comm = init_distributed()
    if comm is None:                                  # torchrun / srun without MPI
        import torch.distributed as dist

        dist.init_process_group("gloo")
        comm = TorchComm()
    # Under MPI a rank that raises would leave the others blocked in a collective forever:
    # its traceback goes to OUT/errors/rank{rank:04d}.txt and stderr, then every rank aborts.
    with abort_job_on_error(info, comm, "pipeline.cache", cfg.out):
        return _run(cfg, info, comm)


def corpus_fingerprint(plan: dict) -> str:
    """sha256 of the planned files' paths, sizes and mtimes (no file is read): the header's
    dataset fingerprint. Each unit's bytes are hashed by the rank that caches it."""
    files = [[f["path"], f["size"], f["mtime_ns"]] for f in plan["files"]]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _setup_launch(cfg: CacheConfig, out: Path, header: dict, tok, info: DistInfo):
    """Rank 0: begin this launch, then refuse a changed corpus or a different cache, plan the
    units (first launch) and take over the units of dead launches. Returns (header, plan,
    launch). The checks run before the launch begins (a refused run leaves the directory
    as it was) and again after it: the first writes of header.json and units.json come
    after the lease, so two jobs started at once on one directory cannot both write them."""
    _check_existing(cfg, out, header)
    launch = Ledger.begin_launch(out, info.world_size, cfg.lease_s, log=lambda m: log(m, info))
    try:
        header, plan = _plan_and_take_over(cfg, out, header, tok, info, launch.number)
    except BaseException as e:
        if info.world_size == 1:    # several ranks: the job is aborted, the heartbeat dies with it
            launch.stop("failed", reason=f"{type(e).__name__}: {e}"[:500])
        raise
    return header, plan, launch


def _check_existing(cfg: CacheConfig, out: Path, header: dict) -> tuple[dict, dict | None]:
    """Read-only: refuse a corpus changed since the plan (naming the file) or a directory
    holding another cache. Returns (header with the corpus fingerprint, the plan or None)."""
    plan = read_json(out / UNITS) if (out / UNITS).exists() else None
    if plan is not None:
        check_plan(cfg.data_spec, plan)            # names the file that changed
    files = plan if plan is not None else plan_units(cfg.data_spec, cfg.unit_bytes)
    header = {**header, "dataset_fingerprint": corpus_fingerprint(files)}
    check_compatible(out, header)
    return header, plan


def _plan_and_take_over(cfg: CacheConfig, out: Path, header: dict, tok, info: DistInfo,
                        launch: int) -> tuple[dict, dict]:
    header, plan = _check_existing(cfg, out, header)      # again, now under the lease
    if plan is None:
        plan = plan_with_cap(cfg.data_spec, cfg.unit_bytes, tok, cfg.seq_len, cfg.max_windows)
        if not plan["units"]:
            raise ValueError(f"--data {cfg.data}: no documents to cache (the corpus is empty)")
        write_json_atomic(out / UNITS, plan)
    if not (out / HEADER).exists():
        write_json_atomic(out / HEADER, header)
    ledger = Ledger(out, len(plan["units"]), launch, 0, info.world_size)
    stale = ledger.take_over_stale()
    done = ledger.done()
    keep = {s["file"] for rec in done.values() for s in rec["shards"]}
    # Before any rank of this launch writes: a shard file no done record names is part of a
    # unit an earlier launch did not finish (killed mid-unit, or between its last shard and
    # its done record); the unit is recomputed, so its files go. Only files of launches the
    # ledger knows (and begin_launch proved ended) are deleted: a file of an unknown launch
    # means the ledger was lost or copied incompletely, and deleting would lose data.
    for f in sorted(out.glob("cache-u*")):
        if f.name in keep:
            continue
        m = re.match(r"cache-u\d{7}-l(\d{6})-", f.name)
        if m is None or not (ledger_dir(out) / launch_name(int(m.group(1)))).exists():
            raise ValueError(f"{f}: a shard of no launch recorded in {ledger_dir(out)} (was "
                             "the ledger lost, or the cache copied without it?); restore "
                             f"{ledger_dir(out)}, or move the file out of {out}")
        log(f"removing {f.name}: part of an unfinished unit of an earlier launch", info)
        f.unlink()
    if stale:
        log(f"launch {launch}: took over {len(stale)} unit(s) claimed by earlier launches", info)
    log(f"launch {launch}: {len(done)} of {len(plan['units'])} unit(s) already cached", info)
    return header, plan


def _verify_done(out: Path, done: dict[int, dict], info: DistInfo) -> list[str]:
    """This rank's share (unit % world == rank) of the done units: every shard present with
    its recorded size and sha256. A restart trusts only what it verified."""
    problems = []
    for u, rec in done.items():
        if u % info.world_size != info.rank:
            continue
        for s in rec["shards"]:
            path = shard_path(out, s["file"], source=f"ledger/{done_name(u)}")
            if not path.exists():
                problems.append(f"{path} (unit {u}) is missing")
            elif path.stat().st_size != s["bytes"] or sha256_file(path) != s["sha256"]:
                problems.append(f"{path} (unit {u}): size or sha256 differs from its done record")
    return problems


def _run(cfg: CacheConfig, info: DistInfo, comm) -> dict | None:
    device = _pick_device(cfg, info)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, model = load_teacher(cfg, device)
    V = cache_vocab_size(tok, model)   # the tokenizer's classes; padded logits are dropped
    try:
        codec = RecordCodec(V, cfg.num_classes)
    except ValueError as e:
        raise ValueError(f"--teacher {cfg.teacher}: {e}") from e
    max_pos = model.config.get_text_config().to_dict().get("max_position_embeddings")
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the teacher's context "
                         f"(max_position_embeddings={max_pos}); use --seq-len <= {max_pos}")
    setup, launch = None, None
    try:
        if info.rank == 0:
            setup, launch = _rank0_setup(cfg, out, tok, model, codec, info)
        return _work(cfg, info, comm, out, setup, launch, tok, model, codec, V, device)
    except BaseException as e:
        # One process: end the launch here (its heartbeat thread would otherwise outlive the
        # error in this process). Several ranks: the job is aborted (MPI) or torn down
        # (torchrun) and the heartbeat stops with it; marking the launch ended while other
        # ranks may still be working would let a new launch take over their units.
        if launch is not None and info.world_size == 1:
            launch.stop("failed", reason=f"{type(e).__name__}: {e}"[:500])
        raise


def _rank0_setup(cfg: CacheConfig, out: Path, tok, model, codec: RecordCodec, info: DistInfo):
    """Rank 0 alone hashes the teacher's weights and plans; the others receive the result."""
    t_hash = time.perf_counter()
    weights = teacher_weight_hashes(cfg.teacher)
    log(f"teacher identity: sha256 of {len(weights or {})} weight file(s) in "
        f"{time.perf_counter() - t_hash:.1f} s", info)
    header = build_header(cfg, tok, model, codec, teacher_weights=weights)
    header, plan, launch = _setup_launch(cfg, out, header, tok, info)
    return (header, plan, launch.number), launch


def _work(cfg: CacheConfig, info: DistInfo, comm, out: Path, setup, launch, tok, model,
          codec: RecordCodec, V: int, device) -> dict | None:
    # The broadcast is also the barrier the ledger needs: no rank claims before rank 0 has
    # taken over the units of dead launches.
    header, plan, launch_no = comm.bcast_object(setup)
    ledger = Ledger(out, len(plan["units"]), launch_no, info.rank, info.world_size)
    problems = [p for part in comm.allgather_object(_verify_done(out, ledger.done(), info))
                for p in part]
    if problems:
        raise ValueError(f"{out}: {len(problems)} cached shard(s) failed verification: "
                         + "; ".join(problems[:5]) + f". Run `{repair_command(out)}` (it moves "
                         f"damaged units' shards into {out}/quarantine/ and drops their done "
                         "records), then rerun this command: those units are recomputed")
    mine = _cache_units(cfg, info, out, ledger, plan, header, tok, model, codec, V, device)
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


def _cache_units(cfg, info, out, ledger, plan, header, tok, model, codec, V, device) -> dict:
    """Claim units until none is left; cache each. Returns this rank's reading counts."""
    prog = StageProgress("teacher cache", None, "tokens", prefix=f"[rank {info.rank}] ")
    delay = _test_delay(info.rank)
    # Benchmark hook: SAMPLEDKD_TEST_STATIC_UNITS=1 gives unit u to rank u % world (the static
    # split that dynamic claiming is measured against in tools/bench_assign.py).
    only = ((lambda u: u % info.world_size == info.rank)
            if os.environ.get("SAMPLEDKD_TEST_STATIC_UNITS") == "1" else None)
    mine = {"rank": info.rank, "launch": ledger.launch, "node": info.node, "units": [],
            "documents": 0, "tokens": 0, "bytes": 0, "windows": 0}
    t0 = time.perf_counter()
    while (u := ledger.claim_next(only)) is not None:
        unit = plan["units"][u]
        reader = UnitReader(cfg.data_spec, plan, u)
        counts = UnitStats()
        writer = UnitWriter(out, u, ledger.launch, header)
        cap = unit.get("max_windows")
        batch: list[tuple[int, np.ndarray]] = []
        for k, tokens in enumerate(unit_windows(reader.documents(), tok, cfg.seq_len, counts)):
            if cap is not None and k >= cap:
                break
            if int(tokens.max()) >= V:
                raise ValueError(f"unit {u}, window {k}: token id {int(tokens.max())} >= teacher V={V}")
            batch.append((k, tokens))
            if len(batch) == cfg.batch_size:
                _flush(cfg, model, codec, device, u, batch, writer, prog, delay)
        if batch:
            _flush(cfg, model, codec, device, u, batch, writer, prog, delay)
        shards = writer.close()
        # sha256 of the unit's bytes: complete once its documents were read to the end (a
        # --max-windows cap may stop the last unit early: then None).
        rec = {"shards": shards, "stats": writer.stats, "windows": sum(s["samples"] for s in shards),
               "documents": reader.n_documents, "tokens": counts.tokens, "bytes": reader.n_bytes,
               "sha256": reader.sha256, "node": info.node}
        ledger.mark_done(u, rec)
        mine["units"].append(u)
        for k in ("documents", "tokens", "bytes", "windows"):
            mine[k] += rec[k]
    prog.close()
    mine["wall_time_s"] = time.perf_counter() - t0
    return mine


def _flush(cfg, model, codec, device, unit: int, batch, writer: UnitWriter, prog, delay: float) -> None:
    ids_in = torch.from_numpy(np.stack([t for _, t in batch]).astype(np.int64)).to(device)
    per_window: dict[int, list] = {b: [] for b in range(len(batch))}
    gens = [window_generators(cfg.seed, unit, k, device) for k, _ in batch]
    stats: dict = {}
    for b, _, logits, dropped in teacher_logit_chunks(model, ids_in, cfg.chunk_positions,
                                                      cfg.teacher_temperature, codec.vocab_size):
        before = stats.get("rskd_truncated_positions", 0)
        ids, w, h = sample_classes(logits, cfg.num_classes, cfg.sampler, gens[b][0],
                                   sentinel=codec.sentinel, stats=stats, **cfg.sampler_args)
        per_window[b].append((ids.cpu(), w.cpu(), h.cpu(),
                              stats.get("rskd_truncated_positions", 0) - before, dropped.cpu()))
    for b, (k, tokens) in enumerate(batch):
        parts = per_window[b]
        ids = torch.cat([p[0] for p in parts]).numpy()
        w = torch.cat([p[1] for p in parts]).numpy()
        h = torch.cat([p[2] for p in parts]).numpy()
        dm = torch.cat([p[4] for p in parts]).numpy()
        records, ec = encode_window(codec, ids, w, h, gens[b][1])
        n_distinct = (ids != codec.sentinel).sum(1)
        writer.write(k, tokens, records, ec, n_distinct, sum(p[3] for p in parts), dm)
    prog.update(len(batch), len(batch) * cfg.seq_len)
    batch.clear()
    if delay:
        time.sleep(delay)


def _test_delay(rank: int) -> float:
    """Test hook: SAMPLEDKD_TEST_SLOW_RANK="R:SECONDS" sleeps SECONDS after every batch of
    rank R, or of every rank with R = "*" (the dynamic-assignment test and benchmark slow one
    rank down; kill and resume tests slow them all)."""
    spec = os.environ.get("SAMPLEDKD_TEST_SLOW_RANK")
    if not spec:
        return 0.0
    r, _, s = spec.partition(":")
    return float(s) if r == "*" or int(r) == rank else 0.0


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
                 ("sampler", f"{m['sampler']} U={m['num_classes']}"),
                 ("wall time (this launch)", f"{m['wall_time_s']:.1f} s")]:
        t.add_row(k, str(v))
    Console(stderr=True).print(t)


def main(argv: list[str] | None = None) -> None:
    cfg = C.parse(CacheConfig, argv, __doc__)
    run(cfg)
    import torch.distributed as dist

    if dist.is_initialized():     # torchrun/srun without MPI: as pipeline.distill.main
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
