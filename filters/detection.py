"""Detection of memorized prompts from the magnitude of the first sampling steps."""

from __future__ import annotations

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
                           guidance_scale: float, first_steps: int, batch_size: int) -> torch.Tensor:
    """Magnitudes ``[P, S, first_steps]`` of every prompt x seed, stopping after ``first_steps``.

    Many prompts share each forward, and sampling stops after the steps detection reads,
    instead of generating whole trajectories one prompt at a time.
    """
    return sample_prompts(comps, prompts, seeds, num_inference_steps, guidance_scale, batch_size,
                          stop_after=first_steps)[1]
