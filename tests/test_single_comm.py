"""One single-process communicator: pipeline.common.distributed.SingleComm, light enough for
position selection to import, and all that selection asks of a communicator."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.common.distributed import SingleComm

REPO = Path(__file__).resolve().parents[1]


def test_distributed_imports_only_the_standard_library():
    """Importing it loads no rich, torch, numpy or mpi4py (selection imports it)."""
    code = ("import sys, pipeline.common.distributed\n"
            "print(sorted(m for m in ('rich', 'torch', 'numpy', 'mpi4py', 'transformers') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_single_comm_serves_selection():
    """Selection's Communicator protocol and its gather of rows of any length."""
    from pipeline.stage2_distill.selection.rules import Communicator, all_gather_rows

    comm = SingleComm()
    for name in ("rank", "world_size", "all_gather"):
        assert hasattr(comm, name) and name in {**Communicator.__annotations__, **vars(Communicator)}
    x = torch.arange(6.0).reshape(3, 2)
    assert comm.all_gather(x)[0] is x and len(comm.all_gather(x)) == 1
    assert torch.equal(all_gather_rows(comm, x), x)
    assert (comm.gather_object(1), comm.allgather_object(2), comm.bcast_object(3)) == ([1], [2], 3)


def _single_process_classes() -> list[str]:
    """Classes in pipeline/ that declare `world_size = 1`: single-process communicators."""
    found = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(s, ast.Assign) and any(getattr(t, "id", None) == "world_size"
                                                      for t in s.targets)
                    and isinstance(s.value, ast.Constant) and s.value.value == 1
                    for s in node.body):
                found.append(f"{path.relative_to(REPO)}:{node.name}")
    return found


def test_one_single_process_communicator():
    assert _single_process_classes() == ["pipeline/common/distributed.py:SingleComm"]
