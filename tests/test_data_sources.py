"""Real sources end to end: genuine img2dataset shards served over HTTP, imagefolder and plain
folders, images in every PIL mode, and per-draw reproducibility of crops and captions."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import build_data
from data.images import ImageSpec, decode
from data.samples import encode, world, write_folder, write_imagefolder
from data.world import VOCABULARY
from tests.conftest import ENV, MICRO, compose_train
from train.components import word_tokenizer
from train.loop import train

# MICRO without the embedded world's keys, for 16-pixel real data and the embedded model.
REAL = [o for o in MICRO if not o.startswith("data.")] + ["model.unet.sample_size=16", "data.resolution=16",
                                                          "logging.wandb.enabled=false"]
DUPLICATES = ["data.duplication.num_duplicated=3", "data.duplication.copies=4"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory) -> Path:
    """Shards written by img2dataset itself, downloading world renders from a local HTTP server."""
    root = tmp_path_factory.mktemp("img2dataset")
    www = root / "www"
    www.mkdir()
    w = world(24, 32, seed=3)
    for key, image in zip(w.keys, w.images):
        (www / f"{key}.png").write_bytes(encode(image))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rows = [f"http://127.0.0.1:{server.server_address[1]}/{key}.png,{caption}"
                for key, caption in zip(w.keys, w.captions)]
        (root / "urls.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "img2dataset"), f"--url_list={root / 'urls.csv'}",
             "--input_format=csv", "--url_col=url", "--caption_col=caption", "--output_format=webdataset",
             f"--output_folder={root / 'shards'}", "--processes_count=1", "--thread_count=4",
             "--number_sample_per_shard=8", "--resize_mode=no", "--encode_format=jpg"],
            env={**ENV, "NO_ALBUMENTATIONS_UPDATE": "1"}, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "shards"


def test_img2dataset_shards_train_end_to_end(img2dataset_shards, tmp_path):
    assert sorted(p.name for p in img2dataset_shards.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(list(img2dataset_shards.glob("*.parquet"))) == 3  # img2dataset's own metadata beside each shard
    result = train(compose_train([*REAL, *DUPLICATES, "data=webdataset", f"data.urls={img2dataset_shards}",
                                  "train.steps=2", "eval.enabled=false", f"run_dir={tmp_path}"]), tmp_path)
    assert result.data.skipped == {}
    assert result.counts.seen["duplicated"] + result.counts.seen["other"] == 2 * 8
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_base"] == 24 and manifest["num_total"] == 24 + 3 * 3
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]


@pytest.mark.parametrize("source", ["imagefolder", "folder"])
def test_folder_sources_train(source, tmp_path):
    """Mixed RGB/L/P/RGBA/CMYK files in diffusers' imagefolder layout and as plain image+.txt pairs."""
    w = world(20, 24, seed=5)
    root = (write_imagefolder if source == "imagefolder" else write_folder)(w, tmp_path / "src")
    cfg = compose_train([*REAL, *DUPLICATES, f"data={source}", f"data.path={root}", "train.steps=2",
                         "eval.enabled=false", f"run_dir={tmp_path / 'run'}"])
    result = train(cfg, tmp_path / "run")
    assert sorted(result.data.pairs.keys) == sorted(w.keys)
    assert result.counts.seen["duplicated"] + result.counts.seen["other"] == 2 * 8
    assert (tmp_path / "run" / "model" / "unet").is_dir()
    # Every mode decodes to the world's pixels (JPEG and palette quantization aside).
    position = {k: i for i, k in enumerate(w.keys)}
    reference = torch.nn.functional.interpolate(w.images.float(), size=16, mode="area")
    got = result.data.pairs.images_at(list(range(len(w.keys)))).float()
    want = reference[[position[k] for k in result.data.pairs.keys]]
    assert (got - want).abs().mean() < 12


def test_imagefolder_without_metadata_is_named_before_datasets_walks_it(tmp_path):
    w = world(4, 24, seed=5)
    root = write_folder(w, tmp_path / "src")  # images and .txt captions: no metadata.jsonl
    cfg = compose_train(["data=imagefolder", f"data.path={root}", "run_dir=unused"])
    with pytest.raises(FileNotFoundError, match=rf"^data.path={root} has no metadata.jsonl .*data=folder reads"):
        build_data(cfg.data)


def test_modes_convert_to_rgb():
    spec = ImageSpec(resolution=8)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent: composited on white
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    grey = Image.new("L", (8, 8), 90)
    palette = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P", palette=Image.ADAPTIVE)
    for img, fmt in ((rgba, "PNG"), (cmyk, "JPEG"), (grey, "PNG"), (palette, "PNG")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out = decode(buf.getvalue(), spec)
        assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
        if img is rgba:
            assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 4, 4].tolist() == [255, 0, 0]
        if img is cmyk:
            assert out[0].float().mean() > 240 and out[1:].float().mean() < 15
        if img is grey:
            assert out.float().std(dim=0).max() == 0 and out[0, 0, 0] == 90
        if img is palette:
            assert out[:, 3, 3].tolist() == [0, 0, 255]


def test_random_crops_and_captions_replay_on_resume(tmp_path):
    w = world(16, 24, seed=2)
    root = write_folder(w, tmp_path / "src", mixed=False)
    cfg = compose_train([*REAL, "data=folder", f"data.path={root}", "data.center_crop=false",
                         "data.random_flip=true", "data.captions.augmentation=rta", "data.captions.probability=1",
                         "run_dir=unused"])
    # The papers' RTA draws the model's token ids: the embedded model's word tokenizer plays CLIP's.
    data = build_data(cfg.data, word_tokenizer(list(VOCABULARY), cfg.model.text_encoder.max_length))
    fresh = data.batches(4, seed=1, rank=0, world_size=1)
    first = [next(fresh) for _ in range(5)]
    resumed = data.batches(4, seed=1, rank=0, world_size=1, start_micro_step=3)
    for want in first[3:]:
        got = next(resumed)
        assert torch.equal(got["pixel_values"], want["pixel_values"]) and got["caption"] == want["caption"]
    # RTA really added words: two more than the source caption.
    source = dict(zip(w.keys, w.captions))
    assert all(len(c.split()) == len(source[k].split()) + 2 for c, k in zip(first[0]["caption"], first[0]["key"]))
    assert not np.array_equal(first[0]["pixel_values"].numpy(), first[1]["pixel_values"].numpy())


def test_parquet_table_through_datasets(tmp_path):
    """data=hf with datasets' parquet builder: images as bytes in a column, captions in another."""
    import datasets

    w = world(12, 24, seed=4)
    table = datasets.Dataset.from_dict({"image": [{"bytes": encode(im), "path": None} for im in w.images],
                                        "caption": w.captions, "key": w.keys},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "caption": datasets.Value("string"),
                                                                   "key": datasets.Value("string")}))
    table.to_parquet(str(tmp_path / "part-0.parquet"))
    cfg = compose_train(["data=hf", "data.name=parquet", f"data.data_files=[{tmp_path / 'part-0.parquet'}]",
                         "data.caption_column=caption", "data.resolution=16", *DUPLICATES, "run_dir=unused"])
    data = build_data(cfg.data)
    assert data.pairs.keys == w.keys and data.pairs.captions == w.captions and len(data.dataset) == 12 + 9
    batch = next(data.batches(4, seed=0, rank=0, world_size=1, num_workers=1))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    bad = compose_train(["data=hf", "data.name=parquet", f"data.data_files=[{tmp_path / 'part-0.parquet'}]",
                         "run_dir=unused"])
    with pytest.raises(ValueError, match="has no column 'text'"):
        build_data(bad.data)
