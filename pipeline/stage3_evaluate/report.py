"""Stage 3's report of a run's results: the headline metric per task (results.md and the
console table)."""

from __future__ import annotations

from pipeline.stage3_evaluate import tasks as task_registry


def headline(results: dict) -> dict[str, tuple[str, float, float | None]]:
    """task -> (metric key, value, stderr or None) for the tasks in lm-eval's `results`."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        key = task_registry.HEADLINE.get(task)
        if key is None or key not in metrics:
            continue
        metric, _, filt = key.partition(",")
        err = metrics.get(f"{metric}_stderr,{filt}")
        out[task] = (key, float(metrics[key]), float(err) if isinstance(err, (int, float)) else None)
    return out


def markdown(results: dict) -> str:
    """results.md: headline table, held-out metrics, lm-eval's full table."""
    from lm_eval.utils import make_table

    ours = results["sampledkd"]
    lines = [f"# Evaluation of `{ours['model']}`", ""]
    heads = headline(results)
    if heads:
        lines += ["| Task | Metric | Value | Stderr | n |", "|---|---|---:|---:|---:|"]
        for task, (key, value, err) in heads.items():
            n = results.get("n-samples", {}).get(task, {}).get("effective", "")
            lines.append(f"| {task} | {key} | {value:.4f} | {'' if err is None else f'{err:.4f}'} | {n} |")
        mean = sum(v for _, v, _ in heads.values()) / len(heads)
        lines += [f"| **mean of {len(heads)}** | | **{mean:.4f}** | | |", ""]
    if "heldout" in results:
        lines += ["## Held-out language modeling", "", "| Metric | Value |", "|---|---:|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in results["heldout"].items() if not isinstance(v, list)]  # bins: JSON only
        lines.append("")
    if results.get("results"):
        lines += ["## lm-eval", "", make_table(results)]
    return "\n".join(lines) + "\n"


def print_summary(results: dict, console) -> None:
    from rich.table import Table

    heads = headline(results)
    table = Table(title=f"SampledKD evaluation: {results['sampledkd']['model']}")
    for col, justify in (("task", "left"), ("metric", "left"), ("value", "right"),
                         ("± stderr", "right"), ("n", "right")):
        table.add_column(col, justify=justify)
    for task, (key, value, err) in heads.items():
        n = results.get("n-samples", {}).get(task, {}).get("effective", "")
        table.add_row(task, key, f"{value:.4f}", "" if err is None else f"{err:.4f}", str(n))
    if heads:
        mean = sum(v for _, v, _ in heads.values()) / len(heads)
        table.add_row(f"mean of {len(heads)}", "", f"{mean:.4f}", "", "", style="bold")
    for key, value in results.get("heldout", {}).items():
        if isinstance(value, list):        # the calibration bins: results.json only
            continue
        table.add_row("heldout", key, f"{value:.6g}" if isinstance(value, float) else str(value), "", "")
    console.print(table)
