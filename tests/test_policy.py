import math

import pytest
import torch
from omegaconf import OmegaConf

from filters.policy import FixedThreshold, TimestepCalibrated, build_policy, filtered_mean


def test_threshold_keeps_strictly_below_as_the_reference_and_loss_is_mean_of_kept():
    mags = torch.tensor([0.5, 2.5, 1.9, 2.0, 3.1])
    keep = FixedThreshold(2.0).keep(mags, torch.zeros(5, dtype=torch.long), step=10)
    assert keep.tolist() == [True, False, True, False, False]  # exactly at the threshold: dropped (Wen et al.'s <)
    per_sample = torch.tensor([1.0, 10.0, 3.0, 5.0, 20.0], requires_grad=True)
    loss = filtered_mean(per_sample, keep, int(keep.sum()))
    assert torch.isclose(loss, torch.tensor(2.0))
    loss.backward()
    assert torch.allclose(per_sample.grad, torch.tensor([1 / 2, 0, 1 / 2, 0, 0]))


def test_threshold_waits_for_start_step():
    policy = FixedThreshold(1.0, start_step=5)
    assert policy.keep(torch.tensor([9.0]), torch.tensor([1]), step=4).all()
    assert not policy.keep(torch.tensor([9.0]), torch.tensor([1]), step=5).any()


def test_all_dropped_still_reaches_every_parameter():
    layer = torch.nn.Linear(3, 1)
    per_sample = layer(torch.randn(4, 3)).squeeze(1) ** 2
    loss = filtered_mean(per_sample, torch.zeros(4, dtype=torch.bool), global_kept=0)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in layer.parameters())


def test_distributed_normalisation_gives_global_mean():
    # Two ranks: rank 0 keeps [1, 3], rank 1 keeps [8]; DDP averages the two rank losses.
    losses = [torch.tensor([1.0, 3.0, 100.0]), torch.tensor([8.0, 50.0, 60.0])]
    keeps = [torch.tensor([True, True, False]), torch.tensor([True, False, False])]
    rank_losses = [filtered_mean(lv, k, global_kept=3, num_processes=2) for lv, k in zip(losses, keeps)]
    assert torch.isclose(sum(rank_losses) / 2, torch.tensor(4.0))


def calibrated(**kw) -> TimestepCalibrated:
    args = {"z": 3.0, "buckets": 2, "window": 400, "min_samples": 10, "min_timestep": 500, "memory_decay": 0.5,
            "min_observations": 2, "min_prompts": 20, "drop_observations": 2, **kw}
    return TimestepCalibrated(1000, 2000, **args)


def test_relative_magnitude_is_over_the_bucket_median():
    policy = calibrated()
    low = torch.arange(1, 21, dtype=torch.float32)  # bucket 0 (t < 500)
    high = low * 10  # bucket 1: median 105
    t = torch.cat([torch.full((20,), 100), torch.full((20,), 900)])
    policy.observe(torch.cat([low, high]), t, torch.ones(40, dtype=torch.bool))
    assert torch.allclose(policy.scale.medians(), torch.tensor([float(low.median()), float(high.median())]))
    rel = policy.scale.relative(torch.tensor([20.0, 20.0]), torch.tensor([100, 900]))  # torch medians: 10, 100
    assert torch.allclose(rel, torch.tensor([2.0, 0.2]))  # the same magnitude is loud at t=100, quiet at t=900


def calibrate_population(policy, prompts: int = 40, rounds: int = 2, seed: int = 0):
    """Judge ``prompts`` ordinary prompts ``rounds`` times at t=800 with relative magnitudes near 1."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.full((prompts,), 800)
    valid = torch.ones(prompts, dtype=torch.bool)
    policy.observe(torch.ones(prompts), t, valid)  # calibrates bucket 1 at median 1 (no prompt ids)
    for _ in range(rounds):
        policy.observe(1 + 0.05 * torch.randn(prompts, generator=gen), t, valid, torch.arange(prompts))


def test_a_prompt_far_above_the_others_is_dropped_at_every_timestep():
    policy = calibrated()
    calibrate_population(policy)
    loud = torch.tensor([1000])
    for _ in range(2):
        policy.observe(torch.tensor([3.0]), torch.tensor([800]), torch.tensor([True]), loud)
    assert policy.count[1000] == 2 and policy.average[1000] > policy.prompt_limit()
    ids = torch.tensor([1000, 1000, 3, 77])  # loud at low and high t, an ordinary pair, an unseen one
    keep = policy.keep(torch.ones(4), torch.tensor([10, 990, 800, 800]), step=0, pairs=ids)
    assert keep.tolist() == [False, False, True, True]


def test_nothing_is_dropped_before_enough_prompts_are_judged_or_before_start_step():
    policy = calibrated(min_prompts=100, start_step=0)
    calibrate_population(policy)
    policy.observe(torch.tensor([9.0, 9.0]), torch.tensor([800, 800]), torch.ones(2, dtype=torch.bool),
                   torch.tensor([1000, 1000]))
    assert policy.prompt_limit() == float("inf")
    assert policy.keep(torch.ones(1), torch.tensor([800]), step=0, pairs=torch.tensor([1000])).all()
    late = calibrated(start_step=5)
    calibrate_population(late)
    late.observe(torch.tensor([9.0, 9.0]), torch.tensor([800, 800]), torch.ones(2, dtype=torch.bool),
                 torch.tensor([1000, 1000]))
    assert late.keep(torch.ones(1), torch.tensor([800]), step=4, pairs=torch.tensor([1000])).all()
    assert not late.keep(torch.ones(1), torch.tensor([800]), step=5, pairs=torch.tensor([1000])).any()


def test_uncaptioned_and_unjudged_samples_do_not_count_and_state_round_trips():
    policy = calibrated()
    calibrate_population(policy)
    before = policy.state_dict()
    policy.observe(torch.tensor([5.0, 5.0, float("nan")]), torch.tensor([800, 100, 800]),
                   torch.tensor([False, True, True]), torch.tensor([3, 4, 5]))
    after = policy.state_dict()  # uncaptioned at t=800, captioned but unjudged at t=100, not measured (nan)
    assert torch.equal(after["count"], before["count"]) and torch.equal(after["average"], before["average"])
    for quantile in ("exact", "histogram"):
        clone = calibrated(quantile=quantile)
        clone.load_state_dict(policy.state_dict())
        assert torch.equal(clone.count, policy.count) and torch.equal(clone.average, policy.average)
        assert torch.allclose(clone.scale.medians(), policy.scale.medians(), equal_nan=True)
        assert torch.isclose(clone.prompt_limit(), policy.prompt_limit(), rtol=2e-3)
    with pytest.raises(ValueError, match="remembers 2000 keys; this run's data has 10"):
        TimestepCalibrated(1000, 10).load_state_dict(policy.state_dict())


def test_a_prompt_needs_drop_observations_judgements_before_it_is_dropped():
    policy = calibrated(drop_observations=4)
    calibrate_population(policy)
    loud = torch.tensor([1000])
    for count in range(1, 5):
        policy.observe(torch.tensor([3.0]), torch.tensor([800]), torch.tensor([True]), loud)
        kept = bool(policy.keep(torch.ones(1), torch.tensor([800]), step=0, pairs=loud))
        assert kept == (count < 4)


def sequential_reference(magnitudes, timesteps, pairs, decay, window, buckets=2):
    """The memory and bucket windows updated one sample at a time, in plain Python."""
    memory, values, cursor = {}, [[None] * window for _ in range(buckets)], [0] * buckets
    for m, t, p in zip(magnitudes.tolist(), timesteps.tolist(), pairs.tolist()):
        count, average = memory.get(p, (0, 0.0))
        weight = max(decay, 1 / (count + 1))
        memory[p] = (count + 1, (1 - weight) * average + weight * m)
        b = t * buckets // 1000
        values[b][cursor[b] % window] = m
        cursor[b] += 1
    return memory, values


def test_a_batch_with_repeated_pairs_updates_as_one_sample_at_a_time():
    policy = calibrated(window=16, min_samples=1, min_timestep=0)
    policy.scale.values.fill_(1.0)  # every bucket median 1: relative magnitude = magnitude
    gen = torch.Generator().manual_seed(3)
    pairs = torch.randint(0, 5, (40,), generator=gen)  # each pair about 8 times in one batch
    mags = 0.5 + torch.rand(40, generator=gen)
    t = torch.randint(0, 1000, (40,), generator=gen)  # about 20 per bucket, beyond the window of 16
    policy.observe(mags, t, torch.ones(40, dtype=torch.bool), pairs)
    memory, values = sequential_reference(mags, t, pairs, 0.5, 16)
    for p, (count, average) in memory.items():
        assert policy.count[p] == count and abs(float(policy.average[p]) - average) < 1e-6
    assert torch.equal(policy.scale.values, torch.tensor([[1.0 if v is None else v for v in row] for row in values]))
    assert policy.scale.cursor.tolist() == [int((t < 500).sum()), int((t >= 500).sum())]


def test_histogram_limit_is_close_to_the_exact_one():
    gen = torch.Generator().manual_seed(0)
    exact, histogram = calibrated(quantile="exact"), calibrated(quantile="histogram")
    state = exact.state_dict()
    state["count"] = torch.randint(0, 6, (2000,), generator=gen, dtype=torch.int32)
    state["average"] = torch.exp(0.2 * torch.randn(2000, generator=gen))
    for policy in (exact, histogram):
        policy.load_state_dict(state)
    assert torch.isclose(histogram.prompt_limit(), exact.prompt_limit(), rtol=1e-3)
    for z in (-1.0, 0.25, 2.0):  # the MAD side too, not only the median
        exact.z = histogram.z = z
        exact._limit = histogram._limit = None
        assert torch.isclose(histogram.prompt_limit(), exact.prompt_limit(), rtol=1e-3)
    # Moved by observe, the histogram tracks the same population as a rebuilt one.
    histogram.scale.values.fill_(1.0)
    histogram.observe(1 + torch.rand(64, generator=gen), torch.full((64,), 800), torch.ones(64, dtype=torch.bool),
                      torch.randint(0, 2000, (64,), generator=gen))
    rebuilt = calibrated(quantile="histogram")
    rebuilt.load_state_dict(histogram.state_dict())
    assert torch.equal(rebuilt.population.counts, histogram.population.counts)


def test_judge_fraction_measures_the_least_judged_pairs_in_the_judged_range():
    policy = calibrated(judge_fraction=0.25)
    policy.count[:8] = torch.tensor([5, 0, 3, 0, 1, 9, 0, 0], dtype=torch.int32)
    pairs = torch.arange(8)
    t = torch.tensor([900, 900, 900, 900, 900, 900, 100, 100])  # pairs 6 and 7: below min_timestep=500
    noise = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.0, 0.0])
    chosen = policy.judge(pairs, t, noise)
    assert chosen.tolist() == [False, True, False, True, False, False, False, False]  # counts 0, 0 in range
    assert calibrated().judge(pairs, t, noise).all()  # judge_fraction 1: every sample
    with pytest.raises(ValueError, match="judge_fraction=0"):
        calibrated(judge_fraction=0)


def test_unfiltered_judge_fraction_logs_a_seeded_random_share_and_keeps_every_sample():
    policy = build_policy(OmegaConf.create({"kind": "none", "judge_fraction": 0.25}), 1000, 2000)
    pairs, t = torch.arange(32), torch.randint(0, 1000, (32,))
    noise = torch.rand(32, generator=torch.Generator().manual_seed(0))
    chosen = policy.judge(pairs, t, noise)
    assert int(chosen.sum()) == 8 and torch.equal(chosen, noise <= noise.sort().values[7])
    assert torch.equal(policy.judge(pairs, t, noise), chosen)  # the same draws, the same samples
    assert policy.keep(torch.full((32,), math.nan), t, 0, pairs).all()  # unjudged samples still train
    assert build_policy(OmegaConf.create({"kind": "none"}), 1000, 2000).judge(pairs, t, noise).all()
    with pytest.raises(ValueError, match="judge_fraction=1.5"):
        build_policy(OmegaConf.create({"kind": "none", "judge_fraction": 1.5}), 1000, 2000)


def test_sticky_keeps_a_dropped_pair_out_after_its_average_sinks_and_survives_a_resume():
    def after_sinking(policy):
        calibrate_population(policy)
        loud, t, valid = torch.tensor([1000]), torch.tensor([800]), torch.tensor([True])
        for _ in range(2):
            policy.observe(torch.tensor([3.0]), t, valid, loud)
        keep = policy.keep(torch.ones(1), t, step=0, pairs=loud)
        assert not keep.any()
        policy.observe(torch.tensor([3.0]), t, valid, loud, keep)  # the step that dropped it is observed
        for _ in range(6):  # no longer trained on, its magnitude falls back among the others
            policy.observe(torch.tensor([1.0]), t, valid, loud)
        assert policy.average[1000] < policy.prompt_limit()
        return policy, bool(policy.keep(torch.ones(1), t, step=0, pairs=loud))

    assert after_sinking(calibrated())[1]  # the default: back in the loss
    sticky, kept = after_sinking(calibrated(sticky=True))
    assert not kept and sticky.dropped.sum() == 1
    resumed = calibrated(sticky=True)
    resumed.load_state_dict(sticky.state_dict())
    keep = resumed.keep(torch.ones(2), torch.tensor([800, 800]), step=0, pairs=torch.tensor([1000, 3]))
    assert keep.tolist() == [False, True]


def test_sticky_marks_nothing_before_start_step():
    policy = calibrated(sticky=True, start_step=5)
    calibrate_population(policy)
    loud, t, valid = torch.tensor([1000]), torch.tensor([800]), torch.tensor([True])
    for step in range(3):
        keep = policy.keep(torch.ones(1), t, step=step, pairs=loud)
        assert keep.all()
        policy.observe(torch.tensor([3.0]), t, valid, loud, keep)
    assert not policy.dropped.any()  # loud, but not dropped before start_step: not dropped for good either
    for _ in range(6):
        policy.observe(torch.tensor([1.0]), t, valid, loud)
    assert policy.keep(torch.ones(1), t, step=5, pairs=loud).all()
