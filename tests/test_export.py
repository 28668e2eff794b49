"""HF export of a distillation run: pipeline/stage2_distill/export.py and tools/export_hf.py.

The reference for "the exported model is the trained model" is the live ZeRO-3 engine
itself: the test-only driver of tests/test_distill.py runs a forward pass of
`engine.module` (parameters partitioned over 2 ranks, gathered layer by layer by
DeepSpeed's hooks) on a fixed input right after training, and saves those logits. Both
exports are then loaded with plain `from_pretrained` in this process and must give the
same logits: OUT/export (written by the trainer from gathered parameters) and the
directory tools/export_hf.py consolidates offline from the checkpoint's fp32 ZeRO shards.
The runs are shared with test_distill.py (built once per session).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from distill_runs import STEPS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(distill_runs) -> dict:
    return distill_runs


def _engine(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    d = load_file(run / "engine_logits.safetensors")
    return d["input_ids"], d["logits"]


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_hf_dir(d: Path, tied: bool = True) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    with safe_open(d / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and not any(k.startswith("module.") for k in keys)
    assert ("lm_head.weight" in keys) is not tied          # a tied head is stored once
    assert AutoTokenizer.from_pretrained(d)("the fox").input_ids
    _check_shareable(d)


def _check_shareable(d: Path) -> None:
    """What other users and stock tools need: readable files, a generation config, no
    load-time options in the tokenizer config, and no name pointing at another model."""
    import stat

    from transformers import AutoConfig, GenerationConfig

    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, (f.name, oct(f.stat().st_mode))
    assert stat.S_IMODE((d / "model.safetensors").stat().st_mode) == 0o644
    gen = GenerationConfig.from_pretrained(d)
    assert gen.eos_token_id == AutoConfig.from_pretrained(d).eos_token_id is not None
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_cfg and "is_local" not in tok_cfg, tok_cfg
    for name in ("config.json", "tokenizer_config.json"):
        cfg = json.loads((d / name).read_text())
        for key in ("_name_or_path", "name_or_path"):
            assert cfg.get(key, str(d)) == str(d), (name, key, cfg.get(key))


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_export_logits_equal_the_engine(runs):
    ids, want = _engine(runs["A"])
    d = runs["A"] / "export"
    _check_hf_dir(d)
    got = _logits(d, ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.dist
@pytest.mark.slow
def test_export_hf_tool_from_checkpoint_equals_the_engine(runs, tmp_path, monkeypatch):
    ids, want = _engine(runs["A"])
    out = tmp_path / "hf"
    monkeypatch.setattr(sys, "argv", ["export_hf.py", str(runs["A"] / "ckpt"), str(out)])
    runpy.run_path(str(REPO / "tools" / "export_hf.py"), run_name="__main__")
    _check_hf_dir(out)
    info = json.loads((out / "sampledkd_export.json").read_text())
    assert info["step"] == STEPS and info["checkpoint"].endswith(f"step{STEPS:08d}")
    assert (_logits(out, ids) - want).abs().max().item() < 1e-5


def test_latest_tag_and_missing_meta_errors_name_the_path(tmp_path):
    from pipeline.stage2_distill.checkpoint import META, latest_tag
    from pipeline.stage2_distill.export import export_checkpoint

    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        latest_tag(tmp_path)
    (tmp_path / "step00000002").mkdir()
    (tmp_path / "latest").write_text("step00000002\n")
    assert latest_tag(tmp_path) == "step00000002"
    with pytest.raises(FileNotFoundError) as e:
        export_checkpoint(tmp_path, tmp_path / "out")
    assert str(tmp_path / "step00000002" / META) in str(e.value)


@pytest.mark.parametrize("tied", [True, False])
def test_save_hf_round_trips_a_wrapped_state_dict(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stage2_distill.export import save_hf
    from pipeline.demo.tiny import build_tiny_model

    src = build_tiny_model(tmp_path / "src", hidden=16, layers=1, heads=2, seed=3,
                           tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    # A DeepSpeed-style prefix, and lm_head listed even when tied (state_dict() does that).
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    save_hf(sd, model.config, AutoTokenizer.from_pretrained(src), tmp_path / "out")
    _check_hf_dir(tmp_path / "out", tied=tied)
    ids = torch.arange(20)[None] % model.config.vocab_size
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert torch.equal(_logits(tmp_path / "out", ids), want)
