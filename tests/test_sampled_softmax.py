"""pipeline.stage2_distill.sampled_softmax's helpers for distill: the exact-class set and the negatives'
random stream (the estimator itself is tested in tests/test_losses.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.stage2_distill.sampled_softmax import frequent_classes, negatives_generator


def test_frequent_classes_hand_example():
    # V = 6; id 6 (>= V) is padding and must not count. Mass by hand:
    # class 0: 0.1; 1: 0.5 + 0.2 = 0.7; 2: 0.3; 3: 0.3; 4: 0; 5: 0.6
    b1 = SimpleNamespace(ids=torch.tensor([[[1, 2, 6]]]), weights=torch.tensor([[[0.5, 0.3, 9.0]]]))
    b2 = SimpleNamespace(ids=torch.tensor([[[5, 3, 0], [1, 6, 6]]]),
                         weights=torch.tensor([[[0.6, 0.3, 0.1], [0.2, 9.0, 9.0]]]))
    assert frequent_classes([b1, b2], 3, 6).tolist() == [1, 2, 5]   # 0.7, 0.6, then 2 ties 3: id
    assert frequent_classes([b1, b2], 10, 6).tolist() == [0, 1, 2, 3, 4, 5]


def test_frequent_classes_sums_over_ranks_through_all_reduce():
    b = SimpleNamespace(ids=torch.tensor([[[0, 1]]]), weights=torch.tensor([[[0.4, 0.6]]]))
    other_rank = torch.tensor([0.0, 0.0, 5.0])          # another rank's mass on class 2

    def sum_over_ranks(t):
        return t + other_rank.to(t.dtype)

    assert frequent_classes([b], 1, 3, sum_over_ranks=sum_over_ranks).tolist() == [2]


def test_negatives_depend_on_seed_rank_step_micro_only():
    def draw(*key):
        return torch.randperm(1000, generator=negatives_generator(*key, torch.device("cpu")))[:8]

    assert torch.equal(draw(0, 1, 5, 0), draw(0, 1, 5, 0))          # a resumed run redraws them
    keys = [(0, 1, 5, 0), (1, 1, 5, 0), (0, 0, 5, 0), (0, 1, 6, 0), (0, 1, 5, 1)]
    draws = [tuple(draw(*k).tolist()) for k in keys]
    assert len(set(draws)) == len(keys)
