"""Inference-time mitigation: under the target or 10 AdamW steps, per sample, whatever the batch."""

import pytest
import torch

from filters.mitigation import Mitigation, mitigate_embeddings
from filters.sampling import initial_latents, latent_shape, sample_prompts

PROMPTS = ["a big red circle top left item1234", "a small blue cross bottom item77", "a big green square center item5"]


def test_mitigation_gets_under_the_target_or_stops_at_ten(tiny_components):
    comps = tiny_components
    comps.unet.eval()
    cond, uncond = comps.encode_text(PROMPTS), comps.encode_text([""])
    latents = initial_latents([0, 1, 2], latent_shape(comps.unet))
    before = mitigate_embeddings(comps.unet, comps.sampling_scheduler(), cond, uncond, latents, 50,
                                 Mitigation(target=1e9)).initial_magnitude
    # One target within reach for some samples (the smallest magnitude's 90%), out of reach for others (1%).
    for target in (0.9 * float(before.min()), 0.01 * float(before.min())):
        result = mitigate_embeddings(comps.unet, comps.sampling_scheduler(), cond, uncond, latents, 50,
                                     Mitigation(target=target))
        torch.testing.assert_close(result.initial_magnitude, before)
        for final, steps in zip(result.final_magnitude, result.iterations):
            assert float(final) <= target or int(steps) == 10
            assert 1 <= int(steps) <= 10
        assert (result.final_magnitude < before).all()
        assert torch.equal(result.embeddings[:, 0], cond[:, 0])  # the start token is left alone
    # A sample optimizes the same alone as in a batch: each stops on its own.
    alone = mitigate_embeddings(comps.unet, comps.sampling_scheduler(), cond[1:2], uncond, latents[1:2], 50,
                                Mitigation(target=0.9 * float(before.min())))
    batched = mitigate_embeddings(comps.unet, comps.sampling_scheduler(), cond, uncond, latents, 50,
                                  Mitigation(target=0.9 * float(before.min())))
    torch.testing.assert_close(alone.embeddings[0], batched.embeddings[1], rtol=1e-4, atol=1e-5)


def test_mitigated_sampling_starts_from_the_optimized_embedding(tiny_components):
    comps = tiny_components
    comps.unet.eval()
    _, plain = sample_prompts(comps, PROMPTS, [7], 5, 7.5, batch_size=8)
    target = 0.8 * float(plain[:, 0, 0].min())
    _, mitigated = sample_prompts(comps, PROMPTS, [7], 5, 7.5, batch_size=8, mitigation=Mitigation(target=target))
    result = mitigate_embeddings(comps.unet, comps.sampling_scheduler(), comps.encode_text(PROMPTS),
                                 comps.encode_text([""]), initial_latents([7] * 3, latent_shape(comps.unet)), 5,
                                 Mitigation(target=target))
    torch.testing.assert_close(mitigated[:, 0, 0], result.final_magnitude, rtol=1e-4, atol=1e-5)
    assert (mitigated[:, 0, 0] < plain[:, 0, 0]).all()
    # Generations already under the target (a high threshold skips them all) are untouched.
    _, skipped = sample_prompts(comps, PROMPTS, [7], 5, 7.5, batch_size=8,
                                mitigation=Mitigation(target=target, threshold=1e9))
    torch.testing.assert_close(skipped, plain)


def test_joint_mode_optimizes_one_embedding_per_prompt_against_the_joint_norm(tiny_components):
    """The reference's mode: a prompt's generations share one embedding and its loss is the norm of all
    their differences stacked, sqrt(sum of per-image magnitudes squared)."""
    comps = tiny_components
    comps.unet.eval()
    seeds = [0, 1, 2, 3]
    cond = comps.encode_text([p for p in PROMPTS[:2] for _ in seeds])
    uncond, latents = comps.encode_text([""]), initial_latents(seeds * 2, latent_shape(comps.unet))
    per_image = mitigate_embeddings(comps.unet, comps.sampling_scheduler(), cond, uncond, latents, 50,
                                    Mitigation(target=1e9)).initial_magnitude.view(2, 4)
    joint_norm = per_image.pow(2).sum(dim=1).sqrt()
    target = 0.9 * float(joint_norm.min())
    result = mitigate_embeddings(comps.unet, comps.sampling_scheduler(), cond, uncond, latents, 50,
                                 Mitigation(target=target, mode="joint"), generations=len(seeds))
    torch.testing.assert_close(result.initial_magnitude, joint_norm, rtol=1e-4, atol=1e-5)
    assert result.embeddings.shape == cond.shape
    for p in range(2):  # one embedding for all of a prompt's generations
        assert all(torch.equal(result.embeddings[4 * p], result.embeddings[4 * p + g]) for g in range(4))
        assert float(result.final_magnitude[p]) <= target or int(result.iterations[p]) == 10
    assert (result.final_magnitude < joint_norm).all()
    # Sampling keeps a prompt's generations in one batch even when batch_size does not divide them.
    _, mitigated = sample_prompts(comps, PROMPTS[:2], seeds, 50, 7.5, batch_size=6, stop_after=1,
                                  mitigation=Mitigation(target=target, mode="joint"))
    torch.testing.assert_close(mitigated[:, :, 0].pow(2).sum(dim=1).sqrt(), result.final_magnitude, rtol=1e-4,
                               atol=1e-5)


def test_bad_mitigation_settings_are_named():
    with pytest.raises(ValueError, match="mitigation.target=0.0 must be > 0"):
        Mitigation(target=0.0)
    with pytest.raises(ValueError, match="mitigation.mode='shared'; expected one of"):
        Mitigation(target=1.0, mode="shared")
