"""Per-step cost of each position-selection score and rule, next to a step without selection.

    python tools/bench_selection.py                      # V=151,936, tiny Qwen2 body, B=2, T=512
    python tools/bench_selection.py --body none --repeats 7

The "step" is a student training step on cached sparse targets: (optionally) a 2-layer
Qwen2 body forward (hidden 256) -> select -> lm_head on the selected rows only -> sparse KD
`-sum_i p_hat_i log s(i)` -> backward. The baseline picks the same number of rows
(ceil(frac*T) per sequence) at random without any selection machinery. Every configuration
runs once per repeat, interleaved, and the table gives medians: the step's wall time, the
time spent inside `Selector.select` (+ `observe`), and the ratio to the baseline step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from pipeline.stage2_distill.selection import SelectionConfig, SelectionInputs, Selector, next_token_labels, topk_rule

CONFIGS: list[tuple[str, dict]] = [
    ("baseline (no selection)", {}),
    ("topk / teacher_entropy", dict(select="topk", select_score="teacher_entropy")),
    ("topk / random", dict(select="topk", select_score="random")),
    ("topk / student_entropy", dict(select="topk", select_score="student_entropy")),
    ("topk / student_ce", dict(select="topk", select_score="student_ce")),
    ("topk / kl", dict(select="topk", select_score="kl")),
    ("topk / combined", dict(select="topk", select_score="combined")),
    ("percentile_band 75-100 / teacher_entropy", dict(select="percentile_band", band_lo=75.0, band_hi=100.0)),
    ("gls / teacher_entropy", dict(select="gls", gls_queue=30_000, gls_warmup=0)),
    ("positional / teacher_entropy", dict(select="positional", select_score="teacher_entropy")),
    ("learned linucb", dict(select="learned", learned_kind="linucb")),
    ("learned mlp", dict(select="learned", learned_kind="mlp")),
    ("all (every position)", dict(select="all")),
]


def build(args):
    g = torch.Generator().manual_seed(0)
    B, T, H, V, U = args.batch, args.seq, args.hidden, args.vocab, 12
    if args.body == "qwen2":
        from transformers import AutoModelForCausalLM

        from pipeline.demo.tiny import tiny_config
        model = AutoModelForCausalLM.from_config(tiny_config("qwen2", V, hidden=H, layers=2, heads=4))
        body, head = model.model, model.lm_head
    else:
        body, head = None, torch.nn.Linear(H, V, bias=False)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    p = torch.rand(B, T, U, generator=g)
    batch = dict(input_ids=input_ids, valid=torch.ones(B, T, dtype=torch.bool),
                 labels=next_token_labels(input_ids), ids=torch.randint(0, V, (B, T, U), generator=g),
                 weights=p / p.sum(-1, keepdim=True), entropy=torch.rand(B, T, generator=g) * 5,
                 h0=torch.randn(B, T, H, generator=g))
    params = list(head.parameters()) + (list(body.parameters()) if body is not None else [])
    return body, head, batch, params


def step(body, head, batch, params, selector: Selector | None, frac: float, gen: torch.Generator):
    """One training step; returns (step seconds, seconds inside select + observe)."""
    t0 = time.perf_counter()
    if body is not None:
        h = body(input_ids=batch["input_ids"]).last_hidden_state
    else:
        h = batch["h0"].requires_grad_(True)
    t_sel = time.perf_counter()
    if selector is None:
        mask = topk_rule(torch.rand(batch["valid"].shape, generator=gen), batch["valid"], frac).mask
        weights, sel = mask.float(), None
    else:
        inp = SelectionInputs(batch["valid"], hidden=h, labels=batch["labels"],
                              teacher_entropy=batch["entropy"], ids=batch["ids"], weights=batch["weights"])
        sel = selector.select(inp, head, step=0)
        mask, weights = sel.mask, sel.weights
    sel_s = time.perf_counter() - t_sel
    logp = torch.log_softmax(head(h[mask]).float(), dim=-1)             # [n, V], selected rows only
    per_pos = -(batch["weights"][mask] * logp.gather(1, batch["ids"][mask])).sum(-1)
    loss = (per_pos * weights[mask]).sum() / mask.sum().clamp_min(1)
    loss.backward()
    for p in params:
        p.grad = None
    if sel is not None:
        t_obs = time.perf_counter()
        selector.observe(sel, per_pos.detach())
        sel_s += time.perf_counter() - t_obs
    return time.perf_counter() - t0, sel_s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frac", type=float, default=0.25)
    ap.add_argument("--chunk", type=int, default=512, help="--select-chunk rows per lm_head chunk")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--body", choices=("qwen2", "none"), default="qwen2",
                    help="qwen2: 2-layer tiny Qwen2 body before lm_head; none: random hidden states")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        raise SystemExit(f"--repeats {args.repeats}: use >= 5 (medians)")
    torch.manual_seed(0)
    body, head, batch, params = build(args)
    selectors = {name: Selector(SelectionConfig(select_frac=args.frac, select_chunk=args.chunk, **kw)) if kw else None
                 for name, kw in CONFIGS}
    gen = torch.Generator().manual_seed(1)
    for name, sel in selectors.items():                                # warm-up, untimed
        step(body, head, batch, params, sel, args.frac, gen)
    times = {name: ([], []) for name in selectors}
    for _ in range(args.repeats):
        for name, sel in selectors.items():
            s, ss = step(body, head, batch, params, sel, args.frac, gen)
            times[name][0].append(s)
            times[name][1].append(ss)
    base = statistics.median(times[CONFIGS[0][0]][0])
    table = Table(title=(f"selection overhead: V={args.vocab:,} H={args.hidden} B={args.batch} T={args.seq} "
                         f"select_frac={args.frac} chunk={args.chunk} body={args.body}, "
                         f"{torch.get_num_threads()} threads, median of {args.repeats}"))
    for col in ("configuration", "step ms", "select ms", "step / baseline"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for name in selectors:
        st, ss = statistics.median(times[name][0]), statistics.median(times[name][1])
        table.add_row(name, f"{st * 1e3:.0f}", f"{ss * 1e3:.1f}", f"{st / base:.2f}x")
    Console().print(table)
    Console().print(f"load average during the run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
