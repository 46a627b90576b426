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
