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
    counts: dict[str, float] = field(default_factory=dict)
    # "copies": counts are occurrences in the training set; "weighted": sampling weights relative to 1
    # (a pair of weight w is drawn as often as one with w copies), nothing is copied.
    sampling: str = "copies"
    # image_only: where each repeat's other caption came from.
    caption_source: str = ""
    # data.dedup: what deduplication by image removed from the training set (data/dedup.py); empty when off.
    dedup: dict = field(default_factory=dict)

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



MODES = ("exact", "image_only", "caption_only")


@dataclass(frozen=True)
class Entry:
    """One training sample of a plan: it carries base pair ``pair``'s key (what the manifest and
    the logs split by), shows the image of source record ``record`` and takes the captions of
    record ``text`` (-1: the image's own record), variant ``variant`` (0: the caption itself;
    j > 0: its j-th alternative, for image-only repeats)."""

    pair: int
    record: int
    variant: int = 0
    text: int = -1


def choose_pairs(keys: Sequence[str], num_duplicated: int, copies: int | Sequence[int], seed: int) -> dict[int, int]:
    """``{base index: total count}``, drawn exactly as :func:`plan_duplicates` draws them."""
    _, manifest = plan_duplicates(keys, num_duplicated, copies, seed)
    position = {k: i for i, k in enumerate(keys)}
    return {position[k]: int(c) for k, c in manifest.counts.items()}


def counts_from_list(keys: Sequence[str], counts: dict[str, int]) -> dict[int, int]:
    """``{base index: total count}`` from an explicit ``{key: total count}`` list."""
    position = {k: i for i, k in enumerate(keys)}
    for key, count in counts.items():
        if key not in position:
            raise ValueError(f"data.duplication.counts names key {key!r}, which is not among the source's pairs")
        if int(count) < 1:
            raise ValueError(f"data.duplication.counts[{key!r}]={count}; expected a total count >= 1")
    return {position[k]: int(c) for k, c in counts.items() if int(c) > 1}


def expand_plan(keys: Sequence[str], records: Sequence[int], chosen: dict[int, int], seed: int,
                mode: str = "exact") -> tuple[list[Entry], DuplicationManifest]:
    """Every base pair once, then the repeats of each chosen pair, in the duplication ``mode``.

    ``records[p]`` is base pair ``p``'s source record. Repeats are:

    - ``exact``: the pair itself (image and caption);
    - ``image_only``: repeat j shows the pair's image with its j-th alternative caption;
    - ``caption_only``: the pair's caption with the image of a pair that is not duplicated
      (donors drawn without replacement while they last, seeded).
    """
    if mode not in MODES:
        raise ValueError(f"data.duplication.mode={mode!r}; expected one of {MODES}")
    entries = [Entry(p, records[p]) for p in range(len(keys))]
    repeats = [(p, j) for p, count in chosen.items() for j in range(1, count)]
    if mode == "caption_only" and repeats:
        donors = np.array([i for i in range(len(keys)) if i not in chosen])
        if not len(donors):
            raise ValueError("caption_only duplication needs pairs that are not duplicated to lend their images")
        rng = np.random.default_rng(seed + 1)
        order = np.concatenate([rng.permutation(donors) for _ in range(len(repeats) // len(donors) + 1)])
        entries += [Entry(p, records[int(d)], 0, records[p]) for (p, _), d in zip(repeats, order)]
    else:
        entries += [Entry(p, records[p], j if mode == "image_only" else 0) for p, j in repeats]
    manifest = DuplicationManifest(seed=seed, mode=mode, num_base=len(keys), num_total=len(entries),
                                   counts={keys[p]: c for p, c in chosen.items()})
    return entries, manifest


def choose_weighted(keys: Sequence[str], fraction: float, weight: float, seed: int
                    ) -> tuple[np.ndarray, DuplicationManifest]:
    """On-the-fly duplication (Somepalli et al.): a ``fraction`` of the pairs is drawn ``weight`` times
    as often as the rest; nothing is copied. Returns per-pair sampling weights and the manifest."""
    if not 0 < fraction <= 1 or weight < 1:
        raise ValueError(f"data.weighted needs 0 < fraction <= 1 and weight >= 1, got {fraction} and {weight}")
    num = max(1, round(fraction * len(keys)))
    chosen = np.random.default_rng(seed).choice(len(keys), size=num, replace=False)
    weights = np.ones(len(keys))
    weights[chosen] = weight
    manifest = DuplicationManifest(seed=seed, mode="exact", num_base=len(keys), num_total=len(keys),
                                   counts={keys[i]: float(weight) for i in sorted(chosen.tolist())},
                                   sampling="weighted")
    return weights, manifest
