"""Training data as the loop and evaluation see it, whatever the source.

The loop only asks for step-addressed batches (:meth:`TrainingData.batches`); evaluation only
asks for the base pairs (each unique pair once, to pick prompts and find their training
images) and the duplication manifest. Sources differ only in how they provide these.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from data.injection import DuplicationManifest, plan_duplicates
from data.sampler import StepBatchSampler
from data.world import EmbeddedWorld, WorldConfig, generate_world


@dataclass
class BasePairs:
    """Every unique image-caption pair once, in memory: ``images`` is uint8 ``[N, 3, H, W]``."""

    keys: list[str]
    captions: list[str]
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def images_at(self, indices: list[int]) -> torch.Tensor:
        """uint8 images ``[len(indices), 3, H, W]`` of the given base pairs."""
        return self.images[indices]


class PairDataset(Dataset):
    """Training samples over the base pairs, indexed through a duplication plan."""

    def __init__(self, pairs: BasePairs, indices: list[int], manifest: DuplicationManifest):
        self.pairs, self.indices, self.manifest = pairs, indices, manifest

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        base = self.indices[i]
        key = self.pairs.keys[base]
        return {
            "pixel_values": self.pairs.images[base].float() / 127.5 - 1.0,
            "caption": self.pairs.captions[base],
            "key": key,
            "duplicated": self.manifest.is_duplicated(key),
        }


def collate(items: list[dict]) -> dict:
    """One batch: ``pixel_values`` in [-1, 1], ``caption``/``key`` lists, ``duplicated`` bool tensor."""
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "duplicated": torch.tensor([it["duplicated"] for it in items], dtype=torch.bool),
    }


@dataclass
class TrainingData:
    """The training samples, the base pairs they draw on, the manifest, and skip counts by reason."""

    dataset: PairDataset
    pairs: BasePairs
    manifest: DuplicationManifest
    world: EmbeddedWorld | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def batches(self, batch_size: int, seed: int, rank: int, world_size: int, start_micro_step: int = 0,
                num_workers: int = 0) -> Iterator[dict]:
        """Endless per-rank batches; micro-step ``s`` on rank ``r`` always gets the same samples,
        so a resumed run sees exactly what an uninterrupted one would."""
        sampler = StepBatchSampler(len(self.dataset), batch_size, seed, rank, world_size,
                                   start_micro_step=start_micro_step)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers))


def build_data(cfg: DictConfig) -> TrainingData:
    """Build the configured source and inject duplicates into it."""
    if cfg.source != "embedded":
        raise ValueError(f"data.source={cfg.source!r} is not available yet; expected 'embedded'")
    world = generate_world(WorldConfig(**cfg.world))
    dup = cfg.duplication
    indices, manifest = plan_duplicates(world.keys, dup.num_duplicated, list(dup.copies)
                                        if not isinstance(dup.copies, int) else dup.copies, dup.seed)
    pairs = BasePairs(world.keys, world.captions, world.images)
    return TrainingData(dataset=PairDataset(pairs, indices, manifest), pairs=pairs, manifest=manifest, world=world)
