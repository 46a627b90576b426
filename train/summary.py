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


def training_summary(result: TrainResult, cfg: DictConfig) -> dict:
    """The training half of ``summary.json``: what the filter dropped (and, for ``filter=threshold``,
    the number it used, chosen by ``filter.choose`` or given), the speed, and skipped data."""
    filt = {"kind": cfg.filter.kind, "dropped_fraction": result.counts.dropped_fraction(),
            "seen": result.counts.seen, "dropped": result.counts.dropped,
            "skipped_steps": result.counts.skipped_steps}
    if cfg.filter.kind == "threshold":
        filt["threshold"] = cfg.filter.threshold
    return {"filter": filt, "timing": {"seconds_per_step": result.seconds_per_step},
            "data": {"skipped": dict(result.data.skipped),
                     **({"dedup": result.data.manifest.dedup} if result.data.manifest.dedup else {})}}


def write_training_summary(result: TrainResult, cfg: DictConfig) -> dict:
    """Replace ``summary.json`` by the training half (an earlier evaluation no longer describes the model)."""
    summary = training_summary(result, cfg)
    write_json(Path(result.run_dir) / "summary.json", summary)
    return summary
