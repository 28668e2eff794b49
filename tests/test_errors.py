"""Expected errors end in one line, unexpected ones keep their traceback (pipeline.errors).
Each stage run as a user runs it (a subprocess), its stderr read as text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import errors

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**ENV, **env}, capture_output=True,
                          text=True, timeout=300)


def test_a_refusal_of_ours_is_expected_a_library_error_is_not():
    from pipeline.config import raise_if

    with pytest.raises(ValueError) as ours:
        raise_if(["x must be > 0"], "test")
    assert errors.is_expected(ours.value)
    with pytest.raises(ValueError) as lib:
        np.zeros(-1)
    assert not errors.is_expected(lib.value)
    with pytest.raises(ValueError) as here:
        raise ValueError("raised by a test, not by the pipeline")
    assert not errors.is_expected(here.value)
    assert not errors.is_expected(KeyError("x"))


def test_stage2_configuration_error_is_one_line(tmp_path):
    r = _run("-m", "pipeline.distill", "--student", "s", "--cache", "c", "--out", str(tmp_path), "--select-frac", "2")
    assert r.returncode == 1
    assert r.stderr.startswith("pipeline.distill: error: invalid ") and "--select-frac 2.0 must be in (0, 1]" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run("-m", "pipeline.distill", "--student", "s", "--cache", "c", "--out", str(tmp_path), "--recipe", "nope")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "unknown recipe" in r.stderr


def test_stage1_data_errors_are_one_line_and_leave_no_garbage_messages(tmp_path):
    from pipeline.demo.tiny import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", hidden=32, layers=1)
    r = _run("-m", "pipeline.cache", "--teacher", str(teacher), "--data", str(tmp_path / "missing.jsonl"),
             "--out", str(tmp_path / "c0"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "pipeline.cache: error: " in r.stderr and "missing.jsonl" in r.stderr
    # a malformed conversation: one line naming file and row; no tar stream flushed at exit
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello there"}]}) + "\n"
                    + json.dumps({"messages": "oops"}) + "\n")
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}")
    args = ("-m", "pipeline.cache", "--teacher", str(teacher), "--data", str(data), "--data-format", "chat",
            "--chat-template", str(tpl), "--out", str(tmp_path / "c1"), "--seq-len", "16")
    r = _run(*args)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln.lower() or "Exception" in ln]
    assert lines == [ln for ln in lines if ln.startswith("pipeline.cache: error: ")], r.stderr[-2000:]
    assert "line 2" in lines[0] and "'messages' is a str" in lines[0]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    # SAMPLEDKD_DEBUG=1: the traceback behind the same error
    r = _run(*args[:-4], "--out", str(tmp_path / "c2"), "--seq-len", "16", SAMPLEDKD_DEBUG="1")
    assert r.returncode == 1 and "Traceback" in r.stderr and "'messages' is a str" in r.stderr
