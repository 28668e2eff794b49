r"""Side-by-side table of evaluated runs (the paper's results table) plus a bar chart.

    python tools/compare_runs.py runs/no_kd/eval runs/dense_kd/eval runs/tskd/eval runs/sampledkd/eval \
        --out reports/compare            # -> reports/compare.md, reports/compare.png
    python tools/compare_runs.py "no-KD=runs/a/eval/results.json" "SampledKD=runs/b/eval"

Each RUN is a `results.json` written by `python -m pipeline.evaluate` (lm-eval >= 0.4
format: a `results` object keyed by task name whose metric keys read "metric,filter"),
or a folder holding one; `LABEL=RUN` names the row (default: `run_info.json`'s `name`,
else the folder's name, skipping a trailing `eval`). Rows are runs; columns are the nine
tasks (those that at least one run has, in the paper's order) with their headline metric
(`pipeline.stage3_evaluate.tasks.HEADLINE`) in percent, and their mean `Avg` (only for runs that have
every column; "-" otherwise).

`run_info.json` (optional, in the results file's folder or the folder above it) adds
columns when any run has them; all fields optional, other fields ignored:

    {"name": "SampledKD",                  # row label
     "cache_bytes_per_position": 37,       # teacher-cache storage (0 for online KD)
     "wall_time_s": 5400.0}                # distillation wall time in seconds
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.stage3_evaluate.tasks import HEADLINE, PAPER_TASKS

SHORT = {"gsm8k": "GSM8K", "svamp": "SVAMP", "arc_easy": "ARC-E", "arc_challenge": "ARC-C",
         "hellaswag": "HellaSwag", "piqa": "PIQA", "lambada_openai": "LAMBADA", "aime25": "AIME25",
         "ifeval": "IFEval"}
_INFO_FIELDS = {"name": str, "cache_bytes_per_position": (int, float), "wall_time_s": (int, float)}


@dataclass(frozen=True)
class Run:
    """One evaluated run: headline scores in [0, 1] and optional run_info fields."""

    label: str
    path: Path
    scores: dict[str, float]
    info: dict = field(default_factory=dict)


def _results_path(spec: Path) -> Path:
    if spec.is_dir():
        spec = spec / "results.json"
    if not spec.is_file():
        raise FileNotFoundError(f"{spec}: no such results file (run python -m pipeline.evaluate)")
    return spec


def read_scores(path: Path) -> dict[str, float]:
    """task -> headline value from an lm-eval >= 0.4 results file (tasks outside the nine skipped)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: no 'results' object; expected an lm-eval results file as "
                         "written by python -m pipeline.evaluate")
    scores: dict[str, float] = {}
    for task, metrics in data["results"].items():
        if not isinstance(metrics, dict):
            raise ValueError(f"{path}: results[{task!r}] is a {type(metrics).__name__}, not an object")
        names = [k for k in metrics if k not in ("alias", "name", "sample_len")]
        if names and not any("," in k for k in names):
            raise ValueError(f"{path}: task {task!r} has metric keys without ',filter' ({names[:4]}): "
                             "a results file from lm-eval < 0.4; re-run python -m pipeline.evaluate")
        if task not in HEADLINE:
            continue
        key = HEADLINE[task]
        if key not in metrics:
            raise ValueError(f"{path}: task {task!r} lacks metric {key!r} (has {sorted(names)}); "
                             "a results file of another lm-eval schema or task version")
        value = metrics[key]
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{path}: results[{task!r}][{key!r}] = {value!r}, expected a number in [0, 1]")
        scores[task] = float(value)
    return scores


def read_info(results_file: Path) -> dict:
    """run_info.json next to the results file or one folder up ({} when there is none)."""
    for folder in (results_file.parent, results_file.parent.parent):
        path = folder / "run_info.json"
        if path.is_file():
            info = json.loads(path.read_text())
            if not isinstance(info, dict):
                raise ValueError(f"{path}: expected a JSON object")
            for key, types in _INFO_FIELDS.items():
                if key in info and not isinstance(info[key], types):
                    raise ValueError(f"{path}: {key} = {info[key]!r} has the wrong type")
            return info
    return {}


def load_run(spec: str) -> Run:
    """`[LABEL=]PATH` -> Run."""
    label, sep, path_s = spec.partition("=")
    if not sep or not label or Path(spec).exists():
        label, path_s = "", spec
    path = _results_path(Path(path_s))
    info = read_info(path)
    folder = path.parent.parent if path.parent.name == "eval" else path.parent
    return Run(label or info.get("name") or folder.resolve().name, path, read_scores(path), info)


def columns(runs: list[Run]) -> list[str]:
    """The nine tasks that at least one run has, in the paper's order."""
    cols = [t for t in PAPER_TASKS if any(t in r.scores for r in runs)]
    if not cols:
        raise ValueError("none of the runs has any of the tasks " + ", ".join(PAPER_TASKS))
    return cols


def average(run: Run, cols: list[str]) -> float | None:
    """Mean headline score over `cols`, None unless the run has all of them."""
    if any(t not in run.scores for t in cols):
        return None
    return sum(run.scores[t] for t in cols) / len(cols)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def markdown(runs: list[Run]) -> str:
    """The comparison table (scores in percent) and a line naming the metrics."""
    cols = columns(runs)
    storage = any("cache_bytes_per_position" in r.info for r in runs)
    wall = any("wall_time_s" in r.info for r in runs)
    head = ["Run"] + [SHORT[t] for t in cols] + ["Avg"]
    head += ["Cache B/pos"] * storage + ["Train time"] * wall
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in runs:
        cells = [r.label] + [f"{100 * r.scores[t]:.1f}" if t in r.scores else "-" for t in cols]
        avg = average(r, cols)
        cells.append("-" if avg is None else f"{100 * avg:.1f}")
        if storage:
            b = r.info.get("cache_bytes_per_position")
            cells.append("-" if b is None else f"{b:.1f}")
        if wall:
            s = r.info.get("wall_time_s")
            cells.append("-" if s is None else _duration(s))
        lines.append("| " + " | ".join(cells) + " |")
    metrics = "; ".join(f"{SHORT[t]} {HEADLINE[t].replace(',none', '').replace(',', ' ')}" for t in cols)
    return "\n".join(lines) + f"\n\nScores in percent. Metrics: {metrics}. Avg: mean over the columns.\n"


def bar_chart(runs: list[Run], path: Path, title: str = "SampledKD: evaluation") -> None:
    """Grouped bars: one group per task (plus Avg), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cols = columns(runs)
    groups = [SHORT[t] for t in cols] + ["Avg"]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups)), 4.0))
    for i, r in enumerate(runs):
        avg = average(r, cols)
        vals = [100 * r.scores[t] if t in r.scores else math.nan for t in cols]
        vals.append(math.nan if avg is None else 100 * avg)
        xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, vals, width=width, label=r.label)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Run]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="[LABEL=]results.json or run folder")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.png (OUT: a path prefix)")
    ap.add_argument("--title", default="SampledKD: evaluation", help="chart title")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(s) for s in args.runs]
        table = markdown(runs)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(table, end="")
    if args.out is not None:
        base = Path(args.out)
        base = base.with_suffix("") if base.suffix in (".md", ".png") else base
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_name(base.name + ".md").write_text(table)
        bar_chart(runs, base.with_name(base.name + ".png"), args.title)
    return runs


if __name__ == "__main__":
    main()
