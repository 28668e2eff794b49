"""The quality study's table and plots (tools/study.py runs the grid and summarizes it).

    markdown(summary) -> the table of study.md
    plots(summary, out_dir, vocab) -> [kl_vs_bytes.png, rows.png, gap_vs_bytes.png (with dense KD)]
    gaps_to_dense(summary) -> each cache row's per-seed KL(row) - KL(dense_kd) and its bytes
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _pm(xs: list[float], fmt: str) -> str:
    m, s = mean_sd(xs)
    return f"{m:{fmt}}" if math.isnan(s) else f"{m:{fmt}} ± {s:{fmt}}"


def markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"Held-out: {s['heldout_windows']} windows x {s['seq_len']} tokens of text no run trained on. "
             f"Training: {s['steps']} steps x {s['micro_batch']} x {s['nproc']} windows of {s['seq_len']}, "
             f"lr {s['lr']}, {s['train_windows']} cached windows. Mean ± sd over seeds; paired dKL = "
             "KL(row) - KL(dense_kd) per seed, paired dKL vs U=12 = KL(row) - KL(priority U=12) per seed.",
             "", "| row | seeds | bytes/pos | KL(teacher‖student) | paired dKL vs dense | paired dKL vs "
             "U=12 | perplexity | ECE (15 bins) | step / no_kd |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def signed(d):
        return "-" if d is None else (f"{d[0]:+.4f}" if math.isnan(d[1]) else f"{d[0]:+.4f} ± {d[1]:.4f}")

    for r in summary["rows"]:
        b = r["cache_bytes_per_position"] if r["row"] not in ("dense_kd", "no_kd") else "-"
        step = "-" if r["step_vs_no_kd"] is None else f"{r['step_vs_no_kd']:.2f}x"
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {b} | {_pm(r['kl_per_seed'], '.4f')} | "
                     f"{signed(r['paired_dkl_vs_dense'])} | {signed(r['paired_dkl_vs_priority_U12'])} | "
                     f"{_pm(r['perplexity_per_seed'], '.1f')} | {_pm(r['ece_per_seed'], '.4f')} | {step} |")
    envs = summary.get("environments", [])
    if len(envs) > 1:
        lines.insert(1, f"\nWARNING: these results come from {len(envs)} environments "
                        f"({'; '.join(json.dumps(e) for e in envs)}): a paired difference across "
                        "them mixes in the environment's own effect.\n")
    for name, ref in summary["references"].items():
        lines.append(f"| {name} (reference, not trained) | - | - | {ref['kl']:.4f} | - | - | "
                     f"{ref['perplexity']:.1f} | {ref['ece']:.4f} | - |")
    return "\n".join(lines) + "\n"


FAMILIES = (("priority", "o"), ("allocated", "D"), ("topk", "s"), ("rskd", "^"))


def gaps_to_dense(summary: dict) -> dict[str, dict]:
    """Per cache row paired with dense KD: its bytes a position, its family (the row name's
    prefix), and KL(row, s) - KL(dense_kd, s) at each seed s both ran. Dense KD is the
    steadiest row over seeds (sd 0.006 nats in issue 25's grid, against up to 0.05 for a cache
    row), so its gap is the reference that adds the least noise of its own to a comparison."""
    rows = {r["row"]: r for r in summary["rows"]}
    if "dense_kd" not in rows:
        return {}
    dense = dict(zip(rows["dense_kd"]["seeds"], rows["dense_kd"]["kl_per_seed"]))
    out = {}
    for name, r in rows.items():
        family = next((f for f, _ in FAMILIES if name.startswith(f)), None)
        if family is None or not r["bytes_per_position"]:
            continue
        gaps = {s: kl - dense[s] for s, kl in zip(r["seeds"], r["kl_per_seed"]) if s in dense}
        if gaps:
            out[name] = {"label": r["label"], "family": family, "bytes": r["bytes_per_position"],
                         "gaps": gaps}
    return out


def _gap_plot(summary: dict, out: Path, plt) -> Path | None:
    """The paired gap to dense KD against bytes: each seed a dot, the median over seeds a
    marker (one diverged run moves a mean, not a median of three)."""
    points = gaps_to_dense(summary)
    if not points:
        return None
    for p in points.values():
        p["median"] = statistics.median(p["gaps"].values())
    medians = [p["median"] for p in points.values()]
    top = max(medians) + 0.5 * (max(medians) - min(0.0, min(medians))) + 1e-3  # a diverged seed stays off-scale
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (family, marker), color in zip(FAMILIES, ("tab:blue", "tab:red", "tab:orange", "tab:green")):
        pts = sorted((p["bytes"], p["median"], list(p["gaps"].values())) for p in points.values()
                     if p["family"] == family)
        if not pts:
            continue
        for b, _, g in pts:
            ax.plot([b] * len(g), [min(v, top) for v in g], ".", color=color, alpha=0.4)
            for v in (v for v in g if v > top):
                ax.annotate(f"{v:+.2f} (off scale)", (b, top), fontsize=7, ha="center", va="top", color=color)
        ax.plot([b for b, _, _ in pts], [m for _, m, _ in pts], marker=marker, color=color,
                ls="-" if len(pts) > 1 else "none", label=f"{family} cache: median over seeds (dots: seeds)")
    ax.axhline(0.0, color="k", lw=1, label="dense KD (online teacher), same seed")
    ax.set_xscale("log")
    ticks = sorted({round(p["bytes"]) for p in points.values()})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(min(0.0, min(medians)) - 0.02, top + 0.02)
    return _save(fig, ax, out / "gap_vs_bytes.png", plt, ylabel="KL(row) - KL(dense KD), same seed, nats/token",
                 title="paired gap to online dense KD against storage")


def _save(fig, ax, path: Path, plt, **labels) -> Path:
    """A storage plot's axis labels and legend, written to `path`."""
    ax.set(xlabel="bytes per position (log)", **labels)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(summary: dict, out: Path, vocab: int | None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = {r["row"]: r for r in summary["rows"]}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family, marker in FAMILIES:
        pts = sorted((r["bytes_per_position"], r["kl"]) for r in rows.values()
                     if r["bytes_per_position"] and r["row"].startswith(family))
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                        yerr=[0 if math.isnan(p[1][1]) else p[1][1] for p in pts],
                        marker=marker, capsize=3, label=f"{family} cache, KD at every position")
    for name, style in (("dense_kd", "-"), ("no_kd", ":")):
        if name in rows:
            m, sd = rows[name]["kl"]
            ax.axhline(m, color="k", ls=style, lw=1, label=rows[name]["label"])
            if not math.isnan(sd):
                ax.axhspan(m - sd, m + sd, color="k", alpha=0.08)
    if vocab and "dense_kd" in rows:
        ax.plot([2 * vocab], [rows["dense_kd"]["kl"][0]], "k*", ms=10,
                label=f"full bf16 logits ({2 * vocab:,} B/position)")
    ax.set_xscale("log")
    a = _save(fig, ax, out / "kl_vs_bytes.png", plt, ylabel="held-out KL(teacher || student), nats/token",
              title="distillation quality against storage")

    fig, axs = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.5))
    names = list(rows)
    for axx, key, title in ((axs[0], "kl", "held-out KL(teacher || student)"), (axs[1], "ece", "ECE, 15 bins")):
        vals = [rows[n][key][0] for n in names]
        errs = [0 if math.isnan(rows[n][key][1]) else rows[n][key][1] for n in names]
        axx.barh(range(len(names)), vals, xerr=errs, capsize=3, color="tab:blue")
        axx.set_yticks(range(len(names)), [rows[n]["label"] for n in names], fontsize=7)
        axx.invert_yaxis()
        axx.set_title(title)
    fig.tight_layout()
    b = out / "rows.png"
    fig.savefig(b, dpi=110)
    plt.close(fig)
    c = _gap_plot(summary, out, plt)
    return [a, b] + ([c] if c else [])
