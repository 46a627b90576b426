"""The magnitude: the norm written out by hand, in epsilon space for every prediction type."""

import pytest
import torch

from filters.magnitude import predict_pair, text_conditional_magnitude
from filters.sampling import guided_sample, initial_latents, latent_shape


def test_magnitude_matches_hand_computation(tiny_components):
    comps = tiny_components
    unet = comps.unet.eval()
    cond = comps.encode_text(["a big red circle top left item1234", "a small blue square center item42"])
    uncond = comps.encode_text([""])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900, 300])
    with torch.no_grad():
        eps_cond, eps_uncond = predict_pair(unet, x, t, cond, uncond)
        got = text_conditional_magnitude(eps_cond, eps_uncond, comps.noise_scheduler, t)
        for i in range(2):  # one sample, two separate forwards, the norm written out
            c = unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=cond[i:i + 1]).sample
            u = unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=uncond).sample
            hand = sum(float(v) ** 2 for v in (c - u).flatten()) ** 0.5
            assert abs(float(got[i]) - hand) < 1e-4 * max(hand, 1.0)
    assert (got > 0).all()


def test_empty_prompt_has_zero_magnitude(tiny_components):
    comps = tiny_components
    uncond = comps.encode_text([""])
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([10, 500, 990])
    with torch.no_grad():
        mag = text_conditional_magnitude(*predict_pair(comps.unet, x, t, uncond.expand(3, -1, -1), uncond),
                                         comps.noise_scheduler, t)
    assert torch.allclose(mag, torch.zeros(3), atol=1e-5)


def to_epsilon(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, kind: str) -> torch.Tensor:
    """The noise a prediction implies at ``x_t``, from the forward process x_t = sqrt(a) x0 + sqrt(1-a) eps."""
    a = torch.tensor(alpha_bar, dtype=torch.float64)
    if kind == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
        return a.sqrt() * pred + (1 - a).sqrt() * x_t
    return (x_t - a.sqrt() * pred) / (1 - a).sqrt()  # sample: pred = x0


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_magnitude_is_in_epsilon_space_for_every_prediction_type(tiny_components, kind):
    """The same UNet read as a v- (or x0-) prediction model: its magnitude is the norm of the difference of
    the noises its two predictions imply, by hand, at every timestep; the raw difference is not."""
    comps = tiny_components
    comps.noise_scheduler.register_to_config(prediction_type=kind)
    unet = comps.unet.eval()
    cond, uncond = comps.encode_text(["a big red circle top left item1234"] * 3), comps.encode_text([""])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([981, 500, 20])
    with torch.no_grad():
        pred_cond, pred_uncond = predict_pair(unet, x, t, cond, uncond)
        got = text_conditional_magnitude(pred_cond, pred_uncond, comps.noise_scheduler, t)
    raw = (pred_cond - pred_uncond).flatten(1).norm(dim=1)
    for i in range(3):
        a = float(comps.noise_scheduler.alphas_cumprod[t[i]])
        eps = [to_epsilon(p[i].double(), x[i].double(), a, kind) for p in (pred_cond, pred_uncond)]
        hand = float((eps[0] - eps[1]).norm())
        assert abs(float(got[i]) - hand) < 1e-4 * hand
    assert not torch.allclose(got, raw, rtol=1e-2)  # the raw difference would be another scale at high noise


def test_guided_sampling_records_epsilon_space_magnitudes(tiny_components):
    """Detection and generation record the magnitude through the sampling scheduler's own timesteps."""
    comps = tiny_components
    comps.unet.eval()
    comps.noise_scheduler.register_to_config(prediction_type="v_prediction")
    scheduler = comps.sampling_scheduler()
    cond, uncond = comps.encode_text(["a small blue square center item42"]), comps.encode_text([""])
    latents = initial_latents([5], latent_shape(comps.unet))
    _, magnitudes = guided_sample(comps.unet, scheduler, cond, uncond, latents, 10, 3.0, stop_after=1)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        x = scheduler.scale_model_input(latents * scheduler.init_noise_sigma, t)
        pred_cond, pred_uncond = predict_pair(comps.unet, x, t.expand(1), cond, uncond)
    a = float(scheduler.alphas_cumprod[t])
    hand = (to_epsilon(pred_cond.double(), x.double(), a, "v_prediction")
            - to_epsilon(pred_uncond.double(), x.double(), a, "v_prediction")).norm()
    assert scheduler.config.prediction_type == "v_prediction"
    assert abs(float(magnitudes[0, 0]) - float(hand)) < 1e-4 * float(hand)
