"""A fake process group for single-process tests of collective code: R ranks as R threads
in lock-step (`run_ranks`), with an all_gather that, like NCCL, needs equal shapes."""

from __future__ import annotations

import threading

import torch


class _Shared:
    def __init__(self, world: int):
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)


class ThreadComm:
    """R ranks as R threads in one process; all_gather requires equal shapes like NCCL."""

    def __init__(self, rank: int, shared: _Shared):
        self.rank, self.world_size, self._sh = rank, shared.world, shared

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._sh.slots[self.rank] = tensor.clone()
        self._sh.barrier.wait()
        shapes = {tuple(s.shape) for s in self._sh.slots}
        assert len(shapes) == 1, f"all_gather with unequal shapes {shapes}"
        out = [s.clone() for s in self._sh.slots]
        self._sh.barrier.wait()
        return out


def run_ranks(world: int, fn):
    """Run fn(rank, comm) on `world` threads in lock-step; return the results by rank."""
    sh, res, errs = _Shared(world), [None] * world, []

    def body(r):
        try:
            res[r] = fn(r, ThreadComm(r, sh))
        except BaseException as e:  # re-raised in the main thread below
            errs.append(e)
            sh.barrier.abort()

    ts = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise errs[0]
    return res
