"""Caption-side baselines: each option changes captions (or text embeddings) as the papers describe,
reproducibly per draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.captions import CaptionPolicy, CaptionSpec, perturb_text_embeddings, token_ids
from data.world import VOCABULARY
from tests.conftest import compose_train
from tests.tiny_sd import write_tokenizer_files
from train.components import word_tokenizer

CAPTIONS = [["a red circle top item1", "a crimson disc up high"], ["a blue square left item2"],
            ["a green cross bottom item3"]]


def draws(spec: CaptionSpec, pair: int, n: int = 200, tokenizer=None) -> list[str]:
    policy = CaptionPolicy(spec, CAPTIONS, tokenizer)
    return [policy.draw(CAPTIONS[pair], 0, 0, np.random.default_rng([7, i])) for i in range(n)]


def test_each_augmentation():
    own = CAPTIONS[1][0]
    vocabulary = {w for c in CAPTIONS for w in c[0].split()}
    rta = draws(CaptionSpec("rta_words", probability=0.5, num_tokens=3), 1)
    added = [c for c in rta if c != own]
    assert 70 < len(added) < 130  # probability 0.5 of 200 draws
    assert all(len(c.split()) == len(own.split()) + 3 and set(c.split()) <= vocabulary for c in added)
    replaced = draws(CaptionSpec("replace_caption", probability=1.0), 1)
    assert set(replaced) == {c[0] for c in CAPTIONS}  # any pair's caption, its own included
    repeated = draws(CaptionSpec("repeat", probability=1.0, num_tokens=1), 1)
    assert all(sorted(set(c.split())) == sorted(own.split()) and len(c.split()) == len(own.split()) + 1
               for c in repeated)
    multiple = draws(CaptionSpec(multiple=True), 0)
    assert set(multiple) == set(CAPTIONS[0])
    assert draws(CaptionSpec("rta_words", probability=0.5), 1) == draws(CaptionSpec("rta_words", probability=0.5), 1)


def test_papers_token_baselines_draw_from_the_tokenizers_vocabulary(tmp_path):
    """DCR's randwordadd / randrepl: random token ids of the model's tokenizer, decoded; the embedded
    model's word tokenizer plays CLIP's."""
    words = word_tokenizer(list(VOCABULARY), 16)
    tokens = {words.decode([i]) for i in token_ids(words)}
    assert tokens == set(VOCABULARY)  # every word, no start/end/unknown token
    own = CAPTIONS[1][0].split()
    rta = draws(CaptionSpec("rta", probability=1.0, num_tokens=2), 1, tokenizer=words)
    for caption in rta:
        rest = caption.split()
        for word in own:
            rest.remove(word)
        assert len(rest) == 2 and set(rest) <= tokens
    assert len({c for c in rta}) > 150  # tokens and positions vary by draw
    replaced = draws(CaptionSpec("replace", probability=1.0), 1, tokenizer=words)
    assert all(len(c.split()) == 4 and set(c.split()) <= tokens for c in replaced)
    assert replaced == draws(CaptionSpec("replace", probability=1.0), 1, tokenizer=words)  # seeded by the draw
    # CLIP's BPE tokenizer: ids below 49,400 and its size, special tokens never drawn.
    from transformers import CLIPTokenizer

    vocab, merges = write_tokenizer_files(tmp_path / "tok")
    clip = CLIPTokenizer(str(vocab), str(merges))
    ids = token_ids(clip)
    assert ids.max() < min(49_400, len(clip)) and not set(ids) & set(clip.all_special_ids)
    pieces = {clip.decode([int(i)]).strip() for i in ids}
    for caption in draws(CaptionSpec("rta", probability=1.0, num_tokens=1), 1, tokenizer=clip):
        rest = caption.split()
        for word in own:
            rest.remove(word)
        assert len(rest) <= 1 and set(rest) <= pieces and "<|endoftext|>" not in caption
    with pytest.raises(ValueError, match="data.captions.augmentation=replace draws token ids of the model's tokenizer"):
        draws(CaptionSpec("replace", probability=1.0), 1)


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


PAPER_BASELINES = {  # DCR's trainspecial options at their default probability; Wen et al.'s README RTA
    "dcr_rta": ("rta", 0.1, 2, False, 0.0), "dcr_replace": ("replace", 0.1, 2, False, 0.0),
    "dcr_repeat": ("repeat", 0.1, 2, False, 0.0), "dcr_multiple": ("none", 0.1, 2, True, 0.0),
    "dcr_noise": ("none", 0.1, 2, False, 0.1), "wen2024_rta": ("rta", 1.0, 1, False, 0.0),
}


def test_caption_presets_set_each_papers_baseline():
    for name, (augmentation, probability, num_tokens, multiple, noise) in PAPER_BASELINES.items():
        for data in ("embedded", "webdataset"):
            cfg = compose_train([f"captions={name}", f"data={data}", "run_dir=x"])
            spec = CaptionSpec.from_config(cfg.data.captions)
            assert spec == CaptionSpec(augmentation, probability, num_tokens, 4, multiple, noise), name
    assert compose_train(["run_dir=x"]).data.captions.augmentation == "none"  # no preset by default
