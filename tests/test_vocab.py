"""Padded vocabularies and -inf logits, end to end, against independent references.

A tiny Qwen2 teacher with 152,064 logits and a tiny student with 151,936 share one
tokenizer of a few hundred tokens (as Qwen2.5-7B and -0.5B share 151,665): the cache's V
is the tokenizer's class count, the teacher's logits beyond V are dropped before sampling
and their probability mass is a cache statistic (recomputed here by a float64 teacher
forward on the windows read from the shards), `tools/inspect_cache.py` shows it, the
151,936-logit student distils (1 rank, 2 steps, export) and evaluates, and a student with
fewer logits than V is refused naming both numbers. A teacher whose logits hold -inf at
some classes caches, and no record (decoded here from the shard bytes by hand) names one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TEACHER_V, STUDENT_V = 152_064, 151_936
T, U, WINDOWS = 32, 12, 4
TEXTS = [f"The quick brown fox {i} jumps over the lazy dog; knowledge distillation trains a "
         f"small student {7 * i} times because a teacher answers." for i in range(60)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def _masked(c: torch.Tensor, V: int) -> torch.Tensor:
    """The classes the -inf teacher masks: every third tokenizer class, half the padding."""
    return ((c < V) & (c % 3 == 1)) | ((c >= V) & (c % 2 == 0))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    from pipeline.stage1_cache import run as cache
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("vocab")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    kw = dict(arch="qwen2", hidden=32, layers=1, heads=4, texts=TEXTS)
    teacher = build_tiny_model(root / "teacher", seed=0, vocab_size=TEACHER_V, **kw)
    student = build_tiny_model(root / "student", seed=1, vocab_size=STUDENT_V, **kw)
    args = ["--teacher", str(teacher), "--data", str(data), "--seq-len", str(T),
            "--max-windows", str(WINDOWS), "--shard-samples", "2", "--num-classes", str(U)]
    cache.main([*args, "--out", str(root / "cache")])

    # The same teacher with -inf at the classes `_masked` names: a hook on its lm_head.
    load = cache.load_teacher

    def load_masked(cfg, device):
        tok, model = load(cfg, device)

        def hook(module, inputs, out):
            cols = torch.arange(out.shape[-1], device=out.device)
            return out.masked_fill(_masked(cols, len(tok)), -math.inf)

        model.get_output_embeddings().register_forward_hook(hook)
        return tok, model

    cache.load_teacher = load_masked
    try:
        cache.main([*args, "--out", str(root / "inf_cache")])
    finally:
        cache.load_teacher = load
    return {"root": root, "teacher": teacher, "student": student, "data": data,
            "cache": root / "cache", "inf_cache": root / "inf_cache"}


def _windows(cache_dir: Path) -> tuple[dict, list[tuple[np.ndarray, np.ndarray]]]:
    """(manifest, [(tokens [T], ids [T, U]) per window]) read from the shard bytes by hand:
    per position U little-endian 24-bit records (id in the low id_bits) and 1 entropy byte."""
    m = json.loads((cache_dir / "manifest.json").read_text())
    out = []
    for s in m["shards"]:
        with tarfile.open(cache_dir / s["file"]) as tf:
            members = {mb.name: tf.extractfile(mb).read() for mb in tf if mb.isfile()}
        for name in sorted(n for n in members if n.endswith(".tokens.u32")):
            tokens = np.frombuffer(members[name], dtype="<u4").astype(np.int64)
            kd = np.frombuffer(members[name.replace(".tokens.u32", ".kd.bin")], dtype=np.uint8)
            rec = kd.reshape(T, 3 * U + 1)[:, :3 * U].reshape(T, U, 3).astype(np.int64)
            val = rec[..., 0] | (rec[..., 1] << 8) | (rec[..., 2] << 16)
            out.append((tokens, val & ((1 << m["id_bits"]) - 1)))
    return m, out


def test_split_padded_against_float64():
    from pipeline.stage1_cache.run import split_padded

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 700, generator=g) * 4
    z[0, 500:] += 8                           # most mass in the padding
    z[1, 650:] = -math.inf                    # -inf padding: 0 mass there
    z[2, 3] = -math.inf                       # a masked kept class
    kept, dropped = split_padded(z, 500)
    assert kept.shape == (6, 500) and kept.is_contiguous() and torch.equal(kept, z[:, :500])
    p = torch.softmax(z.double(), -1)
    torch.testing.assert_close(dropped.double(), p[:, 500:].sum(-1), rtol=1e-5, atol=1e-7)
    assert dropped[0] > 0.5
    same, zero = split_padded(z, 700)
    assert same is z and torch.equal(zero, torch.zeros(6))
    for bad in (float("nan"), float("inf")):
        zb = z.clone()
        zb[4, 600] = bad                      # in the dropped columns
        with pytest.raises(ValueError, match=r"NaN or inf at positions \[4\]"):
            split_padded(zb, 500)
    with pytest.raises(ValueError, match="fewer than V=701"):
        split_padded(z, 701)


def test_cache_v_is_the_tokenizers_and_a_short_teacher_is_refused(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stage1_cache.run import cache_vocab_size, tokenizer_classes
    from pipeline.demo.tiny import tiny_config

    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    V = len(tok)
    assert V == 1 + max(tok.get_vocab().values()) and tokenizer_classes(tok) == V
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    assert cache_vocab_size(tok, model) == V
    short = AutoModelForCausalLM.from_config(tiny_config("qwen2", V - 3, hidden=32, layers=1))
    with pytest.raises(ValueError, match=rf"teacher has {V - 3} logits, fewer than the {V} classes"):
        cache_vocab_size(tok, short)


def test_padded_teacher_cache_records_v_and_the_dropped_mass(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    V = len(tok)
    m, windows = _windows(assets["cache"])
    assert m["vocab_size"] == V < STUDENT_V < TEACHER_V
    assert len(windows) == WINDOWS
    # reference: float64 softmax over all 152,064 logits, mass on the columns >= V
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = teacher(input_ids=torch.from_numpy(np.stack([t for t, _ in windows]))).logits
    assert logits.shape[-1] == TEACHER_V
    mass = torch.softmax(logits.double(), -1)[..., V:].sum(-1)
    st = m["stats"]
    assert st["dropped_mass_sum"] == pytest.approx(float(mass.sum()), rel=1e-4)
    assert st["dropped_mass_max"] == pytest.approx(float(mass.max()), rel=1e-4)
    for tokens, ids in windows:
        assert (tokens < V).all()
        assert ((ids < V) | (ids == m["sentinel"])).all()

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_cache.py"),
                           str(assets["cache"])], capture_output=True, text=True, cwd=REPO,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr
    # the table's cells as one line of words (a long note wraps onto the next table line)
    text = " ".join(proc.stdout.replace("│", " ").split())
    mean = float(mass.mean())
    row = text[text.index("dropped mass (logits >= V)"):][:160]
    assert f"mean {mean:.3g} / max {float(mass.max()):.3g}" in row, row
    # random init: the padding holds most of the mass, flagged as not about 0
    assert f"NOT about 0: {TEACHER_V - V:,} of {TEACHER_V:,} teacher logits beyond V" in row, row
    rep = json.loads(subprocess.run([sys.executable, str(REPO / "tools" / "inspect_cache.py"),
                                     str(assets["cache"]), "--json"], capture_output=True,
                                    text=True, cwd=REPO, env=ENV, check=True).stdout)
    assert rep["settings"]["dropped_mass_mean"] == pytest.approx(mean, rel=1e-4)


def test_neginf_teacher_caches_and_no_record_names_a_masked_class(assets):
    m, windows = _windows(assets["inf_cache"])
    V = m["vocab_size"]
    masked = _masked(torch.arange(V), V).numpy()
    used = np.concatenate([ids[ids != m["sentinel"]] for _, ids in windows])
    assert used.size >= WINDOWS * T            # records were written
    assert not masked[used].any(), "a record names a -inf class"
    # ...while the unmasked teacher's records do name such classes
    _, plain = _windows(assets["cache"])
    plain_used = np.concatenate([ids[ids != m["sentinel"]] for _, ids in plain])
    assert masked[plain_used].mean() > 0.2


@pytest.mark.dist
@pytest.mark.slow
def test_padded_student_distils_exports_and_evaluates(assets, tmp_path):
    from transformers import AutoConfig

    from pipeline.stage3_evaluate import run as evaluate

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "pipeline.distill", "--student", str(assets["student"]), "--cache",
           str(assets["cache"]), "--out", str(run), "--deepspeed",
           str(REPO / "ds_configs" / "zero3_test.json"), "--steps", "2", "--select-frac", "0.5"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert AutoConfig.from_pretrained(run / "export").vocab_size == STUDENT_V

    out = tmp_path / "eval"
    evaluate.main(["--model", str(run / "export"), "--tasks", "arc_easy", "--out", str(out),
                   "--data-dir", str(REPO / "pipeline" / "stage3_evaluate" / "tasks" / "fixtures"), "--limit", "2",
                   "--batch-size", "2", "--bootstrap-iters", "0", "--device", "cpu"])
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["results"]["arc_easy"]["acc,none"] <= 1.0


def test_student_with_fewer_logits_than_v_is_refused(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cache_format.reader import CacheReader
    from pipeline.demo.tiny import tiny_config

    tok = AutoTokenizer.from_pretrained(assets["student"])
    V = len(tok)
    reader = CacheReader(assets["cache"])
    reader.check_student(tok, STUDENT_V)        # padded: accepted
    reader.check_student(tok, V)                # exactly V: accepted
    short = AutoModelForCausalLM.from_config(tiny_config("qwen2", V - 3, hidden=32, layers=1))
    n = short.get_output_embeddings().weight.shape[0]
    with pytest.raises(ValueError) as e:
        reader.check_student(tok, n)
    assert "vocabulary size" in str(e.value)
    assert f"V={V - 3}" in str(e.value) and f"V={V}" in str(e.value)
