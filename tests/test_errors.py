"""Expected errors end in one line, unexpected ones keep their traceback (pipeline.common.errors).
Each stage run as a user runs it (a subprocess), its stderr read as text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.common import errors

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**ENV, **env}, capture_output=True,
                          text=True, timeout=300)


def test_a_refusal_of_ours_is_expected_a_library_error_is_not():
    from pipeline.common.config import raise_if

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


def test_progress_lines_in_a_log_name_the_rank_the_unit_and_the_total(capsys):
    """In a SLURM log (no TTY) a progress line says which rank, what its count counts, of how
    many, and its bracketed prefix survives (rich markup would eat '[rank 1]')."""
    from pipeline.common.progress import StageProgress

    p = StageProgress("teacher cache", None, "tokens", every_s=0.0, prefix="[rank 1] ",
                      unit_of_steps="windows of 2048 tokens")
    p.update(41, 41 * 2048)
    d = StageProgress("distill", 100, "tokens", every_s=0.0, prefix="[rank 0] ", unit_of_steps="steps")
    d.update(5, 5000)
    d.note("val ppl 812.3, KL 3.412 at step 5")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[rank 1] teacher cache: 41 windows of 2048 tokens, ") and "tokens/s" in err[0]
    assert err[1].startswith("[rank 0] distill: 5/100 steps, ") and "ETA" in err[1]
    assert err[2] == "[rank 0] distill: val ppl 812.3, KL 3.412 at step 5"


def test_log_keeps_a_message_s_own_brackets(capsys):
    from pipeline.common.distributed import log

    log("[ledger] launch 3 working (world size [2])")
    log("took units [1, 2]", all_ranks=True)
    err = capsys.readouterr().err.splitlines()
    assert err == ["[ledger] launch 3 working (world size [2])", "[rank 0] took units [1, 2]"]


def test_distill_sh_refuses_bad_input_in_its_preflight_before_any_worker(tmp_path):
    """slurm/distill.sh runs `pipeline.distill --check` on the batch host first: a missing
    cache is one line and exit 2, and torchrun never starts (no workers, no torchrun report)."""
    from pipeline.demo.tiny import build_tiny_model

    student = build_tiny_model(tmp_path / "student", hidden=32, layers=1)
    r = subprocess.run(["bash", "slurm/distill.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**ENV, "PYTHON": sys.executable, "STUDENT": str(student),
                            "CACHE_DIR": str(tmp_path / "no_cache"), "RUN_DIR": str(tmp_path / "run")})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pipeline.distill: error: " in r.stderr and "no_cache" in r.stderr
    assert "refused by the check above; nothing launched" in r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr and "torch.distributed" not in r.stderr
    assert not (tmp_path / "run").exists()
