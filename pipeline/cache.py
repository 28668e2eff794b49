"""Stage 1: run the teacher once over the corpus and write the 37-byte/position cache.

    python -m pipeline.cache --teacher PATH_OR_ID --data PATH_OR_NAME --out DIR \
        [--seq-len 2048] [--num-classes 12] [--sampler priority] [--batch-size 4]
    mpiexec -n 2 python -m pipeline.cache ...      # or: srun --mpi=pmi2 (slurm/cache.sh)

Per rank: windows w with w % world == rank (pipeline.data), teacher forward in
micro-batches, lm_head applied to chunks of positions (the [B, T, V] logits never exist),
sample_classes -> codebooks -> RecordCodec.pack -> one WebDataset sample per window:
`__key__` = {rank:04d}-{window:09d}, `tokens.u32` (T x uint32 LE), `kd.bin` (T x 37 B).

Crash safety: a shard is written as `*.tar.tmp`; as soon as it holds --shard-samples
windows it is hashed, recorded in this rank's manifest part (atomic rewrite, with the
windows it holds), then renamed. A restart verifies recorded shards, deletes partial files,
and computes exactly the windows no verified shard holds (not "the windows after the
last one": a repair can leave a gap anywhere); completed shards are never rewritten and a
shard name is never reused (the part keeps `next_shard`). A damaged or missing shard stops
the restart with an error naming the repair: `python tools/inspect_cache.py OUT --verify
--quarantine` moves it into OUT/quarantine/ and drops its entry, and a rerun with the same
arguments recomputes its windows into new shards. A restart must use the same number of ranks
(window w belongs to rank w % world). Samples are seeded per window (seed, window index),
so the records do not depend on the number of ranks, the batch size or a restart. Under
MPI a rank that fails aborts the whole job (the others would otherwise wait forever in
the final gather), after writing its traceback to stderr and to OUT/errors/rank{rank:04d}.txt.
"""

from __future__ import annotations

import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import config as C
from pipeline.codec import FORMAT_VERSION, RecordCodec
from pipeline.data import (DataSpec, dataset_fingerprint, load_documents, rank_windows,
                           tokenizer_fingerprint)
from pipeline.distributed import (DistInfo, TorchComm, abort_job_on_error, init_distributed,
                                  log)
from pipeline.manifest import (MANIFEST, check_compatible, check_world, merge_parts,
                               next_shard_number, part_name, repair_command, sha256_file,
                               shard_name, shard_number, shard_path, write_json_atomic)
from pipeline.progress import StageProgress
from pipeline.sampling import METHODS, sample_classes


@dataclass(frozen=True)
class CacheConfig:
    teacher: str = C.opt(None, "teacher: local HF checkpoint directory or hub id")
    data: str = C.opt(None, "corpus: local json/jsonl/parquet/txt file or folder, or a hub dataset")
    out: str = C.opt(None, "output cache directory")
    text_field: str = C.opt("text", "column holding the document text")
    split: str = C.opt("train", "dataset split")
    dataset_name: str | None = C.opt(None, "hub dataset configuration name")
    streaming: bool = C.opt(False, "stream the dataset instead of materializing it")
    seq_len: int = C.opt(2048, "window length T in tokens")
    num_classes: int = C.opt(12, "U: sampled classes stored per position")
    sampler: str = C.opt("priority", "class sampler", choices=METHODS)
    rskd_draws: int = C.opt(50, "rskd: draws with replacement per position")
    rskd_tau: float = C.opt(1.0, "rskd: proposal temperature tau_s")
    teacher_temperature: float = C.opt(1.0, "temperature applied to teacher logits before sampling")
    seed: int = C.opt(0, "seed; every window's randomness derives from (seed, window index)")
    batch_size: int = C.opt(1, "windows per teacher forward pass")
    chunk_positions: int = C.opt(2048, "positions per lm_head call (bounds [chunk, V] logits)")
    max_windows: int | None = C.opt(None, "use only the first N windows of the corpus")
    shard_samples: int = C.opt(256, "windows per shard (256 x 2048 tokens = 21 MB)")
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
        if self.max_windows is not None and self.max_windows < 1:
            problems.append(f"--max-windows {self.max_windows} must be >= 1")
        if self.teacher_temperature <= 0:
            problems.append(f"--teacher-temperature {self.teacher_temperature} must be > 0")
        if self.sampler == "rskd" and self.rskd_tau != 1.0:
            # count/N * p/q can exceed 1 when q is flatter than p; the version-1 weight
            # codebook ends at 1.0 and nothing is clipped.
            problems.append(f"--rskd-tau {self.rskd_tau}: only 1.0 is supported by the version-1 "
                            "weight codebook (weights count/N * p/q may exceed 1)")
        C.raise_if(problems, "cache")

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(self.data, self.text_field, self.split, self.dataset_name, self.streaming)

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


def _tar_windows(path: Path, rank: int) -> list[int]:
    """Window indices of the samples in a (verified) shard, read from its member names."""
    windows: list[int] = []
    with tarfile.open(path, mode="r:") as tf:
        for m in tf:
            key = m.name.rsplit("/", 1)[-1].partition(".")[0]
            r, _, w = key.partition("-")
            if not (len(r) == 4 and len(w) == 9 and r.isdigit() and w.isdigit()) or int(r) != rank:
                raise ValueError(f"{path}: sample key {key!r} is not {rank:04d}-{{window:09d}}; "
                                 f"the shard is damaged or foreign")
            if not windows or windows[-1] != int(w):
                windows.append(int(w))
    return windows


def teacher_logit_chunks(model, input_ids: torch.Tensor, chunk: int, temperature: float):
    """Yield `(b, start, logits [n, V])` per window b and chunk of positions.

    The decoder runs once per micro-batch; lm_head runs on `chunk` positions at a time, so
    at V = 151,936 the logits never take more than chunk x V floats.
    """
    base, head = model.get_decoder(), model.get_output_embeddings()
    if model.config.get_text_config().to_dict().get("final_logit_softcapping"):
        raise ValueError("teachers with final_logit_softcapping are not supported yet")
    with torch.inference_mode():
        hidden = base(input_ids=input_ids).last_hidden_state
        for b in range(hidden.shape[0]):
            for s in range(0, hidden.shape[1], chunk):
                h = hidden[b, s:s + chunk].to(head.weight.device)
                yield b, s, head(h).float() / temperature


class RankWriter:
    """One rank's shards and manifest part (see module docstring for the protocol)."""

    def __init__(self, out: Path, rank: int, header: dict, part: dict | None,
                 info: DistInfo | None = None):
        self.out, self.rank, self.header, self.info = out, rank, header, info
        self.part = part or {"rank": rank, "header": header, "shards": [], "finished": False,
                             "stats": {}, "next_shard": 0}
        self.part["finished"] = False
        # Which windows a rank holds depends on the world size (w % world == rank): a
        # restart with another world size is refused (manifest.check_world).
        self.part["world_size"] = info.world_size if info is not None else 1
        self.part["node"] = info.node if info is not None else os.uname().nodename
        self.writer = None
        self.shard_stats = self._empty_stats()
        self.shard_windows: list[int] = []      # windows of the shard being filled

    def _empty_stats(self) -> dict:
        # distinct_hist[k] = positions with k distinct classes, k = 0..U
        return {"entropy_code_hist": [0] * 256,
                "distinct_hist": [0] * (self.header["num_classes"] + 1), "positions": 0,
                "samples": 0, "rskd_truncated_positions": 0}

    def recover(self) -> set[int]:
        """Verify recorded shards, finish interrupted renames, delete partial files.

        Returns the windows this rank already holds: the keys of its verified shards (the
        part's `windows` of each entry, or for entries written before those were recorded,
        the member names of the verified tar), wherever they lie in the rank's sequence.
        Records `next_shard` (1 + the highest shard number ever used) before any new shard
        is opened, so no name is reused."""
        world = self.part["world_size"]
        fix = (f"run `{repair_command(self.out)}` (it moves damaged shards into "
               f"{self.out}/quarantine/ and drops their entries), then rerun this command with "
               "the same arguments: their windows are recomputed into new shards")
        done: dict[int, str] = {}
        for s in self.part["shards"]:
            final = shard_path(self.out, s["file"], source=part_name(self.rank))
            tmp = final.with_name(final.name + ".tmp")
            if not final.exists() and tmp.exists() and sha256_file(tmp) == s["sha256"]:
                os.replace(tmp, final)       # crashed between recording and renaming
            if not final.exists():
                raise ValueError(f"{final} is recorded in {part_name(self.rank)} but missing; "
                                 f"restore it, or {fix}")
            if sha256_file(final) != s["sha256"]:
                raise ValueError(f"{final}: sha256 differs from {part_name(self.rank)}; the shard "
                                 f"is damaged or was replaced. Restore it, or {fix}")
            if "windows" not in s:           # an entry written before windows were recorded
                try:
                    s["windows"] = _tar_windows(final, self.rank)
                except (tarfile.TarError, EOFError) as e:
                    raise ValueError(f"{final}: matches its sha256 but is not a readable tar "
                                     f"({e}); {fix}") from e
            windows = s["windows"]
            if len(windows) != s["samples"] or len(set(windows)) != len(windows):
                raise ValueError(f"{final}: holds {len(set(windows))} distinct window(s), "
                                 f"{part_name(self.rank)} records {s['samples']}; {fix}")
            for w in windows:
                if w % world != self.rank:
                    raise ValueError(f"{final}: window {w} belongs to rank {w % world} of "
                                     f"{world}, not to rank {self.rank}; {fix}")
                if w in done:
                    raise ValueError(f"window {w} is in both {done[w]} and {s['file']} "
                                     f"(recorded in {part_name(self.rank)}); {fix}")
                done[w] = s["file"]
        # Count every name used so far (recorded, partial, quarantined) before deleting
        # partial files, and record it before a new shard can take a name.
        self.part["next_shard"] = next_shard_number(self.out, self.rank, self.part)
        recorded = {s["file"] for s in self.part["shards"]}
        for f in self.out.glob(f"cache-r{self.rank:04d}-*"):
            if f.name not in recorded:
                log(f"removing partial shard {f.name} from an interrupted run", self.info,
                    all_ranks=True)
                f.unlink()
        # A kill during write_json_atomic leaves its temporary file behind.
        leftovers = [part_name(self.rank)] + ([MANIFEST] if self.rank == 0 else [])
        for f in [f for name in leftovers for f in self.out.glob(f"{name}.tmp*")]:
            f.unlink()
        write_json_atomic(self.out / part_name(self.rank), self.part, indent=None)
        return set(done)

    def _finish_shard(self, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())     # durable before the part records its hash
        st = self.shard_stats
        # windows: which windows the shard holds (a restart trusts these once the sha256
        # matches); rskd_truncated_positions: lets a quarantine recompute the part's stats.
        entry = {"file": final.name, "samples": st["samples"], "positions": st["positions"],
                 "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp),
                 "rskd_truncated_positions": st["rskd_truncated_positions"],
                 "windows": self.shard_windows}
        self.part["shards"].append(entry)
        self.part["next_shard"] = max(self.part.get("next_shard", 0),
                                      shard_number(final.name, self.rank) + 1)
        for k, v in st.items():
            agg = self.part["stats"]
            agg[k] = [a + b for a, b in zip(agg[k], v)] if isinstance(v, list) and k in agg else \
                (list(v) if isinstance(v, list) else agg.get(k, 0) + v)
        write_json_atomic(self.out / part_name(self.rank), self.part, indent=None)  # record,
        os.replace(tmp, final)                                                    # then rename
        self.shard_stats = self._empty_stats()
        self.shard_windows = []

    def write(self, window: int, tokens: np.ndarray, records: np.ndarray, ecodes, n_distinct,
              truncated: int) -> None:
        import webdataset as wds

        if self.writer is None:
            # mtime must be the int 0: a float mtime makes tarfile (PAX format; webdataset
            # does not pass its `format` on) add a 1 KiB PAX header to every member, 2 KiB
            # per window = +2.4% at T=2048.
            pattern = str(self.out / shard_name(self.rank, 0)).replace("000000.tar", "%06d.tar.tmp")
            self.writer = wds.ShardWriter(pattern, maxcount=self.header["shard_samples"],
                                          start_shard=self.part.get("next_shard", 0),
                                          post=self._finish_shard, verbose=0, encoder=False,
                                          mtime=0)
        self.writer.write({"__key__": f"{self.rank:04d}-{window:09d}",
                           "tokens.u32": tokens.astype("<u4").tobytes(),
                           "kd.bin": records.tobytes()})
        self.shard_windows.append(window)
        st = self.shard_stats
        st["samples"] += 1
        st["positions"] += len(tokens)
        st["entropy_code_hist"] = (np.asarray(st["entropy_code_hist"])
                                   + np.bincount(ecodes, minlength=256)).tolist()
        st["distinct_hist"] = (np.asarray(st["distinct_hist"])
                               + np.bincount(n_distinct, minlength=len(st["distinct_hist"]))).tolist()
        st["rskd_truncated_positions"] += truncated
        if self.writer.count >= self.writer.maxcount:
            # Finish (hash, record, rename) a full shard now, not when the next window
            # arrives: a crash then loses at most the shard being filled. The next write
            # opens the next shard (ShardWriter.write calls next_stream when none is open).
            self.writer.finish()

    def close(self) -> dict:
        if self.writer is not None:
            self.writer.close()
        self.part["finished"] = True
        write_json_atomic(self.out / part_name(self.rank), self.part, indent=None)
        return self.part


def build_header(cfg: CacheConfig, tok, model, codec: RecordCodec,
                 teacher_weights: dict[str, str] | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "teacher": cfg.teacher,
        "teacher_parameters": sum(p.numel() for p in model.parameters()),
        "teacher_weights": teacher_weights,
        "teacher_dtype": str(model.dtype).removeprefix("torch."),
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
        "dataset_fingerprint": dataset_fingerprint(cfg.data_spec),
        "max_windows": cfg.max_windows,
        "shard_samples": cfg.shard_samples,
        "weight_codebook": codec.weight_codebook().levels.tolist(),
        "entropy_codebook": codec.entropy_codebook().levels.tolist(),
        "entropy_max_error": codec.entropy_codebook().max_error,
    }


def encode_window(codec: RecordCodec, ids, w, h, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    wc = codec.weight_codebook().encode(w, rng)
    ec = codec.entropy_codebook().encode(h)
    return codec.pack(ids, wc, ec), ec


def window_generators(seed: int, window: int, device: torch.device):
    """Independent torch (sampling) and numpy (rounding) streams for one window."""
    ss = np.random.SeedSequence([seed, window])
    s_torch, s_np = ss.generate_state(2, dtype=np.uint64)
    gen = torch.Generator(device=device).manual_seed(int(s_torch) & (2**63 - 1))
    return gen, np.random.default_rng(int(s_np))


def run(cfg: CacheConfig) -> dict | None:
    """Cache the corpus; returns the merged manifest on rank 0, None on other ranks."""
    info, comm = init_distributed()
    if comm is None:                                  # torchrun / srun without MPI
        import torch.distributed as dist

        dist.init_process_group("gloo")
        comm = TorchComm()
    # Under MPI a rank that raises would leave the others blocked in gather_object forever:
    # its traceback goes to OUT/errors/rank{rank:04d}.txt and stderr, then every rank aborts.
    with abort_job_on_error(info, comm, "pipeline.cache", cfg.out):
        return _run(cfg, info, comm)


def _run(cfg: CacheConfig, info: DistInfo, comm) -> dict | None:
    device = _pick_device(cfg, info)
    out = Path(cfg.out)
    load_documents(cfg.data_spec)     # fail fast on a missing/empty corpus or a wrong --text-field
    out.mkdir(parents=True, exist_ok=True)
    tok, model = load_teacher(cfg, device)
    V = model.get_output_embeddings().weight.shape[0]
    try:
        codec = RecordCodec(V, cfg.num_classes)
    except ValueError as e:
        raise ValueError(f"--teacher {cfg.teacher}: {e}") from e
    max_pos = model.config.get_text_config().to_dict().get("max_position_embeddings")
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the teacher's context "
                         f"(max_position_embeddings={max_pos}); use --seq-len <= {max_pos}")
    t_hash = time.perf_counter()
    weights = teacher_weight_hashes(cfg.teacher)
    log(f"teacher identity: sha256 of {len(weights or {})} weight file(s) in "
        f"{time.perf_counter() - t_hash:.1f} s", info)
    header = build_header(cfg, tok, model, codec, teacher_weights=weights)
    part = check_compatible(out, header, info.rank)
    check_world(out, info.world_size)
    writer = RankWriter(out, info.rank, header, part, info)
    done = writer.recover()
    if done:
        log(f"resuming after {len(done)} cached windows "
            f"({len(writer.part['shards'])} shards verified)", info, all_ranks=True)

    prog = StageProgress("teacher cache", None, "tokens", prefix=f"[rank {info.rank}] ")
    stats: dict = {}
    batch: list[tuple[int, np.ndarray]] = []

    def flush():
        ids_in = torch.from_numpy(np.stack([t for _, t in batch]).astype(np.int64)).to(device)
        per_window: dict[int, list] = {b: [] for b in range(len(batch))}
        gens = [window_generators(cfg.seed, w, device) for w, _ in batch]
        for b, _, logits in teacher_logit_chunks(model, ids_in, cfg.chunk_positions,
                                                 cfg.teacher_temperature):
            before = stats.get("rskd_truncated_positions", 0)
            ids, w, h = sample_classes(logits, cfg.num_classes, cfg.sampler, gens[b][0],
                                       sentinel=codec.sentinel, stats=stats, **cfg.sampler_args)
            per_window[b].append((ids.cpu(), w.cpu(), h.cpu(),
                                  stats.get("rskd_truncated_positions", 0) - before))
        for b, (window, tokens) in enumerate(batch):
            parts = per_window[b]
            ids = torch.cat([p[0] for p in parts]).numpy()
            w = torch.cat([p[1] for p in parts]).numpy()
            h = torch.cat([p[2] for p in parts]).numpy()
            records, ec = encode_window(codec, ids, w, h, gens[b][1])
            n_distinct = (ids != codec.sentinel).sum(1)
            writer.write(window, tokens, records, ec, n_distinct, sum(p[3] for p in parts))
        prog.update(len(batch), len(batch) * cfg.seq_len)
        batch.clear()

    t0 = time.perf_counter()
    for window, tokens in rank_windows(cfg.data_spec, tok, cfg.seq_len, info.rank,
                                       info.world_size, done=done, max_windows=cfg.max_windows):
        if int(tokens.max()) >= V:
            raise ValueError(f"window {window}: token id {int(tokens.max())} >= teacher V={V}")
        batch.append((window, tokens))
        if len(batch) == cfg.batch_size:
            flush()
    if batch:
        flush()
    prog.close()
    part = writer.close()
    part["wall_time_s"] = time.perf_counter() - t0
    parts = comm.gather_object(part)
    if info.rank != 0:
        return None
    if not any(p["shards"] for p in parts):
        raise ValueError(f"--data {cfg.data}: no complete window of {cfg.seq_len} tokens "
                         f"(the corpus is empty or shorter than one window)")
    manifest = merge_parts(header, parts)
    manifest["wall_time_s"] = max(p["wall_time_s"] for p in parts)
    write_json_atomic(out / MANIFEST, manifest)
    _summary(manifest, out)
    return manifest


def _summary(m: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"teacher cache: {out}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    bpp = m["bytes"] / max(m["positions"], 1)
    for k, v in [("ranks", m["world_size"]), ("shards", len(m["shards"])),
                 ("windows", m["samples"]), ("positions", f"{m['positions']:,}"),
                 ("bytes on disk", f"{m['bytes']:,}"), ("bytes / position", f"{bpp:.2f}"),
                 ("V / id bits / w bits", f"{m['vocab_size']} / {m['id_bits']} / {m['w_bits']}"),
                 ("sampler", f"{m['sampler']} U={m['num_classes']}"),
                 ("wall time", f"{m['wall_time_s']:.1f} s")]:
        t.add_row(k, str(v))
    Console(stderr=True).print(t)


def main(argv: list[str] | None = None) -> None:
    cfg = C.parse(CacheConfig, argv, __doc__)
    run(cfg)


if __name__ == "__main__":
    main()
