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



class DrawSampler(Sampler[list[tuple[int, tuple[int, ...]]]]):
    """Step-addressed batches of ``(index, draw)`` pairs: ``draw`` seeds everything random about
    that sample (crop, flip, caption), so it too depends only on (seed, micro-step, rank, slot).

    Uniform draws are :class:`StepBatchSampler`'s; with ``weights`` each micro-step draws its global
    batch with replacement in proportion to them (on-the-fly duplication), then takes its rank's slice.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start_micro_step: int = 0, weights: torch.Tensor | None = None):
        self.uniform = StepBatchSampler(size, batch_size, seed, rank, world, start_micro_step)
        self.weights = weights

    def batch(self, micro_step: int) -> list[int]:
        u = self.uniform
        if self.weights is None:
            return u.batch(micro_step)
        gen = torch.Generator().manual_seed(u.seed * 1_000_003 + micro_step)
        drawn = torch.multinomial(self.weights, u.batch_size * u.world, replacement=True, generator=gen)
        return drawn[u.rank * u.batch_size:(u.rank + 1) * u.batch_size].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
        u, step = self.uniform, self.uniform.start
        while True:
            yield [(i, (u.seed, step, u.rank, slot)) for slot, i in enumerate(self.batch(step))]
            step += 1
