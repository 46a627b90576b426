"""Image bytes to training pixels: validate, convert to RGB, resize, crop, flip.

Every real source goes through here, so grayscale, palette, alpha and CMYK files, and bad
files, are handled the same way whatever they came from. Validation only reads what it needs
(the header for the size, a full decode for corruption) and says why a file is unusable, so
sources can skip it and count it by reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# Pillow's own decompression-bomb limit would raise before our size check can name the reason.
Image.MAX_IMAGE_PIXELS = None
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class ImageSpec:
    """How images become training pixels, and which ones are too small or too large to use."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    min_size: int = 8
    max_pixels: int = 100_000_000

    @classmethod
    def from_config(cls, cfg) -> ImageSpec:
        spec = cls(int(cfg.resolution), bool(cfg.center_crop), bool(cfg.random_flip),
                   int(cfg.get("min_size", 8)), int(cfg.get("max_pixels", 100_000_000)))
        if spec.resolution < 8:
            raise ValueError(f"data.resolution={spec.resolution} is too small; expected >= 8")
        return spec


def open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def check_image(data: bytes | None, spec: ImageSpec) -> str | None:
    """Why these bytes cannot be a training image (``empty``, ``corrupt``, ``too_small``,
    ``too_large``), or ``None`` when they can."""
    if not data:
        return "empty"
    try:
        with open_image(data) as img:
            width, height = img.size
            if min(width, height) < spec.min_size:
                return "too_small"
            if width * height > spec.max_pixels:
                return "too_large"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # truncated-file and EXIF warnings: the decode below decides
                img.draft("RGB", (spec.resolution, spec.resolution))  # JPEG decodes at reduced scale: cheap
                img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "corrupt"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB whatever the mode: alpha is composited on white (transparent LAION logos stay visible),
    palette, grayscale and CMYK are converted."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def transform(img: Image.Image, spec: ImageSpec, rng: np.random.Generator | None = None) -> torch.Tensor:
    """uint8 ``[3, R, R]``: shorter side resized to R (bicubic), centre or random crop, optional flip.

    ``rng`` decides the random crop and flip; it is seeded per draw by the caller, so a resumed
    run crops exactly as an uninterrupted one.
    """
    r = spec.resolution
    img.draft("RGB", (r, r))
    img = to_rgb(img)
    w, h = img.size
    scale = r / min(w, h)
    size = (max(r, round(w * scale)), max(r, round(h * scale)))
    img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
    rng = rng if rng is not None else np.random.default_rng(0)
    if spec.center_crop:
        left, top = (size[0] - r) // 2, (size[1] - r) // 2
    else:
        left, top = int(rng.integers(0, size[0] - r + 1)), int(rng.integers(0, size[1] - r + 1))
    img = img.crop((left, top, left + r, top + r))
    if spec.random_flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode(data: bytes, spec: ImageSpec, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Bytes of a validated image to uint8 ``[3, R, R]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(open_image(data), spec, rng)
