"""Bad samples are skipped and counted by reason, the run trains to the end and reports the counts;
a source with nothing usable fails at once with one line naming it."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from data.dataset import build_data
from data.samples import encode, world
from tests.conftest import MICRO, compose_train
from train.app import run

REAL = [o for o in MICRO if not o.startswith("data.")] + ["model.unet.sample_size=16", "data.resolution=16",
                                                          "logging.wandb.enabled=false", "data.max_pixels=2000"]
# Planted per shard: (what, sample) -> the reason it must be counted under.
PLANTED = {
    "corrupt": {"jpg": b"\xff\xd8\xff\xe0 this is no JPEG", "txt": "a red circle center item1"},
    "empty": {"jpg": b"", "txt": "a red circle center item2"},
    "missing_caption": {"jpg": None},
    "too_small": {"png": None, "txt": "a small red circle center item3"},
    "too_large": {"png": None, "txt": "a big red circle center item4"},
    "missing_image": {"txt": "a blue square top item5", "json": {"key": "lost"}},
}


def write_planted(root, shards: int = 2, per_shard: int = 10):
    w = world(shards * per_shard, 24, seed=11)
    tiny_bytes = encode(w.images[0][:, :4, :4])  # 4 < data.min_size=8
    huge_bytes = encode(world(1, 64, seed=1).images[0])  # 64 * 64 = 4096 > data.max_pixels=2000
    root.mkdir()
    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                sink.write({"__key__": w.keys[i], "jpg": encode(w.images[i], fmt="jpg"), "txt": w.captions[i]})
                if i % per_shard == 3:  # planted among good samples
                    for reason, sample in PLANTED.items():
                        sample = dict(sample)
                        if reason == "missing_caption":
                            sample["jpg"] = encode(w.images[i], fmt="jpg")
                        if reason in ("too_small", "too_large"):
                            sample["png"] = tiny_bytes if reason == "too_small" else huge_bytes
                        sink.write({"__key__": f"bad-{reason}-{s}", **sample})
    return shards


def test_planted_corrupt_samples_train_to_the_end(tmp_path):
    shards = write_planted(tmp_path / "shards")
    cfg = compose_train([*REAL, "data=webdataset", f"data.urls={tmp_path / 'shards'}", "train.steps=2",
                         "data.duplication.num_duplicated=2", "data.duplication.copies=3",
                         # the cheapest evaluation that still writes summary.json
                         "eval.num_seeds=1", "eval.num_inference_steps=2", "eval.detection.num_other_prompts=4",
                         "eval.detection.settings.first10_4gen.steps=1",
                         "eval.detection.settings.first10_4gen.generations=1",
                         f"run_dir={tmp_path / 'run'}"])
    summary = run(cfg)
    expected = {reason: shards for reason in PLANTED}
    assert summary["data"]["skipped"] == expected
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]
    assert all(r[f"data/skipped/{reason}"] == shards for r in records for reason in PLANTED)
    assert summary["filter"]["seen"]["duplicated"] + summary["filter"]["seen"]["other"] == 2 * 8


def test_nothing_usable_fails_in_one_line(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": b"garbage", "txt": "x"})
        sink.write({"__key__": "b", "jpg": b"", "txt": "y"})
    cfg = compose_train(["data=webdataset", f"data.urls={root}", "run_dir=unused"])
    with pytest.raises(ValueError) as err:  # the entry points print a ValueError as one line
        build_data(cfg.data)
    assert str(err.value) == (f"data source data.urls='{root}' has no usable image-caption pairs "
                              "(corrupt=1, empty=1)")
