"""Batched generation for evaluation: many (prompt, seed) pairs per forward, seeds recorded."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from filters.sampling import guided_sample, initial_latents
from train.components import Components


def latent_shape(comps: Components) -> tuple[int, int, int]:
    c = comps.unet.config
    return (c.in_channels, c.sample_size, c.sample_size)


def generate(comps: Components, prompts: list[str], seeds: list[int], num_steps: int, guidance_scale: float,
             batch_size: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[P, S, 3, H, W]`` in [0, 1] and magnitudes ``[P, S, steps]`` for every prompt x seed."""
    pairs = [(p, s) for p in range(len(prompts)) for s in seeds]
    device = comps.unet.device
    uncond = comps.encode_text([""])
    scheduler = comps.sampling_scheduler()
    images, mags = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="generate", disable=not progress):
        chunk = pairs[start:start + batch_size]
        cond = comps.encode_text([prompts[p] for p, _ in chunk])
        latents = initial_latents([s for _, s in chunk], latent_shape(comps), device)
        latents, magnitude = guided_sample(comps.unet, scheduler, cond, uncond, latents, num_steps,
                                           guidance_scale)
        images.append(comps.decode_latents(latents).cpu())
        mags.append(magnitude.T.cpu())
    shape = (len(prompts), len(seeds))
    return torch.cat(images).view(*shape, *images[0].shape[1:]), torch.cat(mags).view(*shape, -1)
