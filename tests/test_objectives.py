"""pipeline.stage2_distill.objectives in one process, against dense log-softmax references written here:
the fused CE + KD pass (CE at the unselected rows, KD at the selected ones, one lm_head
pass) gives the same loss and gradients as the two terms computed densely."""

from __future__ import annotations

import pytest
import torch

from pipeline.stage2_distill.objectives import LossSettings, StepInputs, sparse

B, T, H, V, U = 2, 7, 6, 23, 4


def _dense_reference(head, h, labels, mask, ids, w, pw, kd_w, ce_w):
    logp = torch.log_softmax(head(h).double(), -1)                      # [B, T, V]
    kd_rows = mask
    ce_rows = ~mask & (labels >= 0)
    kd_per = -(w[kd_rows].double() * logp[kd_rows].gather(1, ids[kd_rows])).sum(1)
    r = torch.ones_like(kd_per) if pw is None else pw[kd_rows].double()
    # positional divides by the expected count (here B*T, what the test hands in)
    kd = (kd_per * r).sum() / (r.sum() if pw is None else B * T)
    ce = -logp[ce_rows].gather(1, labels[ce_rows][:, None]).sum() / ce_rows.sum()
    return kd_w * kd + ce_w * ce, kd_per


@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_ce_and_kd_equals_the_dense_terms(positional, bias):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=bias)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, -1] = -100                                     # no next token at the end
    mask = torch.rand(B, T, generator=g) < 0.4
    ids = torch.stack([torch.randperm(V, generator=g)[:U] for _ in range(B * T)]).view(B, T, U)
    w = torch.rand(B, T, U, generator=g)
    pw = (1 + torch.rand(B, T, generator=g)) * mask if positional else None
    kd_w, ce_w = 0.75, 0.5
    x = StepInputs(h, labels, mask, ids=ids, weights=w, position_weights=pw,
                   kd_denominator=torch.tensor(float(B * T)) if positional else None,
                   sum_over_ranks=lambda t: t)               # one process: the sums are local
    t = sparse(head, x, LossSettings(vocab=V, cache_vocab=V, kd_weight=kd_w, ce_weight=ce_w,
                                     ce_positions="unselected"))
    assert t.loss is not None, "the fused CE+KD path did not run"
    t.loss.backward()
    got_h, got_w = h.grad.clone(), head.weight.grad.clone()

    h.grad, head.weight.grad = None, None
    want, kd_per = _dense_reference(head, h, labels, mask, ids, w, pw, kd_w, ce_w)
    want.backward()
    assert abs(t.loss.item() - want.item()) < 1e-5
    assert torch.allclose(t.per_position.double(), kd_per.detach(), atol=1e-5)
    assert torch.allclose(got_h, h.grad, atol=1e-5)
    assert torch.allclose(got_w, head.weight.grad, atol=1e-5)
