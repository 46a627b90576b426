"""Wen et al.'s memorization signal: ``||eps(x_t, e_prompt) - eps(x_t, e_empty)||_2`` per sample.

The magnitude is always taken in epsilon space, whatever the model predicts, so one threshold
means the same at every timestep and transfers between models. At fixed ``x_t`` the noise is
linear in the prediction: ``eps = sqrt(a) v + sqrt(1 - a) x_t`` for v-prediction and
``eps = (x_t - sqrt(a) x0) / sqrt(1 - a)`` for sample prediction (``a`` = alpha_bar_t), so the
difference of two predictions maps to the epsilon difference by one factor per sample
(:func:`epsilon_scale`). On v-prediction models (SD 2.x) the raw difference would be
``1 / sqrt(a)`` times the epsilon one: about 13x at t=981, 1x near t=0.
"""

from __future__ import annotations

import torch


def epsilon_scale(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample factor taking a difference of two predictions to the difference of their noises.

    ``scheduler`` is any diffusers scheduler with ``alphas_cumprod`` and
    ``config.prediction_type``; ``timesteps`` are train timesteps (a scalar or ``[B]``; a
    fractional one, as sigma schedulers use, is rounded).
    """
    t = torch.as_tensor(timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return torch.ones(t.shape, device=t.device)
    alpha_bar = scheduler.alphas_cumprod.to(t.device, torch.float32)
    a = alpha_bar[t.round().long().clamp(0, len(alpha_bar) - 1)]
    if kind == "v_prediction":
        return a.sqrt()
    if kind == "sample":
        return a.sqrt() / (1 - a).sqrt()  # the sign, -1, is lost in the norm
    raise ValueError(f"prediction_type={kind!r}; the magnitude supports epsilon, v_prediction and sample")


def text_conditional_magnitude(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scheduler,
                               timesteps: torch.Tensor) -> torch.Tensor:
    """The epsilon-space L2 norm of the two predictions' difference over every non-batch dimension,
    in float32 whatever the prediction dtype; ``timesteps`` are the predictions' own (scalar or ``[B]``)."""
    raw = (pred_cond.float() - pred_uncond.float()).flatten(1).norm(dim=1)
    return raw * epsilon_scale(scheduler, timesteps).to(raw.device)


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


def magnitude_gradient(unet, scheduler, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                       eps_uncond: torch.Tensor, generations: int = 1, joint: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's mean magnitude over its ``generations`` (``joint``: the norm of all their
    differences stacked, ``sqrt(sum m_g^2)``) and its gradient wrt its embedding ``cond [P, L, D]``.

    The prompt's embedding goes in the conditional slot; the unconditional prediction
    ``eps_uncond`` (inputs ``x``/``t`` hold ``P * generations`` samples, prompt-major) is fixed.
    Each prompt's magnitude depends only on its own embedding, so one backward of the summed
    magnitudes gives every prompt's gradient. Only the embeddings get gradients.
    """
    emb = cond.detach().clone().requires_grad_(True)
    eps_cond = unet(x, t, encoder_hidden_states=emb.to(x.dtype).repeat_interleave(generations, dim=0)).sample
    per_image = text_conditional_magnitude(eps_cond, eps_uncond, scheduler, t).view(-1, generations)
    magnitude = per_image.norm(dim=1) if joint else per_image.mean(dim=1)
    (grad,) = torch.autograd.grad(magnitude.sum(), emb)
    return magnitude.detach(), grad


@torch.no_grad()
def unconditional_prediction(unet, x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """The empty prompt's noise prediction for every input."""
    return unet(x, t, encoder_hidden_states=uncond.expand(x.shape[0], *uncond.shape[1:])).sample
