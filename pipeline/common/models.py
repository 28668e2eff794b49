"""Loading a causal LM and its tokenizer from a Hugging Face model directory (or hub id): the
one loader of stage 1's teacher, stage 2's online teacher and the held-out metrics.

Each caller keeps its own checks of what it loaded: stage 1 that the teacher's logits cover
its tokenizer (`pipeline.stage1_cache.teacher`), stage 2 that the online teacher shares the
student's tokenizer (`pipeline.stage2_distill.training_setup`), the held-out metrics that
the logits are plain `lm_head(hidden)` (`pipeline.common.heldout`).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A `--dtype` value as a torch dtype: `auto` is bfloat16 on a GPU, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(path: str | Path, flag: str, dtype: torch.dtype,
               device: torch.device | str, device_map: str | None = None):
    """(tokenizer, model in eval mode) of the HF model at `path`, named `flag` in errors
    (`--teacher`, `--model`).

    The weights load as `dtype` and move to `device`, unless `device_map` spreads them
    (accelerate's placement; then `device` is not used). Loading is safe: no code from the
    directory runs (transformers' default `trust_remote_code=False`), and `.bin` weights go
    through torch's weights_only unpickler, which refuses any Python object but tensors and
    plain containers. A tokenizer that does not load and a refused weights file are
    ValueErrors naming `flag` and `path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot load its tokenizer ({e})") from e
    kw = {"device_map": device_map} if device_map else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"global {found.group(1)}" if found else "an object weights_only loading refuses"
        raise ValueError(f"{flag} {path}: refusing its weights: a .bin file holds a Python object "
                         f"that is not a tensor ({what}), and loading it would run code from the "
                         "file; save the model with safetensors (save_pretrained)") from None
    if not device_map:
        model.to(device)
    model.eval()
    return tok, model
