"""Stage 2 on a chat cache, 2 ranks, ZeRO-3: only trainable (assistant) positions get a loss,
are selected, enter the GLS queue or any count. The check: poison every masked position's
entropy byte in a copy of the cache (random entropies, the manifest's hashes updated so the
reader accepts the shards); the run on the poisoned copy is bit-identical to the run on the
original. A control poisons one window's trainable positions instead, and the result
changes (so the comparison can fail). Class records at a masked position are refused by the
reader (cache_format.checks.check_sample: the format holds sentinels there), naming the
shard, so they cannot reach the loss either."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from distill_runs import DS_TEST, ENV, REPO, TEXTS, TIMEOUT, metrics, torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]   # 2-rank torchrun runs, end to end

STEPS = 4


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory):
    from pipeline.stage1_cache import run as cache
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("chat_distill")
    rows = []
    for i in range(0, 120, 2):
        rows.append({"messages": [{"role": "user", "content": f"Tell me about fox {i}."},
                                  {"role": "assistant", "content": TEXTS[i]},
                                  {"role": "user", "content": "And the dog?"},
                                  {"role": "assistant", "content": TEXTS[i + 1]}]})
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(arch="llama", hidden=32, layers=1, heads=4, texts=TEXTS)
    teacher = build_tiny_model(root / "teacher", seed=0, **kw)
    student = build_tiny_model(root / "student", seed=1, **kw)
    cache.main(["--teacher", str(teacher), "--data", str(data), "--out", str(root / "cache"),
                "--seq-len", "64", "--max-windows", "16", "--shard-samples", "4",
                "--data-format", "chat"])
    return {"root": root, "student": student, "cache": root / "cache"}


def _poison(src: Path, dst: Path, which: str, seed: int = 0) -> int:
    """Copy cache `src` to `dst`, rewriting kd.bin of the masked positions: their entropy
    bytes (`which="masked"`) or their records and entropy bytes (`"masked_records"`); or of
    the trainable positions of one window (`"one_window"`) with random records and entropy
    bytes; decoded from docs/CACHE_FORMAT.md, not with the reader.
    Returns how many positions were poisoned."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    U, V, id_bits = m["num_classes"], m["vocab_size"], m["id_bits"]
    B, T = 3 * U + 1, m["seq_len"]
    rng = np.random.default_rng(seed)
    poisoned = 0
    for entry in m["shards"]:
        path = dst / entry["file"]
        with tarfile.open(path) as tf:
            members = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]
        data = {ti.name: buf for ti, buf in members}
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tw:
            for ti, buf in members:
                if ti.name.endswith(".kd.bin"):
                    key = ti.name[:-len(".kd.bin")]
                    bits = np.frombuffer(data[key + ".trainable.bits"], np.uint8)
                    flags = np.unpackbits(bits, bitorder="little")[:T].astype(bool)
                    if which in ("masked", "masked_records"):
                        rows = np.flatnonzero(~flags)
                    else:
                        rows = np.flatnonzero(flags) if poisoned == 0 else np.array([], int)
                    rec = np.frombuffer(buf, np.uint8).reshape(T, B).copy()
                    for p in rows:
                        if which == "masked":
                            rec[p, 3 * U] = rng.integers(0, 256)
                            continue
                        ids = rng.choice(V, size=U, replace=False)
                        codes = rng.integers(1, 1 << (24 - id_bits), size=U)
                        val = (ids | (codes << id_bits)).astype("<u4").view(np.uint8).reshape(U, 4)[:, :3]
                        rec[p, :3 * U] = val.reshape(-1)
                        rec[p, 3 * U] = rng.integers(0, 256)
                    poisoned += len(rows)
                    buf = rec.tobytes()
                ti.size = len(buf)
                tw.addfile(ti, io.BytesIO(buf))
        path.write_bytes(out.getvalue())

        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        entry["bytes"] = path.stat().st_size
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))
    return poisoned


def _distill(a: dict, cache: Path, out: Path, ok: bool = True) -> subprocess.CompletedProcess:
    args = ["-m", "pipeline.distill", "--student", str(a["student"]), "--cache", str(cache),
            "--out", str(out), "--deepspeed", str(DS_TEST), "--steps", str(STEPS), "--lr", "1e-3",
            "--micro-batch", "2", "--select", "gls", "--select-frac", "0.25", "--gls-warmup", "64",
            "--gls-queue", "2000", "--ce-weight", "0.75", "--ce-positions", "unselected",
            "--kd-weight", "0.75", "--seed", "0", "--no-tensorboard"]
    proc = subprocess.run(torchrun(args), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _same(run_a: Path, run_b: Path) -> bool:
    from safetensors.numpy import load_file

    drop = ("step_time_s", "tokens_per_s")
    ma = [{k: v for k, v in r.items() if k not in drop} for r in metrics(run_a)]
    mb = [{k: v for k, v in r.items() if k not in drop} for r in metrics(run_b)]
    wa, wb = load_file(run_a / "export" / "model.safetensors"), load_file(run_b / "export" / "model.safetensors")
    return ma == mb and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_masked_positions_never_reach_the_loss(chat_cache):
    a, root = chat_cache, chat_cache["root"]
    n_masked = _poison(a["cache"], root / "poisoned", "masked")
    assert n_masked > 100
    n_one = _poison(a["cache"], root / "control", "one_window")
    assert 0 < n_one < 64
    for name, cache in (("orig", a["cache"]), ("poisoned", root / "poisoned"), ("control", root / "control")):
        _distill(a, cache, root / f"run_{name}")
    recs = metrics(root / "run_orig")
    m = json.loads((a["cache"] / "manifest.json").read_text())
    # The cache's trainable fraction is what the steps saw (every window is used once or
    # more; the fraction per step varies around the cache's).
    cache_frac = m["stats"]["trainable_positions"] / m["stats"]["positions"]
    assert 0.3 < cache_frac < 0.95
    assert all(0.2 < r["trainable_frac"] < 1.0 for r in recs)
    # GLS top 25% of the trainable positions: the threshold is global (the FIFO's quantile
    # from step 1 on, warm-up 64 < one step's scores), so a step's fraction scatters around it
    sel = [r["selected_frac"] for r in recs]
    assert all(0.1 < f < 0.45 for f in sel) and 0.15 < sum(sel) / len(sel) < 0.35, sel
    assert _same(root / "run_orig", root / "run_poisoned"), "masked positions changed the run"
    assert not _same(root / "run_orig", root / "run_control"), "the control must change the run"
    # Records at masked positions: the reader refuses the shard in one line, naming it.
    _poison(a["cache"], root / "masked_records", "masked_records")
    proc = _distill(a, root / "masked_records", root / "run_masked_records", ok=False)
    assert "pipeline.distill: error: shard " in proc.stderr, proc.stderr[-3000:]
    assert "masked position(s) hold class records" in proc.stderr, proc.stderr[-3000:]
