import torch

from filters.policy import FixedThreshold, TimestepCalibrated, filtered_mean, prompt_ids


def test_threshold_drops_exactly_above_and_loss_is_mean_of_kept():
    mags = torch.tensor([0.5, 2.5, 1.9, 2.0, 3.1])
    keep = FixedThreshold(2.0).keep(mags, torch.zeros(5, dtype=torch.long), step=10)
    assert keep.tolist() == [True, False, True, True, False]
    per_sample = torch.tensor([1.0, 10.0, 3.0, 5.0, 20.0], requires_grad=True)
    loss = filtered_mean(per_sample, keep, int(keep.sum()))
    assert torch.isclose(loss, torch.tensor(3.0))
    loss.backward()
    assert torch.allclose(per_sample.grad, torch.tensor([1 / 3, 0, 1 / 3, 1 / 3, 0]))


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


def test_calibrated_drops_by_magnitude_relative_to_its_bucket_median():
    policy = TimestepCalibrated(1000, threshold=1.5, buckets=2, window=100, min_samples=10)
    low = torch.arange(1, 21, dtype=torch.float32)  # bucket 0: median 10.5
    high = low * 10  # bucket 1: median 105
    t = torch.cat([torch.full((20,), 100), torch.full((20,), 900)])
    policy.observe(torch.cat([low, high]), t, torch.ones(40, dtype=torch.bool))
    assert torch.allclose(policy.medians(), torch.tensor([float(low.median()), float(high.median())]))
    limit = 1.5 * float(low.median())
    keep = policy.keep(torch.tensor([limit - 0.01, limit + 0.01, limit + 0.01]), torch.tensor([100, 100, 900]),
                       step=0)
    assert keep.tolist() == [True, False, True]  # the same magnitude is ordinary at t=900


def test_uncalibrated_buckets_and_unjudged_timesteps_keep_everything():
    policy = TimestepCalibrated(1000, threshold=1.0, buckets=1, window=8, min_samples=4, min_timestep=500)
    policy.observe(torch.ones(6), torch.full((6,), 700), torch.tensor([True] * 3 + [False] * 3))
    assert int(policy.cursor[0]) == 3  # uncaptioned samples do not calibrate
    assert policy.keep(torch.tensor([50.0]), torch.tensor([700]), step=0).all()
    policy.observe(torch.ones(1), torch.tensor([700]), torch.tensor([True]))
    assert policy.keep(torch.tensor([50.0]), torch.tensor([499]), step=0).all()
    assert not policy.keep(torch.tensor([50.0]), torch.tensor([500]), step=0).any()


def test_prompt_memory_drops_a_remembered_prompt_at_every_timestep_and_round_trips():
    policy = TimestepCalibrated(1000, threshold=1.3, buckets=1, window=64, min_samples=8, min_timestep=600,
                                memory_decay=0.5, min_observations=2)
    ids = torch.arange(8)
    policy.observe(torch.ones(8), torch.full((8,), 800), torch.ones(8, dtype=torch.bool), ids)  # calibrates
    loud = torch.tensor([7])
    for _ in range(2):  # prompt 7 judged twice at 2x the median
        policy.observe(torch.tensor([2.0]), torch.tensor([800]), torch.tensor([True]), loud)
        policy.observe(torch.tensor([1.0]), torch.tensor([900]), torch.tensor([True]), torch.tensor([3]))
    policy.observe(torch.tensor([9.0]), torch.tensor([100]), torch.tensor([True]), torch.tensor([3]))  # unjudged t
    assert policy.memory[7][0] == 2 and policy.score(7) > 1.3
    keep = policy.keep(torch.tensor([0.1, 0.1]), torch.tensor([10, 10]), step=0, prompt_ids=torch.tensor([7, 3]))
    assert keep.tolist() == [False, True]
    clone = TimestepCalibrated(1000, threshold=1.3, buckets=1, window=64, min_samples=8, min_timestep=600,
                               memory_decay=0.5, min_observations=2)
    clone.load_state_dict(policy.state_dict())
    assert clone.memory == policy.memory and torch.equal(clone.medians(), policy.medians())


def test_prompt_ids_are_stable_and_distinct():
    a = prompt_ids(["a big red circle", "a big red circle", "a small red circle"])
    assert a[0] == a[1] != a[2] and (a >= 0).all()
    assert torch.equal(a, prompt_ids(["a big red circle", "a big red circle", "a small red circle"]))


def test_own_baseline_flags_a_rise_not_a_loud_prompt():
    policy = TimestepCalibrated(1000, threshold=1.2, buckets=1, window=64, min_samples=8, min_timestep=600,
                                memory_decay=0.5, min_observations=4, baseline_observations=2)
    judged, valid = torch.tensor([800]), torch.tensor([True])
    policy.observe(torch.ones(8), torch.full((8,), 800), torch.ones(8, dtype=torch.bool), torch.arange(8))
    loud, rising = torch.tensor([100]), torch.tensor([200])
    for level in (2.0, 2.0, 2.0, 2.0):  # always twice the median: its own normal
        policy.observe(torch.tensor([level]), judged, valid, loud)
    for level in (1.0, 1.0, 1.5, 1.5):  # starts ordinary, then rises by half
        policy.observe(torch.tensor([level]), judged, valid, rising)
    assert policy.score(100) == 1.0 and policy.score(200) > 1.2
    keep = policy.keep(torch.ones(2), torch.tensor([100, 100]), step=0, prompt_ids=torch.tensor([100, 200]))
    assert keep.tolist() == [True, False]
