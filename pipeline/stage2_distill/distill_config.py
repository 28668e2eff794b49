"""Stage 2's configuration: `DistillConfig`, its flags (pipeline.common.config), the loss weights
each mode brings, and the selection a mode actually runs (both from the table of modes,
`pipeline.stage2_distill.modes`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.common import config as C
from pipeline.stage2_distill import recipes
from pipeline.stage2_distill.modes import MODES
from pipeline.stage2_distill.objectives import KD_LOSSES
from pipeline.stage2_distill.selection.config import SelectionConfig

RECIPE_HELP = (
    "the loss recipe: a name in pipeline/stage2_distill/recipes/ or a path to a YAML file of these keys, laid "
    "under --config and the flags; 'recommended' = " + recipes.RECOMMENDED + ", sparse KD on the "
    "cache's classes at every position: the best held-out KL measured at equal steps among the "
    "recipes that read only the cache (quality study, 3 paired seeds: KL 3.139 vs 3.631 for no KD "
    "and 3.026 for online dense KD; BENCHMARKS.md). `--recipe list` lists them")


# `--recipe` is the config's preset (pipeline.common.config): its file's values sit under
# --config and the flags; the file's meta keys (recipes.META_KEYS) are not options.
RECIPE_PRESET = C.Preset(file=recipes.path_of, body=lambda data: recipes.split_meta(data)[0])


@dataclass(frozen=True)
class DistillConfig:
    recipe: str = C.opt("recommended", RECIPE_HELP, preset=RECIPE_PRESET)
    student: str = C.opt(None, "student: HF checkpoint directory, hub id, or a config.json path")
    cache: str = C.opt(None, "teacher cache directory (pipeline.cache output)")
    out: str = C.opt(None, "run directory: metrics, checkpoints (ckpt/), export (export/)")
    deepspeed: str = C.opt("ds_configs/zero3.json", "DeepSpeed config (ZeRO and precision only)")
    mode: str = C.opt("sampledkd", "what the loss distils; each mode brings its loss weights", choices=tuple(MODES))
    teacher: str | None = C.opt(None, "online teacher for --mode dense_kd")
    steps: int = C.opt(100, "optimizer steps")
    micro_batch: int = C.opt(1, "windows per rank per micro-step")
    grad_accum: int = C.opt(1, "micro-steps per optimizer step")
    lr: float = C.opt(1e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = C.opt(0.1, "cosine decay floor as a fraction of --lr")
    warmup_steps: int = C.opt(0, "linear warm-up steps")
    weight_decay: float = C.opt(0.0, "AdamW weight decay")
    seed: int = C.opt(0, "seed (data order, selection randomness)")
    kd_weight: float | None = C.opt(None, "weight of the KD term (default: the mode's, 1; 0 for no_kd)")
    ce_weight: float | None = C.opt(None, "weight of the next-token CE term (default: the mode's, 0; "
                                    "1 for no_kd)")
    ce_positions: str = C.opt("selected", "where CE is computed in sampledkd/rskd_all modes: at the "
                              "selected positions, at all, or at the unselected ones (KD then "
                              "replaces CE where the rule selects)",
                              choices=("selected", "all", "unselected"))
    kd_temperature: float = C.opt(1.0, "KD temperature applied to the student")
    kd_head: str = C.opt("fused", "sparse KD at the selected rows: 'fused' makes lm_head's logits "
                         "chunk by chunk with the gradients (no [n, V] logits or gradient), "
                         "'logits' calls lm_head on the rows (used anyway when CE needs the "
                         "selected rows' logits)", choices=("fused", "logits"))
    kd_loss: str = C.opt("sparse", "KD loss at the selected rows: 'sparse' (exact softmax over the "
                         "vocabulary) or 'sampled_softmax' (exact logits for the cached and the "
                         "--exact-classes classes, --num-negatives sampled ones for the rest: no "
                         "[n, V] logits)", choices=tuple(KD_LOSSES))
    num_negatives: int = C.opt(1024, "sampled_softmax: negatives M drawn per micro-step")
    exact_classes: int = C.opt(1024, "sampled_softmax: classes K with the most cached teacher mass "
                               "whose logits are always exact (cuts the estimator's bias ~10x)")
    self_normalize: bool = C.opt(False, "use p_hat / sum(p_hat) as the target (biased, lower variance)")
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)
    val_cache: str | None = C.opt(None, "stage-1 cache of held-out text (same teacher, tokenizer and V as "
                                  "--cache, another corpus): validate the student on it during training")
    val_every: int = C.opt(0, "validate every N steps (and at step 0 and the last step); 0: at step 0 "
                           "and the last step only. Needs --val-cache")
    val_windows: int = C.opt(64, "windows of --val-cache in the validation set (the first N, fixed)")
    checkpoint_every: int = C.opt(0, "save a checkpoint every N steps (0: only at the end and on signals)")
    log_every: int = C.opt(1, "write metrics every N steps")
    log_all_ranks: bool = C.opt(False, "every rank writes OUT/metrics-rank{r}.jsonl")
    resume: bool = C.opt(False, "continue from OUT/ckpt if it holds a checkpoint")
    export: bool = C.opt(True, "write OUT/export (HF format) at the end")
    tensorboard: bool = C.opt(True, "rank 0 writes every metrics.jsonl field to OUT/tensorboard/")
    wandb_project: str | None = C.opt(None, "also log to this W&B project (needs `pip install "
                                      "wandb`; WANDB_MODE=offline works without network)")
    shuffle_buffer: int = C.opt(64, "windows in the reader's shuffle buffer")
    dtype: str = C.opt("auto", "bf16 on GPU, fp32 on CPU when auto", choices=("auto", "float32", "bfloat16"))

    def __post_init__(self):
        # the weights the mode brings (an unknown --mode, reported by validate: KD 1, CE 0)
        mode = MODES.get(self.mode)
        kd, ce = (mode.kd_weight, mode.ce_weight) if mode else (1.0, 0.0)
        if self.kd_weight is None:
            object.__setattr__(self, "kd_weight", kd)
        if self.ce_weight is None:
            object.__setattr__(self, "ce_weight", ce)

    @property
    def active_selection(self) -> SelectionConfig:
        """The selection that runs: the mode's (`Mode.select`: rskd_all, no_kd and dense_kd
        train every position, `all`) whatever `--select` says, else `selection` (sampledkd).
        An unknown --mode (validate reports it) runs `all`."""
        mode = MODES.get(self.mode)
        forced = mode.select if mode else "all"
        if forced is None or self.selection.select == forced:
            return self.selection
        return dataclasses.replace(self.selection, select=forced)

    def validate(self) -> None:
        p = []
        for name, val in (("student", self.student), ("cache", self.cache), ("out", self.out)):
            if not val:
                p.append(f"--{name} is required")
        mode = MODES.get(self.mode)
        if mode is None:
            p.append(f"--mode {self.mode!r} must be one of {tuple(MODES)}")
        elif mode.online_teacher and not self.teacher:
            p.append(f"--mode {self.mode} needs --teacher (the online teacher)")
        if self.steps < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            p.append(f"--steps {self.steps}, --micro-batch {self.micro_batch}, --grad-accum "
                     f"{self.grad_accum} must all be >= 1")
        if self.lr <= 0 or self.kd_temperature <= 0:
            p.append("--lr and --kd-temperature must be > 0")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            p.append(f"--kd-weight {self.kd_weight} and --ce-weight {self.ce_weight} must be >= 0, "
                     "not both 0")
        if mode is not None and not mode.distils and self.ce_weight == 0:
            p.append(f"--mode {self.mode} trains on CE only: --ce-weight must be > 0")
        if self.kd_loss == "sampled_softmax":
            if not (mode is not None and mode.reads_cache):
                cached = " or ".join(n for n, m in MODES.items() if m.reads_cache)
                p.append(f"--kd-loss sampled_softmax reads the cache: use it with --mode {cached}, "
                         f"not {self.mode}")
            if self.num_negatives < 1 or self.exact_classes < 0:
                p.append(f"--num-negatives {self.num_negatives} must be >= 1 and --exact-classes "
                         f"{self.exact_classes} >= 0")
        from pipeline.stage2_distill.validation import val_dir_problems
        p += val_dir_problems(self.val_cache, self.val_every, self.val_windows)
        try:
            self.active_selection.validate(has_targets=mode is None or mode.reads_cache)
        except ValueError as e:
            p.append(str(e))
        C.raise_if(p, "distill")


def recipe_keys() -> set[str]:
    """The keys that make a recipe: every key some recipe file sets, and the loss weights."""
    keys = {"mode", "kd_weight", "ce_weight"}
    for name in recipes.names():
        keys |= {k.replace("-", "_") for k in recipes.read(name)[1]}
    return keys


def recipe_warnings(cfg: DistillConfig) -> list[str]:
    """The warnings of the recipe files whose settings `cfg` trains (names the measurement):
    picked by name or typed as flags, the same recipe gets the same warning."""
    keys = recipe_keys()
    have = C.to_json(cfg)
    out = []
    for name in recipes.names():
        path, values, meta = recipes.read(name)
        if "warning" not in meta:
            continue
        parser = C.ConfigParser(DistillConfig)
        theirs = C.to_json(C.build(DistillConfig, {**parser.check_values(values, str(path))}))
        if all(have[k] == theirs[k] for k in keys):
            out.append(f"recipe {name}: {meta['warning']}")
    return out
