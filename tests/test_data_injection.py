"""Duplicate injection at scale: materialized sets counted in one pass over the written shards,
every duplication mode, explicit count lists, and the weighted stream's frequencies."""

from __future__ import annotations

import collections
import hashlib
import json
import math

import pytest
import torch
import webdataset as wds

from data.build import materialize
from data.dataset import build_data
from data.sampler import DrawSampler
from data.samples import world, write_folder
from tests.conftest import compose_train, python_cli, run_cli


def build_cfg(source, output, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("configs", version_base="1.3"):
        return compose("build", overrides=["data=folder", f"data.path={source}", "data.resolution=16",
                                           f"output={output}", "shard_size=7", *overrides])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    w = world(30, 24, seed=7)
    return w, write_folder(w, tmp_path_factory.mktemp("src") / "folder")


def written(output):
    """One pass over the written shards with webdataset's own reader: (json, txt, image sha) per sample."""
    urls = sorted(str(p) for p in output.glob("*.tar"))
    out = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        image = next(v for k, v in sample.items() if k in ("jpg", "png"))
        out.append((json.loads(sample["json"]), sample["txt"].decode(), hashlib.sha1(image).hexdigest()))
    return out


def test_materialized_counts_exact_in_one_pass(folder, tmp_path):
    w, src = folder
    out = tmp_path / "dup"
    run_cli(python_cli("data.cli", "build", "data=folder", f"data.path={src}", "data.resolution=16", f"output={out}",
             "data.num_pairs=25", "data.duplication.num_duplicated=4", "data.duplication.copies=[3,9]",
             "shard_size=7"), cwd=tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    samples = written(out)
    counts = collections.Counter(meta["key"] for meta, _, _ in samples)
    assert len(counts) == 25 and set(counts) <= set(w.keys)
    assert sorted(manifest["counts"].values()) == [3, 3, 9, 9]
    for key, n in counts.items():
        assert n == manifest["counts"].get(key, 1)
    assert len(samples) == manifest["num_total"] == 25 + 2 * 2 + 2 * 8
    assert len(list(out.glob("*.tar"))) == math.ceil(len(samples) / 7)
    # Exact copies: one image and one caption per key.
    for key in manifest["counts"]:
        assert len({(txt, sha) for meta, txt, sha in samples if meta["key"] == key}) == 1
    # Training on the written set counts the same duplicates from the data itself.
    cfg = compose_train(["data=webdataset", f"data.urls={out}", "data.resolution=16", "run_dir=unused"])
    data = build_data(cfg.data)
    assert data.manifest.counts == manifest["counts"] and len(data.dataset) == manifest["num_total"]
    keys = [data.dataset[(i, (0,))]["key"] for i in range(len(data.dataset))]
    assert collections.Counter(keys) == counts


@pytest.mark.parametrize("mode", ["image_only", "caption_only"])
def test_modes_vary_the_other_half(folder, tmp_path, mode):
    w, src = folder
    manifest = materialize(build_cfg(src, tmp_path / mode, "data.duplication.num_duplicated=3",
                                     "data.duplication.copies=4", f"data.duplication.mode={mode}"))
    samples = written(tmp_path / mode)
    for key, count in manifest.counts.items():
        mine = [(txt, sha) for meta, txt, sha in samples if meta["key"] == key]
        assert len(mine) == count == 4
        captions, images = {t for t, _ in mine}, {s for _, s in mine}
        if mode == "image_only":  # one image, a different caption per repeat
            assert len(images) == 1 and len(captions) == 4
            assert manifest.caption_source
        else:  # one caption, another pair's image per repeat
            assert len(captions) == 1 and len(images) == 4
    cfg = compose_train(["data=webdataset", f"data.urls={tmp_path / mode}", "data.resolution=16", "run_dir=unused"])
    data = build_data(cfg.data)
    assert data.manifest.mode == mode and data.manifest.counts == manifest.counts
    # The base pair's image is its original, not a caption-only repeat's borrowed one.
    original = {k: i for i, k in enumerate(w.keys)}
    ref = torch.nn.functional.interpolate(w.images.float(), size=16, mode="area")
    got = data.pairs.images_at(list(range(len(data.pairs)))).float()
    assert (got - ref[[original[k] for k in data.pairs.keys]]).abs().mean() < 12


def test_counts_from_a_list(folder, tmp_path):
    w, src = folder
    wanted = {w.keys[2]: 5, w.keys[11]: 2}
    (tmp_path / "counts.json").write_text(json.dumps(wanted))
    manifest = materialize(build_cfg(src, tmp_path / "out", f"data.duplication.counts={tmp_path / 'counts.json'}"))
    assert manifest.counts == wanted
    counts = collections.Counter(meta["key"] for meta, _, _ in written(tmp_path / "out"))
    assert all(counts[k] == wanted.get(k, 1) for k in w.keys)


@pytest.mark.parametrize("mode", ["image_only", "caption_only"])
def test_modes_on_the_fly(folder, mode):
    """The same modes without writing anything: the plan's repeats differ in caption or in image."""
    _, src = folder
    cfg = compose_train(["data=folder", f"data.path={src}", "data.resolution=16", "data.duplication.num_duplicated=2",
                         "data.duplication.copies=3", f"data.duplication.mode={mode}", "run_dir=unused"])
    data = build_data(cfg.data)
    assert len(data.dataset) == 30 + 2 * 2
    for key in data.manifest.counts:
        items = [data.dataset[(i, (0,))] for i in range(len(data.dataset))]
        mine = [it for it in items if it["key"] == key]
        assert len(mine) == 3 and all(it["duplicated"] for it in mine)
        captions = {it["caption"] for it in mine}
        images = {it["pixel_values"].numpy().tobytes() for it in mine}
        assert (len(images), len(captions)) == ((1, 3) if mode == "image_only" else (3, 1))


def test_weighted_sampling_frequency(folder):
    """On the fly: 10% of pairs drawn with weight 8 (copies nothing). Expected share of draws per chosen
    pair w / (N - n + n w); each observed count must lie within 5 binomial standard deviations."""
    _, src = folder
    cfg = compose_train(["data=folder", f"data.path={src}", "data.resolution=16", "+data.weighted.fraction=0.1",
                         "+data.weighted.weight=8", "run_dir=unused"])
    data = build_data(cfg.data)
    assert len(data.dataset) == 30 and data.manifest.sampling == "weighted" and len(data.manifest.counts) == 3
    sampler = DrawSampler(len(data.dataset), 16, seed=3, rank=0, world=2, weights=data.weights)
    steps = 250
    drawn = collections.Counter()
    for step in range(steps):
        drawn.update(sampler.batch(step))
    total = steps * 16
    chosen = [i for i, k in enumerate(data.pairs.keys) if data.manifest.is_duplicated(k)]
    p = 8 / (27 + 3 * 8)
    sd = math.sqrt(total * p * (1 - p))
    for i in chosen:
        assert abs(drawn[i] - total * p) < 5 * sd, (drawn[i], total * p)
    rest = sum(v for i, v in drawn.items() if i not in chosen) / 27
    assert 5 < sum(drawn[i] for i in chosen) / 3 / rest < 12  # about 8 times as often as a plain pair


def test_weighted_sampling_needs_fraction_and_weight(folder):
    _, src = folder
    cfg = compose_train(["data=folder", f"data.path={src}", "data.resolution=16", "+data.weighted.fraction=0.1",
                         "run_dir=unused"])
    with pytest.raises(ValueError, match=r"data.weighted needs exactly fraction and weight, got \['fraction'\]"):
        build_data(cfg.data)
