"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) from a TorchScript file.

Two preprocessings (``eval.copy.sscd.preprocess``):

- ``paper`` (default): what both papers' evaluation code does (Wen et al.'s ``inference_mem.py``,
  DCR's ``diff_retrieval.py``): shorter side resized to 256 (bilinear, antialiased), centre crop
  224 x 224, scaled to [0, 1], normalised with mean 0.5 and std 0.5. Absolute similarities and
  the 0.5 copy threshold are comparable to the papers' only with this.
- ``skew_320``: the SSCD authors' README: the whole image resized to a square ``size`` x ``size``
  (aspect ratio not kept, nothing cropped away), normalised with the ImageNet mean and std.

Descriptors are L2-normalised, so the dot product of two is their cosine similarity. Both
papers run ``sscd_disc_large`` (ResNeXt101, 1024-d: DCR's ``--arch resnet50_disc``);
``sscd_disc_mixup`` (ResNet50, 512-d) is the SSCD authors' default.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSINGS = ("paper", "skew_320")
PAPER_RESIZE, PAPER_CROP = 256, 224


class SSCD:
    """A TorchScript SSCD model loaded once; :meth:`embed` batches any number of images."""

    def __init__(self, weights: str | Path, size: int = 320, batch_size: int = 64, device: str | torch.device = "cpu",
                 preprocess: str = "paper"):
        if preprocess not in PREPROCESSINGS:
            raise ValueError(f"eval.copy.sscd.preprocess={preprocess!r}; expected one of {PREPROCESSINGS}")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SSCD weights not found at {path}; set eval.copy.sscd.weights to a "
                                    f"TorchScript file such as sscd_disc_large.torchscript.pt")
        self.path, self.size, self.batch_size, self.device = path, size, batch_size, torch.device(device)
        self.kind = preprocess
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is the format SSCD ships
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        stat = path.stat()
        # Identifies the descriptors in feature caches: the weights file and the preprocessing.
        shape = size if preprocess == "skew_320" else preprocess
        self.identity = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{shape}".encode()
                                       ).hexdigest()[:16]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` (or float in [0, 1]) to the model's normalised square input."""
        x = (images.float() / 255 if images.dtype == torch.uint8 else images.float()).to(self.device)
        if self.kind == "paper":
            return (paper_crop(x) - 0.5) / 0.5
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised descriptors ``[N, D]`` (float32, on the CPU)."""
        out = [F.normalize(self.model(self.preprocess(images[i:i + self.batch_size])).float(), dim=1).cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)


def paper_crop(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``Resize(256)`` then ``CenterCrop(224)`` on float images ``[N, 3, H, W]``, in torch ops
    (torchvision is not a dependency): the shorter side to 256, the longer scaled and truncated as
    torchvision does, bilinear with antialiasing, then the centre 224 x 224 (offsets rounded)."""
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(PAPER_RESIZE * long / short)
    size = (PAPER_RESIZE, new_long) if h <= w else (new_long, PAPER_RESIZE)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = round((size[0] - PAPER_CROP) / 2), round((size[1] - PAPER_CROP) / 2)
    return x[..., top:top + PAPER_CROP, left:left + PAPER_CROP]
