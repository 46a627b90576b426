"""Detection of memorized prompts from the magnitude of the first sampling steps."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from filters.sampling import sample_prompts


def detection_metrics(scores: np.ndarray, memorized: np.ndarray, max_fpr: float = 0.01) -> dict[str, float]:
    """AUC and the TPR at ``max_fpr`` of ``scores`` separating memorized (1) from other (0) prompts.

    TPR at 1% FPR is read off scikit-learn's ROC as the best TPR whose FPR does not exceed it.
    """
    memorized = np.asarray(memorized).astype(int)
    if memorized.min() == memorized.max():
        raise ValueError("detection needs both memorized and non-memorized prompts")
    fpr, tpr, _ = roc_curve(memorized, scores)
    return {
        "auc": float(roc_auc_score(memorized, scores)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= max_fpr].max()),
    }


def first_steps_magnitudes(comps, prompts: list[str], seeds: list[int], num_inference_steps: int,
                           guidance_scale: float, first_steps: int, batch_size: int,
                           progress: bool = False) -> torch.Tensor:
    """Magnitudes ``[P, S, first_steps]`` of every prompt x seed, stopping after ``first_steps``.

    Many prompts share each forward, and sampling stops after the steps detection reads,
    instead of generating whole trajectories one prompt at a time.
    """
    return sample_prompts(comps, prompts, seeds, num_inference_steps, guidance_scale, batch_size,
                          stop_after=first_steps, progress=progress)[1]


def calibrate_threshold(nonmemorized_scores: np.ndarray, fpr: float) -> float:
    """The lowest score that at most a fraction ``fpr`` of non-memorized prompts exceed.

    A prompt is flagged when its score is strictly above the threshold, so on the calibration
    prompts the false-positive rate is at most ``fpr``.
    """
    if not 0 <= fpr < 1:
        raise ValueError(f"calibration fpr={fpr} must lie in [0, 1)")
    ordered = np.sort(np.asarray(nonmemorized_scores, dtype=float))
    if ordered.size == 0:
        raise ValueError("calibration needs at least one non-memorized prompt")
    return float(ordered[max(math.ceil((1 - fpr) * ordered.size) - 1, 0)])


@dataclass(frozen=True)
class DetectionThreshold:
    """A calibrated threshold and the scoring it holds for (the first ``steps`` magnitudes of one generation)."""

    threshold: float
    fpr: float
    steps: int
    num_inference_steps: int
    guidance_scale: float
    calibration_prompts: int

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> DetectionThreshold:
        if not Path(path).is_file():
            raise FileNotFoundError(f"threshold file {path} does not exist; memsieve-detect writes threshold.json")
        return cls(**json.loads(Path(path).read_text()))


def save_roc(path: str | Path, scores: np.ndarray, memorized: np.ndarray, title: str) -> Path:
    """ROC curve of ``scores`` separating memorized from other prompts, with the 1% FPR line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(np.asarray(memorized).astype(int), scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(memorized, scores):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.axvline(0.01, color="red", lw=0.8, ls="--", label="1% FPR")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
