"""The embedded world written out as real files, in every layout the real sources read.

Lets the real-data path be tried, tested and benchmarked without downloading anything: the
images are the world's renders (so captions use the embedded model's vocabulary and the
evaluation's recognizer still applies), stored as image files in assorted modes (RGB,
grayscale, palette, RGBA, CMYK) like a scraped set.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image

from data.world import WORLD_MARKER, EmbeddedWorld, WorldConfig, generate_world

# Cycled over samples: the modes (and formats) a LAION scrape mixes.
MODES = (("RGB", "jpg"), ("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg"))


def world(num_pairs: int, resolution: int = 32, seed: int = 0, num_captions: int = 1) -> EmbeddedWorld:
    return generate_world(WorldConfig(num_pairs=num_pairs, resolution=resolution, seed=seed,
                                      num_captions=num_captions))


def encode(image: torch.Tensor, mode: str = "RGB", fmt: str = "png") -> bytes:
    """uint8 ``[3, H, W]`` to file bytes in a PIL ``mode`` and format (``jpg`` at quality 95)."""
    img = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")  # fully opaque: the content survives compositing on white
    elif mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE, colors=256)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpg" else fmt.upper(), **({"quality": 95} if fmt == "jpg" else {}))
    return buf.getvalue()


def mark_as_world(root: Path, w: EmbeddedWorld) -> None:
    """Say beside the files that they are the embedded world's renders (:data:`data.world.WORLD_MARKER`)."""
    (root / WORLD_MARKER).write_text(json.dumps({"pairs": len(w.keys), "resolution": int(w.images.shape[-1])}))


def mode_of(i: int, mixed: bool) -> tuple[str, str]:
    return MODES[i % len(MODES)] if mixed else ("RGB", "png")


def write_folder(w: EmbeddedWorld, root: str | Path, mixed: bool = True) -> Path:
    """``{key}.{ext}`` images with ``{key}.txt`` captions."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, (key, caption) in enumerate(zip(w.keys, w.captions)):
        mode, fmt = mode_of(i, mixed)
        (root / f"{key}.{fmt}").write_bytes(encode(w.images[i], mode, fmt))
        (root / f"{key}.txt").write_text(caption)
    mark_as_world(root, w)
    return root


def write_imagefolder(w: EmbeddedWorld, root: str | Path, mixed: bool = True) -> Path:
    """diffusers' imagefolder convention: images plus ``metadata.jsonl`` (``file_name``, ``text``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (key, caption) in enumerate(zip(w.keys, w.captions)):
        mode, fmt = mode_of(i, mixed)
        (root / f"{key}.{fmt}").write_bytes(encode(w.images[i], mode, fmt))
        lines.append(json.dumps({"file_name": f"{key}.{fmt}", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    mark_as_world(root, w)
    return root


def write_shards(w: EmbeddedWorld, root: str | Path, shard_size: int, mixed: bool = False,
                 start_shard: int = 0) -> list[Path]:
    """img2dataset's webdataset layout: ``%05d.tar`` with ``{key}.jpg/.txt/.json``, numbered from
    ``start_shard`` (large sets are written world by world, as their pixels would not fit in memory)."""
    import webdataset as wds

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=shard_size, verbose=0, start_shard=start_shard) as sink:
        for i, (key, caption) in enumerate(zip(w.keys, w.captions)):
            mode, fmt = mode_of(i, mixed) if mixed else ("RGB", "jpg")
            meta = {"key": key, "caption": caption, **({"captions": w.alternatives[i]} if w.alternatives[i] else {})}
            sink.write({"__key__": key, fmt: encode(w.images[i], mode, fmt), "txt": caption, "json": meta})
    mark_as_world(root, w)
    return sorted(root.glob("*.tar"))
