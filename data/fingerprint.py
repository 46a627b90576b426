"""Label-free pair identity: which training samples show one image, from the pixels alone.

A training-time filter pools each pair's judgements under a key. The injection plan's pair
index would be the perfect key, but it is ground truth that nobody training on real data has
(``filter.key=oracle`` keeps it, named as the oracle it is). The default key is what the data
itself says (``filter.key``):

- ``content``: a 64-bit digest of the record's decoded pixels (training resolution, centre crop,
  no flip: the record's one canonical image), so exact copies pool whatever their keys, file
  names or captions: the embedded world's injected copies and a real source's natural
  duplicates (the same bytes stored under two keys);
- ``near``: the record's 64-bit perceptual hash (:func:`data.dedup.phash`), so JPEG re-encodes and
  resizes that keep the hash also pool (the transitive within-``max_distance`` grouping of
  ``data.dedup.method=near`` needs the whole set at once; a key must be known per sample).

In-memory images (the embedded world) get dense ids, one per distinct fingerprint: no two
images share a key unless their fingerprints agree. Real sources fingerprint each record the
first time a sample of it is loaded (one more decode, in the DataLoader workers, cached per
record) into a fixed table of ``filter.table_size`` slots (default 1.5 slots per record, at least
2^20): the filter's state stays within 9 bytes per slot (13.5 per record) at scale, streams
included, and two different images share a slot only by a hash collision (at 1.5 slots per
record about half the records share theirs with another: two ordinary images then pool, which the
per-key test tolerates; an ordinary image sharing a dropped key's slot is dropped with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from data.dedup import phash, pixel_digest

KINDS = ("content", "near", "oracle")
SLOTS_PER_RECORD = 1.5
MIN_SLOTS = 2**20  # 9.4 MB of filter state: collisions stay rare (0.2% of records at 2,000) on small sets


@dataclass(frozen=True)
class KeySpec:
    """``filter.key`` and ``filter.table_size``: which key the filter pools a pair's judgements under."""

    kind: str = "oracle"
    table_size: int | None = None

    @classmethod
    def from_filter(cls, cfg) -> KeySpec:
        kind = cfg.get("key", "oracle") if cfg.kind not in ("none", "threshold") else "oracle"
        if kind not in KINDS:
            raise ValueError(f"filter.key={kind!r}; expected content (pixel digest), near (perceptual hash) or "
                             "oracle (the injection plan's pair index, ground truth real data never has)")
        size = cfg.get("table_size")
        if size is not None and size < 1:
            raise ValueError(f"filter.table_size={size} must be >= 1 (or null: 1.5 slots per source record)")
        return cls(kind, size)

    @property
    def fingerprint(self) -> Callable[[torch.Tensor], int] | None:
        """The image fingerprint this key needs (``None``: the oracle reads the plan)."""
        return {"content": pixel_digest, "near": phash}.get(self.kind)


ORACLE = KeySpec()  # samples carry the plan's pair index only: logs, filter=none/threshold, filter.key=oracle


class ContentKeys:
    """Each source record's key slot in ``[0, size)``, from its canonical image's fingerprint."""

    def __init__(self, spec: KeySpec, size: int, dense: np.ndarray | None = None):
        self.spec, self.size, self.dense = spec, size, dense
        self.cache: dict[int, int] = {}

    @classmethod
    def of_images(cls, spec: KeySpec, images: torch.Tensor) -> ContentKeys:
        """Dense ids for in-memory uint8 images ``[N, 3, H, W]``: one per distinct fingerprint."""
        prints = np.array([spec.fingerprint(image) for image in images], dtype=np.uint64)
        _, ids = np.unique(prints, return_inverse=True)
        return cls(spec, int(ids.max()) + 1 if len(ids) else 1, ids.astype(np.int64))

    @classmethod
    def hashed(cls, spec: KeySpec, num_records: int) -> ContentKeys:
        """Slots of a fixed table, filled as records are first loaded (real sources, streams)."""
        return cls(spec, spec.table_size or max(MIN_SLOTS, math.ceil(SLOTS_PER_RECORD * num_records)))

    def slot(self, record: int, canonical: Callable[[], torch.Tensor]) -> int:
        """Record ``record``'s key; ``canonical`` returns its uint8 centre-cropped image when it must be read."""
        if self.dense is not None:
            return int(self.dense[record])
        if record not in self.cache:
            self.cache[record] = self.spec.fingerprint(canonical()) % self.size
        return self.cache[record]
