"""The embedded world: a procedurally generated image-caption dataset.

Each image is a random low-frequency colour field (content the caption does not determine)
with one object drawn on it whose colour, shape, size and position the caption states. A
prompt that is not memorized therefore has many valid images (any background), while a
memorized one has exactly one: generating its training background is copying. A world may
leave attributes out of its captions (``unstated``, e.g. the colour), as LAION's alt texts leave
most of an image unsaid: then an ordinary caption fixes less of its image, and a memorized one
still fixes all of it.

The same rendering code recognizes objects again (:func:`recognize_attributes`), which gives
a weight-free alignment score: does the image show what the caption says?
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.14, "big": 0.18}  # half-extent as a fraction of the side
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre as a fraction of the side
    "top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
    "left": (0.27, 0.5), "center": (0.5, 0.5), "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS),
}
# The background is a grey level in this band plus a faint tint, so it carries much content
# (what a memorizing model must copy) yet no background pixel passes for a saturated object colour.
BACKGROUND_RANGE = (0.05, 0.95)
BACKGROUND_TINT = 0.08
# Written beside files of the world's renders (data.samples, memsieve-data build keeps it): the
# embedded copy and alignment metrics then apply to them as to the world itself.
WORLD_MARKER = "embedded_world.json"
ID_WORD = "item"
VOCABULARY: tuple[str, ...] = tuple(
    sorted({"a", ID_WORD, *COLORS, *SHAPES, *SIZES, *(w for p in POSITIONS for w in p.split())})
) + tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class WorldConfig:
    """What the generator needs; mirrors ``configs/data/embedded.yaml``'s ``world`` block."""

    num_pairs: int = 2000
    resolution: int = 16
    background_cells: int = 4
    id_digits: int = 4
    seed: int = 0
    num_captions: int = 1  # captions per pair: the main one, then rephrasings (data.captions.multiple)
    unstated: tuple[str, ...] = ()  # attributes drawn in the image but left out of every caption


@dataclass
class EmbeddedWorld:
    """Generated pairs: ``images`` is uint8 ``[N, 3, R, R]``; ``attributes`` feed alignment."""

    images: torch.Tensor
    captions: list[str]
    keys: list[str]
    attributes: list[dict[str, str]]
    alternatives: list[list[str]]  # each pair's other captions (rephrasings), possibly none

    def caption_sets(self) -> list[list[str]]:
        """Per pair: its main caption, then its alternatives."""
        return [[main, *alt] for main, alt in zip(self.captions, self.alternatives)]


# Rephrasings of a caption in the world's own words (a new word would change the tokenizer and the
# model), so a pair has several captions stating the same attributes, as LAION images with several
# alt texts or captioner outputs do. Used as a pair's alternative captions (data.world.num_captions).
REPHRASINGS: tuple[str, ...] = (
    "a {color} {size} {shape} {position} {id}",
    "{id} a {size} {color} {shape} {position}",
    "{position} a {size} {color} {shape} {id}",
    "a {size} {color} {shape} {id} {position}",
    "a {shape} {size} {color} {position} {id}",
)


def stated(attrs: dict[str, str], unstated: tuple[str, ...]) -> dict[str, str]:
    """``attrs`` with the unstated ones as empty words (a template then leaves them out)."""
    return {name: "" if name in unstated else value for name, value in attrs.items()}


def caption_for(attrs: dict[str, str], item_id: str, unstated: tuple[str, ...] = ()) -> str:
    a = stated(attrs, unstated)
    return " ".join(f"a {a['size']} {a['color']} {a['shape']} {a['position']} {ID_WORD}{item_id}".split())


def rephrasings(attrs: dict[str, str], item_id: str, count: int, unstated: tuple[str, ...] = ()) -> list[str]:
    """The first ``count`` of :data:`REPHRASINGS` for one pair."""
    a = stated(attrs, unstated)
    return [" ".join(t.format(**a, id=f"{ID_WORD}{item_id}").split()) for t in REPHRASINGS[:count]]


def object_mask(shape: str, size: str, position: str, resolution: int) -> torch.Tensor:
    """Boolean ``[R, R]`` mask of one object, computed at pixel centres."""
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    cx, cy = POSITIONS[position]
    r = SIZES[size]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    if shape == "triangle":  # apex up, base down
        return (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 2.5
        return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(attrs: dict[str, str], background: torch.Tensor) -> torch.Tensor:
    """Draw the object described by ``attrs`` on a float ``[3, R, R]`` background in [0, 1]."""
    mask = object_mask(attrs["shape"], attrs["size"], attrs["position"], background.shape[-1])
    colour = torch.tensor(COLORS[attrs["color"]]).view(3, 1, 1)
    return torch.where(mask, colour, background)


def generate_world(cfg: WorldConfig) -> EmbeddedWorld:
    """Generate ``cfg.num_pairs`` pairs, identical for identical configs."""
    if cfg.num_pairs < 1 or cfg.resolution < 8:
        raise ValueError(
            f"world needs num_pairs >= 1 and resolution >= 8, got {cfg.num_pairs} and {cfg.resolution}"
        )
    if not 1 <= cfg.num_captions <= 1 + len(REPHRASINGS):
        raise ValueError(f"data.world.num_captions={cfg.num_captions}; expected 1 to {1 + len(REPHRASINGS)} "
                         f"(the main caption and up to {len(REPHRASINGS)} rephrasings)")
    unknown = set(cfg.unstated) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"data.world.unstated has {sorted(unknown)}; expected attributes among {list(ATTRIBUTES)}")
    rng = np.random.default_rng(cfg.seed)
    lo, hi = BACKGROUND_RANGE
    shape = (cfg.num_pairs, 1, cfg.background_cells, cfg.background_cells)
    grey = rng.uniform(lo, hi, size=shape)
    tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=(cfg.num_pairs, 3, *shape[2:]))
    cells = np.clip(grey + tint, 0.0, 1.0)
    backgrounds = F.interpolate(
        torch.from_numpy(cells).float(), size=(cfg.resolution, cfg.resolution), mode="bilinear",
        align_corners=False,
    )
    images, captions, attributes, alternatives = [], [], [], []
    for i in range(cfg.num_pairs):
        attrs = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
        item_id = "".join(str(d) for d in rng.integers(0, 10, size=cfg.id_digits))
        images.append(render(attrs, backgrounds[i]))
        captions.append(caption_for(attrs, item_id, tuple(cfg.unstated)))
        attributes.append(attrs)
        alternatives.append(rephrasings(attrs, item_id, cfg.num_captions - 1, tuple(cfg.unstated)))
    pixels = (torch.stack(images) * 255).round().to(torch.uint8)
    keys = [f"{cfg.seed:04d}-{i:06d}" for i in range(cfg.num_pairs)]
    return EmbeddedWorld(images=pixels, captions=captions, keys=keys, attributes=attributes,
                         alternatives=alternatives)


def parse_caption(caption: str) -> dict[str, str]:
    """Recover the attributes an embedded-world caption states (inverse of :func:`caption_for`).

    Words may come in any order (rephrasings); attributes the world leaves unstated
    (``data.world.unstated``) are absent from the result.
    """
    words = caption.split()
    if len(words) < 2 or "a" not in words:
        raise ValueError(f"not an embedded-world caption: {caption!r}; expected 'a SIZE COLOR SHAPE POSITION itemN'")
    words = [w for w in words if w != "a" and not w.startswith(ID_WORD)]
    attrs: dict[str, str] = {}
    i = 0
    while i < len(words):
        two = " ".join(words[i:i + 2])
        word, width = (two, 2) if two in POSITIONS else (words[i], 1)
        name = next((n for n, values in ATTRIBUTES.items() if word in values), None)
        if name is None or name in attrs:
            raise ValueError(f"caption {caption!r} has {'a second ' + name if name else 'the unknown word'} "
                             f"{word!r}; expected one each of {list(ATTRIBUTES)}")
        attrs[name] = word
        i += width
    return attrs


def recognize_attributes(image: torch.Tensor, attrs: dict[str, str], sharpness: float = 20.0) -> dict[str, bool]:
    """For each stated attribute, whether the stated value explains ``image`` best among all values.

    ``image`` is float ``[3, R, R]`` in [0, 1]. A candidate is scored by the soft IoU between its
    object mask and the map of pixels matching its colour; the stated value must win against
    every alternative with the other stated attributes held at their stated values and the
    unstated ones (absent from ``attrs``) at whichever value explains the image best.
    """
    resolution = image.shape[-1]
    free = [name for name in ATTRIBUTES if name not in attrs]

    def score(cand: dict[str, str]) -> float:
        colour = torch.tensor(COLORS[cand["color"]]).view(3, 1, 1)
        match = torch.exp(-sharpness * ((image - colour) ** 2).sum(0))
        mask = object_mask(cand["shape"], cand["size"], cand["position"], resolution).float()
        return float((match * mask).sum() / (mask.sum() + (match * (1 - mask)).sum() + 1e-6))

    def best_over_free(cand: dict[str, str]) -> float:
        return max(score({**cand, **dict(zip(free, values))}) for values in product(*(ATTRIBUTES[n] for n in free)))

    results = {}
    for name in attrs:
        scores = {value: best_over_free({**attrs, name: value}) for value in ATTRIBUTES[name]}
        results[name] = max(scores, key=scores.get) == attrs[name]
    return results
