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


def calibrated(**kw) -> TimestepCalibrated:
    args = {"z": 3.0, "buckets": 2, "window": 400, "min_samples": 10, "min_timestep": 500, "memory_decay": 0.5,
            "min_observations": 2, "min_prompts": 20, "drop_observations": 2, **kw}
    return TimestepCalibrated(1000, **args)


def test_relative_magnitude_is_over_the_bucket_median():
    policy = calibrated()
    low = torch.arange(1, 21, dtype=torch.float32)  # bucket 0 (t < 500)
    high = low * 10  # bucket 1: median 105
    t = torch.cat([torch.full((20,), 100), torch.full((20,), 900)])
    policy.observe(torch.cat([low, high]), t, torch.ones(40, dtype=torch.bool))
    assert torch.allclose(policy.medians(), torch.tensor([float(low.median()), float(high.median())]))
    rel = policy.relative(torch.tensor([20.0, 20.0]), torch.tensor([100, 900]))  # torch medians: 10, 100
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
    assert policy.memory[1000][0] == 2 and policy.memory[1000][1] > policy.prompt_limit()
    ids = torch.tensor([1000, 1000, 3, 77])  # loud at low and high t, an ordinary prompt, an unseen one
    keep = policy.keep(torch.ones(4), torch.tensor([10, 990, 800, 800]), step=0, prompt_ids=ids)
    assert keep.tolist() == [False, False, True, True]


def test_nothing_is_dropped_before_enough_prompts_are_judged_or_before_start_step():
    policy = calibrated(min_prompts=100, start_step=0)
    calibrate_population(policy)
    policy.observe(torch.tensor([9.0, 9.0]), torch.tensor([800, 800]), torch.ones(2, dtype=torch.bool),
                   torch.tensor([1000, 1000]))
    assert policy.prompt_limit() == float("inf")
    assert policy.keep(torch.ones(1), torch.tensor([800]), step=0, prompt_ids=torch.tensor([1000])).all()
    late = calibrated(start_step=5)
    calibrate_population(late)
    late.observe(torch.tensor([9.0, 9.0]), torch.tensor([800, 800]), torch.ones(2, dtype=torch.bool),
                 torch.tensor([1000, 1000]))
    assert late.keep(torch.ones(1), torch.tensor([800]), step=4, prompt_ids=torch.tensor([1000])).all()
    assert not late.keep(torch.ones(1), torch.tensor([800]), step=5, prompt_ids=torch.tensor([1000])).any()


def test_uncaptioned_and_unjudged_samples_do_not_count_and_state_round_trips():
    policy = calibrated()
    calibrate_population(policy)
    before = dict(policy.memory)
    policy.observe(torch.tensor([5.0, 5.0]), torch.tensor([800, 100]), torch.tensor([False, True]),
                   torch.tensor([3, 4]))
    assert policy.memory == before  # uncaptioned at t=800, captioned but unjudged at t=100
    clone = calibrated()
    clone.load_state_dict(policy.state_dict())
    assert clone.memory == policy.memory
    assert torch.allclose(clone.medians(), policy.medians(), equal_nan=True)
    assert clone.prompt_limit() == policy.prompt_limit()


def test_prompt_ids_are_stable_and_distinct():
    a = prompt_ids(["a big red circle", "a big red circle", "a small red circle"])
    assert a[0] == a[1] != a[2] and (a >= 0).all()
    assert torch.equal(a, prompt_ids(["a big red circle", "a big red circle", "a small red circle"]))


def test_a_prompt_needs_drop_observations_judgements_before_it_is_dropped():
    policy = calibrated(drop_observations=4)
    calibrate_population(policy)
    loud = torch.tensor([1000])
    for count in range(1, 5):
        policy.observe(torch.tensor([3.0]), torch.tensor([800]), torch.tensor([True]), loud)
        kept = bool(policy.keep(torch.ones(1), torch.tensor([800]), step=0, prompt_ids=loud))
        assert kept == (count < 4)
