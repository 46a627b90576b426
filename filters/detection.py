"""Detection of memorized prompts from the magnitude of the first sampling steps."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from filters.sampling import Seeds, sample_prompts


def detection_metrics(scores: np.ndarray, memorized: np.ndarray, max_fpr: float = 0.01) -> dict:
    """AUC and the TPR at ``max_fpr`` of ``scores`` separating memorized (1) from other (0) prompts.

    TPR at 1% FPR is the best TPR of scikit-learn's ROC whose FPR is strictly below ``max_fpr``
    (the reference's ``tpr[fpr < .01]``): with 200 negatives one false positive is allowed, with
    under 100 none. The counts of both classes stand beside it, and ``warning`` says when 1% of
    the negatives is less than one prompt.
    """
    memorized = np.asarray(memorized).astype(int)
    if memorized.min() == memorized.max():
        raise ValueError("detection needs both memorized and non-memorized prompts")
    fpr, tpr, _ = roc_curve(memorized, scores)
    negatives = int((memorized == 0).sum())
    out = {
        "auc": float(roc_auc_score(memorized, scores)),
        "tpr_at_1pct_fpr": float(tpr[fpr < max_fpr].max()),
        "negatives": negatives,
        "positives": int(memorized.sum()),
    }
    warning = few_negatives_warning(negatives, max_fpr)
    if warning:
        out["warning"] = warning
    return out


def few_negatives_warning(negatives: int, max_fpr: float = 0.01) -> str | None:
    """A one-line warning when ``max_fpr`` of ``negatives`` is less than one prompt, else ``None``."""
    if negatives * max_fpr >= 1:
        return None
    return (f"only {negatives} non-memorized prompts: {max_fpr:.0%} FPR is less than one prompt, so TPR at "
            f"{max_fpr:.0%} FPR allows no false positive at all; give at least {math.ceil(1 / max_fpr)}")


def empirical_p_values(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each score's p-value against non-memorized ``reference`` scores: ``(1 + #{ref >= score}) / (n + 1)``.

    Under the null (a score exchangeable with the reference ones) ``P(p <= a) <= a`` for every
    ``a``, exactly ``k / (n + 1)`` at ``a = k / (n + 1)`` when scores do not tie; the smallest
    possible p-value is ``1 / (n + 1)``.
    """
    ordered = np.sort(np.asarray(reference, dtype=float))
    if ordered.size == 0:
        raise ValueError("p-values need at least one non-memorized reference score")
    at_least = ordered.size - np.searchsorted(ordered, np.asarray(scores, dtype=float), side="left")
    return (1 + at_least) / (ordered.size + 1)


def benjamini_hochberg(p_values: np.ndarray, fdr: float) -> np.ndarray:
    """Which hypotheses Benjamini-Hochberg rejects at false-discovery rate ``fdr``: the ``k`` smallest
    p-values, ``k`` the largest rank with ``p_(k) <= k * fdr / m``."""
    if not 0 < fdr < 1:
        raise ValueError(f"fdr={fdr} must lie in (0, 1)")
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    below = np.flatnonzero(p[order] <= fdr * np.arange(1, p.size + 1) / max(p.size, 1))
    flagged = np.zeros(p.size, dtype=bool)
    if below.size:
        flagged[order[: below[-1] + 1]] = True
    return flagged


def calibration_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded split of ``count`` non-memorized prompts into a calibration half (the
    larger one when odd) and a test half, each sorted."""
    if count < 2:
        raise ValueError(f"a calibration and a test half need at least 2 non-memorized prompts, got {count}")
    order = np.random.default_rng(seed).permutation(count)
    half = (count + 1) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def seed_set_figures(scores: np.ndarray, memorized: np.ndarray, calibration_fpr: float = 0.01, fdr: float = 0.05,
                     split_seed: int = 0) -> dict:
    """Every detection figure for each seed set's scores ``[K, P]``, as mean, spread and per-set lists.

    For seed set ``k``: AUC and TPR at 1% FPR over all prompts; the non-memorized prompts split
    (seed ``split_seed + k``) into calibration and test halves; the threshold calibrated at
    ``calibration_fpr`` on the calibration half, its false-positive rate on the test half
    (``heldout_fpr``) and on the calibration half (``in_sample_fpr``, at most ``calibration_fpr``
    by construction) and its TPR; the p-values of the memorized and test prompts against the
    calibration half, flagged by Benjamini-Hochberg at ``fdr``: the false-discovery proportion
    achieved (``fdr``, 0 when nothing is flagged), TPR (``fdr_tpr``) and flagged count. ``X`` is the
    mean over sets, ``X_std`` the sample standard deviation (``None`` for one set), ``per_seed.X`` the list.
    ``fdr_min_flagged`` is the fewest prompts BH can flag at all: the smallest p-value, ``1 / (n + 1)``
    for ``n`` calibration prompts, must be under ``k * fdr / m`` for ``m`` tested prompts.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    memorized = np.asarray(memorized).astype(bool)
    positives, negatives = np.flatnonzero(memorized), np.flatnonzero(~memorized)
    per: dict[str, list[float]] = {}
    for k, s in enumerate(scores):
        metrics = detection_metrics(s, memorized)
        cal, test = (negatives[i] for i in calibration_split(negatives.size, split_seed + k))
        threshold = calibrate_threshold(s[cal], calibration_fpr)
        queried = np.concatenate([positives, test])
        flagged = benjamini_hochberg(empirical_p_values(s[queried], s[cal]), fdr)
        false = int(flagged[positives.size:].sum())
        figures = {"auc": metrics["auc"], "tpr_at_1pct_fpr": metrics["tpr_at_1pct_fpr"],
                   "heldout_fpr": float((s[test] > threshold).mean()),
                   "in_sample_fpr": float((s[cal] > threshold).mean()),
                   "heldout_tpr": float((s[positives] > threshold).mean()),
                   "fdr": false / max(int(flagged.sum()), 1),
                   "fdr_tpr": float(flagged[: positives.size].mean()),
                   "fdr_flagged": int(flagged.sum())}
        for name, value in figures.items():
            per.setdefault(name, []).append(value)
    out: dict = {}
    for name, values in per.items():
        out[name] = float(np.mean(values))
        out[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    min_flagged = math.ceil(queried.size / (fdr * (len(cal) + 1)) - 1e-9)
    out.update({"seed_sets": len(scores), "positives": int(positives.size), "negatives": int(negatives.size),
                "calibration_prompts": len(cal), "test_prompts": len(test), "calibration_fpr": calibration_fpr,
                "fdr_q": fdr, "fdr_min_flagged": min_flagged, "split_seed": split_seed, "per_seed": per})
    warnings = [few_negatives_warning(int(negatives.size))]
    if min_flagged > positives.size:
        warnings.append(f"BH at q={fdr:g} can flag no fewer than {min_flagged} of {queried.size} tested prompts with "
                        f"{len(cal)} calibration prompts (smallest p-value 1/{len(cal) + 1}), more than the "
                        f"{positives.size} memorized ones; use more non-memorized prompts or a larger q")
    if any(warnings):
        out["warning"] = "; ".join(w for w in warnings if w)
    return out


def first_steps_magnitudes(comps, prompts: list[str], seeds: Seeds, num_inference_steps: int,
                           guidance_scale: float, first_steps: int, batch_size: int,
                           progress: bool = False) -> torch.Tensor:
    """Magnitudes ``[P, G, first_steps]`` of every prompt x generation, stopping after ``first_steps``.

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
    """A calibrated threshold and what it was calibrated on (``threshold.json``).

    A score is only comparable with it when it is computed the same way: the mean magnitude
    over the first ``steps`` of ``num_inference_steps`` DDIM steps and ``generations`` starting
    noises, at ``guidance_scale`` (which the first step does not depend on), on ``model``.
    ``reference_scores`` are the calibration prompts' scores, against which new scores get
    empirical p-values.
    """

    threshold: float
    fpr: float
    steps: int
    generations: int
    num_inference_steps: int
    guidance_scale: float
    model: str | None
    calibration_prompts: int
    reference_scores: list[float]

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> DetectionThreshold:
        if not Path(path).is_file():
            raise FileNotFoundError(f"threshold file {path} does not exist; memsieve-detect writes threshold.json")
        raw = json.loads(Path(path).read_text())
        missing = [f for f in cls.__dataclass_fields__ if f not in raw]
        if missing:
            raise ValueError(f"threshold file {path} lacks {', '.join(missing)} (written by an older memsieve-detect); "
                             f"calibrate it again with memsieve-detect nonmemorized=FILE")
        return cls(**{f: raw[f] for f in cls.__dataclass_fields__})

    def setting(self) -> str:
        """What the threshold was calibrated on, in words."""
        return scoring_setting(self.steps, self.generations, self.num_inference_steps, self.guidance_scale, self.model)

    def check(self, consumer: str, steps: int, generations: int, num_inference_steps: int,
              guidance_scale: float | None = None, model: str | None = None) -> None:
        """A one-line error naming both settings unless ``consumer`` scores as the threshold was calibrated.

        Guidance is compared only when more than the first step is scored, the model only when both are known.
        """
        differs = (steps, generations, num_inference_steps) != (self.steps, self.generations, self.num_inference_steps)
        differs |= steps > 1 and guidance_scale is not None and guidance_scale != self.guidance_scale
        differs |= model is not None and self.model is not None and same_model(model) != same_model(self.model)
        if differs:
            raise ValueError(f"the threshold was calibrated on {self.setting()}, but {consumer} scores "
                             f"{scoring_setting(steps, generations, num_inference_steps, guidance_scale, model)}; "
                             f"calibrate one for that setting with memsieve-detect")

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Empirical p-values of ``scores`` against the calibration prompts' scores."""
        return empirical_p_values(scores, np.asarray(self.reference_scores))


def scoring_setting(steps: int, generations: int, num_inference_steps: int, guidance_scale: float | None,
                    model: str | None) -> str:
    """``first 1 of 50 steps x 1 generation, guidance 7.5, model M`` (guidance and model when known)."""
    words = f"first {steps} of {num_inference_steps} steps x {generations} generation(s)"
    words += f", guidance {guidance_scale:g}" if guidance_scale is not None else ""
    return words + (f", model {model}" if model is not None else "")


def same_model(model: str) -> str:
    """A model's identity for comparison: a local folder by its resolved path, a hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


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
