"""The stage-1 end-to-end fixtures and independent references shared by tests/test_cache.py
(one rank), tests/test_cache_mpi.py (several ranks under mpiexec), tests/test_cache_resume.py
(restarts, damage and bad input) and tests/test_chat_cache.py.

Every check is against an independent reference: shards are read with `tarfile` and the
24-bit records unpacked by hand (`decode_kd`, not the codec or the reader); a unit's
documents are read here from the jsonl lines whose first byte lies in the unit's range of
`units.json` (`unit_documents`), tokenized per document (`references.reference_windows`)
and cut into the unit's windows; records are compared with a recomputation from the
teacher's full HF forward (`model(input_ids).logits`, not the stage's chunked lm_head),
sliced to the cache's V and fed to the same seeded sampler and codebooks (`recompute`,
seeded by (seed, unit, window)).

`shared_env` (a tiny teacher and a corpus of 5 jsonl files) and `shared_ref1` (the
one-rank reference cache) are built once per session whichever test module asks first;
each module wraps them in its own `env` / `ref1` fixtures, and no test writes into them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.stage1_cache.run import main as cache_main
from pipeline.stage1_cache.run import window_generators
from pipeline.cache_format.codec import RecordCodec
from pipeline.stage1_cache.class_sampler import sample_classes
from references import reference_windows
from tests.mpi import MPIEXEC, mpi_env, require_mpiexec

REPO = Path(__file__).resolve().parents[1]
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


# -- independent references and helpers -------------------------------------------------------

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


_SHARED: dict = {}


def shared_env(tmp_path_factory) -> dict:
    """Teacher (4096 logits over a tokenizer of a few hundred tokens), its tokenizer and a
    corpus folder of 5 jsonl files of different sizes; built once per session."""
    if "env" in _SHARED:
        return _SHARED["env"]
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("cache")
    teacher = build_teacher(root / "teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    data = root / "corpus"
    docs = write_corpus(data, CORPUS)
    sizes = sorted((data / f).stat().st_size for f in CORPUS)
    assert sizes[0] < UNIT_BYTES < sizes[-1] // 10, sizes
    _SHARED["env"] = {"root": root, "teacher": teacher, "tok": tok, "data": data, "docs": docs,
                      "model": load_model(teacher)}
    return _SHARED["env"]


def shared_ref1(env: dict) -> dict:
    """One rank, in process, batches of 3: the reference every other run is compared with;
    built once per session."""
    if "ref1" in _SHARED:
        return _SHARED["ref1"]
    out = env["root"] / "one-rank"
    cache_main(main_args(env, out, "--batch-size", "3"))
    plan = json.loads((out / "units.json").read_text())
    _SHARED["ref1"] = {"out": out, "plan": plan, "expected": expected_units(env, plan),
                       "samples": read_shards(out)}
    return _SHARED["ref1"]


def same_plan(out: Path, ref1: dict) -> None:
    assert json.loads((out / "units.json").read_text()) == ref1["plan"], "another unit plan"



# -- a small cache, and the tool -------------------------------------------------------------

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



def run_inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSPECT), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=mpi_env())



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


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny teacher and corpus of cache_stage (built once per session)."""
    return shared_env(tmp_path_factory)


@pytest.fixture(scope="module")
def ref1(env):
    """The one-rank reference cache of cache_stage (built once per session)."""
    return shared_ref1(env)
