"""Experiment tracking: every metrics.jsonl record also goes to TensorBoard (and W&B on request).

    tensorboard --logdir RUN_DIR/tensorboard

`Tracker` is what the training loop writes a step's record to: `OUT/metrics.jsonl` (one
JSON object per step, the source of truth), TensorBoard event files under `OUT/tensorboard/`
(`torch.utils.tensorboard`, the format DeepSpeed's monitor, torchtune and TRL write), and a
W&B run when `--wandb-project` is given and `wandb` is installed (never required; offline
with WANDB_MODE=offline). Numbers become scalars `train/<field>` at the record's step; the
window keys (lists of strings) become text `train/keys` and `train/rank_keys`. After a
resume the steps after the checkpoint are recomputed: `purge_step` makes TensorBoard drop
their old events, as `truncate_metrics` drops their old lines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TB_DIR = "tensorboard"


def _scalar(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


class Tracker:
    """Rank 0's sinks for per-step records; a no-op object on other ranks."""

    def __init__(self, out: Path, config: dict, enabled: bool, tensorboard: bool = True,
                 wandb_project: str | None = None, resume_step: int = 0):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / TB_DIR), purge_step=resume_step + 1 if resume_step else None)
            self.tb.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError(f"--wandb-project {wandb_project}: the wandb package is not "
                                 "installed (pip install wandb), or leave the flag out") from e
            run_id = out / "wandb_run_id"
            rid = run_id.read_text().strip() if run_id.exists() else wandb.util.generate_id()
            run_id.write_text(rid)
            self.wandb = wandb.init(project=wandb_project, dir=str(out), id=rid, resume="allow",
                                    config=config, name=out.name)

    def log(self, rec: dict, step: int, prefix: str = "train") -> None:
        if not self.enabled:
            return
        scalars = {k: x for k, v in rec.items() if (x := _scalar(v)) is not None}
        if self.tb is not None:
            for k, x in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", x, step)
            for k, v in rec.items():
                if isinstance(v, list) and all(isinstance(s, str) for s in v):
                    self.tb.add_text(f"{prefix}/{k}", " ".join(v), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": x for k, x in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def log_results(out: Path, results: dict) -> None:
    """Evaluation numbers (`{task: {metric: value}}`, the held-out table as task `heldout`)
    as TensorBoard scalars `eval/<task>/<metric>` in `out/tensorboard`, at step 0 (one
    evaluation per model directory)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / TB_DIR)) as tb:
        for task, metrics in results.items():
            for metric, v in (metrics.items() if isinstance(metrics, dict) else ()):
                if (x := _scalar(v)) is not None:
                    tb.add_scalar(f"eval/{task}/{metric}", x, 0)
