"""Weight-free copy and alignment metrics for the embedded world.

Copy similarity is the cosine between mean-centred pixels of a generation and its training
image outside the training image's object (its pixels, dilated by one, are excluded): it is high
only when the background, the content no caption states and a memorizing model has to copy from
one training image, is reproduced. SSCD replaces it for real images.
Alignment is the fraction of the attributes the caption states (colour, shape, size, position,
less any the world leaves unstated) that the world's recognizer finds in the image
(:func:`data.world.recognize_attributes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.world import COLORS, object_mask, parse_caption, recognize_attributes

# Squared colour distance under which a pixel is the object's (worlds whose captions leave its place
# unsaid): a background pixel's channels lie within 0.16 of one another, a saturated colour's 1 apart.
OBJECT_TOLERANCE = 0.25


def object_region(caption: str, reference: torch.Tensor, dilate: int = 1) -> torch.Tensor:
    """Boolean ``[R, R]`` mask of the object in a float ``[3, R, R]`` training image, dilated.

    Taken from the caption where it states shape, size and position (exact on lossily stored
    renders too); where the world leaves some unsaid (``data.world.unstated``), read from the
    image's pixels: the object is drawn in a saturated colour no background pixel comes near.
    """
    a = parse_caption(caption)
    if all(name in a for name in ("shape", "size", "position")):
        mask = object_mask(a["shape"], a["size"], a["position"], reference.shape[-1])
    else:
        palette = torch.tensor(list(COLORS.values()), dtype=reference.dtype).view(-1, 3, 1, 1)
        mask = (((reference[None] - palette) ** 2).sum(1) < OBJECT_TOLERANCE).any(0)
    return F.max_pool2d(mask.float()[None, None], 2 * dilate + 1, stride=1, padding=dilate)[0, 0].bool()


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
