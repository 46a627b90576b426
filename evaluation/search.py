"""Nearest-neighbour search of generations against the whole training set.

Training-set descriptors are computed once per (dataset, descriptor) and cached on disk; the
search walks them in chunks, so the similarity matrix never exceeds ``queries x chunk`` and a
100k-image subset fits in CPU or GPU memory (100k x 1024 float16 descriptors are 200 MB).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm


class RunningMax:
    """Best similarity and the training index it came from, per query, updated chunk by chunk."""

    def __init__(self, num_queries: int):
        self.value = torch.full((num_queries,), -float("inf"))
        self.index = torch.full((num_queries,), -1, dtype=torch.long)

    def update(self, sims: torch.Tensor, offset: int, queries: torch.Tensor | None = None) -> None:
        """``sims`` is ``[q, C]`` for training indices ``offset..offset+C`` and the ``queries`` rows (all if None)."""
        best, where = sims.float().max(dim=1)
        rows = torch.arange(len(self.value)) if queries is None else queries
        better = best.cpu() > self.value[rows]
        self.value[rows[better]] = best.cpu()[better]
        self.index[rows[better]] = where.cpu()[better] + offset


def chunks(total: int, size: int) -> Iterator[tuple[int, list[int]]]:
    """``(offset, indices)`` for consecutive chunks of ``range(total)``."""
    for start in range(0, total, size):
        yield start, list(range(start, min(start + size, total)))


def dataset_fingerprint(pairs) -> str:
    """A cheap identity of a training set: its keys, captions and a few images' bytes.

    Keys alone are not enough (the embedded world's keys repeat across resolutions), and
    hashing every image would read the whole set the cache exists to avoid reading.
    """
    h = hashlib.sha256(f"{len(pairs)}".encode())
    h.update("\n".join(pairs.keys).encode())
    h.update("\n".join(pairs.captions).encode())
    probe = sorted({0, len(pairs) // 2, len(pairs) - 1, *range(0, len(pairs), max(1, len(pairs) // 16))})
    h.update(pairs.images_at(probe).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_features(pairs, embed: Callable[[torch.Tensor], torch.Tensor], identity: str, cache_dir: str | Path,
                    chunk_size: int, progress: bool = False) -> torch.Tensor:
    """Descriptors ``[N, D]`` (float16) of every training image, from ``cache_dir`` or computed once in chunks."""
    path = Path(cache_dir).expanduser() / f"{identity}-{dataset_fingerprint(pairs)}.pt"
    if path.exists():
        return torch.load(path)
    todo = list(chunks(len(pairs), chunk_size))
    parts = [embed(pairs.images_at(idx)).to(torch.float16)
             for _, idx in tqdm(todo, desc="training-set features", disable=not progress)]
    features = torch.cat(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(features, tmp)
    tmp.replace(path)  # atomic: concurrent runs never read a half-written cache
    return features


def nearest(queries: torch.Tensor, features: torch.Tensor, chunk_size: int) -> RunningMax:
    """For L2-normalised ``queries [Q, D]``, the most similar row of ``features [N, D]`` by cosine."""
    best = RunningMax(len(queries))
    q = queries.float()
    for offset, idx in chunks(len(features), chunk_size):
        best.update(q @ features[idx[0]:idx[-1] + 1].to(q.device, torch.float32).T, offset)
    return best
