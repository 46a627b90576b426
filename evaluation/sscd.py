"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) from a TorchScript file.

The reference preprocessing (facebookresearch/sscd-copy-detection README, "skew_320"): resize
the whole image to a square ``size`` x ``size`` (aspect ratio not kept, which batches well and
is what copy detection prefers), scale to [0, 1], normalise with the ImageNet mean and std.
Descriptors are L2-normalised, so the dot product of two is their cosine similarity.
``sscd_disc_large`` (ResNeXt101, 1024-d) is what Wen et al. report; ``sscd_disc_mixup``
(ResNet50, 512-d) is the SSCD authors' default and what Somepalli et al. use.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SSCD:
    """A TorchScript SSCD model loaded once; :meth:`embed` batches any number of images."""

    def __init__(self, weights: str | Path, size: int = 320, batch_size: int = 64, device: str | torch.device = "cpu"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SSCD weights not found at {path}; set eval.copy.sscd.weights to a "
                                    f"TorchScript file such as sscd_disc_large.torchscript.pt")
        self.path, self.size, self.batch_size, self.device = path, size, batch_size, torch.device(device)
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is the format SSCD ships
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        stat = path.stat()
        # Identifies the descriptors in feature caches: the weights file and the preprocessing.
        self.identity = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size}".encode()
                                       ).hexdigest()[:16]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` (or float in [0, 1]) to the model's normalised square input."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x.to(self.device), size=(self.size, self.size), mode="bilinear", antialias=True,
                          align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised descriptors ``[N, D]`` (float32, on the CPU)."""
        out = [F.normalize(self.model(self.preprocess(images[i:i + self.batch_size])).float(), dim=1).cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)
