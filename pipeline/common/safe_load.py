"""Checkpoints are data, never code: every `torch.load` in the process is `weights_only`.

A run directory may be moved, copied or handed over, and a pickle runs whatever its
`__reduce__` says. DeepSpeed loads its model and optimizer states with
`torch.load(weights_only=False)` (TorchCheckpointEngine.load, zero_to_fp32), so passing the
flag at our own call sites is not enough. `enforce_weights_only()` sets torch's
`TORCH_FORCE_WEIGHTS_ONLY_LOAD`, which torch reads at every `torch.load` call and which
overrides an explicit `weights_only=False`, and allowlists by name the few non-tensor
types DeepSpeed's states hold (measured on ZeRO-3 checkpoints of DeepSpeed 0.19:
`get_unsafe_globals_in_checkpoint` lists exactly ZeroStageEnum and LossScaler; the
dynamic scaler is the fp16 variant of the same object). Any other global in a checkpoint
makes the load fail before it is called: `refuse_unsafe(path)` turns that into an error
naming the file and the refused global.
"""

from __future__ import annotations

import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path


def safe_globals() -> list:
    """The non-tensor types DeepSpeed's ZeRO checkpoints hold (plain data classes/enums)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def enforce_weights_only() -> None:
    """Every later `torch.load` in this process (and its children) is weights_only=True."""
    import torch

    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)   # both set: torch raises
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals(safe_globals())


@contextmanager
def refuse_unsafe(path: str | Path, what: str):
    """Turn a refused unpickle inside the block into a ValueError naming `path`."""
    try:
        yield
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        detail = f"global {found.group(1)}" if found else "an object weights_only loading refuses"
        raise ValueError(
            f"{path}: refusing to load the {what}: it holds a Python object that is not a tensor "
            f"or one of DeepSpeed's known checkpoint types ({detail}). Loading it would run code "
            "from the file. It was not written by pipeline.distill, or it was altered; use a "
            "checkpoint you produced yourself") from None
