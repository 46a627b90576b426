"""Training datasets: pairs as tensors, with the duplicated flag each log splits by."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from data.injection import DuplicationManifest, plan_duplicates
from data.world import EmbeddedWorld, WorldConfig, generate_world


class PairDataset(Dataset):
    """Image-caption pairs over a base set, indexed through a duplication plan."""

    def __init__(self, images: torch.Tensor, captions: list[str], keys: list[str],
                 indices: list[int], manifest: DuplicationManifest):
        self.images, self.captions, self.keys = images, captions, keys
        self.indices, self.manifest = indices, manifest

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        base = self.indices[i]
        key = self.keys[base]
        return {
            "pixel_values": self.images[base].float() / 127.5 - 1.0,
            "caption": self.captions[base],
            "key": key,
            "duplicated": self.manifest.is_duplicated(key),
        }


@dataclass
class TrainingData:
    """The dataset plus what evaluation needs to find each prompt's training image."""

    dataset: PairDataset
    manifest: DuplicationManifest
    world: EmbeddedWorld | None


def build_data(cfg: DictConfig) -> TrainingData:
    """Build the configured source and inject duplicates into it."""
    if cfg.source != "embedded":
        raise ValueError(f"data.source={cfg.source!r} is not available yet; expected 'embedded'")
    world = generate_world(WorldConfig(**cfg.world))
    dup = cfg.duplication
    indices, manifest = plan_duplicates(world.keys, dup.num_duplicated, list(dup.copies)
                                        if not isinstance(dup.copies, int) else dup.copies, dup.seed)
    dataset = PairDataset(world.images, world.captions, world.keys, indices, manifest)
    return TrainingData(dataset=dataset, manifest=manifest, world=world)
