"""Stage 1 (pipeline.cache, format version 2: work units and a ledger) end to end on tiny
real teachers.

Every check is against an independent reference: shards are read with `tarfile` and the
24-bit records unpacked by hand (`decode_kd`, not the codec or the reader); a unit's
documents are read here from the jsonl lines whose first byte lies in the unit's range of
`units.json` (`unit_documents`), tokenized per document (`references.reference_windows`)
and cut into the unit's windows; records are compared with a recomputation from the
teacher's full HF forward (`model(input_ids).logits`, not the stage's chunked lm_head),
sliced to the cache's V and fed to the same seeded sampler and codebooks (`recompute`,
seeded by (seed, unit, window)).

Multi-process runs use the venv's MPICH (`mpiexec -n N`, up to 16 ranks on one machine)
and are marked `dist`; the kill/restart test and the T=2048 storage test are also `slow`.
`-m "not dist and not slow"` runs the rest. Runs that must last long enough to be killed
or raced use the stage's test hook SAMPLEDKD_TEST_SLOW_RANK ("R:SECONDS" or "*:SECONDS",
a sleep after every batch).
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

from pipeline.stage1_cache.run import main as cache_main
from pipeline.stage1_cache.run import window_generators
from pipeline.cache_format.codec import RecordCodec
from pipeline.stage1_cache.class_sampler import sample_classes
from references import reference_windows
from tests.mpi import require_mpiexec

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
INSPECT = REPO / "tools" / "inspect_cache.py"
T = 32
U = 12
SEED = 7
UNIT_BYTES = 500              # the corpus below (~24 KB in 5 files) -> 51 units
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "distillation", "42", "100", "answer", "question", "because", "naïve", "é"]
# Several jsonl files of different sizes (documents per file), one in a subfolder: files
# larger than UNIT_BYTES are cut into byte ranges, the small one forms a unit of its own.
CORPUS = {"a.jsonl": 60, "b.jsonl": 2, "c.jsonl": 20, "sub/d.jsonl": 4, "e.jsonl": 35}
KEY_RE = re.compile(r"u(\d{7})-w(\d{7})")
SHARD_RE = re.compile(r"cache-u(\d{7})-l(\d{6})-(\d{4})\.tar")


# -- fixtures and independent helpers ---------------------------------------------------------

def build_teacher(out: Path, arch: str = "llama", vocab_size: int | None = 4096, seed: int = 0,
                  sharpen: float = 30.0) -> Path:
    """A tiny real HF teacher (hidden 32, 1 layer) with peaked output distributions.

    Random init gives near-uniform logits; scaling the (tied) embedding sharpens them so
    positions span low and high entropies. The output layer is padded to 4096 logits over a
    tokenizer of a few hundred tokens: the cache's V is the tokenizer's, the rest is dropped.
    """
    from transformers import AutoModelForCausalLM

    from pipeline.demo.tiny import build_tiny_model

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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "source": "test"}, ensure_ascii=False) + "\n")
    return path


def write_corpus(folder: Path, sizes: dict[str, int], seed: int = 100) -> dict[str, list[str]]:
    """One jsonl file per entry; returns {relative path: documents}."""
    docs = {}
    for i, (name, n) in enumerate(sizes.items()):
        docs[name] = make_docs(n, seed + i)
        write_jsonl(folder / name, docs[name])
    return docs


def jsonl_lines(path: Path) -> list[tuple[int, bytes]]:
    """(offset of the line's first byte, line) of every line of a file."""
    raw, out, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl < 0 else nl + 1
        out.append((pos, raw[pos:end]))
        pos = end
    return out


def unit_documents(data: Path, plan: dict, u: int) -> tuple[list[str], bytes]:
    """(documents, bytes owned) of unit u of `plan` (units.json), read by hand: the lines of
    files `file` .. `last_file` whose first byte lies in [start, end) (whole files in
    between); blank lines are no documents but their bytes are owned."""
    entry = plan["units"][u]
    docs, owned = [], []
    for j in range(entry["file"], entry["last_file"] + 1):
        finfo = plan["files"][j]
        path = data / finfo["path"] if data.is_dir() else data
        a = entry["start"] if j == entry["file"] else 0
        b = entry["end"] if j == entry["last_file"] else finfo["size"]
        for off, line in jsonl_lines(path):
            if a <= off < b:
                owned.append(line)
                if line.strip():
                    docs.append(json.loads(line)["text"])
    return docs, b"".join(owned)


def expected_units(env: dict, plan: dict, data: Path | None = None, tok=None,
                   seq_len: int = T) -> dict[int, dict]:
    """unit -> {"windows": [n, T] reference tokens, "documents", "tokens", "bytes"}."""
    data = data or env["data"]
    tok = tok or env["tok"]
    out = {}
    for u in range(len(plan["units"])):
        docs, owned = unit_documents(data, plan, u)
        out[u] = {"windows": reference_windows(docs, tok, seq_len), "docs": docs,
                  "documents": len(docs), "bytes": len(owned),
                  "sha256": hashlib.sha256(owned).hexdigest(),
                  "tokens": sum(len(tok.encode(d, add_special_tokens=False)) + 1 for d in docs)}
    return out


def parse_key(key: str) -> tuple[int, int]:
    m = KEY_RE.fullmatch(key)
    assert m, f"key {key!r} is not u{{unit:07d}}-w{{window:07d}}"
    return int(m.group(1)), int(m.group(2))


def read_shards(cache: Path) -> dict[str, dict[str, bytes]]:
    """key -> {"tokens.u32": bytes, "kd.bin": bytes, "file": name}, by plain tarfile; fails
    on a key stored twice (in one shard or in two)."""
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
    """Hand-written decoder of docs/CACHE_FORMAT.md: (ids [T,U], weights [T,U], entropy [T])."""
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


def full_logits(model, tokens: np.ndarray) -> torch.Tensor:
    """The teacher's full HF forward: [T, teacher logits] fp32."""
    with torch.inference_mode():
        return model(input_ids=torch.as_tensor(tokens[None].astype(np.int64))).logits[0].float()


def recompute(model, tokens: np.ndarray, unit: int, k: int, manifest: dict):
    """What the stage must have written for window k of a unit: full HF forward, the first
    V logits (padded ones dropped), the sampler seeded by (seed, unit, k), the codebooks."""
    V = manifest["vocab_size"]
    codec = RecordCodec(V, manifest["num_classes"])
    logits = full_logits(model, tokens)[:, :V] / manifest["teacher_temperature"]
    gen, rng = window_generators(manifest["seed"], unit, k, torch.device("cpu"))
    ids, w, h = sample_classes(logits, manifest["num_classes"], manifest["sampler"], gen,
                               chunk_size=manifest.get("sampler_chunk", 2048), sentinel=codec.sentinel,
                               stats={}, **manifest["sampler_args"])
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


def main_args(env: dict, out: Path, *extra: str) -> list[str]:
    """The settings of the reference cache `ref1` (records depend on these, not on ranks,
    batches or launches; --batch-size and --lease-s may differ)."""
    return cache_args(env["teacher"], env["data"], out, "--unit-bytes", str(UNIT_BYTES),
                      "--shard-samples", "2", *extra)


def mpi_env(**extra: str) -> dict[str, str]:
    # One BLAS thread per rank (16 ranks on two cores), wide rich output (greppable logs).
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "COLUMNS": "300", **extra}


def start_mpi(args: list[str], n: int = 2, env: dict | None = None, **kw) -> subprocess.Popen:
    """`mpiexec -n N python -m pipeline.cache ARGS` in its own process group."""
    require_mpiexec(MPIEXEC)
    return subprocess.Popen([str(MPIEXEC), "-n", str(n), sys.executable, "-m", "pipeline.cache",
                             *args], cwd=REPO, env=env or mpi_env(), text=True,
                            start_new_session=True, **kw)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started (mpiexec, its proxy and the ranks), if alive."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_mpi(args: list[str], n: int = 2, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run to completion (stderr into stdout); on timeout, kill the whole job."""
    proc = start_mpi(args, n, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def file_state(cache: Path, pattern: str = "*") -> dict[str, tuple[int, int, str]]:
    """relative path -> (inode, mtime_ns, sha256) of every file matching `pattern`, at any
    depth for "**/*"."""
    out = {}
    for f in sorted(cache.glob(pattern)):
        if f.is_file():
            st = f.stat()
            out[f.relative_to(cache).as_posix()] = (st.st_ino, st.st_mtime_ns,
                                                    hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def manifest_of(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def done_records(cache: Path) -> dict[int, dict]:
    """unit -> done record, read from the ledger's files by hand."""
    out = {}
    for f in (cache / "ledger").glob("unit-*.done.json"):
        out[int(f.name[5:12])] = json.loads(f.read_text())
    return out


def launch_info(cache: Path, n: int) -> dict:
    return json.loads((cache / "ledger" / f"launch-{n:06d}.json").read_text())


def no_tmp_files(cache: Path) -> None:
    left = [p.relative_to(cache).as_posix() for p in cache.rglob("*") if "tmp" in p.name]
    assert not left, f"temporary files remain: {left}"


def check_cache(cache: Path, expected: dict[int, dict], reference: dict | None = None,
                model=None, recompute_every: int = 0) -> dict:
    """The finished cache against the references: every window of the unit plan exactly
    once (key u{unit}-w{k} in a shard of that unit), its tokens equal to the per-document
    tokenization of the unit's documents, tokens and records byte-identical to `reference`
    (another cache's samples), the manifest listing exactly the shards on disk with their
    sizes and hashes; every `recompute_every`-th window (and each unit's first) recomputed
    from the teacher. Returns the samples."""
    m = manifest_of(cache)
    samples = read_shards(cache)                    # fails on a key stored twice
    want = {f"u{u:07d}-w{k:07d}": e["windows"][k] for u, e in expected.items()
            for k in range(len(e["windows"]))}
    assert len(want) > 0
    missing, extra = sorted(set(want) - set(samples)), sorted(set(samples) - set(want))
    assert not missing and not extra, f"missing {missing[:5]}, not in the plan {extra[:5]}"
    for i, (key, entry) in enumerate(sorted(samples.items())):
        u, k = parse_key(key)
        sm = SHARD_RE.fullmatch(entry["file"])
        assert sm and int(sm.group(1)) == u, f"{key} in {entry['file']}"
        tokens = np.frombuffer(entry["tokens.u32"], dtype="<u4")
        np.testing.assert_array_equal(tokens, want[key], err_msg=f"tokens of {key}")
        assert len(entry["kd.bin"]) == T * (3 * U + 1)
        if reference is not None:
            assert entry["tokens.u32"] == reference[key]["tokens.u32"], key
            assert entry["kd.bin"] == reference[key]["kd.bin"], f"records of {key} differ"
        if model is not None and recompute_every and (k == 0 or i % recompute_every == 0):
            check_records(model, entry, u, k, m)
    assert m["samples"] == len(want) and m["positions"] == len(want) * T
    assert [x["windows"] for x in m["units"]] == [len(expected[u]["windows"])
                                                   for u in range(len(expected))]
    on_disk = file_state(cache, "*.tar")
    assert sorted(s["file"] for s in m["shards"]) == sorted(on_disk), "a tar outside the manifest"
    for s in m["shards"]:
        assert s["sha256"] == on_disk[s["file"]][2]
        assert s["bytes"] == (cache / s["file"]).stat().st_size
    no_tmp_files(cache)
    return samples


def check_records(model, entry: dict, u: int, k: int, m: dict) -> None:
    tokens = np.frombuffer(entry["tokens.u32"], dtype="<u4")
    ids, weights, entropy = decode_kd(entry["kd.bin"], m)
    r_ids, r_w, r_h, raw_w, logits = recompute(model, tokens, u, k, m)
    where = f"unit {u} window {k}"
    np.testing.assert_array_equal(ids, r_ids, err_msg=f"ids of {where}")
    np.testing.assert_array_equal(weights, r_w, err_msg=f"weights of {where}")
    np.testing.assert_array_equal(entropy, r_h, err_msg=f"entropy of {where}")
    assert ids.max() <= (1 << m["id_bits"]) - 1
    assert ids[ids != (1 << m["id_bits"]) - 1].max() < m["vocab_size"]
    # Independent of the sampler: the entropy byte is within the codebook's stated error of
    # the dense entropy over the V kept classes, and every stored weight is within one
    # codebook step of the unquantized one (stochastic rounding picks a neighbouring level).
    logp = torch.log_softmax(logits.double(), -1)
    dense_h = -(logp.exp() * logp).sum(-1).numpy()
    assert np.abs(entropy - dense_h).max() <= m["entropy_max_error"] + 1e-5
    wl = np.asarray(m["weight_codebook"])
    lo = wl[np.clip(np.searchsorted(wl, raw_w, side="right") - 1, 0, len(wl) - 1)]
    hi = wl[np.clip(np.searchsorted(wl, raw_w, side="left"), 0, len(wl) - 1)]
    assert np.all((weights == lo) | (weights == hi)), f"{where}: weight off its neighbours"


def check_rank_counts(m: dict, expected: dict[int, dict]) -> None:
    """manifest["launches"][launch][rank]: units, documents, tokens, bytes and windows are
    the sums over exactly the units the manifest says that rank cached, computed from the
    independent per-unit reference; every unit counted once."""
    by_rank: dict[tuple[str, str], list[int]] = {}
    for x in m["units"]:
        by_rank.setdefault((str(x["launch"]), str(x["rank"])), []).append(x["unit"])
    got = {(ln, r): c for ln, ranks in m["launches"].items() for r, c in ranks.items()}
    assert sorted(got) == sorted(by_rank)
    for lr, units in by_rank.items():
        c = got[lr]
        assert c["units"] == len(units), lr
        for k in ("documents", "tokens", "bytes"):
            assert c[k] == sum(expected[u][k] for u in units), (lr, k)
        assert c["windows"] == sum(len(expected[u]["windows"]) for u in units), lr
    for k in ("documents", "tokens", "bytes"):
        assert sum(c[k] for c in got.values()) == sum(e[k] for e in expected.values()), k


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Teacher (4096 logits over a tokenizer of a few hundred tokens), its tokenizer and a
    corpus folder of 5 jsonl files of different sizes."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("cache")
    teacher = build_teacher(root / "teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    data = root / "corpus"
    docs = write_corpus(data, CORPUS)
    sizes = sorted((data / f).stat().st_size for f in CORPUS)
    assert sizes[0] < UNIT_BYTES < sizes[-1] // 10, sizes
    return {"root": root, "teacher": teacher, "tok": tok, "data": data, "docs": docs,
            "model": load_model(teacher)}


@pytest.fixture(scope="module")
def ref1(env):
    """One rank, in process, batches of 3: the reference every other run is compared with."""
    out = env["root"] / "one-rank"
    cache_main(main_args(env, out, "--batch-size", "3"))
    plan = json.loads((out / "units.json").read_text())
    return {"out": out, "plan": plan, "expected": expected_units(env, plan),
            "samples": read_shards(out)}


def same_plan(out: Path, ref1: dict) -> None:
    assert json.loads((out / "units.json").read_text()) == ref1["plan"], "another unit plan"


# -- one rank: the reference cache against the independent references ---------------------------

def test_one_rank_cache_matches_the_references(env, ref1):
    """Units partition the corpus; every window of every unit is present once with the
    per-document tokens of the unit's own documents; all records recompute from the
    teacher; the dropped padded mass equals the full forward's; per-unit counts and the
    rank's reading counts equal the reference."""
    out, plan, expected = ref1["out"], ref1["plan"], ref1["expected"]
    m = manifest_of(out)
    V = len(env["tok"])
    assert m["format_version"] == 2 and m["vocab_size"] == V and V < 4096
    assert m["teacher_logits"] == 4096 and (m["id_bits"], m["w_bits"]) == (V.bit_length(),
                                                                          24 - V.bit_length())
    # The units partition the corpus: in file order, every document exactly once.
    assert [f["path"] for f in plan["files"]] == sorted(CORPUS)
    n_units = len(plan["units"])
    assert n_units >= 40 and len(m["units"]) == n_units
    all_docs = [d for name in sorted(CORPUS) for d in env["docs"][name]]
    assert [d for u in range(n_units) for d in expected[u]["docs"]] == all_docs
    assert sum(e["bytes"] for e in expected.values()) == sum(
        (env["data"] / f).stat().st_size for f in CORPUS)
    assert {plan["files"][x["file"]]["path"] for x in plan["units"]} == set(CORPUS)
    n_windows = sum(len(e["windows"]) for e in expected.values())
    assert n_windows >= 120, n_windows
    samples = check_cache(out, expected, model=env["model"], recompute_every=1)
    # Shards: at most --shard-samples windows, in window order, named for unit and launch 1.
    for s in m["shards"]:
        u, launch, n = (int(x) for x in SHARD_RE.fullmatch(s["file"]).groups())
        assert launch == 1 and s["unit"] == u and 1 <= s["samples"] <= 2
        keys = sorted(k for k, e in samples.items() if e["file"] == s["file"])
        assert [parse_key(k)[1] for k in keys] == s["windows"] == \
            list(range(2 * n, 2 * n + s["samples"]))
    for x in m["units"]:
        e = expected[x["unit"]]
        assert (x["documents"], x["tokens"], x["sha256"]) == (e["documents"], e["tokens"],
                                                             e["sha256"]), x
        assert (x["launch"], x["rank"]) == (1, 0)
    check_rank_counts(m, expected)
    assert m["world_size"] == 1 and list(m["launches"]) == ["1"]
    # Dropped mass: what the teacher's softmax over all 4096 logits puts beyond V.
    dropped = sum(float(torch.softmax(full_logits(env["model"], np.frombuffer(
        e["tokens.u32"], dtype="<u4")).double(), -1)[:, V:].sum()) for e in samples.values())
    assert dropped > 0
    assert m["stats"]["dropped_mass_sum"] == pytest.approx(dropped, rel=1e-4)
    assert launch_info(out, 1)["status"] == "finished"


def test_max_windows_takes_the_first_windows_in_unit_order(env, ref1, tmp_path):
    """--max-windows N: the unit plan is cut after the unit holding window N (in unit
    order) and that unit is cached up to it; the records are the full cache's."""
    expected = ref1["expected"]
    counts = [len(expected[u]["windows"]) for u in range(len(expected))]
    n_full = next(i for i in range(len(counts)) if sum(counts[:i + 1]) >= 8 and counts[i] >= 2)
    n = sum(counts[:n_full]) + 1                   # one window into unit n_full
    out = tmp_path / "c"
    cache_main(main_args(env, out, "--max-windows", str(n), "--batch-size", "2"))
    m = manifest_of(out)
    assert [x["unit"] for x in m["units"]] == list(range(n_full + 1))
    want = {u: dict(expected[u]) for u in range(n_full + 1)}
    want[n_full]["windows"] = expected[n_full]["windows"][:1]
    check_cache(out, want, reference=ref1["samples"])
    assert m["samples"] == n and m["max_windows"] == n


def test_identical_windows_get_their_own_draws_and_a_rerun_the_same(env, tmp_path):
    """Records are drawn from a stream of their own (unit, window): two units holding the same
    text (two copies of one file), and windows of one unit holding the same tokens (one
    document repeated), get other sampled classes and weights, from the same teacher
    distribution; every (unit, window) is byte-identical in a second run with other batches.
    Compared on the records decoded by hand (decode_kd), not on a recomputation with the
    stage's own generators (which would pass if every window shared one stream)."""
    doc = "the teacher answers because the quick brown fox jumps over the lazy dog 42"
    data = tmp_path / "corpus"
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(data / name, [doc] * 80)
    size = (data / "a.jsonl").stat().st_size
    unit_bytes = size + size // 2                  # one file fits a unit, the two do not
    outs = {bs: tmp_path / f"batch{bs}" for bs in (3, 1)}
    for bs, out in outs.items():
        cache_main(cache_args(env["teacher"], data, out, "--unit-bytes", str(unit_bytes),
                              "--shard-samples", "4", "--batch-size", str(bs)))
    plan = json.loads((outs[3] / "units.json").read_text())
    assert [(u["file"], u["last_file"]) for u in plan["units"]] == [(0, 0), (1, 1)], plan["units"]
    m = manifest_of(outs[3])
    assert (m["sampler"], m["num_classes"]) == ("priority", U)
    samples, again = read_shards(outs[3]), read_shards(outs[1])
    # The same (unit, window): the same bytes, whatever the batches.
    assert sorted(again) == sorted(samples)
    for key, e in samples.items():
        assert again[key]["tokens.u32"] == e["tokens.u32"], key
        assert again[key]["kd.bin"] == e["kd.bin"], f"{key}: another draw in a rerun"

    tokens = {parse_key(k): e["tokens.u32"] for k, e in samples.items()}
    records = {parse_key(k): decode_kd(e["kd.bin"], m) for k, e in samples.items()}
    by_tokens: dict[bytes, list[tuple[int, int]]] = {}
    for uk in sorted(tokens):
        by_tokens.setdefault(tokens[uk], []).append(uk)
    pairs = [(a, b) for g in by_tokens.values() for i, a in enumerate(g) for b in g[i + 1:]]
    n = len(reference_windows([doc] * 80, env["tok"], T))
    assert sorted(uk for uk in tokens) == [(u, k) for u in (0, 1) for k in range(n)]
    assert {((0, k), (1, k)) for k in range(n)} <= set(pairs)      # unit 1 repeats unit 0
    assert any(a[0] == b[0] for a, b in pairs), "no two windows of one unit hold the same tokens"
    sentinel = (1 << m["id_bits"]) - 1
    for a, b in pairs:
        (ids_a, w_a, h_a), (ids_b, w_b, h_b) = records[a], records[b]
        # same tokens, same teacher: the same distributions (entropy bytes within one step)...
        assert np.abs(h_a - h_b).max() <= 2 * m["entropy_max_error"] + 1e-6, (a, b)
        # ...from which other classes were drawn: the sets differ at most positions (all
        # but a few here, U = 12 of a few hundred classes; one shared stream: none)
        set_a = [set(r[r != sentinel].tolist()) for r in ids_a]
        set_b = [set(r[r != sentinel].tolist()) for r in ids_b]
        differ = sum(x != y for x, y in zip(set_a, set_b))
        assert differ >= T // 2, f"windows {a} and {b}: {T - differ} of {T} positions drew the same classes"
        assert not np.array_equal(w_a, w_b), f"windows {a} and {b}: the same weights"
    assert len({e["kd.bin"] for e in samples.values()}) == len(samples)


# -- 16 ranks on one machine -----------------------------------------------------------------------

@pytest.mark.dist
def test_sixteen_ranks_every_window_once_and_equal_to_one_rank(env, ref1):
    out = env["root"] / "sixteen"
    proc = run_mpi(main_args(env, out, "--batch-size", "2"), n=16, timeout=400)
    assert proc.returncode == 0, proc.stdout[-5000:]
    same_plan(out, ref1)
    m = manifest_of(out)
    check_cache(out, ref1["expected"], reference=ref1["samples"], model=env["model"],
                recompute_every=9)
    assert m["world_size"] == 16 and len(m["this_launch"]) == 16
    ranks = {int(r) for r in m["launches"]["1"]}
    assert ranks <= set(range(16)) and len(ranks) >= 8, ranks
    n_units = len(ref1["plan"]["units"])
    assert sum(c["units"] for c in m["launches"]["1"].values()) == n_units
    check_rank_counts(m, ref1["expected"])
    # every unit is claimed exactly once, by the rank whose done record it has
    claims = {int(f.name[5:12]): json.loads(f.read_text())
              for f in (out / "ledger").glob("unit-*.claim")}
    assert sorted(claims) == list(range(n_units))
    for x in m["units"]:
        assert (claims[x["unit"]]["launch"], claims[x["unit"]]["rank"]) == (1, x["rank"])


# -- kill -9 3 of 8 ranks, restart with 5 (killed again), finish with 11 ------------------------

def _children(pid: int) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    return children


def _rank_pid(root_pid: int, rank: int) -> int | None:
    """PID of the `pipeline.cache` process with PMI_RANK=rank below `root_pid` (our mpiexec)."""
    children = _children(root_pid)
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


def _wait_ranks_gone(out: Path, timeout: float = 60) -> None:
    """Until no process has `out` on its command line (every rank of the job is dead)."""
    needle = str(out).encode()
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if needle in (d / "cmdline").read_bytes():
                        alive.append(int(d.name))
                except OSError:
                    pass
        if not alive:
            return
        assert time.monotonic() < deadline, f"ranks still alive: {alive}"
        time.sleep(0.1)


def _kill_ranks_when(out: Path, args: list[str], n: int, ranks: list[int], at_done: int,
                     slow: str) -> tuple[str, dict[int, dict], dict, set[int]]:
    """Start an n-rank launch slowed by `slow`, SIGKILL `ranks` once `at_done` units are
    done; mpiexec then ends the rest. Returns (log, done records, tar states, units claimed
    and not done) once every rank is dead."""
    proc = start_mpi(args, n, env=mpi_env(SAMPLEDKD_TEST_SLOW_RANK=slow),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(list((out / "ledger").glob("unit-*.done.json"))) < at_done:
            assert proc.poll() is None, f"ended before {at_done} units were done:\n" + \
                proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, f"{at_done} units not done in 300 s"
            time.sleep(0.05)
        pids = [_rank_pid(proc.pid, r) for r in ranks]
        assert None not in pids, f"rank processes not found: {dict(zip(ranks, pids))}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        log = proc.communicate(timeout=120)[0]
    finally:
        stop_group(proc)
    _wait_ranks_gone(out)
    assert proc.returncode != 0, "mpiexec reported success after ranks were killed:\n" + log
    assert not (out / "manifest.json").exists()
    done = done_records(out)
    claimed = {int(f.name[5:12]) for f in (out / "ledger").glob("unit-*.claim")} - set(done)
    return log, done, file_state(out, "*.tar"), claimed


@pytest.mark.dist
@pytest.mark.slow
def test_kill_3_of_8_ranks_restart_with_5_killed_again_then_11_finish_exactly_once(env, ref1,
                                                                                  tmp_path):
    """Launch 1 (8 ranks, every window slowed 0.2 s) loses ranks 0, 3, 6 to SIGKILL once 10
    units are done, and mpiexec ends the rest; launch 2 (5 ranks) waits out the 1 s lease,
    takes over launch 1's claims and loses ranks 1 and 3 once 8 more units are done; launch
    3 (11 ranks) finishes. Every shard of a unit done before a kill is the same file
    afterwards (inode, mtime, sha256); finished shards of interrupted units are deleted by
    the next launch and their windows recomputed byte for byte under the new launch's name;
    every window once, equal to the 1-rank records; each unit cached by exactly one launch
    (one claim, one done record, shards named for it)."""
    out = tmp_path / "killed"
    args = main_args(env, out, "--lease-s", "1", "--batch-size", "1")
    N = len(ref1["plan"]["units"])

    log1, done1, tars1, claimed1 = _kill_ranks_when(out, args, 8, [0, 3, 6], 10, "*:0.2")
    assert 10 <= len(done1) < N and all(r["launch"] == 1 for r in done1.values())
    log2, done2, tars2, claimed2 = _kill_ranks_when(out, args, 5, [1, 3], len(done1) + 8,
                                                    "*:0.2")
    assert len(done1) + 8 <= len(done2) < N
    # launch 2 waited out launch 1's lease, declared it dead and took over its claims
    assert f"took over {len(claimed1)} unit(s)" in log2, log2[-5000:]
    assert launch_info(out, 1)["status"] == "dead"
    for u, rec in done1.items():
        assert done2[u] == rec, f"unit {u}'s done record changed"
    assert {rec["launch"] for u, rec in done2.items() if u not in done1} == {2}

    # launch 2 kept launch 1's finished shards of done units (inode, mtime, sha256) and
    # deleted those of units launch 1 had not finished
    for name, state in tars1.items():
        if int(SHARD_RE.fullmatch(name).group(1)) in done1:
            assert tars2.get(name) == state, f"{name} was rewritten by launch 2"
        else:
            assert name not in tars2, f"{name} of an unfinished unit was kept by launch 2"

    final = run_mpi(args, n=11, timeout=400)
    assert final.returncode == 0, final.stdout[-5000:]
    assert f"took over {len(claimed2)} unit(s)" in final.stdout, final.stdout[-5000:]
    same_plan(out, ref1)
    after = file_state(out, "*.tar")
    partial = []
    for tars, done in ((tars1, done1), (tars2, done2)):
        for name, state in tars.items():
            if int(SHARD_RE.fullmatch(name).group(1)) in done:
                assert after.get(name) == state, f"{name} (finished before a kill) changed"
            else:
                partial.append(name)
                assert name not in after, f"{name} of an unfinished unit was kept"
    samples = check_cache(out, ref1["expected"], reference=ref1["samples"],
                          model=env["model"], recompute_every=11)
    # Shards of units interrupted mid-way were deleted by the next launch; their windows
    # were recomputed byte for byte into shards named for a later launch.
    for name in partial:
        u, launch, _ = (int(x) for x in SHARD_RE.fullmatch(name).groups())
        later = {int(SHARD_RE.fullmatch(e["file"]).group(2)) for k, e in samples.items()
                 if parse_key(k)[0] == u}
        assert later and min(later) > launch, (name, later)
    m = manifest_of(out)
    # Exactly once: every unit cached by one launch, which wrote its shards; one claim per
    # unit naming that launch and rank; nothing recomputed that was done.
    owner = {x["unit"]: (x["launch"], x["rank"]) for x in m["units"]}
    for u in range(N):
        want = 1 if u in done1 else 2 if u in done2 else 3
        assert owner[u][0] == want, (u, owner[u])
    for s in m["shards"]:
        assert int(SHARD_RE.fullmatch(s["file"]).group(2)) == owner[s["unit"]][0]
    claims = {int(f.name[5:12]): json.loads(f.read_text())
              for f in (out / "ledger").glob("unit-*.claim")}
    assert {u: (c["launch"], c["rank"]) for u, c in claims.items()} == owner
    assert {int(r) for r in m["launches"].get("1", {})} <= set(range(8))
    assert {int(r) for r in m["launches"].get("2", {})} <= set(range(5))
    assert {int(r) for r in m["launches"]["3"]} <= set(range(11))
    assert sum(c["units"] for ranks in m["launches"].values() for c in ranks.values()) == N
    check_rank_counts(m, ref1["expected"])
    assert [launch_info(out, n)["status"] for n in (1, 2, 3)] == ["dead", "dead", "finished"]
    print(f"kill test: launch 1 did {len(done1)} units ({len(claimed1)} in flight), launch 2 "
          f"{len(done2) - len(done1)} ({len(claimed2)} in flight), launch 3 {N - len(done2)}; "
          f"{len(partial)} finished shard(s) of unfinished units recomputed")


# -- dynamic assignment and per-rank data cost ---------------------------------------------

@pytest.mark.dist
def test_slowed_rank_caches_fewer_units(env, ref1):
    """Rank 1 of 4 sleeps 0.5 s after every window: the three fast ranks claim more units
    (the manifest's per-rank unit counts); the records are still the 1-rank run's."""
    out = env["root"] / "slow-rank"
    proc = run_mpi(main_args(env, out, "--batch-size", "1"), n=4,
                   env=mpi_env(SAMPLEDKD_TEST_SLOW_RANK="1:0.5"))
    assert proc.returncode == 0, proc.stdout[-5000:]
    m = manifest_of(out)
    units = {r: m["launches"]["1"].get(str(r), {"units": 0})["units"] for r in range(4)}
    assert sum(units.values()) == len(ref1["plan"]["units"])
    assert units[1] < min(units[r] for r in (0, 2, 3)), units
    check_cache(out, ref1["expected"], reference=ref1["samples"])
    check_rank_counts(m, ref1["expected"])
    print(f"units per rank with rank 1 slowed: {units}")


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_units_about_one_over_world(env, ref1, world):
    """The manifest's per-rank documents, tokens and bytes are the sums over exactly the
    units that rank cached (from the per-unit reference: no rank read another unit), they
    add up to the corpus, and with equal speeds each rank's share of tokens is 1/world of
    the corpus within one unit's tokens (every rank sleeps the same 0.05 s per window, so
    time, not start-up order, decides the claims)."""
    out = env["root"] / f"share-{world}"
    proc = run_mpi(main_args(env, out, "--batch-size", "1"), n=world,
                   env=mpi_env(SAMPLEDKD_TEST_SLOW_RANK="*:0.05"))
    assert proc.returncode == 0, proc.stdout[-5000:]
    m = manifest_of(out)
    expected = ref1["expected"]
    check_rank_counts(m, expected)
    check_cache(out, expected, reference=ref1["samples"])
    per_rank = m["launches"]["1"]
    assert sorted(per_rank) == [str(r) for r in range(world)]
    total = sum(e["tokens"] for e in expected.values())
    biggest = max(e["tokens"] for e in expected.values())
    shares = {r: c["tokens"] for r, c in per_rank.items()}
    print(f"{world} ranks: tokens per rank {shares}, 1/world = {total / world:.0f}, largest "
          f"unit {biggest}")
    for r, tokens in shares.items():
        assert abs(tokens - total / world) <= biggest, (r, shares, total / world, biggest)
    # this launch's live counts (per rank, accumulated while caching) agree
    for c in m["this_launch"]:
        mine = per_rank[str(c["rank"])]
        assert (c["documents"], c["tokens"], c["bytes"]) == (mine["documents"], mine["tokens"],
                                                             mine["bytes"])


# -- bad input: a changed corpus, two launches at once, another teacher, a damaged shard -------

SMALL = {"x.jsonl": 8, "y.jsonl": 3, "z.jsonl": 6}


def small_cache(env: dict, root: Path, *extra: str) -> tuple[Path, Path, list[str]]:
    """A corpus folder of 3 files (units of 400 bytes) cached by one rank in process."""
    data = root / "corpus"
    write_corpus(data, SMALL, seed=300)
    out = root / "c"
    args = cache_args(env["teacher"], data, out, "--unit-bytes", "400", "--shard-samples", "2",
                      *extra)
    cache_main(args)
    return data, out, args


def unfinish(out: Path, unit: int) -> None:
    """The state a kill leaves: no merged manifest, one unit neither done nor claimed."""
    rec = json.loads((out / "ledger" / f"unit-{unit:07d}.done.json").read_text())
    for s in rec["shards"]:
        (out / s["file"]).unlink()
    (out / "ledger" / f"unit-{unit:07d}.done.json").unlink()
    (out / "ledger" / f"unit-{unit:07d}.claim").unlink()
    (out / "manifest.json").unlink()


def test_changed_corpus_is_refused_on_restart_naming_the_file(env, tmp_path):
    data, out, args = small_cache(env, tmp_path)
    plan = json.loads((out / "units.json").read_text())
    n_units = len(plan["units"])
    assert n_units >= 4
    reference = read_shards(out)
    unfinish(out, n_units - 1)
    before = file_state(out, "**/*")

    def refused(pattern: str) -> None:
        with pytest.raises(ValueError, match=pattern) as e:
            cache_main(args)
        assert "the corpus changed since the units were planned" in str(e.value)
        assert file_state(out, "**/*") == before, "the refused run changed the cache"

    y, st = data / "y.jsonl", (data / "y.jsonl").stat()
    # added
    write_jsonl(data / "w.jsonl", ["a new document"])
    refused(r"file w\.jsonl was added")
    (data / "w.jsonl").unlink()
    # removed
    os.replace(y, tmp_path / "y.jsonl")
    refused(r"file y\.jsonl was removed")
    os.replace(tmp_path / "y.jsonl", y)
    # rewritten: a line appended (size), then the same bytes with a new mtime
    original = y.read_bytes()
    with open(y, "ab") as f:
        f.write(b'{"text": "appended"}\n')
    refused(rf"file y\.jsonl was rewritten \(size {st.st_size} -> ")
    y.write_bytes(original)
    refused(r"file y\.jsonl was rewritten \(mtime_ns ")
    os.utime(y, ns=(st.st_atime_ns, st.st_mtime_ns))
    # restored: the same command finishes the cache, equal to the uninterrupted one
    cache_main(args)
    expected = expected_units(env, plan, data=data)
    check_cache(out, expected, reference=reference)


@pytest.mark.dist
def test_two_launches_at_once_one_works_the_other_refuses_naming_it(env, ref1, tmp_path):
    """A job submitted twice: two 2-rank launches started together on one directory (lease
    2 s, each window slowed by 0.1 s so the working launch outlives the other's 3 s wait).
    One caches everything exactly once; the other refuses, naming the running launch, and
    touches nothing; every shard verifies and equals the 1-rank records."""
    out = tmp_path / "twice"
    args = main_args(env, out, "--lease-s", "2", "--batch-size", "1")
    env_slow = mpi_env(SAMPLEDKD_TEST_SLOW_RANK="*:0.1")
    procs = [start_mpi(args, 2, env=env_slow, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            stop_group(p)
    codes = [p.returncode for p in procs]
    assert sorted(c == 0 for c in codes) == [False, True], (codes, [x[-3000:] for x in logs])
    won, lost = (0, 1) if codes[0] == 0 else (1, 0)
    statuses = {n: launch_info(out, n) for n in (1, 2)}
    assert not (out / "ledger" / "launch-000003.json").exists()
    working = [n for n, i in statuses.items() if i["status"] == "finished"]
    refused = [n for n, i in statuses.items() if i["status"] == "refused"]
    assert len(working) == 1 and len(refused) == 1, statuses
    w, r = working[0], refused[0]
    text = logs[lost].replace("\n", " ")
    assert re.search(rf"launch {r} refused: launch {w} \(host [^,]+, pid {statuses[w]['pid']}, "
                     r"world size 2, status \w+\) is running on this cache directory", text), \
        logs[lost][-3000:]
    assert f"launch {w} (" in statuses[r]["reason"]
    # it refused after waiting 1.5 x lease (3 s) for launch w's heartbeat to stop, while w
    # was still working
    waited = statuses[r]["ended"] - statuses[r]["started"]
    assert 3.0 <= waited < 15, waited
    assert statuses[r]["ended"] < statuses[w]["ended"]
    margin = statuses[w]["ended"] - statuses[r]["ended"]
    print(f"launch {r} refused after {waited:.1f} s, {margin:.1f} s before launch {w} finished")
    m = manifest_of(out)
    assert list(m["launches"]) == [str(w)] and {x["launch"] for x in m["units"]} == {w}
    check_cache(out, ref1["expected"], reference=ref1["samples"])
    claims = [json.loads(f.read_text())["launch"] for f in (out / "ledger").glob("unit-*.claim")]
    assert len(claims) == len(ref1["plan"]["units"]) and set(claims) == {w}
    proc = subprocess.run([sys.executable, str(INSPECT), str(out), "--verify"],
                          capture_output=True, text=True, cwd=REPO, env=mpi_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_other_teacher_weights_at_the_same_path_are_refused(env, tmp_path):
    """An unfinished cache, then the teacher directory's weights replaced (same tokenizer,
    same shapes, other seed): the restart is refused naming the weight file and the fix,
    and changes nothing. A teacher with another parameter count is refused too."""
    from transformers import AutoTokenizer

    from pipeline.demo.tiny import build_tiny_model

    teacher = tmp_path / "teacher"
    shutil.copytree(env["teacher"], teacher)
    data = tmp_path / "corpus"
    write_corpus(data, SMALL, seed=300)
    out = tmp_path / "c"
    args = cache_args(teacher, data, out, "--unit-bytes", "400", "--shard-samples", "2")
    cache_main(args)
    weights = teacher / "model.safetensors"
    recorded = manifest_of(out).get("teacher_weights")
    original = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert recorded == {"model.safetensors": original}
    unfinish(out, 1)
    before = file_state(out, "**/*")

    other = build_teacher(tmp_path / "other", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    assert (other / "config.json").read_bytes() == (teacher / "config.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights.read_bytes()
    shutil.copy(other / "model.safetensors", weights)
    with pytest.raises(ValueError, match="teacher_weights") as e:
        cache_main(args)
    msg = str(e.value)
    assert f"{weights} has sha256" in msg and "Use a new --out directory" in msg, msg
    assert file_state(out, "**/*") == before, "the refused run changed the cache"

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
    assert file_state(out, "**/*") == before
    assert AutoTokenizer.from_pretrained(teacher).get_vocab() == env["tok"].get_vocab()


def test_crash_leftovers_are_removed_and_their_units_recomputed(env, tmp_path):
    """What kills leave, made by hand on a finished cache: unit 1's shards finished but its
    done record never written; unit 2 also mid-shard (a partial `.tar.tmp`); unit 3's done
    record half written (unreadable); a ledger temporary file of the dead launch; no
    manifest. The same command removes the leftovers, moves the unreadable record aside,
    recomputes exactly units 1-3, byte for byte, into shards named for launch 2, and leaves
    every other shard untouched."""
    data, out, args = small_cache(env, tmp_path)
    plan = json.loads((out / "units.json").read_text())
    reference = read_shards(out)
    good = file_state(out, "*.tar")
    led = out / "ledger"
    recs = done_records(out)
    assert all(len(recs[u]["shards"]) >= 1 for u in (1, 2, 3)) and len(recs) >= 5
    (led / "unit-0000001.done.json").unlink()
    (led / "unit-0000002.done.json").unlink()
    last = out / recs[2]["shards"][-1]["file"]
    partial = last.with_name(last.name + ".tmp")
    partial.write_bytes(last.read_bytes()[:700])
    last.unlink()
    raw = (led / "unit-0000003.done.json").read_bytes()
    (led / "unit-0000003.done.json").write_bytes(raw[:len(raw) // 2])
    stray = led / ".unit-0000004.done.json.L000001.vm.4242.deadbeef.tmp"
    stray.write_text('{"half": ')
    (out / "manifest.json").unlink()

    cache_main(args)
    after = file_state(out, "*.tar")
    redone = {u: [s["file"] for s in recs[u]["shards"]] for u in (1, 2, 3)}
    for name, state in good.items():
        u = int(SHARD_RE.fullmatch(name).group(1))
        if u in redone:
            assert name not in after, f"{name} of an unfinished unit was kept"
        else:
            assert after[name] == state, f"{name} was rewritten"
    new = sorted(set(after) - set(good))
    assert {int(SHARD_RE.fullmatch(n).group(1)) for n in new} == {1, 2, 3}
    assert all(SHARD_RE.fullmatch(n).group(2) == "000002" for n in new), new
    assert not partial.exists() and not stray.exists()
    assert (led / "unit-0000003.done.json.corrupt-000002").read_bytes() == raw[:len(raw) // 2]
    samples = check_cache(out, expected_units(env, plan, data=data), reference=reference)
    assert {parse_key(k)[0] for k, e in samples.items() if e["file"] in new} == {1, 2, 3}
    m = manifest_of(out)
    assert sorted(x["unit"] for x in m["units"] if x["launch"] == 2) == [1, 2, 3]


def run_inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSPECT), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=mpi_env())


def test_damaged_shard_quarantined_then_rerun_restores_every_window_once(env, ref1, tmp_path):
    """The repair the stage's error names, on a finished cache: a flipped byte in the middle
    shard of a unit, and a shard of another unit deleted by hand -> the rerun refuses naming
    both and `--verify --quarantine` -> the tool moves those units' shards, their done
    records and the manifest into quarantine/ -> the same command recomputes exactly those
    units into shards named for the new launch. Every window is then
    present exactly once, byte-identical to the undamaged cache, no shard name is reused,
    every other shard is untouched, and the repaired cache passes --verify."""
    out = tmp_path / "c"
    shutil.copytree(ref1["out"], out)
    args = main_args(env, out, "--batch-size", "2")
    m0 = manifest_of(out)
    unit = next(x["unit"] for x in m0["units"] if x["windows"] >= 5)   # >= 3 shards
    names = sorted(s["file"] for s in m0["shards"] if s["unit"] == unit)
    assert len(names) >= 3
    good = file_state(out, "*.tar")
    damaged = out / names[1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3] ^= 0x40
    damaged.write_bytes(data)
    # and a shard of another unit deleted by hand
    other = next(x["unit"] for x in m0["units"] if x["unit"] > unit and x["windows"] >= 3)
    gone = sorted(s["file"] for s in m0["shards"] if s["unit"] == other)
    (out / gone[0]).unlink()

    with pytest.raises(ValueError, match="failed verification") as e:
        cache_main(args)
    msg = str(e.value)
    assert f"{names[1]} (unit {unit}): size or sha256 differs" in msg, msg
    assert f"{gone[0]} (unit {other}) is missing" in msg, msg
    assert f"tools/inspect_cache.py {out} --verify --quarantine" in msg, msg
    assert launch_info(out, 2)["status"] == "failed"

    proc = run_inspect(out, "--verify", "--quarantine")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for u, name in ((unit, names[1]), (other, gone[0])):
        assert name in proc.stdout and f"unit {u}" in proc.stdout, proc.stdout
    for ok in set(good) - {names[1], gone[0]}:
        assert f"{ok}:" not in proc.stdout, f"good shard {ok} reported:\n{proc.stdout}"
    q = out / "quarantine"
    assert (q / names[1]).read_bytes() == bytes(data)          # moved, not deleted
    assert sorted(p.name for p in q.glob("*.tar")) == sorted(names + gone[1:])
    for u in (unit, other):
        assert (q / f"unit-{u:07d}.done.json").exists()
    assert (q / "manifest.json").exists() and not (out / "manifest.json").exists()

    cache_main(args)                                            # the same command: launch 3
    after = file_state(out, "*.tar")
    for name, state in good.items():
        if name not in names + gone:
            assert after[name] == state, f"{name} was rewritten"
    new = sorted(set(after) - set(good))
    assert {SHARD_RE.fullmatch(n).group(1, 2) for n in new} == {
        (f"{unit:07d}", "000003"), (f"{other:07d}", "000003")}, new
    assert not set(new) & set(names + gone), "a shard name was reused"
    samples = check_cache(out, ref1["expected"], reference=ref1["samples"])
    for u in (unit, other):
        files = {e["file"] for k, e in samples.items() if parse_key(k)[0] == u}
        assert files and files <= set(new)
    m = manifest_of(out)
    assert sorted(x["unit"] for x in m["units"] if x["launch"] == 3) == sorted([unit, other])
    proc = run_inspect(out, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_input_is_refused_and_leaves_the_cache_intact(env, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    data, out, base = small_cache(env, tmp_path)
    before = file_state(out, "**/*")
    assert len([f for f in before if f.endswith(".tar")]) >= 3

    def refused(argv: list[str], pattern: str) -> None:
        with pytest.raises(ValueError, match=pattern):
            cache_main(argv)
        assert file_state(out, "**/*") == before, f"{argv}: the cache directory changed"

    def with_flag(flag: str, value: str) -> list[str]:
        argv = list(base)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        return argv

    missing = tmp_path / "missing.jsonl"
    refused(with_flag("--data", str(missing)), rf"--data {re.escape(str(missing))}: no such file")
    # another corpus (same file names, an empty x.jsonl): refused by the unit plan's check
    other_data = tmp_path / "other-corpus"
    write_corpus(other_data, {"y.jsonl": 3, "z.jsonl": 6}, seed=301)
    write_jsonl(other_data / "x.jsonl", [])
    refused(with_flag("--data", str(other_data)), r"the corpus changed since the units were "
            r"planned: file x\.jsonl was rewritten \(size \d+ -> 0 bytes")
    # into a new directory an empty file is refused as such, and nothing is written
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=rf"--data {re.escape(str(other_data))}: empty file "
                                         rf"{re.escape(str(other_data / 'x.jsonl'))}"):
        cache_main(with_flag("--data", str(other_data)) + ["--out", str(fresh)])
    assert not any(fresh.iterdir())
    refused(with_flag("--text-field", "body"),
            r"holds a different cache(.|\n)*dataset: cache has .*\"text_field\": \"text\"")
    refused(with_flag("--seq-len", "8192"),
            r"--seq-len 8192 exceeds the teacher's context \(max_position_embeddings=4096\)")
    refused(with_flag("--num-classes", "8"),
            r"holds a different cache(.|\n)*num_classes: cache has 12, this run has 8")
    refused(with_flag("--sampler", "topk"), r'sampler: cache has "priority", this run has "topk"')
    refused(with_flag("--seed", "8"), r"seed: cache has 7, this run has 8")
    refused(with_flag("--unit-bytes", "300"), r"unit_bytes: cache has 400, this run has 300")
    other = build_teacher(tmp_path / "other-teacher", seed=1)
    refused(with_flag("--teacher", str(other)),
            re.escape(f'teacher: cache has "{env["teacher"]}", this run has "{other}"'))
    # V = len(tokenizer) = 2**19 does not fit 24-bit records with >= 5 weight bits.
    big = tmp_path / "v524288"
    big_tok = big_tokenizer(524_288)
    cfg = AutoConfig.from_pretrained(env["teacher"])
    cfg.vocab_size = 524_288
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(big)
    big_tok.save_pretrained(big)
    refused(with_flag("--teacher", str(big)), re.escape(f"--teacher {big}: vocab_size V=524288 ")
            + r"exceeds the version-\d record limit 524287 \(2\*\*19 - 1\)")
    # A teacher with fewer logits than its tokenizer's classes cannot score every token.
    short = tmp_path / "short"
    cfg.vocab_size = 300
    AutoModelForCausalLM.from_config(cfg).save_pretrained(short)
    env["tok"].save_pretrained(short)
    refused(with_flag("--teacher", str(short)),
            rf"the teacher has 300 logits, fewer than the {len(env['tok'])} classes")
    # After all that, the same command still resumes to the same cache.
    cache_main(base)
    assert {k: v[2] for k, v in file_state(out, "*.tar").items()} == \
        {k: v[2] for k, v in before.items() if k.endswith(".tar")}


@pytest.mark.dist
def test_rank_failure_under_mpi_aborts_instead_of_hanging(env, tmp_path):
    """The corpus's last line has no text field: the rank that claims its unit fails while
    the other has finished its units and waits in the final gather (or, if rank 0 fails,
    rank 1 waits for it). The job must end with the error naming the line, not hang."""
    data = tmp_path / "corpus"
    write_corpus(data, {"a.jsonl": 20, "b.jsonl": 20}, seed=500)
    with open(data / "b.jsonl", "a") as f:
        f.write(json.dumps({"body": "no text field here"}) + "\n")
    out = tmp_path / "c"
    t0 = time.monotonic()
    proc = run_mpi(cache_args(env["teacher"], data, out, "--unit-bytes", "600"), timeout=240)
    assert proc.returncode != 0
    text = proc.stdout.replace("\n", " ")
    assert "has no field 'text'" in text and "b.jsonl" in text, proc.stdout[-3000:]
    errors = sorted((out / "errors").glob("rank*.txt"))
    assert len(errors) == 1 and "has no field 'text'" in errors[0].read_text()
    assert time.monotonic() - t0 < 200
    assert not (out / "manifest.json").exists()


_HANG_IN_MPI_INIT = """
import os, socket
a, b = socket.socketpair()          # a PMI server that never answers
os.set_inheritable(b.fileno(), True)
os.environ.update(PMI_FD=str(b.fileno()), PMI_RANK="0", PMI_SIZE="2")
from pipeline.common.distributed import init_distributed
init_distributed()
print("MPI_Init returned")
"""


def test_mpi_init_that_never_returns_exits_with_where_it_hung():
    """A pmi2 hang in MPI_Init (seen once on the two-node cluster) must end the rank, so
    srun --kill-on-bad-exit ends the step and slurm/cache.sh can launch it again."""
    env = dict(os.environ, SAMPLEDKD_MPI_INIT_TIMEOUT="2")
    env.pop("SLURM_NTASKS", None)
    r = subprocess.run([sys.executable, "-c", _HANG_IN_MPI_INIT], env=env, capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "MPI_Init returned" not in r.stdout
    assert "Timeout (0:00:02)!" in r.stderr and "init_distributed" in r.stderr, r.stderr[-2000:]


# -- V = 151,665 (18 id bits) ---------------------------------------------------------------------

def big_tokenizer(n: int):
    """A byte-level BPE tokenizer of exactly n tokens: <|endoftext|> (id 0), the 256
    byte-level symbols, then synthetic tokens no merge produces (`pipeline.demo.tiny`'s trainer
    cannot reach 2**17 tokens on a test corpus quickly). Text encodes to byte tokens
    (ids < 257); Qwen2's tokenizer class loads it as it is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for a in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[a] = len(vocab)
    vocab.update((f"x{i}", i) for i in range(len(vocab), n))
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def test_qwen_vocab_ids_above_17_bits_round_trip(tmp_path, env):
    """Qwen2.5's shape: 151,936 logits over a tokenizer of 151,665 tokens. V = 151,665 needs
    the 18th id bit for ids >= 131,072 (the research code masked them); the 271 padded
    logits are dropped (records never name them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.demo.tiny import tiny_config

    n_logits, V, high = 151_936, 151_665, 131_072
    teacher = tmp_path / "qwen"
    tok = big_tokenizer(V)
    assert len(tok) == V
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", n_logits, hidden=32, layers=1,
                                                         heads=4, eos_token_id=0))
    with torch.no_grad():   # favour ids >= 2**17 (and the padding): large random logits
        head = model.get_output_embeddings().weight
        g = torch.Generator().manual_seed(0)
        head[high:] = torch.randn(n_logits - high, head.shape[1], generator=g) * 2.0
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(teacher)         # what the stage loads: Qwen2Tokenizer
    ids = tok("naïve", add_special_tokens=False)["input_ids"]
    assert len(tok) == V and len(ids) == 6 and max(ids) < 257 and tok.decode(ids) == "naïve"
    data = write_jsonl(tmp_path / "corpus.jsonl", make_docs(20, seed=11))
    out = tmp_path / "cache"
    cache_main(cache_args(teacher, data, out, "--max-windows", "3"))
    m = manifest_of(out)
    assert (m["vocab_size"], m["teacher_logits"], m["id_bits"], m["w_bits"]) == (V, n_logits, 18, 6)
    samples = read_shards(out)
    assert sorted(samples) == [f"u0000000-w{k:07d}" for k in range(3)]
    model = load_model(teacher)
    docs, _ = unit_documents(data, json.loads((out / "units.json").read_text()), 0)
    ref = reference_windows(docs, tok, T)
    n_high = 0
    for key, e in samples.items():
        u, k = parse_key(key)
        tokens = np.frombuffer(e["tokens.u32"], dtype="<u4")
        np.testing.assert_array_equal(tokens, ref[k])
        ids, weights, entropy = decode_kd(e["kd.bin"], m)
        r_ids, r_w, r_h, _, _ = recompute(model, tokens, u, k, m)
        np.testing.assert_array_equal(ids, r_ids)
        np.testing.assert_array_equal(weights, r_w)
        np.testing.assert_array_equal(entropy, r_h)
        n_high += int((ids >= high).sum())
        assert ids.max() < V, "a record names a padded logit"
    assert n_high >= 0.5 * 3 * T * U, f"only {n_high} records with ids >= {high}"
    assert m["stats"]["dropped_mass_max"] > 0
    # The reader returns the same high ids.
    from pipeline.cache_format.reader import CacheReader

    batch = next(CacheReader(out, micro_batch=3, shuffle_buffer=0).batches(0))
    for b, key in enumerate(batch.keys):
        ids, _, _ = decode_kd(samples[key]["kd.bin"], m)
        np.testing.assert_array_equal(batch.ids[b].numpy(), ids)


# -- storage at T = 2048 ---------------------------------------------------------------------------

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
                "--sampler", "topk", "--shard-samples", str(windows)])
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


def test_a_cache_written_before_sampler_chunk_was_recorded_resumes_only_with_its_value():
    """The sampler's draws depend on its chunk; old headers lack the key and used 2048."""
    from pipeline.cache_format.manifest import header_diff

    old = {"sampler": "priority", "seed": 0}                       # no sampler_chunk
    assert header_diff(old, {**old, "sampler_chunk": 2048}) == []
    diff = header_diff(old, {**old, "sampler_chunk": 64})
    assert len(diff) == 1 and "sampler_chunk: cache has 2048, this run has 64" in diff[0], diff
