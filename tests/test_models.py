"""pipeline.common.models: the one loader of a Hugging Face model directory, behind stage 1's
teacher, stage 2's online teacher and the held-out metrics; each keeps its own checks."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from pipeline.common.models import load_model, resolve_dtype
from pipeline.demo.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
# Where a causal LM may be built from a checkpoint: the one loader, the student under
# DeepSpeed (ZeRO-3 partitions it while it loads), the demo's asset builders.
ALLOWED = {("pipeline/common/models.py", "load_model"),
           ("pipeline/stage2_distill/training_setup.py", "load_student"),
           ("pipeline/demo/assets.py", "*"), ("pipeline/demo/student.py", "*")}


def _from_pretrained_calls() -> set[tuple[str, str]]:
    """(module, enclosing function) of every `AutoModelForCausalLM.from_pretrained(...)`."""
    found = set()
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text(), rel)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "from_pretrained"
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "AutoModelForCausalLM"):
                    found.add((rel, fn.name))
    return found


def test_every_model_load_goes_through_the_one_loader():
    calls = _from_pretrained_calls()
    stray = {c for c in calls if c not in ALLOWED and (c[0], "*") not in ALLOWED}
    assert not stray, f"load models with pipeline.common.models.load_model: {sorted(stray)}"
    assert ("pipeline/common/models.py", "load_model") in calls


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"a": build_tiny_model(root / "a", hidden=32, layers=1, seed=0),
            "b": build_tiny_model(root / "b", hidden=32, layers=1, seed=1),          # a's tokenizer
            "other": build_tiny_model(root / "other", hidden=32, layers=1, tokenizer_vocab=300)}


def test_both_stages_load_through_it(models, monkeypatch):
    """Stage 1's and stage 2's load_teacher and the held-out loader call load_model with
    their flag, dtype and device."""
    import pipeline.common.heldout as heldout
    import pipeline.common.models as M
    import pipeline.stage1_cache.teacher as t1
    from pipeline.stage1_cache.run import CacheConfig
    from pipeline.stage2_distill import training_setup as t2

    seen = []
    real = M.load_model

    def spy(path, flag, dtype, device, device_map=None):
        seen.append((str(path), flag, dtype, str(device), device_map))
        return real(path, flag, dtype, device, device_map)

    monkeypatch.setattr(t1, "load_model", spy)
    monkeypatch.setattr(M, "load_model", spy)       # stage 2 and heldout import it when called
    a = str(models["a"])
    tok, model = t1.load_teacher(CacheConfig(teacher=a), torch.device("cpu"))
    t2.load_teacher(a, str(models["b"]), tok, torch.device("cpu"))
    heldout._load(a, "--model", torch.float32, "cpu")
    assert seen == [(a, "--teacher", torch.float32, "cpu", None)] * 2 + [(a, "--model", torch.float32,
                                                                         "cpu", None)]


def test_what_each_stage_gets(models):
    from pipeline.stage1_cache.run import CacheConfig
    from pipeline.stage1_cache.teacher import load_teacher as stage1_teacher
    from pipeline.stage2_distill.training_setup import load_teacher as stage2_teacher

    cpu = torch.device("cpu")
    tok, t1 = stage1_teacher(CacheConfig(teacher=str(models["a"]), dtype="bfloat16"), cpu)
    assert t1.dtype == torch.bfloat16 and not t1.training and t1.device == cpu
    assert len(tok) == t1.config.vocab_size
    t2 = stage2_teacher(str(models["a"]), str(models["b"]), tok, cpu)
    assert t2.dtype == torch.float32 and not t2.training
    assert not any(p.requires_grad for p in t2.parameters())        # stage 2: frozen
    with pytest.raises(ValueError, match="have different tokenizers"):   # stage 2's own check
        stage2_teacher(str(models["other"]), str(models["b"]), tok, cpu)


def test_dtypes():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_bad_directories_are_one_line_errors(models, tmp_path):
    """No tokenizer; a .bin holding a Python object (refused unread): ValueErrors naming the
    flag and the path."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"--teacher {empty}: cannot load its tokenizer"):
        load_model(empty, "--teacher", torch.float32, "cpu")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = tmp_path / "pickled"        # torch .bin weights, as older checkpoints come
    model = AutoModelForCausalLM.from_pretrained(models["a"])
    model.config.save_pretrained(bad)
    AutoTokenizer.from_pretrained(models["a"]).save_pretrained(bad)
    torch.save({**model.state_dict(), "payload": argparse.Namespace(x=1)},
               bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"--model .*: refusing its weights: .*argparse\.Namespace"):
        load_model(bad, "--model", torch.float32, "cpu")
