"""Caption-side baselines that the memorization papers compare against, as data options.

Somepalli et al. (2023) mitigate copying by randomizing captions at training time; Wen et al.
(2024) compare their filter with the strongest of these (random token addition, RTA). All are
applied per draw with an RNG seeded by the draw, so resumed runs see the same captions. The
papers' versions (DCR's ``randwordadd``, ``randrepl``, ``wordrepeat``) draw random token ids of
the model's tokenizer (ids < 49,400 for CLIP, special tokens left out; the embedded model's word
tokenizer plays CLIP's) and decode them:

- ``rta``: insert ``num_tokens`` random decoded tokens, each at a random word position;
- ``replace``: replace the caption with ``replace_tokens`` (4) random tokens, decoded together;
- ``repeat``: repeat ``num_tokens`` random words of the caption at random positions;
- ``rta_words``: ``rta`` with words of the source's own caption vocabulary instead of tokens;
- ``replace_caption``: replace the caption with a random pair's real caption;
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

AUGMENTATIONS = ("none", "rta", "replace", "repeat", "rta_words", "replace_caption")
TOKEN_AUGMENTATIONS = ("rta", "replace")
CLIP_TOKEN_LIMIT = 49_400  # DCR and Wen et al. draw token ids below this (CLIP's vocabulary is 49,408)


@dataclass(frozen=True)
class CaptionSpec:
    """Mirrors ``data.captions`` in the data configs."""

    augmentation: str = "none"
    probability: float = 0.1
    num_tokens: int = 2
    replace_tokens: int = 4
    multiple: bool = False
    embedding_noise: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> CaptionSpec:
        spec = cls(**dict(cfg)) if cfg is not None else cls()
        if spec.augmentation not in AUGMENTATIONS:
            raise ValueError(f"data.captions.augmentation={spec.augmentation!r}; expected one of {AUGMENTATIONS}")
        if (not 0 <= spec.probability <= 1 or spec.num_tokens < 1 or spec.replace_tokens < 1
                or spec.embedding_noise < 0):
            raise ValueError(f"data.captions needs probability in [0, 1], num_tokens >= 1, replace_tokens >= 1, "
                             f"embedding_noise >= 0; got {spec}")
        return spec


def alternative_source(spec: CaptionSpec) -> str:
    """Where image-only repeats' other captions come from (recorded in the manifest)."""
    return ("the pair's own captions (its 'captions' field) while they last, then its caption with "
            f"{spec.num_tokens} random words of the source's vocabulary added")


def token_ids(tokenizer) -> np.ndarray:
    """The ids random-token baselines draw from: below 49,400 and the tokenizer's size, no special tokens."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(min(CLIP_TOKEN_LIMIT, len(tokenizer))) if i not in special])


class CaptionPolicy:
    """Chooses and perturbs the caption of each draw; ``rta`` and ``replace`` need ``tokenizer`` (the model's)."""

    def __init__(self, spec: CaptionSpec, captions: Sequence[Sequence[str]], tokenizer=None):
        self.spec = spec
        self.main = [c[0] for c in captions]
        self.vocabulary = sorted({w for c in self.main for w in c.split()})
        self.tokenizer = tokenizer
        self.ids = token_ids(tokenizer) if tokenizer is not None and spec.augmentation in TOKEN_AUGMENTATIONS else None

    def random_tokens(self, count: int, rng: np.random.Generator) -> str:
        """``count`` random token ids decoded together (CLIP's BPE joins word pieces as it decodes)."""
        if self.ids is None:
            raise ValueError(f"data.captions.augmentation={self.spec.augmentation} draws token ids of the model's "
                             f"tokenizer; build the data with it (build_data(cfg, tokenizer=...))")
        return self.tokenizer.decode(self.ids[rng.integers(len(self.ids), size=count)].tolist()).strip()

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
            for _ in range(s.num_tokens):
                caption = self.add_words(caption, 1, rng, [self.random_tokens(1, rng)])
            return caption
        if s.augmentation == "replace":
            return self.random_tokens(s.replace_tokens, rng)
        if s.augmentation == "rta_words":
            return self.add_words(caption, s.num_tokens, rng, self.vocabulary)
        if s.augmentation == "replace_caption":
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
