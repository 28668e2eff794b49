"""The student's parameter gradient on a real batch under each cache format, against full KD's.

    python tools/batch_gradient.py [--students init trained=RUN/export] [--draws 8] [--json OUT]

The companion of tools/fidelity_frontier.py (which measures the error of the target at each
position, no model): here the error that reaches the weights, as the RS-KD paper measures it
(Anshumann et al., ACL 2025: angle and norm ratio between the sparse and the full-KD gradient
of the student's parameters; 4 degrees / 1.0 for their 12 sampled entries, 58 / 2.4 for
top-12, 8B -> 3B). Batch: 2 windows x 256 tokens of the demo's held-out Wikipedia text; teacher
SmolLM2-135M (V = 49,152) gives p_t at every position; students: the demo's 6-layer cut at init
and, with `trained=DIR`, a trained export. Full KD: L = mean_t -sum_i p_ti log s_ti. A format's
draw: its classes and weights w at every position, and one of two losses with the same
expectation as full KD's gradient w.r.t. the logits:
    log-form  L = mean_t -sum_i w_i log s_i          grad s * sum(w) - w   (the pipeline's)
    z-form    L = mean_t logsumexp(z) - sum_i w_i z_i grad s - w
Formats: priority U (4, 12, 24, 32), top-k 12 (renormalised), allocated U at 37 B (B = 35/3
records a position on average and a count byte; pipeline.stage1_cache.class_budget), all with fp32 weights
(the codebook's quantization is the frontier's subject). Per format and student, over --draws
draws: the mean angle (degrees) and norm ratio ||g_hat|| / ||g||, and the angle of the mean
gradient (what remains when draws average out: bias). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.stage1_cache import class_budget as cb  # noqa: E402
from pipeline.stage1_cache.class_sampler import sample_classes  # noqa: E402

FORMATS = ("priority:4", "priority:12", "priority:24", "priority:32", "topk:12", "allocated:37")


def _batch(assets: Path, tok, windows: int, T: int) -> torch.Tensor:
    from pipeline.common.text import DataSpec, load_documents, token_stream, windows as cut

    docs = load_documents(DataSpec(path=str(assets / "corpus" / "heldout.jsonl"), text_field="text"))
    return torch.tensor([w.astype("int64").tolist() for _, w in zip(range(windows),
                                                                    cut(token_stream(docs, tok), T))])


def draw(p: torch.Tensor, fmt: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, K] (-1 unused), weights [N, K] for every position of p [N, V]."""
    family, param = fmt.split(":")
    V = p.shape[1]
    if family == "allocated":
        B = (int(param) - 2) / 3
        top = torch.topk(p, 4 * 12 + 1, dim=1).values
        sizes = cb.allocate(cb.variance_curves(top, (p.double() ** 2).sum(1), 48),
                            cb.budget_records(B, p.shape[0]), 1, 48)
        ids, w = cb.priority_sample_sizes(p, sizes, gen, sentinel=-1)
        return ids, w
    logits = torch.log(p.clamp_min(1e-30))
    ids, w, _ = sample_classes(logits, int(param), family, gen, sentinel=-1)
    return ids, w


def logit_grad(s: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, form: str) -> torch.Tensor:
    """d L / d z of one format's loss at every position (module docstring), [N, V]."""
    W = torch.zeros_like(s).scatter_add_(1, ids.clamp_min(0), torch.where(ids >= 0, w, 0.0))
    return (s * W.sum(1, keepdim=True) - W) if form == "log" else (s - W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get("SAMPLEDKD_ASSETS", REPO / "assets_cache")))
    ap.add_argument("--students", nargs="+", default=["init"],
                    help="init (the demo's student cut) and/or NAME=EXPORT_DIR")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.assets / "teacher")
    x = _batch(args.assets, tok, args.windows, args.seq_len)
    teacher = AutoModelForCausalLM.from_pretrained(args.assets / "teacher", dtype=torch.float32).eval()
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=x).logits[:, :-1].float(), -1).reshape(-1, teacher.config.vocab_size)
    del teacher
    N = p.shape[0]
    rows = []
    for spec in args.students:
        name, path = ("init", args.assets / "student-L0-1-2-27-28-29") if spec == "init" else spec.split("=", 1)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        z = model(input_ids=x).logits[:, :-1].float().reshape(N, -1)
        s = torch.softmax(z.detach(), -1)

        def param_grad(gz: torch.Tensor) -> torch.Tensor:
            # float64 for the dot products: at ~50M parameters float32 cannot resolve angles
            # below ~0.05 degrees (cos rounds to 1)
            grads = torch.autograd.grad(z, params, grad_outputs=gz / N, retain_graph=True)
            return torch.cat([g.reshape(-1).double() for g in grads])

        full = param_grad(s - p)
        nf = float(full.norm())
        for fmt in args.formats:
            for form in ("log", "z"):
                gen = torch.Generator().manual_seed(zlib_seed(fmt))
                angles, ratios, acc = [], [], torch.zeros_like(full)
                for _ in range(args.draws):
                    ids, w = draw(p, fmt, gen)
                    g = param_grad(logit_grad(s, ids, w.float(), form))
                    acc += g
                    cos = float(torch.dot(g, full) / (g.norm() * nf))
                    angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
                    ratios.append(float(g.norm()) / nf)
                mean = acc / args.draws
                mcos = float(torch.dot(mean, full) / (mean.norm() * nf))
                row = {"student": name, "format": fmt, "form": form, "angle_deg": sum(angles) / len(angles),
                       "angle_sd": _sd(angles), "norm_ratio": sum(ratios) / len(ratios), "norm_sd": _sd(ratios),
                       "mean_grad_angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, mcos)))),
                       "draws": args.draws}
                rows.append(row)
                print(f"{name:8s} {fmt:13s} {form}-form  angle {row['angle_deg']:6.2f} ± {row['angle_sd']:.2f} deg  "
                      f"norm ratio {row['norm_ratio']:.3f} ± {row['norm_sd']:.3f}  mean-gradient angle "
                      f"{row['mean_grad_angle_deg']:6.2f} deg", flush=True)
        del model, z
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((v - m) ** 2 for v in xs) / max(len(xs) - 1, 1))


def zlib_seed(s: str) -> int:
    import zlib

    return zlib.crc32(s.encode())


if __name__ == "__main__":
    main()
