"""Copy and alignment metrics on real components: a TorchScript SSCD-style descriptor scripted from a
tiny random network, a tiny random CLIP checkpoint in transformers' format, and the chunked
nearest-neighbour search over real training sets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from data.dataset import build_data
from evaluation.scores import MetricUnavailable, alignment_scores, copy_scores
from evaluation.search import cached_features, nearest
from evaluation.sscd import SSCD, paper_crop
from tests.conftest import compose_train
from tests.tiny_sd import write_tokenizer_files


class TinyDescriptor(torch.nn.Module):
    """SSCD's interface at toy size: images in, one L2-normalised descriptor per image out."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=4, stride=4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(torch.tanh(self.conv(x)).flatten(1)), dim=1)


def write_tiny_sscd(path: Path) -> Path:
    """A TorchScript file of a random :class:`TinyDescriptor` (32 x 32 input)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is the format SSCD ships
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyDescriptor().eval()).save(str(path))
    return path


def write_tiny_clip(folder: Path) -> Path:
    """A random CLIP model with its processor (byte-level BPE tokenizer, 32 px images)."""
    write_tokenizer_files(folder / "tokenizer_src")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer_src", model_max_length=77)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")
    return folder / "clip"


@pytest.fixture(scope="module")
def data():
    cfg = compose_train(["run_dir=unused", "data.world.num_pairs=1500", "data.duplication.num_duplicated=5"])
    return build_data(cfg.data)


def eval_cfg(tmp_path: Path, *overrides: str):
    return compose_train(["run_dir=unused", f"eval.copy.cache_dir={tmp_path / 'cache'}", *overrides]).eval


def planted(data, picks: list[int], seeds: int = 2) -> torch.Tensor:
    """Generations ``[P, S, 3, H, W]``: seed 0 is the prompt's exact training image, the rest random."""
    exact = data.pairs.images_at(picks)
    noise = torch.randint(0, 256, (len(picks), seeds - 1, *exact.shape[1:]), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    return torch.cat([exact[:, None], noise], dim=1)


def test_search_finds_a_planted_copy_among_thousands():
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(5000, 64, generator=g), dim=1)
    queries = F.normalize(torch.randn(40, 64, generator=g), dim=1)
    queries[7] = features[3210]  # an exact copy of one training descriptor
    best = nearest(queries, features.half(), chunk_size=333)  # chunks that do not divide the set
    assert best.index[7] == 3210 and best.value[7] == pytest.approx(1.0, abs=1e-3)
    brute = (queries @ features.T).max(dim=1)
    assert torch.equal(best.index, brute.indices)
    assert torch.allclose(best.value, brute.values, atol=2e-3)


def test_embedded_copy_search_finds_the_copied_training_image(data, tmp_path):
    picks = [17, 1203, 640]
    ec = eval_cfg(tmp_path, "eval.copy.chunk_size=256")
    scored, _ = copy_scores(ec["copy"], planted(data, picks), data.pairs.images_at(picks),
                            [data.pairs.captions[i] for i in picks], data, "cpu")
    assert torch.allclose(scored.own[:, 0], torch.ones(3), atol=1e-5)
    assert scored.nearest_index[:, 0].tolist() == picks
    assert (scored.nearest >= scored.own - 1e-5).all()  # the own image is one of those searched


def test_sscd_path_scores_copies_and_caches_training_features(data, tmp_path):
    weights = write_tiny_sscd(tmp_path / "tiny_sscd.torchscript.pt")
    picks = [5, 999, 1400]
    ec = eval_cfg(tmp_path, "eval.copy.metric=sscd", f"eval.copy.sscd.weights={weights}", "eval.copy.sscd.size=32",
                  "eval.copy.sscd.preprocess=skew_320",
                  "eval.copy.chunk_size=500")
    scored, description = copy_scores(ec["copy"], planted(data, picks), data.pairs.images_at(picks),
                                      [data.pairs.captions[i] for i in picks], data, "cpu")
    assert "SSCD" in description
    assert torch.allclose(scored.own[:, 0], torch.ones(3), atol=1e-5)
    assert scored.nearest_index[:, 0].tolist() == picks
    cached = list((tmp_path / "cache").glob("sscd-*.pt"))
    assert len(cached) == 1
    model = SSCD(weights, size=32, preprocess="skew_320")
    features = torch.load(cached[0])
    assert features.shape == (len(data.pairs), 64)
    assert torch.allclose(features[:10].float(), model.embed(data.pairs.images_at(list(range(10)))), atol=1e-3)

    def must_not_run(_images):
        raise AssertionError("the cached features were recomputed")

    again = cached_features(data.pairs, must_not_run, f"sscd-{model.identity}", tmp_path / "cache", 500)
    assert torch.equal(again, features)


def test_missing_weights_are_reported_not_faked(data, tmp_path):
    picks = [1, 2]
    args = (planted(data, picks), data.pairs.images_at(picks), [data.pairs.captions[i] for i in picks], data, "cpu")
    for overrides, expected in ((["eval.copy.metric=sscd"], "needs eval.copy.sscd.weights"),
                                (["eval.copy.metric=sscd", f"eval.copy.sscd.weights={tmp_path / 'no.pt'}"],
                                 f"SSCD weights not found at {tmp_path / 'no.pt'}")):
        with pytest.raises(MetricUnavailable, match=expected):
            copy_scores(eval_cfg(tmp_path, *overrides)["copy"], *args)
    with pytest.raises(MetricUnavailable, match="could not be loaded"):
        alignment_scores(eval_cfg(tmp_path, "eval.alignment.metric=clip", f"eval.alignment.clip.model={tmp_path}",
                                  "eval.alignment.clip.local_files_only=true").alignment,
                         args[0], args[2], data, "cpu")
    no_world = OmegaConf.create({"metric": "embedded"})
    with pytest.raises(MetricUnavailable, match="needs the embedded world"):
        alignment_scores(no_world, args[0], args[2], type(data)(data.dataset, data.pairs, data.manifest), "cpu")


def test_clip_score_is_the_models_cosine_in_batches(data, tmp_path):
    folder = write_tiny_clip(tmp_path)
    picks = [3, 4, 5]
    images, captions = planted(data, picks, seeds=3), [data.pairs.captions[i] for i in picks]
    scores = {}
    for batch in (1, 4):
        ac = eval_cfg(tmp_path, "eval.alignment.metric=clip", f"eval.alignment.clip.model={folder}",
                      "eval.alignment.clip.local_files_only=true", f"eval.alignment.clip.batch_size={batch}").alignment
        scores[batch], description = alignment_scores(ac, images, captions, data, "cpu")
    assert scores[1].shape == (3, 3) and "CLIP" in description
    assert torch.allclose(scores[1], scores[4], atol=1e-5)  # batching never changes a score
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = model(**processor(text=[captions[1]], images=[images[1, 2]], return_tensors="pt", padding=True))
        cosine = float(out.logits_per_image[0, 0] / model.logit_scale.exp())
    assert scores[1][1, 2] == pytest.approx(cosine, abs=1e-5)


def test_sscd_paper_preprocessing_is_torchvisions_resize_and_center_crop():
    """Both papers' Resize(256), CenterCrop(224), Normalize(0.5, 0.5), checked against PIL (torchvision's backend)."""
    from PIL import Image

    images = torch.randint(0, 256, (2, 3, 40, 70), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    got = paper_crop(images.float() / 255) * 255
    assert got.shape == (2, 3, 224, 224)
    for image, ours in zip(images, got):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((int(256 * 70 / 40), 256), Image.BILINEAR)
        left = round((pil.width - 224) / 2)
        ref = torch.from_numpy(np.array(pil.crop((left, 16, left + 224, 240)))).permute(2, 0, 1).float()
        assert (ours - ref).abs().max() <= 1.0 + 1e-3  # PIL rounds to uint8
    with pytest.raises(ValueError, match="eval.copy.sscd.preprocess='crop'; expected one of"):
        SSCD(Path(__file__), preprocess="crop")
