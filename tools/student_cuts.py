"""Held-out perplexity of students cut from the teacher's layers: which cut to start from.

    python tools/student_cuts.py [--assets assets_cache] [--windows 12] [--seq-len 256] \
        [--cuts 4 6 0,1,28,29 0,1,2,27,28,29 0,6,12,18,24,29 0,1,2,3,26,27,28,29]

Each cut is made by `pipeline.demo.assets.cut_student` (the demo's own builder) into a
temporary folder and scored by `pipeline.common.heldout.heldout_metrics` on the first
--windows held-out windows (the demo's text and window cutting), next to the teacher.
A count k keeps layers 0..k-1; a list keeps those layers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CUTS = ["4", "6", "8", "0,1,28,29", "0,1,2,27,28,29", "0,1,2,3,28,29", "0,6,12,18,24,29",
                "0,1,2,3,26,27,28,29"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get("SAMPLEDKD_ASSETS", "assets_cache")))
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--cuts", nargs="+", default=DEFAULT_CUTS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rich.console import Console
    from rich.table import Table

    from pipeline.demo.assets import cut_student, prepare_assets, student_layer_list
    from pipeline.common.heldout import heldout_metrics

    paths = prepare_assets(args.assets)
    teacher, heldout = paths["teacher"], paths["heldout"]
    rows = []
    t0 = time.perf_counter()
    ref = heldout_metrics(teacher, heldout, args.seq_len, max_windows=args.windows)
    rows.append(("teacher (30 layers)", ref["perplexity"], None, time.perf_counter() - t0))
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.cuts:
            keep = student_layer_list(spec, 30)
            out = cut_student(teacher, Path(tmp) / spec.replace(",", "-"), keep)
            t0 = time.perf_counter()
            m = heldout_metrics(out, heldout, args.seq_len, teacher_dir=teacher,
                                max_windows=args.windows)
            rows.append((f"{len(keep)} layers: {','.join(map(str, keep))}", m["perplexity"],
                         m["kl_to_teacher"], time.perf_counter() - t0))
    table = Table(title=f"held-out perplexity at init, {args.windows} windows x {args.seq_len} tokens")
    for col in ("model", "perplexity", "KL(teacher || cut) nats/token", "eval s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, ppl, kl, dt in rows:
        table.add_row(name, f"{ppl:.4g}", "-" if kl is None else f"{kl:.2f}", f"{dt:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
