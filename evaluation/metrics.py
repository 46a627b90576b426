"""Weight-free copy and alignment metrics for the embedded world.

Copy similarity is the cosine between mean-centred pixels of a generation and its training
image over the region the caption does not determine (the object's pixels, dilated by one,
are excluded): it is high only when the background, the content a memorizing model has to
copy from one training image, is reproduced. SSCD replaces it for real images.
Alignment is the fraction of the attributes the caption states (colour, shape, size, position,
less any the world leaves unstated) that the world's recognizer finds in the image
(:func:`data.world.recognize_attributes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.world import object_mask, parse_caption, recognize_attributes


def caption_region(caption: str, resolution: int, dilate: int = 1) -> torch.Tensor:
    """Boolean ``[R, R]`` mask of what ``caption`` determines (its object, dilated)."""
    a = parse_caption(caption)
    missing = [name for name in ("shape", "size", "position") if name not in a]
    if missing:
        raise ValueError(f"caption {caption!r} leaves {missing} unstated; the embedded copy metric needs captions "
                         f"that state shape, size and position (data.world.unstated may only hold color)")
    mask = object_mask(a["shape"], a["size"], a["position"], resolution).float()[None, None]
    return F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)[0, 0].bool()


def copy_similarity(generated: torch.Tensor, reference: torch.Tensor, exclude: torch.Tensor | None = None,
                    ) -> torch.Tensor:
    """Centred cosine of ``[B, 3, R, R]`` images against one ``[3, R, R]`` reference."""
    keep = torch.ones(reference.shape[-2:], dtype=torch.bool) if exclude is None else ~exclude
    g = generated[..., keep]  # [B, 3, K]
    r = reference[..., keep]
    g = (g - g.mean(-1, keepdim=True)).flatten(1)
    r = (r - r.mean(-1, keepdim=True)).flatten()
    return F.cosine_similarity(g, r.expand_as(g), dim=1)


def alignment(generated: torch.Tensor, caption: str) -> torch.Tensor:
    """Per image, the fraction of the caption's stated attributes recognized in it."""
    attrs = parse_caption(caption)
    return torch.tensor([sum(recognize_attributes(img, attrs).values()) / len(attrs) for img in generated])
