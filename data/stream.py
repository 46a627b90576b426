"""Streaming webdataset shards to many ranks and workers, exactly resumable.

Each epoch the shard list is shuffled by (seed, epoch) and dealt round-robin to the global
workers (rank r's DataLoader worker w is global worker ``r * W + w`` of ``world * W``), so
every shard is read by exactly one worker per epoch and no two workers see the same sample.
The split uses the rank and world size the loop passes, not torch.distributed, so it behaves
the same under accelerate, torchrun or a single process. Samples (read by webdataset's tar
iterator) are repeated as the duplication plan says (``copies`` per epoch, or a weight w as
floor(w) draws plus one more with probability frac(w)), pass a seeded shuffle buffer, and are
decoded with an RNG seeded by (seed, global worker, sample number).

Resume: the DataLoader takes batches from its workers in turn, so after ``s`` micro-steps
stream worker ``w`` has produced ``ceil((s - w) / W)`` batches; on resume DataLoader worker
``i`` plays stream worker ``(i + s) % W`` (the one whose batch is due first) and replays its
stream without decoding up to that point. Same seed, ranks and workers give the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.dataset import PairDataset, collate
from data.injection import Entry
from data.sources import readable_samples, split_key


class ShardStream:
    """What a stream needs besides the run's batch size, seed and topology."""

    def __init__(self, urls: list[str], dataset: PairDataset, weights: torch.Tensor | None, buffer: int):
        self.urls, self.dataset, self.buffer = urls, dataset, max(1, buffer)
        # Which plan entries each usable tar sample stands for: its own, and its repeats.
        self.entries: dict[tuple[int, str], list[Entry]] = {}
        for entry in dataset.entries:
            loc = dataset.index.records[entry.record].loc
            if entry.text >= 0:
                raise ValueError("caption_only duplication needs random access; use data.access=indexed or "
                                 "materialize it with memsieve-data build")
            self.entries.setdefault((loc[0], split_key(loc[3])[0]), []).append(entry)
        self.weights = None if weights is None else weights.numpy()

    def batches(self, batch_size: int, seed: int, rank: int, world_size: int, start_micro_step: int = 0,
                num_workers: int = 0) -> Iterator[dict]:
        workers = max(1, num_workers)
        if len(self.urls) < world_size * workers:
            raise ValueError(f"{len(self.urls)} shards cannot feed {world_size} ranks x {workers} workers; "
                             "every worker needs a shard (write more, smaller shards, or use data.access=indexed)")
        stream = WorkerStream(self, batch_size, seed, rank, world_size, workers, start_micro_step)
        return iter(DataLoader(stream, batch_size=None, num_workers=num_workers))


class WorkerStream(IterableDataset):
    """One rank's stream; each DataLoader worker takes its own shards (see the module docstring)."""

    def __init__(self, source: ShardStream, batch_size: int, seed: int, rank: int, world: int, workers: int,
                 start_micro_step: int):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world, self.workers, self.start = rank, world, workers, start_micro_step

    def shards(self, worker: int, epoch: int) -> list[int]:
        """This worker's shards in ``epoch``."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source.urls))
        return order[self.rank * self.workers + worker::self.world * self.workers].tolist()

    def samples(self, worker: int) -> Iterator[tuple[Entry, bytes]]:
        """Endless (entry, image bytes) of this worker, repeated per the plan, before shuffling."""

        src = self.source
        rng = np.random.default_rng([self.seed, self.rank, worker, 1])
        for epoch in range(2**62):
            for shard in self.shards(worker, epoch):
                for sample in readable_samples(src.urls[shard]):
                    entries = src.entries.get((shard, sample["__key__"]))
                    if not entries:
                        continue  # skipped when the source was indexed
                    loc = src.dataset.index.records[entries[0].record].loc
                    data = sample[loc[3].rpartition("/")[2].partition(".")[2]]  # webdataset keeps the case
                    if src.weights is not None:
                        w = src.weights[entries[0].pair]
                        entries = entries * (int(w) + int(rng.random() < w - int(w)))
                    for entry in entries:
                        yield entry, data

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        # The DataLoader asks its worker 0 first; after s micro-steps the next batch is stream worker s % W's.
        worker = ((info.id if info is not None else 0) + self.start) % self.workers
        done = max(0, math.ceil((self.start - worker) / self.workers))  # batches this worker already produced
        skip = done * self.batch_size
        rng = np.random.default_rng([self.seed, self.rank, worker, 2])
        buffer: list[tuple[Entry, bytes]] = []
        batch: list[dict] = []
        number = 0
        for item in self.samples(worker):
            buffer.append(item)
            if len(buffer) < self.source.buffer:
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            entry, data = buffer.pop()
            number += 1
            if number <= skip:
                continue
            draw = (self.seed, self.rank * self.workers + worker, number)
            batch.append(self.source.dataset.sample(entry, draw, data))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
