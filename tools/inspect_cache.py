"""Storage statistics of a teacher cache, an optional integrity check, and a plot.

    python tools/inspect_cache.py CACHE_DIR                 # rich table
    python tools/inspect_cache.py CACHE_DIR --verify        # + sha256 and record checks
    python tools/inspect_cache.py CACHE_DIR --json          # one JSON object on stdout
    python tools/inspect_cache.py CACHE_DIR --plot out.png  # entropy histogram + one sample

The numbers and how each is computed: pipeline/cache_format/stats.py (DESIGN.md sections
2 and 9).

Chat caches (format version 3, `--data-format chat`): only positions whose next token
belongs to an assistant turn are trainable (each sample's `trainable.bits`). The report
shows the trainable fraction (manifest stats `trainable_positions / positions`, with the
conversations cached and those skipped for having no assistant turn), and the entropy and
distinct-class histograms are over trainable positions only (the stage counts only those);
`--verify` counts the trainable positions from the shards and compares. Text caches: every
position is trainable (fraction 1).

`--verify` first checks that every shard `file` is a plain shard name inside CACHE_DIR
(no `../`, no absolute path: such a shard is reported bad and never opened), then re-hashes
every shard against the manifest (size, sha256), reads every sample
(tar members, `tokens.u32` of 4T bytes, `kd.bin` of (3U+1)T bytes) and decodes its records
with pipeline.cache_format.checks (the reader's and the stage's checks): ids < V or the
sentinel, weight code 0 in sentinel slots, no repeated
id within a position, tokens < V, keys unique and of the shard's unit (version 2:
`u{unit:07d}-w{window:07d}` in `cache-u{unit:07d}-l{launch:06d}-{n:04d}.tar`, and the windows
its entry records) or rank (version 1: `{rank:04d}-{window:09d}`), sample/position counts as
recorded; version 3: a `trainable.bits` member of ceil(T/8) bytes with zero padding bits,
only sentinel records at masked positions and at least one class at trainable ones; when
every shard passes it also recomputes the entropy and distinct-class histograms (and the
trainable count) and compares them with the manifest's. Then (version 2 and 3) it checks
each unit's sources against each other, as a restart of the cache stage does
(docs/CACHE_FORMAT.md, "What a restart trusts"): its done record in ledger/ against its shard
entries, units.json, manifest.json and the shard files on disk, and its statistics against
the histograms of its shards; every problem names the unit and the files. A copy without
ledger/ is checked from the manifest alone.

`--verify --quarantine` repairs a version-2 cache, finished or not: it verifies every shard
of every cached unit (the ledger's done records; a unit the manifest lists without one: the
manifest's entries) and checks its sources as above, and for each unit with a bad or
missing shard or a disagreement moves all its shard files and its done record into
CACHE/quarantine/ (nothing is deleted) and moves manifest.json there too; the cache stage,
rerun with the same arguments and any number of ranks, then recomputes exactly those units
into new shards (new names: the launch number is part of them). It prints what it did
instead of the table. It refuses (exit 2, nothing moved) while the manifest is the only
record of a good unit: the cache stage, rerun first, restores that unit's done record.

Exit status: 0 fine (with --quarantine: every shard good, nothing moved); 1 `--verify`
found a bad shard or a unit whose sources disagree (each one is named; with --quarantine:
and moved it); 2 the directory is not a readable cache (no manifest.json: the cache stage
has not finished) or not a repairable one.

Where the code lives: the statistics in pipeline/cache_format/stats.py, the shard and
sample checks in pipeline/cache_format/checks.py and verify.py, the checks of each unit's
done record and the repair in pipeline/stage1_cache/audit.py; this file parses the flags
and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.cache_format.checks import TOKEN_BYTES
from pipeline.cache_format.manifest import MANIFEST, load_manifest
from pipeline.cache_format.stats import (TOP_K_BASELINE, TOP_K_BYTES_PER_CLASS, distinct_stats,
                                         entropy_stats, first_sample_entropy, settings,
                                         storage_stats, trainable_stats)
from pipeline.cache_format.verify import MAX_PROBLEMS
from pipeline.stage1_cache.audit import quarantine_damaged, verify_cache

SPARK = "▁▂▃▄▅▆▇█"

err = Console(stderr=True, highlight=False, soft_wrap=True)   # messages stay greppable


def sparkline(counts: np.ndarray) -> str:
    """One block character per bin, height proportional to count (empty bins: a dot)."""
    top = counts.max() if counts.size else 0
    if top <= 0:
        return "·" * len(counts)
    return "".join("·" if c == 0 else SPARK[min(len(SPARK) - 1, int(c / top * len(SPARK)))]
                   for c in counts)


def render_quarantine(res: dict, cache_dir: Path, console: Console) -> None:
    for q in res["quarantined"]:
        console.print(f"[red]BAD[/red] unit {q['unit']}: {'; '.join(q['problems'][:MAX_PROBLEMS])}",
                      soft_wrap=True)
        console.print(f"  quarantined: {', '.join(q['moved_to'])}", soft_wrap=True)
    if res["ok"]:
        console.print(f"all {res['shards_checked']} shard(s) of the cached units verified; "
                      "nothing to quarantine", soft_wrap=True)
        return
    if res["manifest_moved_to"]:
        console.print(f"moved {cache_dir / MANIFEST} to {res['manifest_moved_to']}: the cache "
                      "reads as unfinished until the cache stage completes it", soft_wrap=True)
    n = sum(q["samples"] for q in res["quarantined"])
    console.print(f"Now rerun the cache stage with the same arguments (any number of ranks), "
                  f"e.g. `python -m pipeline.cache ... --out {cache_dir}`: it recomputes the "
                  f"{len(res['quarantined'])} quarantined unit(s) ({n} window(s)) into new shards.",
                  soft_wrap=True)


def build_report(cache_dir: Path, verify: bool) -> tuple[dict, dict]:
    m = load_manifest(cache_dir)
    rep = storage_stats(cache_dir, m)
    rep |= {"entropy": entropy_stats(m), "distinct": distinct_stats(m), "settings": settings(m),
            "trainable": trainable_stats(m)}
    if verify:
        rep["verify"] = verify_cache(cache_dir, m)
    return rep, m


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


DROPPED_MASS_WARN = (1e-3, 1e-2)   # mean, max above which the dropped mass is not "about 0"


def _dropped_mass_row(s: dict) -> tuple[str, str, str]:
    """The table row of the teacher probability mass on logits >= V, dropped before sampling."""
    name, V, vt = "dropped mass (logits >= V)", s["vocab_size"], s.get("teacher_logits")
    mean, mx = s.get("dropped_mass_mean"), s.get("dropped_mass_max")
    cols = (f"{vt - V:,} of {vt:,} teacher logits beyond V" if isinstance(vt, int)
            else "teacher logits beyond V")
    if mean is None or mx is None:
        return name, "not recorded", "a cache written before this statistic"
    value = f"mean {mean:.3g} / max {mx:.3g}"
    if mean > DROPPED_MASS_WARN[0] or mx > DROPPED_MASS_WARN[1]:
        return f"[yellow]{name}", f"[yellow]{value}", f"[yellow]NOT about 0[/yellow]: {cols}"
    return name, value, f"{cols}; per position"


def render(rep: dict, cache_dir: Path, console: Console) -> None:
    s, e, d = rep["settings"], rep["entropy"], rep["distinct"]
    V, U = s["vocab_size"], s["num_classes"]
    t = Table(title=f"teacher cache {cache_dir}", show_lines=False)
    t.add_column("quantity")
    t.add_column("value", justify="right", no_wrap=True)   # sparklines must stay whole
    t.add_column("note", style="dim")
    rows = [
        ("samples (windows)", f"{rep['samples']:,}", f"T={s['seq_len']}"),
        ("positions", f"{rep['positions']:,}", "samples x T" if rep["positions"] ==
         rep["positions_expected"] else f"[red]!= samples x T = {rep['positions_expected']:,}"),
        ("shards", f"{rep['shards']}", f"{len(rep['missing_shards'])} missing"
         if rep["missing_shards"] else f"{s['shard_samples']} samples/shard max"),
        ("bytes on disk", _fmt_bytes(rep["bytes_on_disk"]), f"{rep['bytes_on_disk']:,} B of shards; "
         f"manifest.json {_fmt_bytes(rep['manifest_bytes'])}"),
        ("B/position, records", f"{rep['record_bytes_per_position']:.2f}",
         f"2 + 3 x {s['window_records'] / s['seq_len']:.2f} records a position on average "
         f"(count and entropy bytes; --class-budget {s['class_budget']})" if d["allocated"]
         else f"3U+1, U={U}"),
        ("B/position, on disk", f"{rep['bytes_per_position']:.2f}",
         f"+{TOKEN_BYTES} B tokens, tar overhead {100 * rep['tar_overhead_fraction']:.2f}%"),
    ]
    for name, key, base in (("bf16", "bf16", f"2V = {2 * V:,} B"), ("fp32", "fp32", f"4V = {4 * V:,} B"),
                            ("top-128 fp16+int32", "top128", f"{TOP_K_BASELINE * TOP_K_BYTES_PER_CLASS} B")):
        rows.append((f"reduction vs {name}", f"{rep['reduction_vs_' + key]:,.1f}x",
                     f"{base}/position; records only {rep['record_reduction_vs_' + key]:,.1f}x"))
    for r in rows:
        t.add_row(*r)
    t.add_section()
    tr = rep["trainable"]
    over = " (trainable)" if tr["masked"] else ""   # histograms: trainable positions only
    if tr["masked"]:      # positions whose next token is in an assistant turn
        t.add_row("trainable positions", f"{100 * tr['fraction']:.2f}%",
                  f"{tr['trainable_positions']:,} of {tr['positions']:,} positions")
        counted = rep.get("verify", {}).get("trainable_positions")
        if counted is not None:
            t.add_row("trainable, counted in shards", f"{counted:,}", "--verify")
        t.add_row("conversations", f"{tr['conversations'] or 0:,}",
                  f"{tr['skipped_no_assistant'] or 0:,} skipped (no assistant turn)")
    else:
        t.add_row("trainable positions", "100.00%", "text cache: every position")
    if "mean" in e:
        q = e["quantiles"]
        t.add_row("entropy mean" + over, f"{e['mean']:.3f} nats", f"quantization error <= "
                  f"{e['max_quantization_error'] or float('nan'):.4f}")
        t.add_row("entropy p5/p25/p50/p75/p95", " / ".join(f"{v:.2f}" for v in q.values()), "nats")
        t.add_row("entropy histogram" + over, sparkline(np.asarray(e["hist_counts"])),
                  f"0 .. ln V = {e['max_nats']:.2f} nats, {len(e['hist_counts'])} bins")
    if "mean" in d and d["allocated"]:      # format 4: U_t, the records each position got
        t.add_row("records per position U_t", f"{d['mean']:.3f}",
                  f"min {d['min']}, max {d['max']}, ceiling {U}; allocated from the teacher's p")
        t.add_row("U_t p5/p25/p50/p75/p95", " / ".join(str(v) for v in d["quantiles"].values()),
                  "records")
        t.add_row("U_t histogram", sparkline(np.asarray(d["hist"])), f"0 .. {U}")
    elif "mean" in d:
        t.add_row("distinct classes mean", f"{d['mean']:.3f}", f"min {d['min']}, max {d['max']}, U={U}")
        t.add_row("positions with < U classes", f"{100 * d['fraction_padded']:.2f}%", "sentinel-padded")
        t.add_row("distinct histogram", sparkline(np.asarray(d["hist"])), f"0 .. {U}")
    t.add_section()
    t.add_row("teacher", str(s["teacher"]), f"{s['teacher_parameters'] or 0:,} parameters")
    t.add_row("sampler", f"{s['sampler']} {json.dumps(s['sampler_args'])}",
              f"teacher temperature {s['teacher_temperature']}, seed {s['seed']}")
    t.add_row("V / U / id bits / w bits", f"{V:,} / {U} / {s['id_bits']} / {s['w_bits']}",
              f"sentinel {s['sentinel']}")
    t.add_row("rskd truncated positions", f"{100 * s['rskd_truncated_fraction']:.3f}%",
              f"{s['rskd_truncated_positions']:,} positions")
    t.add_row(*_dropped_mass_row(s))
    if s["wall_time_s"]:
        t.add_row("cache stage", f"{s['world_size']} rank(s)", f"wall {s['wall_time_s']:.1f} s")
    if rep["stray_files"]:
        t.add_row("[yellow]files not in manifest", str(len(rep["stray_files"])),
                  ", ".join(rep["stray_files"][:4]))
    if "verify" in rep:
        v = rep["verify"]
        t.add_section()
        found = ", ".join(x for x in (
            f"{len(v['bad_shards'])} bad shard(s)" if v["bad_shards"] else "",
            f"unit(s) {', '.join(map(str, v['damaged_units']))} inconsistent"
            if v.get("damaged_units") else "", "other problems" if not v["bad_shards"]
            and not v.get("damaged_units") else "") if x)
        t.add_row("verify", "[green]ok" if v["ok"] else f"[red]{found}",
                  f"{len(v['shards'])} shards re-hashed and decoded")
    console.print(t)
    if "verify" in rep:
        for r in rep["verify"]["shards"]:
            for p in r["problems"]:            # each names its shard (checks.shard_label)
                console.print(f"[red]BAD[/red] {p}", soft_wrap=True)
        for p in rep["verify"]["cache_problems"]:
            console.print(f"[red]BAD[/red] {cache_dir}: {p}", soft_wrap=True)


def plot(rep: dict, m: dict, cache_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = rep["entropy"]
    key, h, nd = first_sample_entropy(cache_dir, m)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), constrained_layout=True)
    edges = np.asarray(e["hist_edges_nats"])
    a1.bar(edges[:-1], e["hist_counts"], width=np.diff(edges), align="edge", color="tab:blue")
    a1.set(xlabel="teacher entropy (nats)", ylabel="positions",
           title=f"entropy histogram, {e['positions']:,} "
                 f"{'trainable ' if rep['trainable']['masked'] else ''}positions "
                 f"(mean {e.get('mean', float('nan')):.2f} nats, ln V = {e['max_nats']:.2f})")
    a2.plot(np.arange(len(h)), h, lw=0.8, color="tab:blue")
    a2.set(xlabel="position", ylabel="entropy (nats)", title=f"sample {key}: per-position entropy")
    if (nd < m["num_classes"]).any():
        ax = a2.twinx()
        ax.plot(np.arange(len(nd)), nd, lw=0.6, color="tab:orange")
        ax.set_ylabel("distinct classes", color="tab:orange")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache_dir", type=Path, help="cache directory (holds manifest.json)")
    ap.add_argument("--verify", action="store_true", help="re-hash and decode every shard")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--plot", type=Path, metavar="OUT.png", help="write entropy plots (matplotlib)")
    ap.add_argument("--quarantine", action="store_true",
                    help="with --verify: move the shards and done records of units with a bad "
                         "shard into CACHE/quarantine/, so a rerun of the cache stage recomputes them")
    args = ap.parse_args(argv)
    if args.quarantine and not args.verify:
        ap.error("--quarantine acts on what --verify finds: use --verify --quarantine")
    if not args.cache_dir.is_dir():
        err.print(f"[red]error:[/red] {args.cache_dir} is not a directory")
        return 2
    if args.quarantine:
        try:
            res = quarantine_damaged(args.cache_dir)
        except (FileNotFoundError, ValueError, KeyError) as e:
            what = f"a done record or header lacks the field {e}" if isinstance(e, KeyError) else str(e)
            err.print(f"[red]error:[/red] {args.cache_dir} is not a repairable cache: {what}")
            return 2
        if args.json:
            sys.stdout.write(json.dumps(res) + "\n")
        else:
            render_quarantine(res, args.cache_dir, Console(highlight=False, soft_wrap=True))
        return 0 if res["ok"] else 1
    try:
        rep, m = build_report(args.cache_dir, args.verify)
    except (FileNotFoundError, ValueError, KeyError) as e:
        what = f"manifest.json lacks the field {e}" if isinstance(e, KeyError) else str(e)
        err.print(f"[red]error:[/red] {args.cache_dir} is not a readable cache: {what}")
        return 2
    if args.plot:
        plot(rep, m, args.cache_dir, args.plot)
    if args.json:
        sys.stdout.write(json.dumps(rep) + "\n")
    else:
        out = Console(highlight=False)
        if not out.is_terminal:      # a pipe or a log file: rich would assume 80 columns
            out = Console(highlight=False, width=120)
        render(rep, args.cache_dir, out)
        if args.plot:
            err.print(f"plot written to {args.plot}")
    if "verify" in rep and not rep["verify"]["ok"]:
        for f in rep["verify"]["bad_shards"]:
            err.print(f"[red]bad shard:[/red] {args.cache_dir / f}")
        for p in rep["verify"]["cache_problems"]:
            err.print(f"[red]cache problem:[/red] {p}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
