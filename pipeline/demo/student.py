"""Students cut from the demo's teacher: some of its decoder layers, weights copied exactly.

`cut_student` keeps the embeddings, the chosen layers, the final norm and lm_head of a HF
causal LM; `student_layer_list` parses the --student-layers spec and `student_asset_name`
names the resulting asset. pipeline.demo.assets builds the default student with these, and
tools/student_cuts.py compares cuts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.demo.store import AssetError


def student_layer_list(layers: int | str | Sequence[int], n: int) -> list[int]:
    """The teacher layers a student keeps: `k` (or "k") = the first k; "0,1,2,27,28,29" or a
    sequence = those layers, in increasing order. Raises ValueError naming the spec."""
    if isinstance(layers, str):
        try:
            parts = [int(x) for x in layers.split(",")]
        except ValueError:
            raise ValueError(f"--student-layers={layers!r}: expected a count (4) or a comma-separated "
                             "list of layer indices (0,1,2,27,28,29)") from None
        layers = parts[0] if len(parts) == 1 else parts
    if isinstance(layers, int):
        if not 1 <= layers <= n:
            raise ValueError(f"student layers={layers} must be in [1, {n}] (the teacher has {n})")
        return list(range(layers))
    keep = list(layers)
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"student layers={keep} must be distinct increasing indices in [0, {n - 1}]")
    return keep


def student_asset_name(keep: list[int]) -> str:
    """`student-L4` for a prefix cut (layers 0..3), `student-L0-1-2-27-28-29` otherwise."""
    if keep == list(range(len(keep))):
        return f"student-L{len(keep)}"
    return "student-L" + "-".join(map(str, keep))


def cut_student(teacher_dir: str | Path, out_dir: str | Path, layers: int | str | Sequence[int]) -> Path:
    """Save the teacher cut to some of its decoder layers as a new model in `out_dir`.

    `layers` (see `student_layer_list`): an int k keeps layers 0..k-1; a list keeps those
    layers, in order. The embeddings, the final norm, lm_head (tied or not, as in the
    teacher) and the tokenizer are kept; weights are copied exactly. Then for input x,
    student(x).logits == lm_head(norm(L_kj(...L_k1(embed(x))))) over the kept layers k1..kj.
    Keeping the last layers too (e.g. 0,1,2,27,28,29) matters: the final norm and lm_head
    expect the last layer's features, and a prefix-only cut starts at a perplexity of ~1e8.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher_dir, out = Path(teacher_dir), Path(out_dir)
    cfg = AutoConfig.from_pretrained(teacher_dir)
    keep = student_layer_list(layers, cfg.num_hidden_layers)
    # Per-layer lists (Qwen's layer_types) must shrink with the layer count.
    per_layer = {k: [v[i] for i in keep] for k, v in cfg.to_dict().items()
                 if k in ("layer_types", "mlp_layer_types") and v is not None}
    cfg = AutoConfig.from_pretrained(teacher_dir, num_hidden_layers=len(keep), **per_layer)
    teacher_sd = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).state_dict()
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    layer_key = re.compile(r"model\.layers\.(\d+)\.")
    sd = {}
    for key in student.state_dict():
        m = layer_key.match(key)
        src = key if m is None else f"model.layers.{keep[int(m.group(1))]}.{key[m.end():]}"
        if src not in teacher_sd:
            raise AssetError(f"cutting {teacher_dir} to layers {keep}: the teacher has no {src}")
        sd[key] = teacher_sd[src]
    # strict: every student weight comes from the teacher (tied lm_head included).
    student.load_state_dict(sd, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out
