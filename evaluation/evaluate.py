"""End-of-run evaluation: generate for duplicated and other training prompts, measure copying,
alignment and first-steps detection, and write ``summary.json`` plus a grid PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from omegaconf import DictConfig

from evaluation.generate import generate
from evaluation.metrics import alignment, caption_region, copy_similarity
from evaluation.report import flatten, save_grid, write_json
from filters.detection import detection_metrics, first_steps_magnitudes
from filters.mitigation import Mitigation
from train.loop import TrainResult

COPY_RATIO_FLOOR = 0.01


def choose_prompts(result: TrainResult, num_other: int | None, seed: int) -> tuple[list[int], list[int]]:
    """Base indices of every duplicated pair and of up to ``num_other`` random non-duplicated ones
    (as many as duplicated ones when ``None``)."""
    keys = result.data.pairs.keys
    dup = [i for i, k in enumerate(keys) if result.data.manifest.is_duplicated(k)]
    rest = [i for i, k in enumerate(keys) if not result.data.manifest.is_duplicated(k)]
    count = min(len(dup) if num_other is None else num_other, len(rest))
    picked = np.random.default_rng(seed).choice(len(rest), size=count, replace=False)
    return dup, [rest[i] for i in sorted(picked.tolist())]


def detect(result: TrainResult, ec: DictConfig) -> dict:
    """First-steps detection of duplicated against other training prompts, in every configured setting.

    Each prompt is scored by its mean magnitude over the first k sampling steps and first n
    generations; one early-stopped sampling pass serves all settings.
    """
    dc = ec.detection
    dup, other = choose_prompts(result, dc.num_other_prompts, ec.seed + 1)
    labels = np.array([1] * len(dup) + [0] * len(other))
    captions = [result.data.pairs.captions[i] for i in dup + other]
    steps = max(s.steps for s in dc.settings.values())
    generations = max(s.generations for s in dc.settings.values())
    magnitudes = first_steps_magnitudes(result.components, captions, [ec.seed + j for j in range(generations)],
                                        ec.num_inference_steps, ec.guidance_scale, steps, ec.batch_size)
    out = {}
    for name, s in dc.settings.items():
        scores = magnitudes[:, : s.generations, : s.steps].mean(dim=(1, 2)).numpy()
        out[name] = {**detection_metrics(scores, labels), "steps": s.steps, "generations": s.generations,
                     "mean_score_duplicated": float(scores[labels == 1].mean()),
                     "mean_score_other": float(scores[labels == 0].mean()),
                     "prompts": {"duplicated": len(dup), "other": len(other)}}
    return out


def evaluate(result: TrainResult, cfg: DictConfig) -> dict | None:
    """Evaluate on the main process (others return ``None``); log to the run's tracker."""
    if not PartialState().is_main_process:
        return None
    ec, ds, comps = cfg.eval, result.data.pairs, result.components
    dup, other = choose_prompts(result, ec.num_other_prompts, ec.seed)
    indices = dup + other
    labels = np.array([1] * len(dup) + [0] * len(other))
    captions = [ds.captions[i] for i in indices]
    seeds = [ec.seed + j for j in range(ec.num_seeds)]
    images, magnitudes = generate(comps, captions, seeds, ec.num_inference_steps, ec.guidance_scale,
                                  ec.batch_size, progress=not os.environ.get("CI") and cfg.logging.progress,
                                  mitigation=Mitigation.from_config(ec.get("mitigation")))
    refs = ds.images_at(indices).float() / 255
    resolution = refs.shape[-1]
    copy = torch.stack([copy_similarity(images[p], refs[p], caption_region(captions[p], resolution))
                        for p in range(len(indices))])  # [P, S]
    align = torch.stack([alignment(images[p], captions[p]) for p in range(len(indices))])
    detection = detect(result, ec)
    default = detection[ec.detection.default]
    is_dup = torch.from_numpy(labels).bool()
    dropped = result.counts.dropped_fraction()
    summary = {
        "copy": {"duplicated": float(copy[is_dup].mean()), "other": float(copy[~is_dup].mean()),
                 "metric": "centred pixel cosine outside the captioned object"},
        "alignment": {"duplicated": float(align[is_dup].mean()), "other": float(align[~is_dup].mean()),
                      "metric": "fraction of caption attributes recognized"},
        "detection": {"auc": default["auc"], "tpr_at_1pct_fpr": default["tpr_at_1pct_fpr"],
                      "default": ec.detection.default, "settings": detection},
        "filter": {"kind": cfg.filter.kind, "dropped_fraction": dropped,
                   "seen": result.counts.seen, "dropped": result.counts.dropped},
        "timing": {"seconds_per_step": result.seconds_per_step},
        "prompts": {"duplicated": len(dup), "other": len(other), "seeds": seeds},
    }
    # Other prompts' copy similarity sits near 0 (either sign); the floor keeps the ratio finite and honest.
    summary["copy"]["ratio"] = summary["copy"]["duplicated"] / max(summary["copy"]["other"], COPY_RATIO_FLOOR)
    run_dir = Path(result.run_dir)
    write_json(run_dir / "summary.json", summary)
    torch.save({"captions": captions, "keys": [ds.keys[i] for i in indices], "seeds": seeds,
                "duplicated": labels.tolist(), "images": (images * 255).round().to(torch.uint8),
                "magnitudes": magnitudes}, run_dir / "generations.pt")
    k = ec.grid_prompts
    rows = [(("DUP " if labels[p] else "") + captions[p], refs[p], images[p])
            for p in [*range(min(k, len(dup))), *range(len(dup), len(dup) + min(k, len(other)))]]
    grid = save_grid(run_dir / "grid.png", rows)
    if cfg.logging.wandb.enabled:
        log_to_tracker(summary, {"eval/grid": grid})
    return summary


def log_to_tracker(summary: dict, images: dict[str, Path]) -> None:
    """Put the summary and figures into the active W&B run, if any."""
    import wandb

    if wandb.run is None:
        return
    flat = {f"eval/{k}": v for k, v in flatten(summary).items() if isinstance(v, (int, float))}
    wandb.run.summary.update(flat)
    wandb.log({**flat, **{name: wandb.Image(str(path)) for name, path in images.items()}})
