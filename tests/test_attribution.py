"""Trigger tokens: the gradient-based significance against a finite-difference estimate."""

import torch

from filters.attribution import highlight, prompt_tokens, token_significance
from filters.detection import first_steps_magnitudes
from filters.magnitude import first_step_input, magnitude_gradient, unconditional_prediction
from filters.sampling import PromptSeeds, initial_latents, latent_shape


def mean_first_step_magnitudes(comps, embs, seeds, num_steps):
    """The quantity the significance differentiates, for each embedding of ``embs [E, L, D]``, in one forward."""
    latents = initial_latents(seeds, latent_shape(comps.unet), dtype=torch.float64)
    x, t = first_step_input(comps.sampling_scheduler(), latents, num_steps)
    x, t = x.repeat(len(embs), 1, 1, 1), t.repeat(len(embs))
    eps_uncond = unconditional_prediction(comps.unet, x, t, comps.encode_text([""]))
    with torch.no_grad():
        eps_cond = comps.unet(x, t, encoder_hidden_states=embs.repeat_interleave(len(seeds), dim=0)).sample
    return (eps_cond - eps_uncond).flatten(1).norm(dim=1).view(len(embs), len(seeds)).mean(dim=1)


def test_token_significance_matches_finite_differences(tiny_components):
    comps = tiny_components
    comps.unet.double().eval()
    comps.text_encoder.double()
    prompts, seeds, steps = ["a big red circle top left item1234"], [3, 4], 50
    found = token_significance(comps, prompts, seeds, steps, batch_size=8)
    h = 1e-4
    for prompt, sig in zip(prompts, found):
        assert sig.tokens == prompt_tokens(comps.tokenizer, prompt) and len(sig.scores) == len(sig.tokens)
        emb = comps.encode_text([prompt])
        latents = initial_latents(seeds, latent_shape(comps.unet), dtype=torch.float64)
        x, t = first_step_input(comps.sampling_scheduler(), latents, steps)
        eps_uncond = unconditional_prediction(comps.unet, x, t, comps.encode_text([""]))
        magnitude, grad = magnitude_gradient(comps.unet, comps.sampling_scheduler(), x, t, emb, eps_uncond,
                                             generations=len(seeds))
        assert abs(float(magnitude) - sig.magnitude) < 1e-9
        # Along each token's gradient direction the directional derivative is that gradient's norm;
        # along a random direction through every token, the gradient predicts the change too.
        directions = torch.zeros(len(sig.tokens) + 1, *emb.shape[1:], dtype=torch.float64)
        for i in range(len(sig.tokens)):
            directions[i, i + 1] = grad[0, i + 1] / grad[0, i + 1].norm()
        directions[-1] = torch.randn(emb.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        shifted = torch.cat([emb + h * directions, emb - h * directions])
        values = mean_first_step_magnitudes(comps, shifted, seeds, steps)
        estimates = (values[: len(directions)] - values[len(directions):]) / (2 * h)
        assert abs(float(mean_first_step_magnitudes(comps, emb, seeds, steps)[0]) - sig.magnitude) < 1e-6
        for token, estimate, score in zip(sig.tokens, estimates[:-1].tolist(), sig.scores):
            assert abs(estimate - score) < 1e-5 * max(score, 1e-3), (prompt, token, estimate, score)
        predicted = float((grad[0] * directions[-1]).sum())
        assert abs(float(estimates[-1]) - predicted) < 1e-5 * float(grad.norm() * directions[-1].norm())
        assert max(sig.scores) > 0


def test_highlight_marks_the_strongest_tokens(tiny_components):
    from filters.attribution import TokenSignificance

    sig = TokenSignificance("a big red circle", ["a", "big", "red", "circle"], [0.1, 0.2, 1.0, 0.6], 1.0)
    assert highlight(sig, 0.5, color=False) == "a big [[red]] [[circle]]"
    assert "\033[1;37;41mred\033[0m" in highlight(sig, 0.5, color=True)
    assert sig.to_json()["tokens"][2] == {"token": "red", "significance": 1.0}


def test_significance_over_a_guided_trajectory(tiny_components):
    """Over k steps the gradients are taken along the trajectory CFG sampling takes: the mean
    magnitude they report is the detector's k-step score of the same noises."""
    comps = tiny_components
    comps.unet.eval()
    prompts = ["a big red circle top left item1234", "a small blue square bottom right item77"]
    seeds = PromptSeeds(3, 2)
    found = token_significance(comps, prompts, seeds, 10, batch_size=2, steps=3, guidance_scale=5.0)
    detector = first_steps_magnitudes(comps, prompts, seeds, 10, 5.0, first_steps=3, batch_size=8)
    for sig, magnitudes in zip(found, detector):
        assert abs(sig.magnitude - float(magnitudes.mean())) < 1e-5
    first = token_significance(comps, prompts, seeds, 10, batch_size=2, steps=1)
    assert all(abs(f.magnitude - float(m[:, 0].mean())) < 1e-5 for f, m in zip(first, detector))
    assert all(a.scores != b.scores and len(a.scores) == len(b.scores) for a, b in zip(found, first))
