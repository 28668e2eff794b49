"""DeepSpeed checkpoint -> Hugging Face model directory (safetensors + config + tokenizer).

    python tools/export_hf.py RUN_DIR/ckpt OUT        # the tool wraps `export_checkpoint`

The ZeRO shards are consolidated to fp32 with DeepSpeed's own `zero_to_fp32` and written
with safetensors; the result loads with `AutoModelForCausalLM.from_pretrained` and lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.stage2_distill.checkpoint import META, latest_tag
from pipeline.common.safe_load import enforce_weights_only, refuse_unsafe


EXPORT_FILE_MODE = 0o644   # rw-r--r--: other users of a shared cluster can load the export
EXPORT_DIR_MODE = 0o755
# Load-time options that transformers records in tokenizer_config.json; they describe how the
# tokenizer was read here, not the tokenizer, and would force offline mode on whoever loads it.
_LOAD_OPTIONS = ("local_files_only", "is_local", "_commit_hash", "cache_dir", "token")


def save_hf(state_dict: dict[str, torch.Tensor], config, tokenizer, out: Path,
            generation_config=None) -> Path:
    """Write `state_dict` as an HF checkpoint (tied lm_head stored once) that stock tools and
    other users read: config.json, generation_config.json (the student's, or one derived from
    its config), the tokenizer without load-time options, files mode 0644, folder 0755."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config.name_or_path = str(out)
    config.save_pretrained(out)
    (generation_config or GenerationConfig.from_model_config(config)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("tokenizer_config.json", "config.json"):
        path = out / name
        if path.exists():
            d = json.loads(path.read_text())
            cleaned = {k: v for k, v in d.items() if k not in _LOAD_OPTIONS}
            if "_name_or_path" in cleaned:            # not the model it was cut from
                cleaned["_name_or_path"] = str(out)
            if "name_or_path" in cleaned:
                cleaned["name_or_path"] = str(out)
            if cleaned != d:
                path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")
    for f in out.iterdir():
        if f.is_file():
            f.chmod(EXPORT_FILE_MODE)
    out.chmod(EXPORT_DIR_MODE)
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
    gen = None
    if (ckpt_dir / tag / "hf_config" / "generation_config.json").exists():
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(ckpt_dir / tag / "hf_config")
    enforce_weights_only()            # zero_to_fp32 passes weights_only=False
    with refuse_unsafe(ckpt_dir / tag, "checkpoint"):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    save_hf(sd, config, tokenizer, out, gen)
    (out / "sampledkd_export.json").write_text(json.dumps({"checkpoint": str(ckpt_dir / tag),
                                                           "step": meta["step"]}, indent=1))
    return out
