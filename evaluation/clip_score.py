"""CLIP score: cosine between a generation's and its caption's CLIP embeddings.

Any CLIP checkpoint in transformers' format, from a folder or a hub id, loaded once and run in
batches: ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K`` is the ViT-g-14 (LAION-2B) model Wen et al.
score with, ``openai/clip-vit-base-patch16`` the ViT-B/16 of Somepalli et al. The score is the
raw cosine (about 0.3 for a good SD generation), as Wen et al. report it; torchmetrics'
``CLIPScore`` is ``100 * max(cosine, 0)``. Images go through the checkpoint's own processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPModel

from train.model_source import goes_online


class ClipScorer:
    """A CLIP model and its processor, loaded once; :meth:`score` batches any number of pairs."""

    def __init__(self, model: str, local_files_only: bool = False, batch_size: int = 64,
                 device: str | torch.device = "cpu"):
        cache_only = not goes_online(model, local_files_only)
        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=cache_only).eval().to(device)
            self.processor = AutoProcessor.from_pretrained(model, local_files_only=cache_only)
        except OSError as err:  # missing folder, no hub access, or not a CLIP checkpoint
            raise FileNotFoundError(f"CLIP model {model!r} could not be loaded ({str(err).splitlines()[0]}); "
                                    f"set eval.alignment.clip.model to a CLIP folder or hub id") from None
        self.name, self.batch_size, self.device = model, batch_size, torch.device(device)

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Cosine similarity per (uint8 ``[3, H, W]`` image, caption) pair, ``[N]`` on the CPU."""
        out = []
        for i in range(0, len(captions), self.batch_size):
            inputs = self.processor(text=captions[i:i + self.batch_size], images=list(images[i:i + self.batch_size]),
                                    return_tensors="pt", padding=True, truncation=True)
            result = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            image = F.normalize(result.image_embeds.float(), dim=-1)
            out.append((image * F.normalize(result.text_embeds.float(), dim=-1)).sum(-1).cpu())
        return torch.cat(out)
