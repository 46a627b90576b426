"""Generation for evaluation: decoded images for every prompt x seed, seeds recorded."""

from __future__ import annotations

import torch

from filters.mitigation import Mitigation
from filters.sampling import sample_prompts
from train.components import Components


def generate(comps: Components, prompts: list[str], seeds: list[int], num_steps: int, guidance_scale: float,
             batch_size: int, progress: bool = True, mitigation: Mitigation | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[P, S, 3, H, W]`` in [0, 1] and magnitudes ``[P, S, steps]`` for every prompt x seed."""
    latents, magnitudes = sample_prompts(comps, prompts, seeds, num_steps, guidance_scale, batch_size,
                                         progress=progress, mitigation=mitigation)
    images = comps.decode_latents(latents.flatten(0, 1))
    return images.view(*latents.shape[:2], *images.shape[1:]).cpu(), magnitudes
