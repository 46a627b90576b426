import torch

from filters.magnitude import predict_pair, text_conditional_magnitude


def test_magnitude_matches_hand_computation(tiny_components):
    comps = tiny_components
    unet = comps.unet.eval()
    cond = comps.encode_text(["a big red circle top left item1234", "a small blue square center item42"])
    uncond = comps.encode_text([""])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900, 300])
    with torch.no_grad():
        eps_cond, eps_uncond = predict_pair(unet, x, t, cond, uncond)
        got = text_conditional_magnitude(eps_cond, eps_uncond)
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
    with torch.no_grad():
        mag = text_conditional_magnitude(*predict_pair(comps.unet, x, torch.tensor([10, 500, 990]),
                                                       uncond.expand(3, -1, -1), uncond))
    assert torch.allclose(mag, torch.zeros(3), atol=1e-5)
