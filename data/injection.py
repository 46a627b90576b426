"""Duplicate injection: the general mechanism by which a source gets repeated pairs.

Works on any indexable source through its keys alone, so the embedded world and LAION shards
share it: choose ``num_duplicated`` pairs, give each a total count ``K`` (K may differ per
pair), and return the index list of the duplicated training set plus a manifest saying which
keys were duplicated and how often. Training logs and evaluation split by the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class DuplicationManifest:
    """Which keys occur more than once in the training set, and how many times in all."""

    seed: int
    mode: str
    num_base: int
    num_total: int
    counts: dict[str, int] = field(default_factory=dict)

    def is_duplicated(self, key: str) -> bool:
        return self.counts.get(key, 1) > 1

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> DuplicationManifest:
        return cls(**json.loads(Path(path).read_text()))


def resolve_copies(copies: int | Sequence[int], num_duplicated: int) -> list[int]:
    """Per-pair total counts: one int for all pairs, or a list cycled over the chosen pairs."""
    counts = [int(copies)] * num_duplicated if isinstance(copies, int) else [int(c) for c in copies]
    if num_duplicated and not counts:
        raise ValueError("copies is an empty list; give an int or a non-empty list of counts >= 2")
    counts = [counts[i % len(counts)] for i in range(num_duplicated)]
    bad = [c for c in counts if c < 2]
    if bad:
        raise ValueError(f"copies must be >= 2 (the total count of a duplicated pair), got {bad[0]}")
    return counts


def plan_duplicates(
    keys: Sequence[str], num_duplicated: int, copies: int | Sequence[int], seed: int, mode: str = "exact"
) -> tuple[list[int], DuplicationManifest]:
    """Choose pairs to duplicate; return training-set indices into ``keys`` and the manifest.

    Every base pair appears once; each chosen pair appears ``K`` times in all. The choice
    depends only on ``seed`` and the number of keys, so runs with one config agree.
    """
    if not 0 <= num_duplicated <= len(keys):
        raise ValueError(f"num_duplicated={num_duplicated} must lie in [0, {len(keys)}] (the source size)")
    if len(set(keys)) != len(keys):
        raise ValueError("source keys are not unique; duplicate injection needs one key per pair")
    counts = resolve_copies(copies, num_duplicated)
    chosen = np.random.default_rng(seed).choice(len(keys), size=num_duplicated, replace=False)
    indices = list(range(len(keys)))
    for index, count in zip(chosen.tolist(), counts):
        indices.extend([index] * (count - 1))
    manifest = DuplicationManifest(
        seed=seed, mode=mode, num_base=len(keys), num_total=len(indices),
        counts={keys[i]: c for i, c in zip(chosen.tolist(), counts)},
    )
    return indices, manifest
