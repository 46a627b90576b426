"""The calibrated filter's evidence rule and the placebo control, driven open loop with known signals.

The stream imitates the demo's: 2,000 keys, 10 of them duplicated and together half of every
batch of 32, timesteps uniform, magnitudes lognormal around a timestep-dependent scale. The
duplicated keys' magnitudes at t >= 600 are multiplied by ``signal`` (1: no signal at all).
"""

import numpy as np
import pytest
import torch

from filters.detection import benjamini_hochberg as bh_numpy
from filters.evidence import PairEvidence, benjamini_hochberg
from filters.policy import FixedThreshold, TimestepCalibrated

KEYS, DUPLICATED, BATCH = 2000, 10, 32


def stream(steps: int, signal: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        dup = torch.rand(BATCH, generator=gen) < 0.5
        keys = torch.where(dup, torch.randint(0, DUPLICATED, (BATCH,), generator=gen),
                           torch.randint(DUPLICATED, KEYS, (BATCH,), generator=gen))
        t = torch.randint(0, 1000, (BATCH,), generator=gen)
        magnitude = (3.0 - 2.0 * t / 1000) * torch.exp(0.3 * torch.randn(BATCH, generator=gen))
        magnitude = torch.where(dup & (t >= 600), magnitude * signal, magnitude)
        yield keys, t, magnitude, dup, torch.rand(BATCH, generator=gen)


def dropped_fractions(policy, steps: int = 1000, signal: float = 1.0) -> tuple[float, float]:
    """Share of the duplicated and of the other samples the policy drops over the stream."""
    dropped, seen = np.zeros(2), np.zeros(2)
    for step, (keys, t, magnitude, dup, order) in enumerate(stream(steps, signal)):
        keep = policy.keep(magnitude, t, step, keys, order)
        policy.observe(magnitude, t, torch.ones(BATCH, dtype=torch.bool), keys, keep, order)
        for g, mask in enumerate((dup, ~dup)):
            seen[g] += int(mask.sum())
            dropped[g] += int((mask & ~keep).sum())
    return tuple(dropped / seen)


def evidence(**kw) -> PairEvidence:
    return PairEvidence(1000, KEYS, **kw)


def robust_z(**kw) -> TimestepCalibrated:
    """The demo's settings of the rule before issue 26."""
    return TimestepCalibrated(1000, KEYS, z=0.25, min_timestep=600, min_observations=2, drop_observations=6,
                              sticky=True, **kw)


def test_torch_benjamini_hochberg_is_detections():
    gen = np.random.default_rng(0)
    for _ in range(20):
        p = np.concatenate([gen.uniform(size=200), gen.uniform(0, 1e-3, size=gen.integers(0, 20))])
        for fdr in (0.001, 0.05, 0.3):
            assert np.array_equal(benjamini_hochberg(torch.from_numpy(p), fdr).numpy(), bh_numpy(p, fdr))


def test_keys_judged_hundreds_of_times_without_signal_stay_in():
    dup, other = dropped_fractions(evidence())
    assert dup <= 0.01 and other <= 0.01
    # The earlier rule drops them on frequency alone: the reason it was replaced.
    assert dropped_fractions(robust_z())[0] > 0.3


def test_the_placebo_cancels_the_magnitudes_cut_but_not_a_cut_frequency_makes():
    real_dup, real_other = dropped_fractions(evidence(), signal=1.6)
    placebo_dup, placebo_other = dropped_fractions(evidence(placebo=True), signal=1.6)
    assert real_dup >= 0.5 and real_other <= 0.01
    assert placebo_dup <= 0.01 and placebo_other <= 0.01
    # A rule that frequency triggers cuts about as much as its own placebo: the control exposes it.
    z_dup, _ = dropped_fractions(robust_z(), signal=1.6)
    z_placebo_dup, _ = dropped_fractions(robust_z(placebo=True), signal=1.6)
    assert z_placebo_dup > 0.3 and z_placebo_dup >= z_dup - 0.25


def test_the_threshold_placebo_drops_as_many_samples_per_batch_none_for_its_own_magnitude():
    magnitude = torch.tensor([0.5, 3.0, float("nan"), 2.5, 0.1, 0.2])
    order = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    real = FixedThreshold(2.0).keep(magnitude, torch.zeros(6), 0)
    placebo = FixedThreshold(2.0, placebo=True).keep(magnitude, torch.zeros(6), 0, order=order)
    assert int((~real).sum()) == int((~placebo).sum())  # the nan (unjudged) sample counts as dropped in both
    assert placebo.tolist() != real.tolist()


def test_state_round_trips_and_resumes_the_same_decisions():
    first = evidence()
    steps = list(stream(400, 1.6))
    for step, (keys, t, magnitude, _, order) in enumerate(steps[:200]):
        first.observe(magnitude, t, torch.ones(BATCH, dtype=torch.bool), keys, first.keep(magnitude, t, step, keys),
                      order)
    resumed = evidence()
    resumed.load_state_dict(first.state_dict())
    for step, (keys, t, magnitude, _, order) in enumerate(steps[200:], start=200):
        a, b = first.keep(magnitude, t, step, keys), resumed.keep(magnitude, t, step, keys)
        assert torch.equal(a, b)
        for policy, keep in ((first, a), (resumed, b)):
            policy.observe(magnitude, t, torch.ones(BATCH, dtype=torch.bool), keys, keep, order)
    assert torch.equal(first.dropped, resumed.dropped) and first.dropped[:DUPLICATED].any()
    with pytest.raises(ValueError, match="robust-z rule's"):
        evidence().load_state_dict(robust_z().state_dict())
    state_bytes = sum(first.state_dict()[k].element_size() for k in ("count", "total", "dropped"))
    assert state_bytes == 9  # bytes per key (issue 14's budget: 16)
