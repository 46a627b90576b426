"""Materialized duplicate injection: write a source's subset with its duplicates as new shards.

The same plan as on-the-fly injection (:func:`data.injection.expand_plan`): N base pairs kept
once, chosen pairs repeated to their total counts (exact, image-only with another caption per
repeat, or caption-only with another pair's image). Image bytes are copied as they are (no
re-encoding), samples are shuffled by the seed so repeats spread over all shards, and
``manifest.json`` is written beside the shards. Every written sample's metadata holds its pair
``key`` and ``copy`` number (0 for the original), so training on the result counts duplicates
from the data itself.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from data.captions import CaptionPolicy, CaptionSpec, alternative_source
from data.dataset import base_pairs, duplication_counts, source_folder
from data.images import IMAGE_EXTENSIONS, ImageSpec
from data.injection import DuplicationManifest, expand_plan
from data.sources import quiet, scan_source
from data.world import WORLD_MARKER


def image_extension(loc: tuple, data: bytes) -> str:
    """The file extension to store image bytes under: the source's own, else the format's."""
    name = str(loc[-1]) if loc and isinstance(loc[-1], str) else ""
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    if ext in IMAGE_EXTENSIONS:
        return ext
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "png").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def safe_key(key: str) -> str:
    """A tar key webdataset can group by (no dots or slashes); the real key stays in the metadata."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def materialize(cfg: DictConfig) -> DuplicationManifest:
    """Write ``cfg.data``'s duplicated subset to ``cfg.output`` as shards of ``cfg.shard_size`` samples."""
    import webdataset as wds

    data = cfg.data
    if data.get("weighted"):
        raise ValueError("data.weighted copies nothing (it is applied while training); materialize with "
                         "data.duplication.num_duplicated/copies or counts")
    if (data.get("dedup") or {}).get("method", "none") != "none":
        raise ValueError(f"data.dedup.method={data.dedup.method} applies when training (memsieve-train reads any "
                         "source, materialized ones too, and deduplicates it); build with data.dedup.method=none")
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output={out} is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    spec = ImageSpec.from_config(data)
    index = scan_source(data, spec)
    keys, records = base_pairs(index, data.num_pairs)
    seed = int(data.duplication.seed)
    entries, manifest = expand_plan(keys, records, duplication_counts(data, keys), seed,
                                    data.duplication.get("mode", "exact"))
    cspec = CaptionSpec.from_config(data.get("captions"))
    policy = CaptionPolicy(cspec, [index.records[r].captions for r in records])
    if manifest.mode == "image_only":
        manifest.caption_source = alternative_source(cspec)
    copy_of, seen = [], {}
    for entry in entries:
        copy_of.append(seen.get(entry.pair, 0))
        seen[entry.pair] = copy_of[-1] + 1
    order = np.random.default_rng(seed).permutation(len(entries))
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=int(cfg.shard_size), verbose=0) as sink:
        for i in tqdm(order.tolist(), desc="write shards", disable=quiet()):
            entry, copy = entries[i], copy_of[i]
            record = index.records[entry.record]
            text = index.records[entry.text].captions if entry.text >= 0 else record.captions
            caption = policy.alternative(text, entry.variant, seed) if entry.variant else text[0]
            data_bytes = index.reader.read([record.loc])[0]
            meta = {"key": keys[entry.pair], "copy": copy, "source_key": record.key}
            if copy == 0 and len(text) > 1:
                meta["captions"] = text
            sink.write({"__key__": f"{safe_key(keys[entry.pair])}_{copy:05d}",
                        image_extension(record.loc, data_bytes): data_bytes, "txt": caption, "json": meta})
    manifest.save(out / "manifest.json")
    folder = source_folder(data)
    if folder is not None and (folder / WORLD_MARKER).is_file():  # renders stay renders
        shutil.copyfile(folder / WORLD_MARKER, out / WORLD_MARKER)
    (out / "skipped.json").write_text(json.dumps(dict(sorted(index.skipped.items())), indent=1))
    return manifest
