"""Wen et al.'s memorization signal: ``||eps(x_t, e_prompt) - eps(x_t, e_empty)||_2`` per sample."""

from __future__ import annotations

import torch


def text_conditional_magnitude(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """L2 norm over every non-batch dimension, in float32 whatever the prediction dtype."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)


def predict_pair(unet, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional predictions in one batched forward, as CFG samplers do."""
    if uncond.shape[0] == 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    out = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
               encoder_hidden_states=torch.cat([cond, uncond])).sample
    eps_cond, eps_uncond = out.chunk(2)
    return eps_cond, eps_uncond


def first_step_input(scheduler, latents: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet input and timesteps ``[B]`` of the first of ``num_steps`` sampling steps from unscaled noise ``latents``."""
    scheduler.set_timesteps(num_steps, device=latents.device)
    t = scheduler.timesteps[0]
    return scheduler.scale_model_input(latents * scheduler.init_noise_sigma, t), t.expand(latents.shape[0])


def magnitude_gradient(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, eps_uncond: torch.Tensor,
                       generations: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's mean magnitude over its ``generations`` and its gradient wrt its embedding ``cond [P, L, D]``.

    The prompt's embedding goes in the conditional slot; the unconditional prediction
    ``eps_uncond`` (inputs ``x``/``t`` hold ``P * generations`` samples, prompt-major) is fixed.
    Each prompt's magnitude depends only on its own embedding, so one backward of the summed
    magnitudes gives every prompt's gradient. Only the embeddings get gradients.
    """
    emb = cond.detach().clone().requires_grad_(True)
    eps_cond = unet(x, t, encoder_hidden_states=emb.to(x.dtype).repeat_interleave(generations, dim=0)).sample
    magnitude = text_conditional_magnitude(eps_cond, eps_uncond).view(-1, generations).mean(dim=1)
    (grad,) = torch.autograd.grad(magnitude.sum(), emb)
    return magnitude.detach(), grad


@torch.no_grad()
def unconditional_prediction(unet, x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """The empty prompt's noise prediction for every input."""
    return unet(x, t, encoder_hidden_states=uncond.expand(x.shape[0], *uncond.shape[1:])).sample
