"""Stage 2's setup: the DeepSpeed config, the student (partitioned as it loads), the online
teacher of `--mode dense_kd`, the learning-rate schedule. `cfg` is a `DistillConfig`
(read by attribute; this module does not import the stage)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

def ds_config(cfg, world: int, device: torch.device) -> dict:
    """The user's ZeRO/precision JSON plus the batch sizes, which must agree if present."""
    path = Path(cfg.deepspeed)
    if not path.exists():
        raise ValueError(f"--deepspeed {path}: no such file (see ds_configs/)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                         f"{e.colno}); fix the file (see ds_configs/zero3.json)") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--deepspeed {path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                         "it must be a JSON file (see ds_configs/zero3.json)") from e
    if not isinstance(raw, dict):
        raise ValueError(f"--deepspeed {path}: a JSON object is needed, got {type(raw).__name__}")
    ds = {k: v for k, v in raw.items() if not k.startswith("_")}
    derived = {"train_micro_batch_size_per_gpu": cfg.micro_batch,
               "gradient_accumulation_steps": cfg.grad_accum,
               "train_batch_size": cfg.micro_batch * cfg.grad_accum * world}
    clash = [f"{k}={ds[k]} (derived {v})" for k, v in derived.items() if k in ds and ds[k] != v]
    if clash:
        raise ValueError(f"--deepspeed {path} contradicts the batch settings: {', '.join(clash)}; "
                         f"micro_batch x grad_accum x world = {cfg.micro_batch} x {cfg.grad_accum} x "
                         f"{world}. Remove the batch keys from the JSON or change the flags.")
    ds.update(derived)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    ds["bf16"] = {"enabled": bf16}
    ds.pop("fp16", None)
    return ds


def check_model_path(flag: str, value: str) -> None:
    """A local-looking model path that does not exist is an error here, not a hub lookup.

    `org/name` (two parts, relative) may be a hub id; anything absolute, starting with
    `.`, or deeper is a path, and transformers would report it as an invalid repo id.
    """
    path = Path(value)
    if not path.exists() and (path.is_absolute() or value.startswith(".") or len(path.parts) > 2):
        raise ValueError(f"{flag} {value}: no such file or directory (expected an HF model "
                         "directory, a config.json, or a hub id org/name)")


def load_student(cfg, ds: dict):
    """Under a live HfDeepSpeedConfig, so ZeRO-3 partitions parameters as they load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds)  # noqa: F841 (must outlive from_pretrained)
    src = Path(cfg.student)
    if src.is_file() and src.suffix == ".json":
        mcfg = AutoConfig.from_pretrained(src)
        model = AutoModelForCausalLM.from_config(mcfg)
        tok_dir = src.parent
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
        tok_dir = cfg.student
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"--student {cfg.student}: no tokenizer found ({e})") from e
    return model, tok, keep_alive


def lr_lambda(cfg):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def load_teacher(path: str, student: str, student_tok, device: torch.device):
    """A frozen fp32 replica of the online teacher per rank, outside ZeRO (it is never
    trained; pipeline.common.models loads it); its tokenizer must be the student's."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from pipeline.common.models import load_model
    from pipeline.common.text import tokenizer_fingerprint

    unset_hf_deepspeed_config()     # else ZeRO-3 would partition the teacher as it loads
    tok, teacher = load_model(path, "--teacher", torch.float32, device)
    if tokenizer_fingerprint(tok) != tokenizer_fingerprint(student_tok):
        raise ValueError(f"--teacher {path} and --student {student} have different tokenizers; "
                         "dense KD needs a shared vocabulary")
    teacher.requires_grad_(False)
    return teacher


def check_inputs(cfg) -> str:
    """What a launch would refuse at setup, checked in one process without DeepSpeed (`--check`,
    run by slurm/distill.sh before torchrun: a bad input then ends in one line on the batch
    host, not in every worker and torchrun's own report). Returns a summary; raises the
    ValueError setup would."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.cache_format.reader import CacheReader
    from pipeline.stage2_distill.modes import MODES
    from pipeline.stage2_distill.validation import check_val_cache

    check_model_path("--student", cfg.student)
    if MODES[cfg.mode].online_teacher:
        check_model_path("--teacher", cfg.teacher)
    reader = CacheReader(cfg.cache, verify=False)
    src = Path(cfg.student)
    tok_dir = src.parent if src.is_file() and src.suffix == ".json" else cfg.student
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
        vocab = AutoConfig.from_pretrained(cfg.student).vocab_size
    except OSError as e:
        raise ValueError(f"--student {cfg.student}: cannot load its tokenizer or config ({e})") from e
    reader.check_student(tok, vocab)
    if cfg.val_cache:
        check_val_cache(CacheReader(cfg.val_cache, verify=False).manifest, reader.manifest,
                        cfg.val_cache, cfg.cache)
    m = reader.manifest
    return (f"--cache {cfg.cache}: {m['samples']:,} windows of {m['seq_len']}, {m['sampler']} "
            f"U={m['num_classes']}, V={m['vocab_size']}; --student {cfg.student}: {vocab:,} logits; "
            f"recipe {cfg.recipe}: mode {cfg.mode}, select {cfg.active_selection.select}, "
            f"kd {cfg.kd_weight:g}, ce {cfg.ce_weight:g}")
