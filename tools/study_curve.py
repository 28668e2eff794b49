"""The learning curve of `tools/study.py --curve`: validation KL against steps and wall time.

Each run of the curve validates every --val-every steps (pipeline.distill --val-cache) and
keeps those points in its result.json (`curve`: step, training wall time so far, KL
estimate and its standard error, CE, perplexity, accuracy, ECE). This module turns the
results into OUT/curve.json, OUT/curve.md (per row, the validation KL at four points of the
run and the paired gap to dense KD there: mean +- sd over seeds of KL(row, s) -
KL(dense_kd, s) at the same step) and two plots (KL against steps; against the training
wall time, where dense KD's teacher forward costs time).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _fmt(m: float, sd: float, sign: bool = False) -> str:
    f = "+.3f" if sign else ".3f"
    return f"{m:{f}}" if math.isnan(sd) else f"{m:{f}} ± {sd:.3f}"


def checkpoints(steps: int) -> list[int]:
    """Four points of the run: a quarter, half, three quarters and the end."""
    return sorted({max(1, steps * k // 4) for k in (1, 2, 3, 4)})


def summarize_curve(results: list[dict], labels: dict[str, str]) -> dict:
    by: dict[str, dict[int, dict]] = {}
    for r in results:
        by.setdefault(r["row"], {})[r["seed"]] = r
    steps = results[0]["settings"]["steps"]
    at = checkpoints(steps)
    dense = by.get("dense_kd", {})
    rows = []
    for name, runs in by.items():
        seeds = sorted(runs)
        pts = {s: {p["step"]: p for p in runs[s]["curve"]} for s in seeds}
        out = {"row": name, "label": labels.get(name, name), "seeds": seeds, "at": {}}
        for step in at:
            kl = [pts[s][step]["kl"] for s in seeds if step in pts[s]]
            gap = [pts[s][step]["kl"] - {p["step"]: p for p in dense[s]["curve"]}[step]["kl"]
                   for s in seeds if s in dense and step in pts[s] and name != "dense_kd"]
            out["at"][step] = {"kl": _ms(kl) if kl else None, "gap_to_dense": _ms(gap) if gap else None}
        out["final_heldout_kl"] = _ms([runs[s]["kl"] for s in seeds])
        out["points"] = {s: runs[s]["curve"] for s in seeds}
        rows.append(out)
    return {"settings": results[0]["settings"], "checkpoints": at, "rows": rows}


def markdown(summary: dict) -> str:
    at = summary["checkpoints"]
    s = summary["settings"]
    head = ("| row | seeds | " + " | ".join(f"KL @ {a}" for a in at) + " | "
            + " | ".join(f"gap to dense @ {a}" for a in at) + " | exact held-out KL at the end |")
    lines = [f"Validation KL (the cached-class estimate, pipeline.stage2_distill.validation) on {s['heldout_windows']} "
             f"held-out windows of {s['seq_len']} tokens, every {s.get('val_every')} steps; gap = paired "
             "KL(row) - KL(dense KD) at the same step and seed, mean ± sd over seeds.", "",
             head, "|" + "---|" * (3 + 2 * len(at))]
    for r in summary["rows"]:
        kls = [_fmt(*r["at"][a]["kl"]) if r["at"][a]["kl"] else "-" for a in at]
        gaps = [_fmt(*r["at"][a]["gap_to_dense"], sign=True) if r["at"][a]["gap_to_dense"] else "-" for a in at]
        lines.append(f"| {r['label']} | {len(r['seeds'])} | " + " | ".join(kls) + " | " + " | ".join(gaps)
                     + f" | {_fmt(*r['final_heldout_kl'])} |")
    return "\n".join(lines) + "\n"


def plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, xlabel, name in (("step", "optimizer step", "curve_steps.png"),
                              ("wall_s", "training wall time, s (validation excluded)", "curve_wall.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in summary["rows"]:
            seeds = sorted(r["points"])
            steps = [p["step"] for p in r["points"][seeds[0]]]
            xs, ys, es = [], [], []
            for i, st in enumerate(steps):
                vals = [r["points"][s][i] for s in seeds if i < len(r["points"][s])]
                xs.append(statistics.fmean(v[key] for v in vals))
                ys.append(statistics.fmean(v["kl"] for v in vals))
                es.append(statistics.stdev([v["kl"] for v in vals]) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=r["label"])
        ax.set(xlabel=xlabel, ylabel="validation KL(teacher || student), nats/token",
               title="learning curve (mean over seeds)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def curve_outputs(results: list[dict], out: Path, labels: dict[str, str]) -> dict:
    summary = summarize_curve(results, labels)
    (out / "curve.json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
    (out / "curve.md").write_text(md)
    pngs = plots(summary, out / "plots")
    print(md)
    print(f"[study] wrote {out / 'curve.md'}, {out / 'curve.json'}, {', '.join(map(str, pngs))}", flush=True)
    return summary
