"""Caption-side baselines: each option changes captions (or text embeddings) as the papers describe,
reproducibly per draw."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from data.captions import CaptionPolicy, CaptionSpec, perturb_text_embeddings

CAPTIONS = [["a red circle top item1", "a crimson disc up high"], ["a blue square left item2"],
            ["a green cross bottom item3"]]


def draws(spec: CaptionSpec, pair: int, n: int = 200) -> list[str]:
    policy = CaptionPolicy(spec, CAPTIONS)
    return [policy.draw(CAPTIONS[pair], 0, 0, np.random.default_rng([7, i])) for i in range(n)]


def test_each_augmentation():
    own = CAPTIONS[1][0]
    vocabulary = {w for c in CAPTIONS for w in c[0].split()}
    rta = draws(CaptionSpec("rta", probability=0.5, num_tokens=3), 1)
    added = [c for c in rta if c != own]
    assert 70 < len(added) < 130  # probability 0.5 of 200 draws
    assert all(len(c.split()) == len(own.split()) + 3 and set(c.split()) <= vocabulary for c in added)
    replaced = draws(CaptionSpec("replace", probability=1.0), 1)
    assert set(replaced) == {c[0] for c in CAPTIONS}  # any pair's caption, its own included
    repeated = draws(CaptionSpec("repeat", probability=1.0, num_tokens=1), 1)
    assert all(sorted(set(c.split())) == sorted(own.split()) and len(c.split()) == len(own.split()) + 1
               for c in repeated)
    multiple = draws(CaptionSpec(multiple=True), 0)
    assert set(multiple) == set(CAPTIONS[0])
    assert draws(CaptionSpec("rta", probability=0.5), 1) == draws(CaptionSpec("rta", probability=0.5), 1)


def test_image_only_alternatives_are_distinct_and_stable():
    policy = CaptionPolicy(CaptionSpec(num_tokens=2), CAPTIONS)
    alts = [policy.alternative(CAPTIONS[2], j, seed=0) for j in range(1, 6)]
    assert len(set(alts)) == 5 and CAPTIONS[2][0] not in alts
    assert alts == [policy.alternative(CAPTIONS[2], j, seed=0) for j in range(1, 6)]
    assert policy.alternative(CAPTIONS[0], 1, seed=0) == CAPTIONS[0][1]  # the pair's own alternative first


def test_embedding_noise_uses_the_step_generator():
    cond = torch.zeros(4, 5, 8)
    off = OmegaConf.create({"captions": {"embedding_noise": 0.0}})
    assert perturb_text_embeddings(cond, off, torch.Generator().manual_seed(1)) is cond
    on = OmegaConf.create({"captions": {"embedding_noise": 0.1}})
    a = perturb_text_embeddings(cond, on, torch.Generator().manual_seed(1))
    b = perturb_text_embeddings(cond, on, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and 0.08 < float(a.std()) < 0.12
