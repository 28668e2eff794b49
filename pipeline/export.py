"""DeepSpeed checkpoint -> Hugging Face model directory (safetensors + config + tokenizer).

    python tools/export_hf.py RUN_DIR/ckpt OUT        # the tool wraps `export_checkpoint`

The ZeRO shards are consolidated to fp32 with DeepSpeed's own `zero_to_fp32` and written
with safetensors; the result loads with `AutoModelForCausalLM.from_pretrained` and lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.safe_load import enforce_weights_only, refuse_unsafe

META = "sampledkd_meta.json"      # written next to DeepSpeed's files by pipeline.distill


def latest_tag(ckpt_dir: Path) -> str:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no 'latest' file; not a DeepSpeed checkpoint directory "
                                "(expected RUN_DIR/ckpt written by pipeline.distill)")
    return latest.read_text().strip()


def save_hf(state_dict: dict[str, torch.Tensor], config, tokenizer, out: Path) -> Path:
    """Write `state_dict` as an HF checkpoint (tied lm_head stored once)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_checkpoint(ckpt_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Consolidate a ZeRO checkpoint (any stage) and write it as an HF model to `out`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoTokenizer

    ckpt_dir, out = Path(ckpt_dir), Path(out)
    tag = tag or latest_tag(ckpt_dir)
    meta_path = ckpt_dir / tag / META
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} missing: the checkpoint was not written by "
                                "pipeline.distill (it records the student's config there)")
    meta = json.loads(meta_path.read_text())
    config = AutoConfig.from_pretrained(ckpt_dir / tag / "hf_config")
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir / tag / "hf_config")
    enforce_weights_only()            # zero_to_fp32 passes weights_only=False
    with refuse_unsafe(ckpt_dir / tag, "checkpoint"):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    save_hf(sd, config, tokenizer, out)
    (out / "sampledkd_export.json").write_text(json.dumps({"checkpoint": str(ckpt_dir / tag),
                                                           "step": meta["step"]}, indent=1))
    return out
