"""End-of-run evaluation: generate for duplicated and other training prompts, measure copying,
alignment and first-steps detection, and write ``summary.json``, ``generations.pt`` and a grid PNG.

:func:`evaluate_model` is shared by the end of training (:func:`evaluate`) and ``memsieve-eval``
(:mod:`evaluation.reeval`), which reuses saved generations and detection when their settings match.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from evaluation.generate import generate
from evaluation.report import flatten, save_grid, write_json
from evaluation.scores import MetricUnavailable, alignment_scores, copy_scores, copy_summary, split_means
from filters.detection import first_steps_magnitudes, seed_set_figures
from filters.mitigation import Mitigation
from filters.sampling import PromptSeeds
from train.loop import TrainResult
from train.summary import training_summary


def choose_prompts(data, num_other: int | None, seed: int) -> tuple[list[int], list[int]]:
    """Base indices of every duplicated pair and of up to ``num_other`` random non-duplicated ones
    (as many as duplicated ones when ``None``)."""
    keys = data.pairs.keys
    dup = [i for i, k in enumerate(keys) if data.manifest.is_duplicated(k)]
    rest = [i for i, k in enumerate(keys) if not data.manifest.is_duplicated(k)]
    count = min(len(dup) if num_other is None else num_other, len(rest))
    picked = np.random.default_rng(seed).choice(len(rest), size=count, replace=False)
    return dup, [rest[i] for i in sorted(picked.tolist())]


def weights_fingerprint(files: list[Path], root: Path) -> str:
    """SHA-256 of the weight files an evaluation ran on (names relative to ``root``, and contents).

    Saved generations and detection are reused only for these very weights: a run resumed or
    extended with ``eval.enabled=false`` rewrites ``model/``, and its earlier generations must not
    be reported as the new model's. Reading the files costs seconds even for SD v1.4 (4 GB).
    """
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """:func:`weights_fingerprint` of a saved model folder (every component's weights)."""
    return weights_fingerprint(list(model_dir.rglob("*.safetensors")), model_dir)


def detection_settings(ec: DictConfig, weights: str) -> dict:
    """Everything detection's result depends on; equal settings let ``memsieve-eval`` reuse it."""
    return {"detection": OmegaConf.to_container(ec.detection, resolve=True), "seed": ec.seed,
            "num_inference_steps": ec.num_inference_steps, "guidance_scale": ec.guidance_scale,
            "weights": weights}


def detect(comps, data, ec: DictConfig) -> dict:
    """First-steps detection of duplicated against other training prompts, in every configured setting.

    Each prompt is scored by its mean magnitude over the first k sampling steps and first n
    generations, from starting noises of its own (:class:`filters.sampling.PromptSeeds`), in
    ``detection.seed_sets`` independent sets of noises; every figure is reported as mean, spread
    and per-set list (:func:`filters.detection.seed_set_figures`). One early-stopped sampling pass
    per seed set serves all settings.
    """
    dc = ec.detection
    dup, other = choose_prompts(data, dc.num_other_prompts, ec.seed + 1)
    labels = np.array([1] * len(dup) + [0] * len(other))
    captions = [data.pairs.captions[i] for i in dup + other]
    steps = max(s.steps for s in dc.settings.values())
    generations = max(s.generations for s in dc.settings.values())
    sets = [first_steps_magnitudes(comps, captions, PromptSeeds(ec.seed + k * len(captions), generations),
                                   ec.num_inference_steps, ec.guidance_scale, steps, ec.batch_size)
            for k in range(dc.seed_sets)]
    out = {}
    for name, s in dc.settings.items():
        scores = np.stack([m[:, : s.generations, : s.steps].mean(dim=(1, 2)).numpy() for m in sets])  # [K, P]
        out[name] = {**seed_set_figures(scores, labels, dc.calibration_fpr, dc.fdr, ec.seed),
                     "steps": s.steps, "generations": s.generations,
                     "mean_score_duplicated": float(scores[:, labels == 1].mean()),
                     "mean_score_other": float(scores[:, labels == 0].mean())}
    return out


@dataclass
class Generations:
    """Every generation of an evaluation (uint8 ``[P, S, 3, H, W]``) and what produced it."""

    indices: list[int]
    keys: list[str]
    captions: list[str]
    seeds: list[int]
    duplicated: list[int]
    images: torch.Tensor
    magnitudes: torch.Tensor
    settings: dict

    def save(self, path: Path) -> None:
        torch.save(asdict(self), path)

    @classmethod
    def load(cls, path: Path, pairs) -> Generations:
        """Read ``generations.pt``; files from before settings were recorded get none, so they never match."""
        raw = torch.load(path)
        index = {k: i for i, k in enumerate(pairs.keys)}
        raw.setdefault("indices", [index[k] for k in raw["keys"]])
        raw.setdefault("settings", {})
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})

    def matches(self, indices: list[int], seeds: list[int], settings: dict) -> bool:
        return self.indices == indices and self.seeds == seeds and self.settings == settings


def generation_settings(ec: DictConfig, weights: str) -> dict:
    """What a generation depends on besides prompts and seeds: the weights (:func:`weights_fingerprint`),
    sampling, and inference-time mitigation when set."""
    settings = {"num_inference_steps": ec.num_inference_steps, "guidance_scale": ec.guidance_scale,
                "weights": weights}
    if ec.get("mitigation") and ec.mitigation.get("enabled"):
        settings["mitigation"] = OmegaConf.to_container(ec.mitigation, resolve=True)
    return settings


def make_generations(comps, data, ec: DictConfig, weights: str, progress: bool) -> Generations:
    dup, other = choose_prompts(data, ec.num_other_prompts, ec.seed)
    indices = dup + other
    captions = [data.pairs.captions[i] for i in indices]
    seeds = [ec.seed + j for j in range(ec.num_seeds)]
    images, magnitudes = generate(comps, captions, seeds, ec.num_inference_steps, ec.guidance_scale,
                                  ec.batch_size, progress=progress,
                                  mitigation=Mitigation.from_config(ec.get("mitigation")))
    return Generations(indices, [data.pairs.keys[i] for i in indices], captions, seeds,
                       [1] * len(dup) + [0] * len(other), (images * 255).round().to(torch.uint8), magnitudes,
                       generation_settings(ec, weights))


def reusable(path: Path | None, data, ec: DictConfig, weights: str) -> Generations | None:
    """Saved generations when they are exactly what ``ec`` asks for of these weights, else ``None``."""
    if path is None or not path.exists():
        return None
    gens = Generations.load(path, data.pairs)
    dup, other = choose_prompts(data, ec.num_other_prompts, ec.seed)
    seeds = [ec.seed + j for j in range(ec.num_seeds)]
    return gens if gens.matches(dup + other, seeds, generation_settings(ec, weights)) else None


def say(line: str) -> None:
    print(f"[memsieve-eval] {line}", flush=True)


def measured(name: str, compute, strict: bool) -> tuple[object | None, str | None]:
    """Run one metric: ``(result, None)``, or ``(None, why)`` when it cannot run here, said in one
    line (an error instead when ``strict``)."""
    try:
        return compute(), None
    except MetricUnavailable as err:
        if strict:
            raise FileNotFoundError(str(err)) from None
        say(f"{name} not measured: {err}")
        return None, str(err)


def evaluate_model(comps, data, cfg: DictConfig, out_dir: Path, weights: str, reuse: Path | None = None,
                   previous: dict | None = None, strict: bool = False) -> dict:
    """Evaluate ``comps`` on ``data`` per ``cfg.eval``; write generations and grid to ``out_dir``.

    ``weights`` is the fingerprint of the weights in ``comps`` (:func:`weights_fingerprint`);
    ``reuse`` a ``generations.pt`` to take instead of generating when it matches; ``previous`` a
    summary whose detection is reused when its settings match. Both must come from these weights.
    """
    ec, pairs = cfg.eval, data.pairs
    progress = not os.environ.get("CI") and cfg.logging.progress
    gens = reusable(reuse, data, ec, weights)
    if gens is None:
        gens = make_generations(comps, data, ec, weights, progress)
    else:
        say(f"reusing {len(gens.captions)} x {len(gens.seeds)} generations from {reuse}")
    gens.save(out_dir / "generations.pt")
    refs = pairs.images_at(gens.indices)
    is_dup = torch.tensor(gens.duplicated).bool()
    device = comps.unet.device
    summary = {"prompts": {"duplicated": int(is_dup.sum()), "other": int((~is_dup).sum()), "seeds": gens.seeds}}
    copy, why = measured("copy", lambda: copy_scores(ec["copy"], gens.images, refs, gens.captions, data, device,
                                                     progress), strict)
    summary["copy"] = {"metric": ec["copy"].metric, "unavailable": why} if copy is None else copy_summary(
        copy[0], copy[1], ec["copy"], is_dup, torch.tensor(gens.indices), len(pairs))
    align, why = measured("alignment", lambda: alignment_scores(ec.alignment, gens.images, gens.captions, data,
                                                                device), strict)
    summary["alignment"] = {"metric": ec.alignment.metric, "unavailable": why} if align is None else {
        "metric": ec.alignment.metric, "description": align[1], **split_means(align[0], is_dup)}
    settings = detection_settings(ec, weights)
    if previous and previous.get("detection", {}).get("config") == settings:
        summary["detection"] = previous["detection"]
    else:
        detection = detect(comps, data, ec)
        default = detection[ec.detection.default]
        summary["detection"] = {**{k: default[k] for k in ("auc", "auc_std", "tpr_at_1pct_fpr",
                                                            "tpr_at_1pct_fpr_std", "seed_sets")},
                                "default": ec.detection.default, "settings": detection, "config": settings}
    k = ec.grid_prompts
    dup_count = int(is_dup.sum())
    rows = [(("DUP " if gens.duplicated[p] else "") + gens.captions[p], refs[p].float() / 255,
             gens.images[p].float() / 255)
            for p in [*range(min(k, dup_count)), *range(dup_count, dup_count + min(k, len(gens.captions) - dup_count))]]
    save_grid(out_dir / "grid.png", rows)
    return summary


def evaluate(result: TrainResult, cfg: DictConfig) -> dict | None:
    """Evaluate on the main process (others return ``None``); log to the run's tracker."""
    if not PartialState().is_main_process:
        return None
    run_dir = Path(result.run_dir)
    summary = evaluate_model(result.components, result.data, cfg, run_dir, model_fingerprint(run_dir / "model"))
    summary.update(training_summary(result, cfg))
    write_json(run_dir / "summary.json", summary)
    if cfg.logging.wandb.enabled:
        log_to_tracker(summary, {"eval/grid": run_dir / "grid.png"})
    return summary


def log_to_tracker(summary: dict, images: dict[str, Path]) -> None:
    """Put the summary and figures into the active W&B run, if any."""
    import wandb

    if wandb.run is None:
        return
    flat = {f"eval/{k}": v for k, v in flatten(summary).items() if isinstance(v, (int, float))}
    wandb.run.summary.update(flat)
    wandb.log({**flat, **{name: wandb.Image(str(path)) for name, path in images.items()}})
