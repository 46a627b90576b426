"""Caption-side baselines that the memorization papers compare against, as data options.

Somepalli et al. (2023) mitigate copying by randomizing captions at training time; Wen et al.
(2024) compare their filter with the strongest of these (random token addition, RTA). All are
applied per draw with an RNG seeded by the draw, so resumed runs see the same captions:

- ``rta``: insert ``num_tokens`` random words (from the source's own caption vocabulary, so every
  word is one the tokenizer has seen) at random positions;
- ``replace``: replace the caption with a random other pair's caption;
- ``repeat``: repeat ``num_tokens`` random words of the caption at random positions;
- ``multiple``: each draw takes one of the pair's captions at random (a ``captions`` field);
- ``embedding_noise``: Gaussian noise of this std on the text embeddings (in the loop,
  :func:`perturb_text_embeddings`).

Each augmentation applies to a drawn caption with ``probability``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

AUGMENTATIONS = ("none", "rta", "replace", "repeat")


@dataclass(frozen=True)
class CaptionSpec:
    """Mirrors ``data.captions`` in the data configs."""

    augmentation: str = "none"
    probability: float = 0.1
    num_tokens: int = 2
    multiple: bool = False
    embedding_noise: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> CaptionSpec:
        spec = cls(**dict(cfg)) if cfg is not None else cls()
        if spec.augmentation not in AUGMENTATIONS:
            raise ValueError(f"data.captions.augmentation={spec.augmentation!r}; expected one of {AUGMENTATIONS}")
        if not 0 <= spec.probability <= 1 or spec.num_tokens < 1 or spec.embedding_noise < 0:
            raise ValueError(f"data.captions needs probability in [0, 1], num_tokens >= 1, embedding_noise >= 0; "
                             f"got {spec}")
        return spec


def alternative_source(spec: CaptionSpec) -> str:
    """Where image-only repeats' other captions come from (recorded in the manifest)."""
    return ("the pair's own captions (its 'captions' field) while they last, then its caption with "
            f"{spec.num_tokens} random words of the source's vocabulary added")


class CaptionPolicy:
    """Chooses and perturbs the caption of each draw."""

    def __init__(self, spec: CaptionSpec, captions: Sequence[Sequence[str]]):
        self.spec = spec
        self.main = [c[0] for c in captions]
        self.vocabulary = sorted({w for c in self.main for w in c.split()})

    def add_words(self, caption: str, count: int, rng: np.random.Generator, pool: Sequence[str]) -> str:
        words = caption.split()
        for _ in range(count):
            words.insert(int(rng.integers(0, len(words) + 1)), pool[int(rng.integers(len(pool)))])
        return " ".join(words)

    def alternative(self, captions: Sequence[str], variant: int, seed: int) -> str:
        """The ``variant``-th other caption of a pair, for image-only repeats: the pair's own
        alternatives (its ``captions`` field) while they last, else its caption with
        ``num_tokens`` random words added (seeded by pair and variant, so each repeat keeps its own)."""
        if variant < len(captions):
            return captions[variant]
        rng = np.random.default_rng([seed, variant, len(captions[0]), sum(map(ord, captions[0]))])
        return self.add_words(captions[0], self.spec.num_tokens, rng, self.vocabulary)

    def draw(self, captions: Sequence[str], variant: int, seed: int, rng: np.random.Generator) -> str:
        """The caption a training draw sees."""
        s = self.spec
        if variant:
            caption = self.alternative(captions, variant, seed)
        elif s.multiple and len(captions) > 1:
            caption = captions[int(rng.integers(len(captions)))]
        else:
            caption = captions[0]
        if s.augmentation == "none" or rng.random() >= s.probability:
            return caption
        if s.augmentation == "rta":
            return self.add_words(caption, s.num_tokens, rng, self.vocabulary)
        if s.augmentation == "replace":
            return self.main[int(rng.integers(len(self.main)))]
        return self.add_words(caption, s.num_tokens, rng, caption.split() or self.vocabulary)


def perturb_text_embeddings(cond: torch.Tensor, data_cfg, generator: torch.Generator, rank: int = 0,
                            world: int = 1) -> torch.Tensor:
    """Somepalli et al.'s Gaussian-noise baseline: ``cond + std * N(0, 1)`` (``data.captions.embedding_noise``;
    0 or absent leaves ``cond`` untouched). ``generator`` draws for the whole global batch and rank ``rank``
    takes its slice, so a sample's noise does not depend on how many processes train."""
    captions = data_cfg.get("captions") if hasattr(data_cfg, "get") else None
    std = float(captions.get("embedding_noise", 0.0)) if captions is not None else 0.0
    if not std:
        return cond
    n = cond.shape[0]
    noise = torch.randn((n * world, *cond.shape[1:]), generator=generator, dtype=torch.float32)[rank * n:(rank + 1) * n]
    return cond + std * noise.to(cond.device, cond.dtype)
