"""Defaults that used to disagree between stages, made one: the work-unit size (one constant
for the cache stage's flag and the unit planner) and the held-out window length of the
evaluation (the T of the cache the student was distilled from, when there is one)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from pipeline.stage3_evaluate import run as evaluate
from pipeline.stage3_evaluate.run import DEFAULT_SEQ_LEN, EvalConfig, heldout_seq_len


def test_one_work_unit_size():
    from pipeline.common.config import leaf_fields
    from pipeline.stage1_cache import units
    from pipeline.stage1_cache.run import CacheConfig

    flag = leaf_fields(CacheConfig)["unit_bytes"][0].default
    assert flag == units.DEFAULT_UNIT_BYTES == 32 << 20
    assert inspect.signature(units.plan_units).parameters["unit_bytes"].default == flag
    doc = " ".join(units.__doc__.split())
    assert "At the default 32 MiB per unit" in doc and "default 64 MiB" not in doc


def _run_dir(root: Path, seq_len: int) -> Path:
    """RUN/ as pipeline.distill leaves it (config.json naming the cache; export/ is the
    caller's), and the cache's manifest.json with its seq_len."""
    cache = root / "cache"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"seq_len": seq_len}))
    run = root / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"recipe": "recommended", "cache": str(cache)}))
    return run


def _cfg(model: Path, **kw) -> EvalConfig:
    return EvalConfig(model=str(model), out="o", heldout="h.jsonl", device="cpu", **kw)


def test_heldout_seq_len_sources(tmp_path):
    """--seq-len wins; else the run's cache (pipeline.distill's RUN/export, or an export of
    tools/export_hf.py through its checkpoint); else the documented default, and why."""
    run = _run_dir(tmp_path / "a", 24)
    cache = tmp_path / "a" / "cache"
    assert heldout_seq_len(_cfg(run / "export", seq_len=8)) == (8, "--seq-len")
    assert heldout_seq_len(_cfg(run / "export")) == (24, f"the seq_len of {cache / 'manifest.json'}")

    ckpt = run / "ckpt" / "global_step000010"             # tools/export_hf.py RUN/ckpt OUT
    ckpt.mkdir(parents=True)
    (ckpt / "sampledkd_meta.json").write_text(json.dumps({"step": 10, "config": {"cache": str(cache)}}))
    out = tmp_path / "exported"
    out.mkdir()
    (out / "sampledkd_export.json").write_text(json.dumps({"checkpoint": str(ckpt), "step": 10}))
    assert heldout_seq_len(_cfg(out))[0] == 24

    other = tmp_path / "models" / "some-hf-model"          # not distilled here
    other.mkdir(parents=True)
    T, why = heldout_seq_len(_cfg(other))
    assert T == DEFAULT_SEQ_LEN == 512 and "is no pipeline.distill export" in why
    (other.parent / "config.json").write_text(json.dumps({"model_type": "llama"}))
    T, why = heldout_seq_len(_cfg(other))
    assert T == DEFAULT_SEQ_LEN and "is no pipeline.distill run config" in why

    (cache / "manifest.json").unlink()                     # the run's cache is gone
    T, why = heldout_seq_len(_cfg(run / "export"))
    assert T == DEFAULT_SEQ_LEN and "not readable" in why and "pass --seq-len" in why


def test_evaluate_takes_the_window_length_of_the_run(tmp_path):
    """`python -m pipeline.evaluate --model RUN/export --heldout ...` without --seq-len scores
    windows of the cache's T (was: 512 whatever the cache)."""
    from pipeline.common.heldout import heldout_metrics
    from pipeline.demo.tiny import build_tiny_model

    run = _run_dir(tmp_path, 12)
    model = build_tiny_model(run / "export", hidden=32, layers=1)
    texts = tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": f"The fox jumps {i} times over the lazy dog."}) + "\n"
                             for i in range(8)))
    evaluate.main(["--model", str(model), "--out", str(tmp_path / "o"), "--heldout", str(texts),
                   "--device", "cpu"])
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["heldout"]["seq_len"] == 12
    assert res["sampledkd"]["settings"]["seq_len"] is None        # what was asked: nothing
    want = heldout_metrics(model, texts, 12)
    assert res["heldout"]["perplexity"] == pytest.approx(want["perplexity"])
