"""The statistics of detection: strict TPR at 1% FPR, held-out calibration, p-values and Benjamini-Hochberg."""

import numpy as np
import pytest

from filters.detection import (
    DetectionThreshold,
    benjamini_hochberg,
    calibrate_threshold,
    calibration_split,
    detection_metrics,
    empirical_p_values,
    seed_set_figures,
)


def test_tpr_at_1pct_fpr_is_strict_and_counts_the_negatives():
    # 100 negatives, one of them above every positive: its FPR of exactly 1% is not below 1%.
    negatives = np.r_[np.linspace(0, 1, 99), 10.0]
    positives = np.linspace(5, 6, 10)
    labels = np.r_[np.zeros(100), np.ones(10)]
    metrics = detection_metrics(np.r_[negatives, positives], labels)
    assert metrics["tpr_at_1pct_fpr"] == 0.0 and metrics["auc"] == pytest.approx(0.99)
    assert (metrics["negatives"], metrics["positives"]) == (100, 10) and "warning" not in metrics
    # With 200 negatives the same single false positive is 0.5% FPR, and every positive counts.
    metrics = detection_metrics(np.r_[np.linspace(0, 1, 199), 10.0, positives], np.r_[np.zeros(200), np.ones(10)])
    assert metrics["tpr_at_1pct_fpr"] == 1.0
    few = detection_metrics(np.r_[np.linspace(0, 1, 50), positives], np.r_[np.zeros(50), np.ones(10)])
    assert few["warning"].startswith("only 50 non-memorized prompts: 1% FPR is less than one prompt")


def test_calibration_split_is_seeded_and_disjoint():
    cal, test = calibration_split(11, seed=3)
    assert len(cal) == 6 and len(test) == 5 and sorted([*cal, *test]) == list(range(11))
    again = calibration_split(11, seed=3)
    assert np.array_equal(cal, again[0]) and not np.array_equal(cal, calibration_split(11, seed=4)[0])
    with pytest.raises(ValueError, match="at least 2 non-memorized prompts, got 1"):
        calibration_split(1, seed=0)


def test_p_values_count_reference_scores_at_least_as_high():
    reference = np.array([0.1, 0.2, 0.2, 0.5])
    p = empirical_p_values(np.array([0.05, 0.2, 0.3, 0.9]), reference)
    assert p.tolist() == [5 / 5, 4 / 5, 2 / 5, 1 / 5]


def test_p_values_are_uniform_under_the_null():
    # Non-memorized prompts scored against other non-memorized ones: exchangeable scores.
    rng = np.random.default_rng(0)
    n, reps = 19, 4000
    p = np.concatenate([empirical_p_values(rng.gamma(2.0, size=5), rng.gamma(2.0, size=n)) for _ in range(reps)])
    # P(p <= k / (n + 1)) = k / (n + 1) exactly; each frequency within 4 binomial standard errors.
    for k in range(1, n + 1):
        expected = k / (n + 1)
        tolerance = 4 * np.sqrt(expected * (1 - expected) / p.size)
        assert abs((p <= expected + 1e-12).mean() - expected) < tolerance, k


def bh_by_definition(p: np.ndarray, q: float) -> np.ndarray:
    """Reject H_(1..k) for the largest k with p_(k) <= k q / m, written out step by step."""
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    k = max((r + 1 for r in range(m) if p[ranked[r]] <= (r + 1) * q / m), default=0)
    out = np.zeros(m, dtype=bool)
    out[ranked[:k]] = True
    return out


def test_benjamini_hochberg_matches_its_definition():
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = np.r_[rng.uniform(size=rng.integers(1, 30)), rng.uniform(0, 0.01, size=rng.integers(0, 5))]
        assert np.array_equal(benjamini_hochberg(p, 0.1), bh_by_definition(p, 0.1))
    assert not benjamini_hochberg(np.array([]), 0.05).any()


def test_benjamini_hochberg_on_p_values_keeps_the_false_discovery_rate():
    # 50 memorized prompts among 150 test prompts, p-values against 200 calibration prompts, q = 0.1.
    rng = np.random.default_rng(2)
    q, fdp, power = 0.1, [], []
    for _ in range(400):
        reference = rng.normal(size=200)
        nulls, memorized = rng.normal(size=100), rng.normal(2.5, 1.0, size=50)
        flagged = benjamini_hochberg(empirical_p_values(np.r_[memorized, nulls], reference), q)
        fdp.append(flagged[50:].sum() / max(flagged.sum(), 1))
        power.append(flagged[:50].mean())
    # BH with these p-values controls the FDR at q x (share of nulls) = 0.067; 4 standard errors of slack.
    assert np.mean(fdp) <= q * 100 / 150 + 4 * np.std(fdp) / np.sqrt(len(fdp))
    assert np.mean(power) > 0.3  # and it does find memorized prompts


def test_seed_set_figures_report_held_out_rates_over_sets():
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(20), np.zeros(300)].astype(int)
    scores = np.stack([np.r_[rng.normal(3, 1, 20), rng.normal(0, 1, 300)] for _ in range(5)])
    figures = seed_set_figures(scores, labels, calibration_fpr=0.01, fdr=0.2, split_seed=9)
    assert figures["seed_sets"] == 5 and all(len(v) == 5 for v in figures["per_seed"].values())
    assert (figures["calibration_prompts"], figures["test_prompts"], figures["negatives"]) == (150, 150, 300)
    for k in range(5):
        cal, test = (20 + i for i in calibration_split(300, 9 + k))
        threshold = calibrate_threshold(scores[k, cal], 0.01)
        assert figures["per_seed"]["heldout_fpr"][k] == np.mean(scores[k, test] > threshold)
        assert figures["per_seed"]["in_sample_fpr"][k] <= 0.01
        assert figures["per_seed"]["auc"][k] == detection_metrics(scores[k], labels)["auc"]
    assert figures["auc"] == pytest.approx(np.mean(figures["per_seed"]["auc"]))
    assert figures["auc_std"] == pytest.approx(np.std(figures["per_seed"]["auc"], ddof=1))
    assert 0 <= figures["fdr"] <= 1 and figures["fdr_tpr"] > 0.3
    assert figures["fdr_min_flagged"] == 6 and "warning" not in figures  # 170 / (0.2 x 151) = 5.6
    # At q = 0.05 the smallest p-value, 1/151, is above 20 x 0.05 / 170: BH cannot flag the 20 memorized prompts.
    strict = seed_set_figures(scores, labels, calibration_fpr=0.01, fdr=0.05, split_seed=9)
    assert strict["fdr_min_flagged"] == 23 and strict["fdr_flagged"] == 0
    assert strict["warning"].startswith("BH at q=0.05 can flag no fewer than 23 of 170 tested prompts")


def test_threshold_check_names_both_settings():
    calibrated = DetectionThreshold(0.5, 0.01, 1, 1, 50, 7.5, "hub/model", 100, [0.1, 0.2])
    calibrated.check("x", 1, 1, 50, 3.0, "hub/model")  # the first step does not depend on guidance
    with pytest.raises(ValueError) as err:
        calibrated.check("the consumer", 10, 4, 50, 7.5, "hub/model")
    assert str(err.value) == ("the threshold was calibrated on first 1 of 50 steps x 1 generation(s), guidance 7.5, "
                              "model hub/model, but the consumer scores first 10 of 50 steps x 4 generation(s), "
                              "guidance 7.5, model hub/model; calibrate one for that setting with memsieve-detect")
    with pytest.raises(ValueError, match="model other/model"):
        calibrated.check("x", 1, 1, 50, 7.5, "other/model")
