"""Copy and alignment scores of generations, with the metric chosen in config.

``eval.copy.metric``: ``embedded`` (weight-free, :mod:`evaluation.metrics`; needs the embedded
world's captions) or ``sscd`` (:mod:`evaluation.sscd`). ``eval.alignment.metric``: ``embedded``
or ``clip`` (:mod:`evaluation.clip_score`). A metric that cannot run (no weights, no embedded
world) raises :class:`MetricUnavailable`; the caller reports it in one line, never a made-up value.

Copying is reported in the field's conventions side by side: similarity to the prompt's own
training image (``duplicated``/``other``, Wen et al.), and over a nearest-neighbour search of
each generation against the whole training set (``nearest``: mean of the max similarity, its
95th percentile and the fraction above a threshold, Somepalli et al.).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from data.world import WORLD_MARKER
from evaluation.metrics import alignment, copy_similarity, object_region
from evaluation.search import RunningMax, cached_features, chunks, nearest

EMBEDDED_COPY = "centred pixel cosine outside the training image's object"
EMBEDDED_ALIGNMENT = "fraction of caption attributes recognized"


class MetricUnavailable(RuntimeError):
    """The configured metric cannot be computed here (weights or world missing)."""


@dataclass
class Scored:
    """Per-generation scores ``[P, S]`` and, for copying, the nearest training image ``[P, S]``."""

    own: torch.Tensor
    nearest: torch.Tensor | None = None
    nearest_index: torch.Tensor | None = None


def embedded_copy(images: torch.Tensor, refs: torch.Tensor, captions: list[str], pairs, chunk_size: int,
                  search: bool) -> Scored:
    """The weight-free copy similarity, to the own image and (optionally) to every training image.

    Each generation is compared outside its own training image's object region; queries sharing
    a region are searched together, one pass over the training set for all regions.
    """
    regions = [object_region(c, ref) for c, ref in zip(captions, refs)]
    own = torch.stack([copy_similarity(images[p], refs[p], regions[p]) for p in range(len(captions))])
    if not search:
        return Scored(own)
    P, S = images.shape[:2]
    groups: dict[bytes, list[int]] = {}
    for p, region in enumerate(regions):
        groups.setdefault(region.numpy().tobytes(), []).append(p)
    queries = {key: centred_unit(images[ps], ~regions[ps[0]]) for key, ps in groups.items()}
    rows = {key: torch.tensor([p * S + s for p in ps for s in range(S)]) for key, ps in groups.items()}
    best = RunningMax(P * S)
    for offset, idx in chunks(len(pairs), chunk_size):
        train = pairs.images_at(idx).float() / 255
        for key, ps in groups.items():
            best.update(queries[key] @ centred_unit(train, ~regions[ps[0]]).T, offset, rows[key])
    return Scored(own, best.value.view(P, S), best.index.view(P, S))


def centred_unit(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[..., 3, R, R]`` images to unit vectors of their per-channel centred kept pixels (as
    :func:`evaluation.metrics.copy_similarity` compares them)."""
    x = images[..., keep]
    x = (x - x.mean(-1, keepdim=True)).flatten(-2).flatten(0, -2)
    return torch.nn.functional.normalize(x, dim=1)


def sscd_copy(cc: DictConfig, images: torch.Tensor, refs: torch.Tensor, pairs, device, progress: bool) -> Scored:
    """SSCD cosine to the own image and, through the cached training-set descriptors, to every one."""
    from evaluation.sscd import SSCD

    if not cc.sscd.weights:
        raise MetricUnavailable("eval.copy.metric=sscd needs eval.copy.sscd.weights (a TorchScript file such as "
                                "sscd_disc_large.torchscript.pt); none given")
    try:
        model = SSCD(cc.sscd.weights, cc.sscd.size, cc.sscd.batch_size, device, cc.sscd.get("preprocess", "paper"))
    except FileNotFoundError as err:
        raise MetricUnavailable(str(err)) from None
    P, S = images.shape[:2]
    gen = model.embed(images.flatten(0, 1))
    own = (gen.view(P, S, -1) * model.embed(refs)[:, None]).sum(-1)
    if not cc.search:
        return Scored(own)
    features = cached_features(pairs, model.embed, f"sscd-{model.identity}", cc.cache_dir, cc.chunk_size, progress)
    best = nearest(gen, features, cc.chunk_size)
    return Scored(own, best.value.view(P, S), best.index.view(P, S))


def copy_scores(cc: DictConfig, images: torch.Tensor, refs: torch.Tensor, captions: list[str], data, device,
                progress: bool = False) -> tuple[Scored, str]:
    """Copy scores of uint8 generations ``[P, S, 3, H, W]`` against their uint8 training images ``[P, 3, H, W]``."""
    if cc.metric == "embedded":
        if not data.embedded_world:
            raise MetricUnavailable("eval.copy.metric=embedded needs the embedded world or files of it (marked by "
                                    f"{WORLD_MARKER} beside them); use eval.copy.metric=sscd with real data")
        return embedded_copy(images.float() / 255, refs.float() / 255, captions, data.pairs, cc.chunk_size,
                             cc.search), EMBEDDED_COPY
    if cc.metric == "sscd":
        return sscd_copy(cc, images, refs, data.pairs, device, progress), \
            f"SSCD cosine ({cc.sscd.weights}, {cc.sscd.get('preprocess', 'paper')} preprocessing)"
    raise ValueError(f"eval.copy.metric={cc.metric!r}; expected 'embedded' or 'sscd'")


def alignment_scores(ac: DictConfig, images: torch.Tensor, captions: list[str], data, device,
                     ) -> tuple[torch.Tensor, str]:
    """Alignment ``[P, S]`` of uint8 generations ``[P, S, 3, H, W]`` with their captions."""
    if ac.metric == "embedded":
        if not data.embedded_world:
            raise MetricUnavailable("eval.alignment.metric=embedded needs the embedded world or files of it (marked "
                                    f"by {WORLD_MARKER} beside them); use eval.alignment.metric=clip with real data")
        floats = images.float() / 255
        return torch.stack([alignment(floats[p], c) for p, c in enumerate(captions)]), EMBEDDED_ALIGNMENT
    if ac.metric == "clip":
        from evaluation.clip_score import ClipScorer

        if not ac.clip.model:
            raise MetricUnavailable("eval.alignment.metric=clip needs eval.alignment.clip.model (a CLIP folder or "
                                    "hub id such as laion/CLIP-ViT-g-14-laion2B-s12B-b42K); none given")
        try:
            scorer = ClipScorer(ac.clip.model, ac.clip.local_files_only, ac.clip.batch_size, device)
        except FileNotFoundError as err:
            raise MetricUnavailable(str(err)) from None
        P, S = images.shape[:2]
        flat = scorer.score(images.flatten(0, 1), [c for c in captions for _ in range(S)])
        return flat.view(P, S), f"CLIP score, cosine ({ac.clip.model})"
    raise ValueError(f"eval.alignment.metric={ac.metric!r}; expected 'embedded' or 'clip'")


def split_means(values: torch.Tensor, is_dup: torch.Tensor) -> dict[str, float]:
    return {"duplicated": float(values[is_dup].mean()), "other": float(values[~is_dup].mean())}


def nearest_stats(values: torch.Tensor, index: torch.Tensor, own_index: torch.Tensor, threshold: float) -> dict:
    """The field's summaries of max similarities over the training set, for one group of prompts."""
    flat = values.flatten()
    return {"mean_max": float(flat.mean()), "p95": float(flat.quantile(0.95)),
            "above_threshold": float((flat > threshold).float().mean()),
            "own_is_nearest": float((index == own_index[:, None]).float().mean())}


def copy_summary(scored: Scored, description: str, cc: DictConfig, is_dup: torch.Tensor, own_index: torch.Tensor,
                 num_train: int) -> dict:
    """``copy`` block of ``summary.json``."""
    out = {"metric": cc.metric, "description": description, **split_means(scored.own, is_dup)}
    if cc.metric == "sscd":
        out["preprocess"] = cc.sscd.get("preprocess", "paper")
    # How much more duplicated prompts copy their training image than other prompts do, on the
    # metric's own scale (0: no more than chance). A ratio of two cosines near 0 has no meaning.
    out["gap"] = out["duplicated"] - out["other"]
    if scored.nearest is not None:
        out["nearest"] = {"threshold": cc.threshold, "training_images": num_train, **{
            name: nearest_stats(scored.nearest[sel], scored.nearest_index[sel], own_index[sel], cc.threshold)
            for name, sel in (("duplicated", is_dup), ("other", ~is_dup))}}
    return out
