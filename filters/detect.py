"""``memsieve-detect``: flag memorized prompts, explain them by their trigger tokens, mitigate them.

Each prompt's score is its mean magnitude over the first ``detection.steps`` DDIM steps and
``detection.generations`` starting noises (Wen et al.: one step and one generation by
default). Many prompts share each forward and sampling stops after the scored steps
(:func:`filters.detection.first_steps_magnitudes`). Writes to ``out_dir``:

- ``scores.jsonl``: per prompt its set, score, per-generation per-step magnitudes, and ``flagged``
  (with a threshold) and ``mitigated_score`` (with mitigation);
- ``summary.json``: settings, counts, mean scores, timing; with ``nonmemorized`` also AUC, TPR at
  1% FPR, ``roc.png`` and ``threshold.json`` (calibrated for ``detection.calibration_fpr``, the file
  :class:`filters.callback.MemorizationMonitor` and ``threshold=`` read);
- ``triggers.jsonl`` (``triggers.enabled``): per-token significance of every scored prompt;
- ``mitigated/`` (``mitigation.enabled``): each prompt's generations sampled with mitigation.

The last line printed is the path of ``summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from filters.attribution import highlight, token_significance
from filters.detection import (
    DetectionThreshold,
    calibrate_threshold,
    detection_metrics,
    first_steps_magnitudes,
    save_roc,
)
from filters.mitigation import Mitigation
from filters.prompts import read_prompts
from filters.sampling import sample_prompts
from train.components import Components, build_components
from train.overrides import reject_unknown_added_keys

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(cfg: DictConfig) -> Components:
    """The model of ``cfg.run`` (a memsieve run directory) or ``cfg.model``, on the chosen device and dtype."""
    model_cfg = cfg.model
    if cfg.run is not None:
        folder = Path(cfg.run) / "model"
        if not folder.is_dir():
            raise FileNotFoundError(f"run={cfg.run} has no model/ folder; give a finished memsieve run directory")
        model_cfg = OmegaConf.create({"kind": "pretrained", "pretrained": str(folder), "local_files_only": True})
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}; expected one of {', '.join(DTYPES)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return build_components(model_cfg, vocabulary=[]).for_inference(device, DTYPES[cfg.dtype])


def validate(cfg: DictConfig) -> None:
    d = cfg.detection
    if d.steps < 1 or d.steps > d.num_inference_steps:
        raise ValueError(f"detection.steps={d.steps} must lie in [1, num_inference_steps={d.num_inference_steps}]")
    if d.generations < 1 or d.batch_size < 1:
        raise ValueError(f"detection.generations={d.generations} and batch_size={d.batch_size} must be >= 1")
    if d.guidance_scale <= 1:
        raise ValueError(f"detection.guidance_scale={d.guidance_scale} must be > 1 (the magnitude is CFG's difference)")
    m = cfg.mitigation
    if m.enabled and m.target is None and cfg.threshold is None and cfg.nonmemorized is None:
        raise ValueError("mitigation.target=null needs a threshold to use: give mitigation.target=NUMBER, "
                         "threshold=threshold.json or nonmemorized=FILE")


def detect(cfg: DictConfig) -> dict:
    """Score, calibrate, explain and mitigate as configured; write the outputs; return the summary."""
    validate(cfg)
    d, out = cfg.detection, Path(cfg.out_dir)
    prompts = read_prompts(cfg.prompts)
    other = read_prompts(cfg.nonmemorized) if cfg.nonmemorized is not None else []
    given = DetectionThreshold.load(cfg.threshold) if cfg.threshold is not None else None
    out.mkdir(parents=True, exist_ok=True)
    progress = cfg.progress and not os.environ.get("CI")
    comps = load_model(cfg)
    seeds = [cfg.seed + j for j in range(d.generations)]

    start = time.perf_counter()
    magnitudes = first_steps_magnitudes(comps, prompts + other, seeds, d.num_inference_steps, d.guidance_scale,
                                        d.steps, d.batch_size, progress=progress)  # [P, S, k]
    seconds = time.perf_counter() - start
    scores = magnitudes.mean(dim=(1, 2)).numpy()
    summary = {
        "model": cfg.run or cfg.model.get("pretrained"),
        "settings": OmegaConf.to_container(d),
        "prompts": {"file": str(cfg.prompts), "count": len(prompts), "mean_score": float(scores[:len(prompts)].mean())},
        "timing": {"seconds": seconds, "seconds_per_prompt": seconds / len(scores),
                   "device": str(comps.unet.device), "dtype": cfg.dtype},
    }
    records = [{"index": i, "set": "prompts" if i < len(prompts) else "nonmemorized", "prompt": p,
                "score": float(scores[i]), "magnitudes": magnitudes[i].tolist()}
               for i, p in enumerate(prompts + other)]

    threshold = given
    if other:
        labels = np.array([1] * len(prompts) + [0] * len(other))
        summary["nonmemorized"] = {"file": str(cfg.nonmemorized), "count": len(other),
                                   "mean_score": float(scores[len(prompts):].mean())}
        summary["detection"] = detection_metrics(scores, labels)
        save_roc(out / "roc.png", scores, labels, f"first {d.steps} step(s), {d.generations} generation(s)")
        calibrated = DetectionThreshold(calibrate_threshold(scores[len(prompts):], d.calibration_fpr),
                                        d.calibration_fpr, d.steps, d.num_inference_steps, d.guidance_scale,
                                        len(other))
        calibrated.save(out / "threshold.json")
        threshold = threshold or calibrated
    if threshold is not None:
        if (threshold.steps, threshold.num_inference_steps) != (d.steps, d.num_inference_steps) or d.generations != 1:
            print(f"memsieve-detect: note: the threshold was calibrated for the first {threshold.steps} of "
                  f"{threshold.num_inference_steps} steps and one generation; these scores use other settings")
        for r in records:
            r["flagged"] = r["score"] > threshold.threshold
        summary["threshold"] = {"value": threshold.threshold, "fpr": threshold.fpr,
                                "flagged": {"prompts": sum(r["flagged"] for r in records[:len(prompts)]),
                                            "nonmemorized": sum(r["flagged"] for r in records[len(prompts):])}}

    if cfg.triggers.enabled:
        summary["triggers"] = explain(cfg, comps, prompts, seeds, scores[:len(prompts)], out)
    mitigation = Mitigation.from_config(cfg.mitigation, threshold.threshold if threshold else None)
    if mitigation is not None:
        summary["mitigation"] = mitigate(cfg, comps, prompts, seeds, mitigation, records, out)

    with (out / "scores.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def explain(cfg: DictConfig, comps: Components, prompts: list[str], seeds: list[int], scores: np.ndarray,
            out: Path) -> dict:
    """Write every prompt's token significance; print the highest-scoring prompts highlighted."""
    found = token_significance(comps, prompts, seeds, cfg.detection.num_inference_steps, cfg.detection.batch_size)
    with (out / "triggers.jsonl").open("w") as f:
        f.writelines(json.dumps(s.to_json()) + "\n" for s in found)
    for i in np.argsort(-scores)[: cfg.triggers.show]:
        print(f"{scores[i]:8.4f}  {highlight(found[i], cfg.triggers.top_fraction)}")
    return {"file": str(out / "triggers.jsonl"), "prompts": len(found)}


def mitigate(cfg: DictConfig, comps: Components, prompts: list[str], seeds: list[int], mitigation: Mitigation,
             records: list[dict], out: Path) -> dict:
    """Generate every scored prompt with mitigation; save the images; record each mitigated score."""
    from PIL import Image

    d = cfg.detection
    latents, magnitudes = sample_prompts(comps, prompts, seeds, d.num_inference_steps, d.guidance_scale,
                                         d.batch_size, progress=cfg.progress and not os.environ.get("CI"),
                                         mitigation=mitigation)
    folder = out / "mitigated"
    folder.mkdir(exist_ok=True)
    for p in range(len(prompts)):
        records[p]["mitigated_score"] = float(magnitudes[p, :, : d.steps].mean())
        pixels = comps.decode_latents(latents[p])
        for seed, img in zip(seeds, (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()):
            Image.fromarray(img).save(folder / f"{p:05d}_seed{seed}.png")
    scored = [r["mitigated_score"] for r in records[: len(prompts)]]
    return {"target": mitigation.target, "threshold": mitigation.threshold, "mean_score": float(np.mean(scored)),
            "images": str(folder)}


@hydra.main(config_path="pkg://configs", config_name="detect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        reject_unknown_added_keys(cfg, list(HydraConfig.get().overrides.task))
        summary = detect(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad config or input: one line, no traceback
        raise SystemExit(f"memsieve-detect: error: {err}") from None
    if "detection" in summary:
        print(f"AUC {summary['detection']['auc']:.3f}  TPR@1%FPR {summary['detection']['tpr_at_1pct_fpr']:.3f}")
    print(Path(cfg.out_dir) / "summary.json")


if __name__ == "__main__":
    main()
