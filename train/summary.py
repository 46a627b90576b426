"""The training half of ``summary.json``: filter statistics, timing and data skip counts.

Written when training ends, before any evaluation, so a run trained with ``eval.enabled=false``
(and evaluated later by ``memsieve-eval``, which keeps these keys) or whose evaluation fails
still records what the filter did; the end-of-run evaluation adds its keys to the same dict.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from evaluation.report import write_json
from train.loop import TrainResult

TRAINING_KEYS = ("filter", "timing", "data")


KNEW = {"content": "each record's pixel digest (exact copies pool under one key)",
        "near": "each record's perceptual hash (copies that keep the hash pool under one key)",
        "oracle": "ORACLE: the injection plan's pair index, ground truth that real data never has"}


def what_it_knew(kind: str, key: str, placebo: bool) -> str:
    """What a filter's decisions could draw on: written beside every figure it made."""
    signal = "no sample's own magnitude (placebo: magnitudes permuted among the batch's judged samples)" \
        if placebo else "each judged sample's magnitude"
    return f"{signal}; {'nothing else' if kind == 'threshold' else 'pairs identified by ' + KNEW[key]}"


def training_summary(result: TrainResult, cfg: DictConfig) -> dict:
    """The training half of ``summary.json``: what the filter dropped (and, for ``filter=threshold``,
    the number it used, chosen by ``filter.choose`` or given), the speed, and skipped data."""
    filt = {"kind": cfg.filter.kind, "dropped_fraction": result.counts.dropped_fraction(),
            "seen": result.counts.seen, "dropped": result.counts.dropped,
            "skipped_steps": result.counts.skipped_steps}
    if cfg.filter.kind == "threshold":
        filt["threshold"] = cfg.filter.threshold
    if cfg.filter.kind != "none":
        filt["placebo"] = bool(cfg.filter.get("placebo", False))
        filt["knew"] = what_it_knew(cfg.filter.kind, result.data.key_spec.kind, filt["placebo"])
    if cfg.filter.kind.startswith("calibrated"):
        filt["key"] = result.data.key_spec.kind
        filt["keys_dropped"] = result.keys_dropped
    return {"filter": filt, "timing": {"seconds_per_step": result.seconds_per_step},
            "data": {"skipped": dict(result.data.skipped),
                     **({"dedup": result.data.manifest.dedup} if result.data.manifest.dedup else {})}}


def write_training_summary(result: TrainResult, cfg: DictConfig) -> dict:
    """Replace ``summary.json`` by the training half (an earlier evaluation no longer describes the model)."""
    summary = training_summary(result, cfg)
    write_json(Path(result.run_dir) / "summary.json", summary)
    return summary
