"""A finished cache's statistics, from its manifest and the sizes of its files (DESIGN.md
sections 2 and 9; tools/inspect_cache.py prints them). With N positions = samples x T:

    bytes_on_disk             sum of the shard files' real sizes (os.stat), manifest excluded
    record_bytes_per_position 3U + 1 (U records of 3 B + 1 entropy byte); version 4
                              (allocated): (2T + 3R) / T, R records per window of T
    bytes_per_position        bytes_on_disk / N (records + 4 B of tokens + tar headers)
    reduction_vs_bf16 / fp32  2V / bytes_per_position, 4V / bytes_per_position
    reduction_vs_top128       128 x (2 B fp16 value + 4 B int32 id) / bytes_per_position
    tar_overhead_fraction     (bytes_on_disk - N x (3U+1+4)) / (N x (3U+1+4)); a chat cache's
                              payload also counts trainable.bits (ceil(T/8) B per sample)

Entropy statistics come from the manifest's histogram over the 256 entropy codebook levels
(exact for the quantized entropies); distinct-class statistics from its histogram of
non-sentinel ids per position (in an allocated cache, the records U_t each position got,
less any slot left empty where the teacher has fewer classes). In a chat cache (format version 3) both histograms are over
trainable positions only (the stage counts only those), and `trainable_stats` gives the
trainable fraction (`trainable_positions / positions`); in a text cache every position is
trainable.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.cache_format.checks import TOKEN_BYTES, check_sample, shard_owner, tar_samples
from pipeline.cache_format.codec import RecordCodec
from pipeline.cache_format.manifest import MANIFEST, shard_path
from pipeline.cache_format.verify import is_masked

TOP_K_BASELINE = 128            # a top-k logit cache as DistillKit-style pipelines store it
TOP_K_BYTES_PER_CLASS = 2 + 4   # fp16 value + int32 id
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def histogram_quantile(levels: np.ndarray, counts: np.ndarray, q: float) -> float:
    """Lower q-quantile of a sample given as `counts[k]` copies of `levels[k]` (levels sorted)."""
    cdf = np.cumsum(counts)
    return float(levels[int(np.searchsorted(cdf, q * cdf[-1], side="left"))])


def entropy_stats(m: dict, bins: int = 32) -> dict:
    """Mean, quantiles and an equal-width (in nats) rebinning of the code histogram."""
    levels = np.asarray(m["entropy_codebook"], dtype=np.float64)
    hist = np.asarray(m["stats"]["entropy_code_hist"], dtype=np.int64)
    if hist.shape != (256,) or levels.shape != (256,):
        raise ValueError(f"manifest: entropy histogram/codebook of {hist.shape}/{levels.shape} "
                         "entries, expected 256 each")
    n = int(hist.sum())
    top = math.log(m["vocab_size"])
    edges = np.linspace(0.0, top, bins + 1)
    which = np.clip(np.searchsorted(edges, levels, side="right") - 1, 0, bins - 1)
    rebinned = np.bincount(which, weights=hist, minlength=bins).astype(np.int64)
    out = {"positions": n, "max_nats": top, "max_quantization_error": m.get("entropy_max_error"),
           "hist_edges_nats": edges.tolist(), "hist_counts": rebinned.tolist()}
    if n:
        out["mean"] = float((levels * hist).sum() / n)
        out["quantiles"] = {f"p{round(q * 100):02d}": histogram_quantile(levels, hist, q)
                            for q in QUANTILES}
    return out


def distinct_stats(m: dict) -> dict:
    """Non-sentinel classes per position: mean, range, share of padded positions."""
    hist = np.asarray(m["stats"]["distinct_hist"], dtype=np.int64)
    U, n = m["num_classes"], int(hist.sum())
    out: dict = {"hist": hist[: U + 1].tolist(), "positions": n,
                 "allocated": m.get("window_records") is not None}
    if n:
        k = np.arange(len(hist))
        nz = np.nonzero(hist)[0]
        cdf = np.cumsum(hist) / n
        out |= {"mean": float((k * hist).sum() / n), "min": int(nz[0]), "max": int(nz[-1]),
                "quantiles": {f"p{round(q * 100):02d}": int(np.searchsorted(cdf, q))
                              for q in QUANTILES},
                "fraction_full": float(hist[U] / n) if U < len(hist) else 0.0,
                "fraction_padded": float(hist[:U].sum() / n)}
    return out


def storage_stats(cache_dir: Path, m: dict) -> dict:
    """Sizes from the file system; every ratio derived from them (see module docstring)."""
    V, T = m["vocab_size"], m["seq_len"]
    sizes, missing = {}, []
    for s in m["shards"]:
        try:
            p = shard_path(cache_dir, s.get("file"))
        except ValueError:            # named by --verify; never stat a path outside the cache
            missing.append(str(s.get("file")))
            continue
        if p.exists():
            sizes[s["file"]] = p.stat().st_size
        else:
            missing.append(s["file"])
    on_disk = sum(sizes.values())
    samples = sum(s["samples"] for s in m["shards"])
    positions = sum(s["positions"] for s in m["shards"])
    record_bpp = RecordCodec.from_header(m).bytes_per_position    # 3U+1; version 4: 2 + 3R/T
    payload = positions * (record_bpp + TOKEN_BYTES)
    if is_masked(m):                   # + trainable.bits: ceil(T/8) bytes per sample
        payload += samples * ((T + 7) // 8)
    if not positions:
        raise ValueError(f"{cache_dir}/{MANIFEST} lists no positions (an empty cache)")
    bpp = on_disk / positions
    listed = {s["file"] for s in m["shards"]}
    stray = sorted(p.name for p in cache_dir.glob("cache-*.tar*") if p.name not in listed)
    return {
        "samples": samples, "positions": positions, "shards": len(m["shards"]),
        "positions_expected": samples * T,
        "bytes_on_disk": on_disk, "bytes_in_manifest": sum(s["bytes"] for s in m["shards"]),
        "manifest_bytes": (cache_dir / MANIFEST).stat().st_size,
        "missing_shards": missing, "stray_files": stray,
        "record_bytes_per_position": record_bpp,
        "bytes_per_position": bpp,
        "tar_overhead_fraction": (on_disk - payload) / payload,
        "reduction_vs_bf16": 2 * V / bpp, "reduction_vs_fp32": 4 * V / bpp,
        "reduction_vs_top128": TOP_K_BASELINE * TOP_K_BYTES_PER_CLASS / bpp,
        "record_reduction_vs_bf16": 2 * V / record_bpp,
        "record_reduction_vs_fp32": 4 * V / record_bpp,
        "record_reduction_vs_top128": TOP_K_BASELINE * TOP_K_BYTES_PER_CLASS / record_bpp,
    }


def trainable_stats(m: dict) -> dict:
    """Trainable positions from the manifest's stats (chat caches; every position otherwise)."""
    st, positions = m["stats"], m["positions"]
    if not is_masked(m):
        return {"masked": False, "positions": positions, "trainable_positions": positions,
                "fraction": 1.0}
    n = int(st.get("trainable_positions", 0))
    return {"masked": True, "positions": positions, "trainable_positions": n,
            "fraction": n / positions if positions else 0.0,
            "conversations": st.get("conversations"),
            "skipped_no_assistant": st.get("skipped_no_assistant")}


def settings(m: dict) -> dict:
    """The header fields a report shows, and the teacher-side statistics per position."""
    st = m["stats"]
    n = st.get("positions") or m["positions"]
    return {k: m.get(k) for k in ("teacher", "teacher_parameters", "vocab_size", "seq_len",
                                   "num_classes", "class_budget", "window_records",
                                   "id_bits", "w_bits", "sentinel", "sampler",
                                   "sampler_args", "teacher_temperature", "seed", "dataset",
                                   "max_windows", "shard_samples", "world_size", "wall_time_s")} | {
        "rskd_truncated_positions": st.get("rskd_truncated_positions", 0),
        "rskd_truncated_fraction": st.get("rskd_truncated_positions", 0) / n if n else 0.0,
        # Probability mass of the teacher's logits beyond V (a padded output layer), dropped
        # before sampling: per-position sum and max over the cache. None: not recorded (a
        # cache written before these statistics existed).
        "teacher_logits": m.get("teacher_logits"),
        "dropped_mass_mean": st["dropped_mass_sum"] / n if n and "dropped_mass_sum" in st else None,
        "dropped_mass_max": st.get("dropped_mass_max")}


def first_sample_entropy(cache_dir: Path, m: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """Key, per-position entropy [T] (nats) and distinct counts [T] of the first sample that
    decodes (checks.check_sample), in manifest order: what the report's plot shows."""
    codec = RecordCodec.from_header(m)
    levels = np.asarray(m["entropy_codebook"], dtype=np.float32)
    for s in m["shards"]:
        path = shard_path(cache_dir, s.get("file"))
        if not path.exists():
            continue
        for key, members in tar_samples(path.read_bytes()):
            _, sample = check_sample(codec, m["seq_len"], m.get("format_version") or 0, key,
                                     members, shard_owner(path.name))
            if sample is not None:
                return key, levels[sample.entropy_codes], sample.distinct
    raise ValueError(f"{cache_dir}: no readable shard to plot a sample from")
