"""Step-addressed batches: which samples a micro-step uses depends only on (seed, micro-step,
rank), so a resumed run replays exactly what an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Endless shuffled epochs; rank ``r`` of ``world`` takes its slice of each global batch."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start_micro_step: int = 0):
        if size < 1:
            raise ValueError("the training set is empty; check data.* (nothing to sample)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start_micro_step
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        return self._perm

    def batch(self, micro_step: int) -> list[int]:
        global_batch = self.batch_size * self.world
        start = micro_step * global_batch + self.rank * self.batch_size
        positions = range(start, start + self.batch_size)
        return [int(self._permutation(p // self.size)[p % self.size]) for p in positions]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.batch(step)
            step += 1

