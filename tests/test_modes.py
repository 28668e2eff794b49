"""pipeline.stage2_distill.modes, the table of training modes, against what the modes are
documented to do (pipeline/stage2_distill/trainer.py's docstring, `--help`):

- the table has a row for every `--mode` choice, and `DistillConfig` takes each mode's loss
  weights and forced selection from it;
- each mode's objective returns the final loss on a fixed tiny batch of two ranks (threads,
  tests/thread_ranks.py): the ranks' losses add up to the loss of a dense reference written
  here (log_softmax over the full logits, float64, on both ranks' rows at once), and so do
  their gradients, sums, counts and KL estimates;
- a selection that weights positions hands the loss its weights and denominator, one that
  does not hands neither;
- the trainer names no mode and no selection rule (an `ast` check of trainer.py).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.common import config as C
from pipeline.stage2_distill.distill_config import DistillConfig
from pipeline.stage2_distill.modes import MODES
from pipeline.stage2_distill.objectives import LossSettings, StepInputs
from pipeline.stage2_distill.selection import Selector, SelectionInputs
from pipeline.stage2_distill.selection.config import RULE_NAMES, SelectionConfig
from thread_ranks import run_ranks

TRAINER = Path(__file__).resolve().parents[1] / "pipeline" / "stage2_distill" / "trainer.py"
REQUIRED = ["--student", "s", "--cache", "c", "--out", "o"]
WORLD, B, T, H, V, U = 2, 2, 7, 8, 29, 4

# As documented (trainer.py's docstring): the loss weights each mode brings, the selection it
# runs (None: --select's), whether it reads the cache's classes, whether it runs a teacher.
DOCUMENTED = {"sampledkd": ((1.0, 0.0), None, True, False),
              "rskd_all": ((1.0, 0.0), "all", True, False),
              "no_kd": ((0.0, 1.0), "all", False, False),
              "dense_kd": ((1.0, 0.0), "all", False, True)}


# ------------------------------------------------------------------------------- the table
def test_the_table_has_a_row_for_every_mode_choice():
    field = next(f for f in dataclasses.fields(DistillConfig) if f.name == "mode")
    assert list(MODES) == list(field.metadata["choices"])          # --help lists them in order
    assert set(MODES) == set(DOCUMENTED)
    for name, ((kd, ce), select, reads_cache, online) in DOCUMENTED.items():
        m = MODES[name]
        assert (m.kd_weight, m.ce_weight, m.select, m.reads_cache, m.online_teacher) == \
            (kd, ce, select, reads_cache, online), name
        assert m.select is None or m.select in RULE_NAMES, name


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_the_config_takes_weights_and_selection_from_the_table(name):
    (kd, ce), select, _, online = DOCUMENTED[name]
    extra = ["--teacher", "t"] if online else []
    cfg = C.parse(DistillConfig, [*REQUIRED, "--mode", name, "--select", "gls", *extra])
    assert (cfg.kd_weight, cfg.ce_weight) == (kd, ce)
    assert cfg.selection.select == "gls" and cfg.active_selection.select == (select or "gls")


def test_the_config_checks_follow_the_table():
    def problems(*argv) -> str:
        with pytest.raises(ValueError) as e:
            C.parse(DistillConfig, [*REQUIRED, *argv])
        return str(e.value)

    assert "--mode dense_kd needs --teacher" in problems("--mode", "dense_kd")
    assert "--mode no_kd trains on CE only" in problems("--mode", "no_kd", "--ce-weight", "0",
                                                        "--kd-weight", "1")
    for name in ("no_kd", "dense_kd"):
        assert ("--kd-loss sampled_softmax reads the cache: use it with --mode sampledkd or "
                f"rskd_all, not {name}") in problems("--mode", name, "--teacher", "t",
                                                     "--kd-loss", "sampled_softmax")
    for name in ("sampledkd", "rskd_all"):
        C.parse(DistillConfig, [*REQUIRED, "--mode", name, "--kd-loss", "sampled_softmax"])


# ------------------------------------------------------- each mode's loss, two ranks, dense ref
def _rank_batch(rank: int, all_rows: bool, positional: bool) -> dict:
    """One rank's micro-batch: a masked (chat) position, sentinel slots, a row without a cached
    class, the last position without a label; the selection every row or about half."""
    g = torch.Generator().manual_seed(10 + rank)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :2] = False
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, -1] = -100
    labels[~valid] = -100
    ids = torch.stack([torch.randperm(V, generator=g)[:U] for _ in range(B * T)]).view(B, T, U)
    ids[0, 1, 2:] = V                                        # unused slots (the sentinel)
    ids[1, 3, :] = V                                         # no cached class at all
    mask = valid.clone() if all_rows else valid & (torch.rand(B, T, generator=g) < 0.5)
    if not all_rows:
        mask[1, 3], mask[0, 0], mask[0, 2] = True, True, False
    pw = torch.where(mask, 1 + 3 * torch.rand(B, T, generator=g), 0.0) if positional else None
    return {"h": torch.randn(B, T, H, generator=g), "labels": labels, "valid": valid, "mask": mask,
            "ids": ids, "weights": torch.rand(B, T, U, generator=g) / U,
            "entropy": 3 * torch.rand(B, T, generator=g),
            "teacher_logits": 2 * torch.randn(B * T, V, generator=g), "pw": pw,
            "den": valid.sum().float() if positional else None}


def _reference(head: torch.nn.Module, batches: list[dict], name: str, s: LossSettings) -> dict:
    """The loss of both ranks' rows at once, float64, from log_softmax over the full logits."""
    cat = {k: torch.cat([b[k] for b in batches]) for k in ("labels", "mask", "ids", "weights",
                                                             "entropy", "teacher_logits")}
    h = torch.cat([b["h"] for b in batches]).double().requires_grad_()
    z = F.linear(h, head.weight.double(), head.bias.double())            # [R*B, T, V]
    mask, labels, tk = cat["mask"], cat["labels"], s.kd_temperature
    out = {"h": h, "kl": torch.zeros((), dtype=torch.float64)}
    if MODES[name].reads_cache:
        ids, w = cat["ids"][mask], cat["weights"][mask].double()
        ok = ids < V
        w = torch.where(ok, w, 0.0)
        if s.self_normalize:                                            # a row without classes: 0
            w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
        logp = torch.log_softmax(z[mask] / tk, -1).gather(1, torch.where(ok, ids, 0))
        per_row = -tk**2 * (w * logp).sum(1)                             # [n]
        r = ok.any(1).double()
        if batches[0]["pw"] is not None:
            r = r * torch.cat([b["pw"] for b in batches])[cat["mask"]].double()
        out["kd_sum"] = (per_row * r).sum()
        out["kd_cnt"] = (sum(b["den"] for b in batches) if batches[0]["den"] is not None
                         else r.sum())
        out["kl"] = ((per_row - tk**2 * cat["entropy"][mask].double()) * r).sum()
        ce_rows = {"selected": mask, "all": torch.ones_like(mask), "unselected": ~mask}[s.ce_positions]
    elif MODES[name].online_teacher:
        p = torch.softmax(cat["teacher_logits"].double().view(z.shape)[mask] / s.teacher_temperature, -1)
        kl_rows = (p * (p.log() - torch.log_softmax(z[mask] / tk, -1))).sum(1) * tk**2
        out["kd_sum"], out["kd_cnt"] = kl_rows.sum(), torch.tensor(float(mask.sum()))
        ce_rows = mask
    else:
        out["kd_sum"], out["kd_cnt"] = torch.zeros((), dtype=torch.float64), torch.tensor(0.0)
        ce_rows = torch.ones_like(mask)
    ce_rows = ce_rows & (labels >= 0)
    ce = -torch.log_softmax(z[ce_rows], -1).gather(1, labels[ce_rows][:, None]).sum()
    out["ce_sum"], out["ce_cnt"] = ce, torch.tensor(float(ce_rows.sum()))
    if not s.ce_weight and MODES[name].distils:
        out["ce_sum"], out["ce_cnt"] = torch.zeros((), dtype=torch.float64), torch.tensor(0.0)
    out["loss"] = (s.kd_weight * out["kd_sum"] / max(float(out["kd_cnt"]), 1.0)
                   + s.ce_weight * out["ce_sum"] / max(float(out["ce_cnt"]), 1.0))
    return out


# (mode, LossSettings overrides, the selection: "all" rows, "some", or "positional")
CASES = [
    ("sampledkd", {}, "some"),                                             # the fused KD head
    ("sampledkd", {}, "positional"),
    ("sampledkd", {"kd_head": "logits", "kd_temperature": 2.0}, "some"),
    ("sampledkd", {"self_normalize": True}, "some"),
    ("sampledkd", {"ce_weight": 0.5, "ce_positions": "selected"}, "some"),
    ("sampledkd", {"ce_weight": 0.5, "ce_positions": "all"}, "positional"),
    ("sampledkd", {"kd_weight": 0.75, "ce_weight": 0.5, "ce_positions": "unselected"}, "some"),
    ("sampledkd", {"kd_weight": 0.75, "ce_weight": 0.5, "ce_positions": "unselected"}, "positional"),
    ("sampledkd", {"ce_weight": 0.5, "ce_positions": "unselected", "kd_head": "logits"}, "some"),
    # more negatives than classes: every logit exact, the dense loss
    ("sampledkd", {"kd_loss": "sampled_softmax", "num_negatives": 10**6}, "some"),
    ("sampledkd", {"kd_loss": "sampled_softmax", "num_negatives": 10**6, "ce_weight": 0.5,
                   "ce_positions": "unselected"}, "positional"),
    ("rskd_all", {}, "all"),
    ("rskd_all", {"ce_weight": 1.0, "ce_positions": "all"}, "all"),
    ("no_kd", {}, "all"),
    ("dense_kd", {}, "all"),
    ("dense_kd", {"ce_weight": 0.5, "teacher_temperature": 2.0, "kd_temperature": 1.5}, "all"),
]


@pytest.mark.parametrize("name,over,rows", CASES,
                         ids=["-".join([n, r, *(f"{k}={v}" for k, v in o.items())]) for n, o, r in CASES])
def test_each_mode_returns_the_global_loss_of_the_dense_reference(name, over, rows):
    (kd_w, ce_w), *_ = DOCUMENTED[name]
    s = LossSettings(vocab=V, cache_vocab=V, **{"kd_weight": kd_w, "ce_weight": ce_w, **over})
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V)
    batches = [_rank_batch(r, rows == "all", rows == "positional") for r in range(WORLD)]
    heads = [copy.deepcopy(head) for _ in range(WORLD)]

    def rank(r, comm):
        b = batches[r]
        h = b["h"].clone().requires_grad_()
        x = StepInputs(h, b["labels"], b["mask"], ids=b["ids"], weights=b["weights"],
                       position_weights=b["pw"], kd_denominator=b["den"], entropy=b["entropy"],
                       teacher_logits=b["teacher_logits"],
                       generator=torch.Generator().manual_seed(r),
                       sum_over_ranks=lambda t: sum(comm.all_gather(t)))
        return h, MODES[name].objective(heads[r], x, s)

    got = run_ranks(WORLD, rank)
    ref_head = copy.deepcopy(head).double()
    want = _reference(ref_head, batches, name, s)
    # DeepSpeed averages the ranks' gradients and the trainer scales by the world size: the
    # step's loss is the sum of the ranks' losses.
    loss = sum(t.loss for _, t in got)
    assert abs(loss.item() - want["loss"].item()) <= 1e-5 * max(1.0, abs(want["loss"].item()))
    for k in ("kd_sum", "kd_cnt", "ce_sum", "ce_cnt", "kl"):
        total, ref = sum(float(getattr(t, k).detach()) for _, t in got), float(want[k].detach())
        assert abs(total - ref) <= 1e-5 * max(1.0, abs(ref)), (k, total, ref)
    for _, t in got:
        t.loss.backward()
    want["loss"].backward()
    assert torch.allclose(torch.cat([h.grad for h, _ in got]).double(), want["h"].grad, atol=1e-5)
    assert torch.allclose(sum(hd.weight.grad for hd in heads).double(), ref_head.weight.grad, atol=1e-5)
    assert torch.allclose(sum(hd.bias.grad for hd in heads).double(), ref_head.bias.grad, atol=1e-5)


# ----------------------------------------------------------------- selection -> the loss
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_only_a_weighting_rule_hands_the_loss_weights_and_a_denominator(rule):
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[2, 10:] = False
    ent = torch.rand(3, 16, generator=g)
    inp = SelectionInputs(valid, hidden=torch.randn(3, 16, 8, generator=g),
                          labels=torch.randint(0, V, (3, 16), generator=g), teacher_entropy=ent)
    head = torch.nn.Linear(8, V)
    sel = Selector(SelectionConfig(select=rule, select_frac=0.25)).select(inp, head, 0)
    ones = bool((sel.weights[sel.mask] == 1).all())
    if sel.loss_weights is None:
        # every selected position weighs 1, and the loss divides by its own count of rows
        assert ones and sel.loss_denominator is None
    else:
        # importance weights: a sum over the mask stands for the sum over the valid positions
        assert sel.loss_weights is sel.weights and not ones
        assert float(sel.loss_denominator) == float(valid.sum())


# ------------------------------------------------------------- the trainer names no mode
NAMES = set(MODES) | set(RULE_NAMES)


def _named_in_comparisons(src: str) -> list[tuple[int, str]]:
    """(line, name) of every mode or rule name a comparison (`==`, `!=`, `in`, `not in`, a
    container of literals on either side) or a `match` case tests against."""
    def literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [v for e in node.elts for v in literals(e)]
        return []

    found = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        found += [(node.lineno, v) for o in operands for v in literals(o) if v in NAMES]
    return found


def _named_anywhere(src: str) -> list[tuple[int, str]]:
    """(line, name) of every string literal (docstrings aside) that is a mode or rule name:
    a lookup such as `{"no_kd": ...}[cfg.mode]` branches on a name too."""
    tree = ast.parse(src)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in NAMES
            and id(n) not in docs]


def test_the_checks_find_a_branch_on_a_mode_or_rule_name():
    src = ('if cfg.mode == "no_kd": pass\n'
           'positional = sel_cfg.select != "positional"\n'
           'if cfg.mode in ("sampledkd", "rskd_all"): pass\n'
           'match cfg.mode:\n    case "dense_kd": pass\n')
    assert sorted(_named_in_comparisons(src)) == [(1, "no_kd"), (2, "positional"), (3, "rskd_all"),
                                                  (3, "sampledkd"), (5, "dense_kd")]
    assert _named_anywhere('"""no_kd"""\nf = {"all": 1}[x]\n') == [(2, "all")]


def test_the_trainer_names_no_mode_and_no_selection_rule():
    src = TRAINER.read_text()
    assert _named_in_comparisons(src) == []
    assert _named_anywhere(src) == []
