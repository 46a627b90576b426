"""Deduplication of the training set by image: what a careful practitioner tries before any mitigation.

``data.dedup.method``:

- ``exact``: samples whose decoded pixels (at the training resolution, centre crop) are identical;
- ``near``: samples whose 64-bit perceptual hashes (pHash: 32x32 greyscale, 2-D DCT, the 8x8
  lowest frequencies against their median, as the ``imagehash`` package computes it) differ in at
  most ``data.dedup.max_distance`` bits, joined transitively.

Each group of duplicate images keeps its first sample in plan order (every base pair comes before
the repeats, so injected duplicates keep their original) and loses the rest. The same code serves
the embedded world and every real source with random access, since it only needs the images of
the plan's records. What was removed is counted in the manifest (``dedup``) and ``summary.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data.injection import DuplicationManifest, Entry

METHODS = ("none", "exact", "near")
HASH_BITS = 64
DCT_SIZE = 32  # pHash's greyscale size; the hash keeps the 8x8 lowest frequencies of its DCT


@dataclass(frozen=True)
class DedupSpec:
    """Mirrors ``data.dedup`` in the data configs."""

    method: str = "none"
    max_distance: int = 4
    chunk_size: int = 512  # images decoded and hashed at a time

    @classmethod
    def from_config(cls, cfg) -> DedupSpec:
        spec = cls(**dict(cfg)) if cfg is not None else cls()
        if spec.method not in METHODS:
            raise ValueError(f"data.dedup.method={spec.method!r}; expected one of {METHODS}")
        if not 0 <= spec.max_distance < HASH_BITS:
            raise ValueError(f"data.dedup.max_distance={spec.max_distance}; expected 0 to {HASH_BITS - 1} "
                             f"(differing bits of {HASH_BITS}-bit perceptual hashes)")
        return spec


def pixel_digest(image: torch.Tensor) -> int:
    """A 64-bit digest of an image's exact pixels (uint8 ``[3, H, W]``)."""
    data = image.contiguous().numpy().tobytes() + bytes(image.shape)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``dct_matrix(n) @ x`` transforms the columns of ``x``."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


DCT = dct_matrix(DCT_SIZE)


def phash(image: torch.Tensor) -> int:
    """The 64-bit perceptual hash of a uint8 ``[3, H, W]`` image (bit set: frequency above the median)."""
    grey = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).convert("L")
    pixels = np.asarray(grey.resize((DCT_SIZE, DCT_SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (DCT @ pixels @ DCT.T)[:8, :8].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits, bitorder="little").view("<u8")[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits between uint64 arrays (broadcast)."""
    x = np.bitwise_xor(a, b)
    return np.unpackbits(x[..., None].view(np.uint8), axis=-1).sum(-1)


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the root is the group's first member


def near_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Each hash's group (its first member's index): hashes within ``max_distance`` bits, transitively.

    Pigeonhole: hashes within d bits agree exactly on at least one of d + 1 disjoint bands of bits,
    so only hashes sharing a band value are compared, not all pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    groups = UnionFind(len(hashes))
    edges = np.linspace(0, HASH_BITS, max_distance + 2).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        band = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(band, kind="stable")
        starts = np.flatnonzero(np.r_[True, band[order][1:] != band[order][:-1], True])
        for s, e in zip(starts[:-1], starts[1:]):
            if e - s < 2:
                continue
            members = order[s:e]
            close = hamming(hashes[members][:, None], hashes[members][None, :]) <= max_distance
            for a, b in zip(*np.nonzero(np.triu(close, 1))):
                groups.union(int(members[a]), int(members[b]))
    return np.array([groups.find(i) for i in range(len(hashes))])


def image_groups(records: Sequence[int], load: Callable[[list[int]], torch.Tensor], spec: DedupSpec) -> list[int]:
    """For each of ``records`` (distinct), the position of the first record with a duplicate image."""
    hash_of = pixel_digest if spec.method == "exact" else phash
    hashes = []
    for start in range(0, len(records), spec.chunk_size):
        hashes += [hash_of(img) for img in load(list(records[start:start + spec.chunk_size]))]
    if spec.method == "exact":
        first: dict[int, int] = {}
        return [first.setdefault(h, i) for i, h in enumerate(hashes)]
    return near_groups(np.array(hashes, dtype=np.uint64), spec.max_distance).tolist()


def deduplicate(entries: list[Entry], keys: Sequence[str], load: Callable[[list[int]], torch.Tensor],
                spec: DedupSpec, manifest: DuplicationManifest) -> list[int]:
    """Positions in ``entries`` to keep: the first sample of each group of duplicate images.

    ``keys`` are the base pairs' keys, ``load`` returns uint8 images of source records. Updates
    ``manifest`` (``num_total`` and a ``dedup`` record of what was removed: duplicated pairs' samples,
    other pairs' samples, and samples removed as duplicates of a different source image).
    """
    records = list(dict.fromkeys(e.record for e in entries))
    group_of = dict(zip(records, (records[g] for g in image_groups(records, load, spec))))
    kept_group: dict[int, int] = {}  # group -> record of the sample kept for it
    keep, removed = [], {"duplicated": 0, "other": 0, "other_image": 0}
    for i, entry in enumerate(entries):
        group = group_of[entry.record]
        if group not in kept_group:
            kept_group[group] = entry.record
            keep.append(i)
            continue
        removed["duplicated" if manifest.is_duplicated(keys[entry.pair]) else "other"] += 1
        removed["other_image"] += kept_group[group] != entry.record
    manifest.num_total = len(keep)
    manifest.dedup = {"method": spec.method, **({"max_distance": spec.max_distance} if spec.method == "near" else {}),
                      "removed": len(entries) - len(keep), "removed_duplicated": removed["duplicated"],
                      "removed_other": removed["other"], "removed_other_image": removed["other_image"],
                      "images_hashed": len(records)}
    return keep
