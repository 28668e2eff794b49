"""Stage 1 (pipeline.cache) end to end on tiny real teachers.

Every check is against an independent reference: shards are read with `tarfile` and the
24-bit records unpacked by hand (not by the codec or the reader); tokens are compared with a
per-document tokenization; records with a recomputation from the teacher's full HF forward
(`model(input_ids).logits`, not the stage's chunked lm_head) through the same seeded
sampler and codebooks the stage uses.

Multi-process runs use the venv's MPICH (`mpiexec -n 2`) and are marked `dist`; the kill -9
test and the T=2048 storage test are also `slow`. `-m "not dist and not slow"` runs the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import main as cache_main
from pipeline.cache import window_generators
from pipeline.codec import RecordCodec
from pipeline.sampling import sample_classes
from references import reference_windows

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
T = 64
U = 12
SEED = 7
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "distillation", "42", "100", "answer", "question", "because", "naïve", "é"]


# -- fixtures and independent helpers ---------------------------------------------------------

def build_teacher(out: Path, arch: str = "llama", vocab_size: int | None = 4096, seed: int = 0,
                  sharpen: float = 30.0) -> Path:
    """A tiny real HF teacher (hidden 32, 1 layer) with peaked output distributions.

    Random init gives near-uniform logits; scaling the (tied) embedding sharpens them so
    positions span low and high entropies. V is padded to 4096 (12 id bits, 12 weight
    bits) unless given.
    """
    from transformers import AutoModelForCausalLM

    from pipeline.tiny import build_tiny_model

    build_tiny_model(out, arch=arch, vocab_size=vocab_size, hidden=32, layers=1, heads=4, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(sharpen)
    model.save_pretrained(out)
    return out


def make_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(0, 50)))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "source": "test"}, ensure_ascii=False) + "\n")
    return path


def read_shards(cache: Path) -> dict[str, dict[str, bytes]]:
    """key -> {"tokens.u32": bytes, "kd.bin": bytes, "file": name}, by plain tarfile."""
    samples: dict[str, dict] = {}
    for shard in sorted(cache.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                entry = samples.setdefault(key, {"file": shard.name})
                assert entry["file"] == shard.name, f"{key} in {entry['file']} and {shard.name}"
                assert ext not in entry, f"{key}.{ext} twice"
                entry[ext] = tf.extractfile(m).read()
    return samples


def decode_kd(kd: bytes, manifest: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hand-written decoder of DESIGN.md section 2: (ids [T,U], weights [T,U], entropy [T])."""
    V, Uc = manifest["vocab_size"], manifest["num_classes"]
    id_bits = V.bit_length()
    a = np.frombuffer(kd, dtype=np.uint8).reshape(-1, 3 * Uc + 1).astype(np.int64)
    b = a[:, :3 * Uc].reshape(-1, Uc, 3)
    rec = b[..., 0] + 256 * b[..., 1] + 65536 * b[..., 2]
    ids = rec % (1 << id_bits)
    wcode = rec // (1 << id_bits)
    wl = np.asarray(manifest["weight_codebook"], dtype=np.float32)
    el = np.asarray(manifest["entropy_codebook"], dtype=np.float32)
    return ids, wl[wcode], el[a[:, 3 * Uc]]


def recompute(model, tokens: np.ndarray, window: int, manifest: dict):
    """What the stage must have written for one window: full HF forward, then the seeded
    sampler and the codebooks exactly as RankWriter/flush use them."""
    codec = RecordCodec(manifest["vocab_size"], manifest["num_classes"])
    with torch.inference_mode():
        logits = model(input_ids=torch.as_tensor(tokens[None].astype(np.int64))).logits[0].float()
    logits = logits / manifest["teacher_temperature"]
    gen, rng = window_generators(manifest["seed"], window, torch.device("cpu"))
    ids, w, h = sample_classes(logits, manifest["num_classes"], manifest["sampler"], gen,
                               sentinel=codec.sentinel, stats={}, **manifest["sampler_args"])
    wc = codec.weight_codebook().encode(w.numpy(), rng)
    ec = codec.entropy_codebook().encode(h.numpy())
    wl = codec.weight_codebook().levels
    el = codec.entropy_codebook().levels
    return ids.numpy(), wl[wc], el[ec], w.numpy(), logits


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def cache_args(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--seq-len",
            str(T), "--num-classes", str(U), "--seed", str(SEED), *extra]


def mpi_env() -> dict[str, str]:
    # One BLAS thread per rank: two ranks on two cores, no oversubscription.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_mpi(args: list[str], n: int = 2, **kw) -> subprocess.Popen:
    """`mpiexec -n N python -m pipeline.cache ARGS` in its own process group."""
    if not MPIEXEC.exists():
        pytest.skip(f"{MPIEXEC} not found (pip install mpich mpi4py into the venv)")
    return subprocess.Popen([str(MPIEXEC), "-n", str(n), sys.executable, "-m", "pipeline.cache",
                             *args], cwd=REPO, env=mpi_env(), text=True, start_new_session=True,
                            **kw)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started (mpiexec, its proxy and the ranks), if alive."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_mpi(args: list[str], n: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion; on timeout, kill the whole job (a hang is a failure, not a leak)."""
    proc = start_mpi(args, n, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def file_state(cache: Path, pattern: str = "*") -> dict[str, tuple[int, int, str]]:
    """name -> (inode, mtime_ns, sha256) of every file matching `pattern`."""
    out = {}
    for f in sorted(cache.glob(pattern)):
        st = f.stat()
        out[f.name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def manifest_of(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def windows_of(samples: dict) -> dict[int, str]:
    """window -> key; fails on a window stored twice."""
    seen: dict[int, str] = {}
    for key in samples:
        rank, w = (int(x) for x in key.split("-"))
        assert w not in seen, f"window {w} stored twice: {seen[w]} and {key}"
        seen[w] = key
    return seen


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Teacher, tokenizer, corpus (>= 80 windows of T) and its reference windows."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("cache")
    teacher = build_teacher(root / "teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    docs = make_docs(400, seed=11)
    data = write_jsonl(root / "corpus.jsonl", docs)
    ref = reference_windows(docs, tok, T)
    assert len(ref) >= 80, len(ref)
    return {"root": root, "teacher": teacher, "tok": tok, "data": data, "ref": ref,
            "model": load_model(teacher)}


@pytest.fixture(scope="module")
def cache1(env):
    """One rank, in process: the first 24 windows, batches of 3, shards of 5."""
    out = env["root"] / "one-rank"
    cache_main(cache_args(env["teacher"], env["data"], out, "--max-windows", "24",
                          "--batch-size", "3", "--shard-samples", "5"))
    return out


@pytest.fixture(scope="module")
def cache2(env):
    """Two MPI ranks: the same config and windows, batches of 2, shards of 4."""
    out = env["root"] / "two-ranks"
    proc = run_mpi(cache_args(env["teacher"], env["data"], out, "--max-windows", "24",
                              "--batch-size", "2", "--shard-samples", "4"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def check_records(cache: Path, env: dict, windows: list[int] | None = None) -> dict:
    """Every stored window: key, tokens and records equal the independent references."""
    m = manifest_of(cache)
    samples = read_shards(cache)
    by_window = windows_of(samples)
    for w, key in sorted(by_window.items()):
        if windows is not None and w not in windows:
            continue
        rank = int(key.split("-")[0])
        assert rank == w % m["world_size"]
        assert samples[key]["file"].startswith(f"cache-r{rank:04d}-")
        tokens = np.frombuffer(samples[key]["tokens.u32"], dtype="<u4")
        np.testing.assert_array_equal(tokens, env["ref"][w], err_msg=f"tokens of window {w}")
        ids, weights, entropy = decode_kd(samples[key]["kd.bin"], m)
        r_ids, r_w, r_h, raw_w, logits = recompute(env["model"], tokens, w, m)
        np.testing.assert_array_equal(ids, r_ids, err_msg=f"ids of window {w}")
        np.testing.assert_array_equal(weights, r_w, err_msg=f"weights of window {w}")
        np.testing.assert_array_equal(entropy, r_h, err_msg=f"entropy of window {w}")
        # Independent of the sampler: the entropy byte is within the codebook's stated
        # error of the dense entropy, and every stored weight is within one codebook step
        # of the unquantized one (stochastic rounding picks a neighbouring level).
        logp = torch.log_softmax(logits.double(), -1)
        dense_h = -(logp.exp() * logp).sum(-1).numpy()
        assert np.abs(entropy - dense_h).max() <= m["entropy_max_error"] + 1e-5
        wl = np.asarray(m["weight_codebook"])
        lo = wl[np.clip(np.searchsorted(wl, raw_w, side="right") - 1, 0, len(wl) - 1)]
        hi = wl[np.clip(np.searchsorted(wl, raw_w, side="left"), 0, len(wl) - 1)]
        assert np.all((weights == lo) | (weights == hi)), f"window {w}: weight off its neighbours"
    return by_window


# -- acceptance: 2 ranks under mpiexec ---------------------------------------------------------

@pytest.mark.dist
def test_two_ranks_every_window_once_and_records_recompute(env, cache2):
    m = manifest_of(cache2)
    assert m["world_size"] == 2 and m["samples"] == 24 and m["positions"] == 24 * T
    by_window = check_records(cache2, env)
    assert sorted(by_window) == list(range(24)), "windows missing"
    assert {k for k in by_window.values()} == {f"{w % 2:04d}-{w:09d}" for w in range(24)}
    # The manifest lists exactly the shards on disk, with their sizes and hashes.
    on_disk = file_state(cache2, "*.tar")
    assert sorted(s["file"] for s in m["shards"]) == sorted(on_disk)
    for s in m["shards"]:
        assert s["sha256"] == on_disk[s["file"]][2]
        assert s["bytes"] == (cache2 / s["file"]).stat().st_size
    assert not list(cache2.glob("*tmp*"))


@pytest.mark.dist
def test_one_rank_and_two_ranks_write_identical_records(env, cache1, cache2):
    one, two = read_shards(cache1), read_shards(cache2)
    w1, w2 = windows_of(one), windows_of(two)
    assert sorted(w1) == sorted(w2) == list(range(24))
    for w in range(24):
        a, b = one[w1[w]], two[w2[w]]
        assert a["tokens.u32"] == b["tokens.u32"], f"window {w}: tokens differ"
        assert a["kd.bin"] == b["kd.bin"], f"window {w}: records differ between 1 and 2 ranks"


def test_one_rank_records_recompute(env, cache1):
    m = manifest_of(cache1)
    assert m["world_size"] == 1 and m["id_bits"] == 13 and m["w_bits"] == 11
    assert [s["samples"] for s in m["shards"]] == [5, 5, 5, 5, 4]
    check_records(cache1, env, windows=[0, 7, 23])


# -- acceptance: V = 151,936 (18 id bits) -------------------------------------------------------

def test_qwen_vocab_ids_above_17_bits_round_trip(tmp_path, env):
    """A Qwen-sized V: ids >= 131,072 need the 18th id bit (the research code masked them)."""
    V, high = 151_936, 131_072
    teacher = build_teacher(tmp_path / "qwen", arch="qwen2", vocab_size=V)
    model = load_model(teacher)
    with torch.no_grad():   # favour ids >= 2**17: their output rows get large random logits
        head = model.get_output_embeddings().weight
        g = torch.Generator().manual_seed(0)
        head[high:] = torch.randn(V - high, head.shape[1], generator=g) * 2.0
    model.save_pretrained(teacher)
    out = tmp_path / "cache"
    cache_main(cache_args(teacher, env["data"], out, "--max-windows", "3"))
    m = manifest_of(out)
    assert (m["vocab_size"], m["id_bits"], m["w_bits"]) == (V, 18, 6)
    samples = read_shards(out)
    model = load_model(teacher)
    n_high = 0
    for w, key in windows_of(samples).items():
        tokens = np.frombuffer(samples[key]["tokens.u32"], dtype="<u4")
        ids, weights, entropy = decode_kd(samples[key]["kd.bin"], m)
        r_ids, r_w, r_h, _, _ = recompute(model, tokens, w, m)
        np.testing.assert_array_equal(ids, r_ids)
        np.testing.assert_array_equal(weights, r_w)
        np.testing.assert_array_equal(entropy, r_h)
        n_high += int((ids >= high).sum())
        assert ids.max() < V
    assert n_high >= 0.5 * 3 * T * U, f"only {n_high} records with ids >= {high}"
    # The reader returns the same high ids.
    from pipeline.reader import CacheReader

    batch = next(CacheReader(out, micro_batch=3, shuffle_buffer=0).batches(0))
    for b, key in enumerate(batch.keys):
        ids, _, _ = decode_kd(samples[key]["kd.bin"], m)
        np.testing.assert_array_equal(batch.ids[b].numpy(), ids)


# -- acceptance: kill -9 one rank, rerun --------------------------------------------------------

def _rank_pid(root_pid: int, rank: int) -> int | None:
    """PID of the `pipeline.cache` process with PMI_RANK=rank below `root_pid` (our mpiexec)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            env_vars = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            cmd, env_vars = [], []
        if b"pipeline.cache" in cmd and f"PMI_RANK={rank}".encode() in env_vars:
            return pid
        stack += children.get(pid, [])
    return None


@pytest.mark.dist
@pytest.mark.slow
def test_kill_one_rank_then_rerun_completes_without_rewriting(env, cache1, tmp_path):
    out = tmp_path / "killed"
    n = 80
    args = cache_args(env["teacher"], env["data"], out, "--max-windows", str(n),
                      "--shard-samples", "2")
    proc = start_mpi(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("cache-r0001-*.tar")):
            assert proc.poll() is None, f"ended before rank 1 wrote a shard:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "rank 1 wrote no shard in 240 s"
            time.sleep(0.05)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1's process not found"
        os.kill(pid, signal.SIGKILL)
        log = proc.communicate(timeout=120)[0]
    finally:
        stop_group(proc)
    assert proc.returncode != 0, "mpiexec reported success after a rank was killed:\n" + log
    assert not (out / "manifest.json").exists()
    before = file_state(out, "*.tar")                  # every completed shard at this point
    assert any(f.startswith("cache-r0001-") for f in before)
    assert len(before) < n // 2, "the run was (nearly) complete before the kill"

    rerun = run_mpi(args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming after" in rerun.stderr
    after = file_state(out, "*.tar")
    for name, state in before.items():
        assert after[name] == state, f"{name} was rewritten (inode, mtime_ns, sha256 changed)"
    assert not [f.name for f in out.iterdir() if "tmp" in f.name], "temporary files remain"
    m = manifest_of(out)
    assert sorted(s["file"] for s in m["shards"]) == sorted(after), "a tar outside the manifest"
    samples = read_shards(out)                      # every tar parses completely
    assert sorted(windows_of(samples)) == list(range(n)), "windows missing after the rerun"
    assert m["samples"] == n
    # Records do not depend on the crash: windows also in the uninterrupted 1-rank cache
    # are byte-identical, and a few more recompute from the teacher.
    one = read_shards(cache1)
    w1, wk = windows_of(one), windows_of(samples)
    for w in w1:
        assert one[w1[w]]["kd.bin"] == samples[wk[w]]["kd.bin"], f"window {w} differs"
    check_records(out, env, windows=[30, 57, 79])
    # A restart with another number of ranks is refused (its windows would be other ones).
    with pytest.raises(ValueError, match=r"written by a run with 2 rank\(s\), this run has 1"):
        cache_main(args)
    assert file_state(out, "*.tar") == after


def test_recover_finishes_renames_and_removes_partial_files(env, tmp_path):
    """Crash states, made by hand: a shard recorded but not renamed, a partial shard, a
    half-written part file, a shard never recorded. The rerun repairs all of them, keeps
    the completed shards and recomputes the lost one byte for byte, under a new name: the
    names 2 and 3 were used by files of the interrupted run and are never reused."""
    out = tmp_path / "c"
    args = cache_args(env["teacher"], env["data"], out, "--max-windows", "9",
                      "--shard-samples", "3")
    cache_main(args)
    good = file_state(out, "*.tar")
    assert sorted(good) == [f"cache-r0000-{i:06d}.tar" for i in range(3)]
    part_path = out / "manifest.r0000.json"
    part = json.loads(part_path.read_text())
    # Shard 1: recorded in the part, crash before the rename.
    os.replace(out / "cache-r0000-000001.tar", out / "cache-r0000-000001.tar.tmp")
    # Shard 2: finished but never recorded (crash before the part was rewritten): lost.
    lost = (out / "cache-r0000-000002.tar").read_bytes()
    os.replace(out / "cache-r0000-000002.tar", out / "cache-r0000-000002.tar.tmp")
    part["shards"] = part["shards"][:2]
    part["finished"] = False
    part_path.write_text(json.dumps(part))
    (out / "manifest.json").unlink()
    (out / "manifest.r0000.json.tmp4242").write_text('{"half": ')
    (out / "cache-r0000-000003.tar.tmp").write_bytes(b"partial")

    cache_main(args)
    after = file_state(out, "*.tar")
    assert sorted(after) == [f"cache-r0000-{i:06d}.tar" for i in (0, 1, 4)]
    assert after["cache-r0000-000000.tar"] == good["cache-r0000-000000.tar"]
    assert after["cache-r0000-000001.tar"] == good["cache-r0000-000001.tar"]  # same inode
    assert (out / "cache-r0000-000004.tar").read_bytes() == lost              # recomputed
    assert not [f.name for f in out.iterdir() if "tmp" in f.name]
    assert manifest_of(out)["samples"] == 9


# -- acceptance: repair of a damaged shard --------------------------------------------------------

INSPECT = REPO / "tools" / "inspect_cache.py"


def run_inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSPECT), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=mpi_env())


def tar_names(cache: Path) -> list[str]:
    return sorted(f.name for f in cache.glob("*.tar"))


def assert_every_window_once(cache: Path, reference: dict, env: dict, n: int) -> dict:
    """Read with tarfile: every window 0..n-1 exactly once (key, tokens), tokens equal to
    the per-document tokenization and tokens + records equal to the undamaged cache's."""
    samples = read_shards(cache)
    by_window = windows_of(samples)                  # fails on a window stored twice
    assert sorted(by_window) == list(range(n)), f"windows missing: {set(range(n)) - set(by_window)}"
    assert sorted(samples) == sorted(reference) == [f"0000-{w:09d}" for w in range(n)]
    for w, key in by_window.items():
        np.testing.assert_array_equal(np.frombuffer(samples[key]["tokens.u32"], dtype="<u4"),
                                      env["ref"][w], err_msg=f"tokens of window {w}")
        assert samples[key]["tokens.u32"] == reference[key]["tokens.u32"], key
        assert samples[key]["kd.bin"] == reference[key]["kd.bin"], f"records of {key}"
    return samples


def test_damaged_middle_shard_quarantined_then_rerun_restores_every_window_once(env, tmp_path):
    """The repair the stage's error names: a flipped byte in a shard that is not the rank's
    last -> the rerun refuses naming `--verify --quarantine` -> the tool moves the shard
    into quarantine/ -> the same command recomputes its windows into a new shard. Every
    window is then present exactly once, byte-identical to the undamaged cache, no shard
    name is reused, and the repaired cache passes --verify (statistics included)."""
    out = tmp_path / "c"
    args = cache_args(env["teacher"], env["data"], out, "--max-windows", "12",
                      "--shard-samples", "3", "--batch-size", "2")
    cache_main(args)
    names = [f"cache-r0000-{i:06d}.tar" for i in range(4)]
    assert tar_names(out) == names
    reference = read_shards(out)                     # the undamaged cache
    good = file_state(out, "*.tar")
    damaged = out / names[1]                         # windows 3, 4, 5
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3] ^= 0x40
    damaged.write_bytes(data)

    with pytest.raises(ValueError, match="sha256 differs") as e:
        cache_main(args)
    msg = str(e.value)
    assert names[1] in msg and f"tools/inspect_cache.py {out} --verify --quarantine" in msg, msg

    proc = run_inspect(out, "--verify", "--quarantine")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert names[1] in proc.stdout and "rerun the cache stage with the same arguments" in proc.stdout
    for ok in (names[0], names[2], names[3]):
        assert f"{ok}:" not in proc.stdout, f"good shard {ok} reported:\n{proc.stdout}"
    assert (out / "quarantine" / names[1]).read_bytes() == bytes(data)    # moved, not deleted
    assert not damaged.exists() and not (out / "manifest.json").exists()
    part = json.loads((out / "manifest.r0000.json").read_text())
    assert [s["file"] for s in part["shards"]] == [names[0], names[2], names[3]]

    cache_main(args)                                 # the same command
    after = file_state(out, "*.tar")
    assert sorted(after) == [names[0], names[2], names[3], "cache-r0000-000004.tar"]
    for name in (names[0], names[2], names[3]):
        assert after[name] == good[name], f"{name} was rewritten"
    samples = assert_every_window_once(out, reference, env, 12)
    assert {samples[f"0000-{w:09d}"]["file"] for w in (3, 4, 5)} == {"cache-r0000-000004.tar"}
    m = manifest_of(out)
    assert m["samples"] == 12 and sorted(s["file"] for s in m["shards"]) == sorted(after)
    proc = run_inspect(out, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hand_deleted_middle_shard_of_an_old_part_is_recomputed_under_a_new_name(env, tmp_path):
    """Issue 16's reproduction: the middle shard and its part entry deleted by hand, in a
    part written before entries recorded their windows and the next shard number. The
    windows held are read from the remaining shards' keys, the gap is recomputed (before:
    4 windows missing, 4 twice, and the last shard's name reused)."""
    out = tmp_path / "c"
    args = cache_args(env["teacher"], env["data"], out, "--max-windows", "12",
                      "--shard-samples", "3")
    cache_main(args)
    names = [f"cache-r0000-{i:06d}.tar" for i in range(4)]
    reference = read_shards(out)
    good = file_state(out, "*.tar")
    part_path = out / "manifest.r0000.json"
    part = json.loads(part_path.read_text())
    part.pop("next_shard", None)
    for s in part["shards"]:
        s.pop("windows", None)
        s.pop("rskd_truncated_positions", None)
    (out / names[1]).unlink()
    part["shards"] = [s for s in part["shards"] if s["file"] != names[1]]
    part_path.write_text(json.dumps(part))

    cache_main(args)
    after = file_state(out, "*.tar")
    assert sorted(after) == [names[0], names[2], names[3], "cache-r0000-000004.tar"]
    for name in (names[0], names[2], names[3]):
        assert after[name] == good[name], f"{name} was rewritten"
    assert_every_window_once(out, reference, env, 12)
    assert manifest_of(out)["samples"] == 12


# -- acceptance: teacher identity -----------------------------------------------------------------

def test_other_teacher_weights_at_the_same_path_are_refused(env, tmp_path):
    """A half-finished cache, then the teacher directory's weights replaced (same tokenizer,
    same shapes, other seed): the rerun is refused naming the weight file and the fix. A
    teacher with another parameter count is refused too."""
    from transformers import AutoTokenizer

    from pipeline.tiny import build_tiny_model

    teacher = tmp_path / "teacher"
    shutil.copytree(env["teacher"], teacher)
    out = tmp_path / "c"
    args = cache_args(teacher, env["data"], out, "--max-windows", "4", "--shard-samples", "2")
    cache_main(args)
    weights = teacher / "model.safetensors"
    recorded = manifest_of(out).get("teacher_weights")
    original = hashlib.sha256(weights.read_bytes()).hexdigest()
    # A kill after the first shard: one recorded shard, no merged manifest.
    part_path = out / "manifest.r0000.json"
    part = json.loads(part_path.read_text())
    (out / part["shards"][1]["file"]).unlink()
    part["shards"], part["finished"] = part["shards"][:1], False
    part_path.write_text(json.dumps(part))
    (out / "manifest.json").unlink()
    before = file_state(out)

    other = build_teacher(tmp_path / "other", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    assert (other / "config.json").read_bytes() == (teacher / "config.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights.read_bytes()
    shutil.copy(other / "model.safetensors", weights)
    with pytest.raises(ValueError, match="teacher_weights") as e:
        cache_main(args)
    msg = str(e.value)
    assert f"{weights} has sha256" in msg and "Use a new --out directory" in msg, msg
    assert file_state(out) == before, "the refused run changed the cache"
    assert recorded == {"model.safetensors": original}

    deeper = build_tiny_model(tmp_path / "deeper", arch="llama", vocab_size=4096, hidden=32,
                              layers=2, heads=4)
    assert (deeper / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    n_cached = sum(p.numel() for p in load_model(env["teacher"]).parameters())
    n_deeper = sum(p.numel() for p in load_model(deeper).parameters())
    assert n_cached != n_deeper
    for name in ("config.json", "model.safetensors"):
        shutil.copy(deeper / name, teacher / name)
    with pytest.raises(ValueError, match=f"teacher_parameters: cache has {n_cached}, this run "
                                         f"has {n_deeper}"):
        cache_main(args)
    assert file_state(out) == before
    assert AutoTokenizer.from_pretrained(teacher).get_vocab() == env["tok"].get_vocab()


# -- acceptance: storage at T = 2048 --------------------------------------------------------------

@pytest.mark.slow
def test_storage_at_2048_tokens_is_within_3_percent_of_41_bytes(env, tmp_path):
    """37 B of records + 4 B of token per position; tar headers (512 B per member) and the
    end-of-archive padding (blocks of 10,240 B) are the overhead. Measured: 16 windows in
    one shard = 1,361,920 B = 41.5625 B/position (+1.37%); before mtime=0 was an int, a PAX
    header per member made it 1,402,880 B = 42.81 B/position (+4.4%). The sampler does not
    change the size (always U records per position): topk keeps the test fast."""
    seq_len, windows = 2048, 16
    docs = make_docs(1500, seed=5)
    data = write_jsonl(tmp_path / "big.jsonl", docs)
    assert len(reference_windows(docs, env["tok"], seq_len)) >= windows
    out = tmp_path / "c"
    cache_main(["--teacher", str(env["teacher"]), "--data", str(data), "--out", str(out),
                "--seq-len", str(seq_len), "--num-classes", "12", "--max-windows", str(windows),
                "--sampler", "topk",
                "--shard-samples", str(windows)])
    m = manifest_of(out)
    positions = windows * seq_len
    on_disk = sum(f.stat().st_size for f in out.glob("*.tar"))
    assert m["positions"] == positions and m["bytes"] == on_disk
    assert m["bytes_per_position"] == 37
    per_position = on_disk / positions
    assert per_position <= (37 + 4) * 1.03, f"{per_position:.4f} B/position"
    # Every member has exactly one 512 B header (no PAX/GNU extension headers).
    with tarfile.open(next(out.glob("*.tar"))) as tf:
        assert all(m.offset_data - m.offset == 512 for m in tf.getmembers())
    print(f"storage: {on_disk} B for {positions} positions = {per_position:.4f} B/position "
          f"({per_position / 41 - 1:+.2%} over 41)")


# -- acceptance: bad input ------------------------------------------------------------------------

def test_bad_input_is_refused_and_leaves_the_cache_intact(env, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "c"
    base = cache_args(env["teacher"], env["data"], out, "--max-windows", "6",
                      "--shard-samples", "2")
    cache_main(base)
    before = file_state(out)
    assert len([f for f in before if f.endswith(".tar")]) == 3

    def refused(argv: list[str], pattern: str) -> None:
        with pytest.raises(ValueError, match=pattern):
            cache_main(argv)
        assert file_state(out) == before, f"{argv}: the cache directory changed"

    def with_flag(flag: str, value: str) -> list[str]:
        argv = list(base)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        return argv

    missing = tmp_path / "missing.jsonl"
    refused(with_flag("--data", str(missing)), rf"--data {re.escape(str(missing))}: no such file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refused(with_flag("--data", str(empty)), rf"--data {re.escape(str(empty))}: empty file")
    refused(with_flag("--text-field", "body"),
            r"--text-field 'body' is not a column of .*columns: \['text', 'source'\]")
    refused(with_flag("--seq-len", "8192"),
            r"--seq-len 8192 exceeds the teacher's context \(max_position_embeddings=4096\)")
    refused(with_flag("--num-classes", "8"),
            r"holds a different cache(.|\n)*num_classes: cache has 12, this run has 8")
    refused(with_flag("--sampler", "topk"), r'sampler: cache has "priority", this run has "topk"')
    refused(with_flag("--seed", "8"), r"seed: cache has 7, this run has 8")
    other = build_teacher(tmp_path / "other-teacher", seed=1)
    refused(with_flag("--teacher", str(other)),
            re.escape(f'teacher: cache has "{env["teacher"]}", this run has "{other}"'))
    # V = 2**19 does not fit 24-bit records with >= 5 weight bits.
    big = tmp_path / "v524288"
    cfg = AutoConfig.from_pretrained(env["teacher"])
    cfg.vocab_size = 524_288
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(big)
    env["tok"].save_pretrained(big)
    refused(with_flag("--teacher", str(big)), re.escape(f"--teacher {big}: vocab_size V=524288 ")
            + "exceeds the version-1 record limit 524287")
    # After all that, the same command still resumes to the same cache.
    cache_main(base)
    assert {k: v[2] for k, v in file_state(out, "*.tar").items()} == \
        {k: v[2] for k, v in before.items() if k.endswith(".tar")}


@pytest.mark.dist
def test_rank_failure_under_mpi_aborts_instead_of_hanging(env, cache2, tmp_path):
    """Rank 1 fails (a shard its part records is gone) while rank 0 has nothing left to do
    and waits in the final gather: the job must end with an error naming the shard, not
    hang until the time limit."""
    out = tmp_path / "c"
    shutil.copytree(cache2, out)
    (out / "cache-r0001-000000.tar").unlink()
    proc = run_mpi(cache_args(env["teacher"], env["data"], out, "--max-windows", "24",
                              "--batch-size", "2", "--shard-samples", "4"), timeout=240)
    assert proc.returncode != 0
    assert "cache-r0001-000000.tar is recorded in manifest.r0001.json but missing" in \
        (proc.stdout + proc.stderr).replace("\n", " ")


_HANG_IN_MPI_INIT = """
import os, socket
a, b = socket.socketpair()          # a PMI server that never answers
os.set_inheritable(b.fileno(), True)
os.environ.update(PMI_FD=str(b.fileno()), PMI_RANK="0", PMI_SIZE="2")
from pipeline.distributed import init_distributed
init_distributed()
print("MPI_Init returned")
"""


def test_mpi_init_that_never_returns_exits_with_where_it_hung():
    """A pmi2 hang in MPI_Init (seen once on the two-node cluster) must end the rank, so
    srun --kill-on-bad-exit ends the step and slurm/cache.sh can launch it again."""
    env = dict(os.environ, SAMPLEDKD_MPI_INIT_TIMEOUT="2")
    env.pop("SLURM_NTASKS", None)
    r = subprocess.run([sys.executable, "-c", _HANG_IN_MPI_INIT], env=env, capture_output=True,
                       text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "MPI_Init returned" not in r.stdout
    assert "Timeout (0:00:02)!" in r.stderr and "init_distributed" in r.stderr, r.stderr[-2000:]
