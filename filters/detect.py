"""``memsieve-detect``: flag memorized prompts, explain them by their trigger tokens, mitigate them.

Each prompt's score is its mean magnitude over the first ``detection.steps`` DDIM steps and
``detection.generations`` starting noises (Wen et al.: one step and one generation by
default), each prompt from noises of its own (:class:`filters.sampling.PromptSeeds`: prompt
``i`` from seed ``seed + i``, as the reference). Many prompts share each forward and sampling
stops after the scored steps (:func:`filters.detection.first_steps_magnitudes`). With
``nonmemorized`` every figure is measured over ``detection.seed_sets`` independent sets of
noises and the non-memorized prompts are split (seeded) into a calibration and a test half:
the threshold is calibrated on the first, its false-positive rate reported on the second.
Writes to ``out_dir``:

- ``scores.jsonl``: per prompt (first seed set) its set, noise seed, score, per-generation
  per-step magnitudes, calibration/test split, and with a threshold ``flagged``, its empirical
  ``p_value`` against the calibration scores and ``fdr_flagged`` (Benjamini-Hochberg at
  ``detection.fdr``); ``mitigated_score`` with mitigation;
- ``summary.json``: settings, counts, mean scores, timing; with ``nonmemorized`` the detection
  figures (mean, spread and per-seed-set lists: AUC, TPR at 1% FPR, held-out FPR, FDR achieved),
  ``roc.png`` and ``threshold.json`` (what it was calibrated on and the calibration scores: the
  file :class:`filters.callback.MemorizationMonitor` and ``threshold=`` read);
- ``triggers.jsonl`` (``triggers.enabled``): per-token significance of every scored prompt;
- ``mitigated/`` (``mitigation.enabled``): each prompt's generations sampled with mitigation.

The highest-scoring prompts are printed with score and p-value; the last line printed is the
path of ``summary.json``.
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

from filters.attribution import TokenSignificance, highlight, token_significance
from filters.detection import (
    DetectionThreshold,
    benjamini_hochberg,
    calibrate_threshold,
    calibration_split,
    first_steps_magnitudes,
    same_model,
    save_roc,
    scoring_setting,
    seed_set_figures,
)
from filters.mitigation import Mitigation
from filters.prompts import read_prompts
from filters.sampling import PromptSeeds, sample_prompts
from train.components import Components, build_components
from train.overrides import check_overrides

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


def model_name(cfg: DictConfig) -> str | None:
    """The scored model as ``threshold.json`` records it: the run's ``model/`` folder or ``model.pretrained``."""
    name = str(Path(cfg.run) / "model") if cfg.run is not None else cfg.model.get("pretrained")
    return None if name is None else same_model(name)


def validate(cfg: DictConfig) -> None:
    d = cfg.detection
    if d.steps < 1 or d.steps > d.num_inference_steps:
        raise ValueError(f"detection.steps={d.steps} must lie in [1, num_inference_steps={d.num_inference_steps}]")
    if d.generations < 1 or d.batch_size < 1 or d.seed_sets < 1:
        raise ValueError(f"detection.generations={d.generations}, batch_size={d.batch_size} and "
                         f"seed_sets={d.seed_sets} must be >= 1")
    if d.guidance_scale <= 1:
        raise ValueError(f"detection.guidance_scale={d.guidance_scale} must be > 1 (the magnitude is CFG's difference)")
    if not 0 < d.fdr < 1:
        raise ValueError(f"detection.fdr={d.fdr} must lie in (0, 1)")
    m = cfg.mitigation
    if m.enabled and m.target is None and cfg.threshold is None and cfg.nonmemorized is None:
        raise ValueError("mitigation.target=null needs a threshold to use: give mitigation.target=NUMBER, "
                         "threshold=threshold.json or nonmemorized=FILE")


def detect(cfg: DictConfig) -> dict:
    """Score, calibrate, explain and mitigate as configured; write the outputs; return the summary."""
    validate(cfg)
    d, out, model = cfg.detection, Path(cfg.out_dir), model_name(cfg)
    prompts = read_prompts(cfg.prompts)
    other = read_prompts(cfg.nonmemorized) if cfg.nonmemorized is not None else []
    given = DetectionThreshold.load(cfg.threshold) if cfg.threshold is not None else None
    if given is not None:
        given.check("memsieve-detect", d.steps, d.generations, d.num_inference_steps, d.guidance_scale, model)
    check_mitigation_threshold(cfg, given, model)
    out.mkdir(parents=True, exist_ok=True)
    progress = cfg.progress and not os.environ.get("CI")
    comps = load_model(cfg)
    scored = prompts + other
    seed_sets = [PromptSeeds(cfg.seed + k * len(scored), d.generations) for k in range(d.seed_sets if other else 1)]

    start = time.perf_counter()
    magnitudes = [first_steps_magnitudes(comps, scored, seeds, d.num_inference_steps, d.guidance_scale, d.steps,
                                         d.batch_size, progress=progress) for seeds in seed_sets]  # K x [P, G, k]
    seconds = time.perf_counter() - start
    scores = torch.stack([m.mean(dim=(1, 2)) for m in magnitudes]).numpy()  # [K, P]
    summary = {
        "model": model,
        "settings": {**OmegaConf.to_container(d), "seed": cfg.seed},
        "prompts": {"file": str(cfg.prompts), "count": len(prompts),
                    "mean_score": float(scores[0, :len(prompts)].mean())},
        "timing": {"seconds": seconds, "seconds_per_prompt": seconds / scores.size,
                   "device": str(comps.unet.device), "dtype": cfg.dtype},
    }
    records = [{"index": i, "set": "prompts" if i < len(prompts) else "nonmemorized", "prompt": p,
                "seed": cfg.seed + i, "score": float(scores[0, i]), "magnitudes": magnitudes[0][i].tolist()}
               for i, p in enumerate(scored)]

    threshold, reference = given, set()
    if other:
        labels = np.array([1] * len(prompts) + [0] * len(other))
        summary["nonmemorized"] = {"file": str(cfg.nonmemorized), "count": len(other),
                                   "mean_score": float(scores[0, len(prompts):].mean())}
        summary["detection"] = seed_set_figures(scores, labels, d.calibration_fpr, d.fdr, cfg.seed)
        save_roc(out / "roc.png", scores[0], labels, f"first {d.steps} step(s), {d.generations} generation(s)")
        calibration, test = (len(prompts) + i for i in calibration_split(len(other), cfg.seed))
        for i in calibration:
            records[i]["split"] = "calibration"
        for i in test:
            records[i]["split"] = "test"
        calibrated = DetectionThreshold(calibrate_threshold(scores[0, calibration], d.calibration_fpr),
                                        d.calibration_fpr, d.steps, d.generations, d.num_inference_steps,
                                        d.guidance_scale, model, len(calibration), scores[0, calibration].tolist())
        calibrated.save(out / "threshold.json")
        if threshold is None:
            threshold, reference = calibrated, set(calibration.tolist())
    if threshold is not None:
        summary["threshold"] = flag(records, threshold, reference, d.fdr)

    if cfg.triggers.enabled:
        found = explain(cfg, comps, prompts, seed_sets[0], out)
        summary["triggers"] = {"file": str(out / "triggers.jsonl"), "prompts": len(found), "steps": cfg.triggers.steps}
    else:
        found = None
    print_table(records[:len(prompts)], found, cfg.show, cfg.triggers.top_fraction)
    mitigation = Mitigation.from_config(cfg.mitigation, threshold.threshold if threshold else None)
    if mitigation is not None:
        summary["mitigation"] = mitigate(cfg, comps, prompts, seed_sets[0], mitigation, records, out)

    with (out / "scores.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def check_mitigation_threshold(cfg: DictConfig, given: DetectionThreshold | None, model: str | None) -> None:
    """``mitigation.target=null`` compares one first-step magnitude per generation with the threshold
    (``given``, else the one calibrated in this run): a one-line error unless it is a first-step,
    one-generation threshold."""
    d, consumer = cfg.detection, "mitigation.target=null, which compares one first-step magnitude per generation,"
    if not cfg.mitigation.enabled or cfg.mitigation.target is not None:
        return
    if given is not None:
        given.check(consumer, 1, 1, d.num_inference_steps, None, model)
    elif (d.steps, d.generations) != (1, 1):
        raise ValueError(f"the threshold calibrated here is on "
                         f"{scoring_setting(d.steps, d.generations, d.num_inference_steps, d.guidance_scale, model)}"
                         f", but {consumer} scores "
                         f"{scoring_setting(1, 1, d.num_inference_steps, None, model)}; give mitigation.target=NUMBER "
                         f"or detection.steps=1 detection.generations=1")


def flag(records: list[dict], threshold: DetectionThreshold, reference: set[int], fdr: float) -> dict:
    """Mark every record ``flagged`` (score above the threshold) and, unless it is one of the
    ``reference`` calibration prompts, its empirical ``p_value`` and ``fdr_flagged`` (Benjamini-Hochberg
    over all other records at ``fdr``); return the counts per set, in-sample ones labelled."""
    tested = [r for r in records if r["index"] not in reference]
    p_values = threshold.p_values(np.array([r["score"] for r in tested]))
    for r, p, hit in zip(tested, p_values, benjamini_hochberg(p_values, fdr)):
        r["p_value"], r["fdr_flagged"] = float(p), bool(hit)
    counts: dict = {"prompts": 0, "nonmemorized": 0, "nonmemorized_calibration_in_sample": 0}
    fdr_counts = {"prompts": 0, "nonmemorized": 0}
    for r in records:
        r["flagged"] = r["score"] > threshold.threshold
        key = "nonmemorized_calibration_in_sample" if r["index"] in reference else r["set"]
        counts[key] += int(r["flagged"])
        fdr_counts[r["set"]] += int(r.get("fdr_flagged", False))
    return {"value": threshold.threshold, "fpr": threshold.fpr, "calibrated_on": threshold.setting(),
            "flagged": counts, "fdr": {"q": fdr, "tested": len(tested), "flagged": fdr_counts}}


def print_table(records: list[dict], found: list[TokenSignificance] | None, show: int, top_fraction: float) -> None:
    """The ``show`` highest-scoring prompts: score, p-value, flags, the prompt (trigger tokens highlighted)."""
    if show < 1 or not records:
        return
    print(f"{'score':>8}  {'p-value':>7}  {'>thr':>4}  {'BH':>3}  prompt")
    for i in sorted(range(len(records)), key=lambda i: -records[i]["score"])[:show]:
        r = records[i]
        p = f"{r['p_value']:.4f}" if "p_value" in r else "-"
        marks = ["yes" if r[k] else "no" if k in r else "-" for k in ("flagged", "fdr_flagged")]
        text = highlight(found[i], top_fraction) if found else r["prompt"]
        print(f"{r['score']:8.4f}  {p:>7}  {marks[0]:>4}  {marks[1]:>3}  {text}")


def explain(cfg: DictConfig, comps: Components, prompts: list[str], seeds: PromptSeeds,
            out: Path) -> list[TokenSignificance]:
    """Write every prompt's token significance over the first ``triggers.steps`` guided steps."""
    d = cfg.detection
    found = token_significance(comps, prompts, seeds, d.num_inference_steps, d.batch_size, cfg.triggers.steps,
                               d.guidance_scale)
    with (out / "triggers.jsonl").open("w") as f:
        f.writelines(json.dumps(s.to_json()) + "\n" for s in found)
    return found


def mitigate(cfg: DictConfig, comps: Components, prompts: list[str], seeds: PromptSeeds, mitigation: Mitigation,
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
        for j, img in enumerate((pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()):
            Image.fromarray(img).save(folder / f"{p:05d}_gen{j}.png")
    scored = [r["mitigated_score"] for r in records[: len(prompts)]]
    return {"target": mitigation.target, "threshold": mitigation.threshold, "mean_score": float(np.mean(scored)),
            "images": str(folder)}


@hydra.main(config_path="pkg://configs", config_name="detect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        check_overrides(cfg, list(HydraConfig.get().overrides.task))
        summary = detect(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad config or input: one line, no traceback
        raise SystemExit(f"memsieve-detect: error: {err}") from None
    if "detection" in summary:
        print(describe(summary["detection"]))
    print(Path(cfg.out_dir) / "summary.json")


def describe(figures: dict) -> str:
    """The detection figures of :func:`filters.detection.seed_set_figures` in two lines (three with a warning)."""
    def pm(name: str, digits: int = 3) -> str:
        std = figures[f"{name}_std"]
        return f"{figures[name]:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    lines = [f"AUC {pm('auc')}  TPR@1%FPR {pm('tpr_at_1pct_fpr')} ({figures['negatives']} negatives, "
             f"{figures['positives']} positives; mean ± std over {figures['seed_sets']} seed sets)",
             f"held-out FPR {pm('heldout_fpr')} (threshold at {figures['calibration_fpr']:.0%} FPR on "
             f"{figures['calibration_prompts']} calibration prompts, tested on {figures['test_prompts']}; in-sample "
             f"{pm('in_sample_fpr')})  FDR achieved {pm('fdr')} at q={figures['fdr_q']:g} (TPR {pm('fdr_tpr')})"]
    if "warning" in figures:
        lines.append(f"warning: {figures['warning']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
