"""Detection of memorized prompts from the magnitude of the first sampling steps."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


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
