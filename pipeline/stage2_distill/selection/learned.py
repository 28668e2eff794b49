"""The `learned` position selector: a tiny model that predicts each position's KD loss.

Used by `pipeline.stage2_distill.selection` (rule `learned`); imports nothing of ours. Two kinds:

- `linucb`: ridge regression `y ~ x . theta` on the features `x` (plus a bias column),
  `A = lambda I + sum x x^T`, `b = sum x y`, `theta = A^-1 b`, ranked by the upper
  confidence bound `x . theta + explore * sqrt(x^T A^-1 x)` (Li et al., 2010). Old data is
  discounted by `LINUCB_DECAY` per update (the student changes, so do the losses):
  `A <- d A + (1 - d) lambda I + X^T X`, `b <- d b + X^T y`.
- `mlp`: `F -> 16 -> 16 -> 1` tanh MLP, `MLP_STEPS` Adam steps of mean squared error on each
  update's batch; exploration is epsilon-greedy: each valid position is forced into the
  selection with probability `explore * frac`, so about `explore * K` of the K chosen
  positions are uniform random picks.

Features per position (`FEATURES`, `[B,T,F]` float32), all O(1):
`teacher_entropy / ln V`, `student_entropy / ln V`, `student_ce / ln V`, `t / (T - 1)`.

Replication: every rank holds an identical copy. Parameters start from a shared seed;
`observe` all-gathers every rank's (features, losses) and applies the same update to the
same data in rank order on the CPU in float64, so the state stays bit-identical across
ranks. Only exploration draws are per rank (they change which positions a rank shows
the model, never how the model updates from what is gathered).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn

FEATURES = ("teacher_entropy", "student_entropy", "student_ce", "rel_position")
KINDS = ("linucb", "mlp")
LINUCB_RIDGE = 1.0
LINUCB_DECAY = 0.999
MLP_HIDDEN = 16
MLP_LR = 1e-2
MLP_STEPS = 4

AllGatherRows = Callable[[Tensor], Tensor]
"""`f(x [n, D]) -> [sum_r n_r, D]`: every rank's rows concatenated in rank order."""


def make_features(teacher_entropy: Tensor, student_entropy: Tensor, student_ce: Tensor,
                  vocab_size: int) -> Tensor:
    """Stack the per-position features `[B,T]` x 3 -> `[B,T,F]` float32 (see `FEATURES`).

    Entropies and CE are divided by `ln V` so they sit near [0, 1] whatever the vocabulary.
    """
    b, t = teacher_entropy.shape
    scale = 1.0 / math.log(vocab_size)
    rel = torch.arange(t, device=teacher_entropy.device, dtype=torch.float32) / max(t - 1, 1)
    return torch.stack([teacher_entropy.float() * scale, student_entropy.float() * scale,
                        student_ce.float() * scale, rel.expand(b, t)], dim=-1)


class LearnedSelector:
    """Online regressor from position features to KD loss, with exploration.

    `scores(features, valid, frac, generator)` -> `[B,T]` ranking scores (higher = pick);
    `observe(features [n,F], losses [n], gather)` trains on the observed losses of the
    selected positions (`gather` all-gathers rows across ranks).
    """

    def __init__(self, kind: str, explore: float, seed: int, device: torch.device | str = "cpu"):
        if kind not in KINDS:
            raise ValueError(f"--learned-kind {kind!r} must be one of {KINDS}")
        self.kind, self.explore, self.device = kind, float(explore), torch.device(device)
        d = len(FEATURES) + 1
        self.updates = 0
        if kind == "linucb":
            self.A = torch.eye(d, dtype=torch.float64) * LINUCB_RIDGE
            self.b = torch.zeros(d, dtype=torch.float64)
        else:
            gen = torch.Generator().manual_seed(seed)  # shared seed: identical init everywhere
            self.mlp = nn.Sequential(nn.Linear(d - 1, MLP_HIDDEN), nn.Tanh(),
                                     nn.Linear(MLP_HIDDEN, MLP_HIDDEN), nn.Tanh(),
                                     nn.Linear(MLP_HIDDEN, 1)).double()
            with torch.no_grad():
                for p in self.mlp.parameters():
                    bound = 1.0 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.1
                    p.uniform_(-bound, bound, generator=gen)
            self.opt = torch.optim.Adam(self.mlp.parameters(), lr=MLP_LR)
        self._refresh()

    # -- prediction ------------------------------------------------------------------
    def _refresh(self) -> None:
        """Recompute the device-side copies used for scoring after an update."""
        if self.kind == "linucb":
            a_inv = torch.linalg.inv(self.A)
            self._theta = (a_inv @ self.b).to(self.device, torch.float32)
            self._a_inv = a_inv.to(self.device, torch.float32)
        else:
            self._mlp_dev = copy.deepcopy(self.mlp).to(self.device, torch.float32)

    @torch.no_grad()
    def predict(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """`features [..., F]` -> (predicted loss `[...]`, LinUCB bonus `[...]`, 0 for mlp)."""
        x = features.float()
        if self.kind == "mlp":
            mean = self._mlp_dev(x).squeeze(-1)
            return mean, torch.zeros_like(mean)
        xb = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        mean = xb @ self._theta
        var = ((xb @ self._a_inv) * xb).sum(-1).clamp_min(0)     # x^T A^-1 x per position
        return mean, var.sqrt()

    @torch.no_grad()
    def scores(self, features: Tensor, valid: Tensor, frac: float,
               generator: torch.Generator) -> Tensor:
        """Ranking scores `[B,T]` float32: the per-sequence top-k of these is the choice.

        linucb: `mean + explore * bonus`. mlp: the predicted loss, except that positions
        drawn with probability `explore * frac` get `BIG + u` so they are taken first.
        """
        mean, bonus = self.predict(features)
        if self.kind == "linucb":
            return mean + self.explore * bonus
        u = torch.rand(valid.shape, generator=generator, device=valid.device)
        forced = (torch.rand(valid.shape, generator=generator, device=valid.device)
                  < self.explore * frac) & valid
        big = mean.abs().max().clamp_min(1.0) * 4 + 1
        return torch.where(forced, big + u, mean)

    # -- training --------------------------------------------------------------------
    def observe(self, features: Tensor, losses: Tensor, gather: AllGatherRows) -> int:
        """Train on the losses `[n]` observed at positions with `features [n,F]` on this rank.

        Collective: every rank must call it at the same step (n may differ, even be 0).
        Returns the number of rows gathered over all ranks.
        """
        rows = torch.cat([features.detach().to(torch.float64).reshape(-1, len(FEATURES)),
                          losses.detach().to(torch.float64).reshape(-1, 1)], dim=1)
        data = gather(rows).cpu()
        if data.shape[0] == 0:
            return 0
        x, y = data[:, :-1], data[:, -1]
        if not torch.isfinite(data).all():
            raise ValueError("learned selector: observed features/losses contain NaN or inf; "
                             "pass the per-position KD loss of the selected positions")
        if self.kind == "linucb":
            xb = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            eye = torch.eye(xb.shape[1], dtype=torch.float64)
            self.A = LINUCB_DECAY * self.A + (1 - LINUCB_DECAY) * LINUCB_RIDGE * eye + xb.T @ xb
            self.b = LINUCB_DECAY * self.b + xb.T @ y
        else:
            for _ in range(MLP_STEPS):
                self.opt.zero_grad(set_to_none=True)
                loss = torch.mean((self.mlp(x).squeeze(-1) - y) ** 2)
                loss.backward()
                self.opt.step()
        self.updates += 1
        self._refresh()
        return int(data.shape[0])

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and ints only (loadable with `torch.load(weights_only=True)`)."""
        sd: dict = {"kind": self.kind, "updates": self.updates}
        if self.kind == "linucb":
            sd.update(A=self.A.clone(), b=self.b.clone())
        else:
            sd.update(mlp=copy.deepcopy(self.mlp.state_dict()),
                      opt=copy.deepcopy(self.opt.state_dict()))
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd["kind"] != self.kind:
            raise ValueError(f"checkpoint holds a {sd['kind']!r} learned selector, "
                             f"but --learned-kind is {self.kind!r}")
        self.updates = int(sd["updates"])
        if self.kind == "linucb":
            self.A, self.b = sd["A"].cpu().double().clone(), sd["b"].cpu().double().clone()
        else:
            self.mlp.load_state_dict(sd["mlp"])
            self.opt.load_state_dict(sd["opt"])
        self._refresh()
