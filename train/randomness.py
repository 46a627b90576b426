"""Each sample's noise, timestep and caption dropout, addressed by its place in the global batch.

A micro-step's draws come from one generator seeded by ``(seed, micro-step)`` for the whole
global batch (every rank's samples); each rank takes the slice at its position. A sample
therefore gets the same draws whether it trains on one process with batch 2B or on either of
two processes with batch B (the data sampler slices global batches the same way), so the
filter sees the same noisy inputs and makes the same decisions. On one process the stream is
the one earlier versions drew per rank, so single-process runs reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleDraws:
    """One rank's slice: noise like the latents, integer timesteps, and which samples keep their caption."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    captioned: torch.Tensor


def micro_step_generator(seed: int, micro_step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + micro_step * 1_009)


def draw(seed: int, micro_step: int, latent_shape: torch.Size, rank: int, world: int, num_train_timesteps: int,
         caption_dropout: float, noise_offset: float = 0.0) -> SampleDraws:
    """The draws of rank ``rank``'s ``latent_shape[0]`` samples (on the CPU; callers move them).

    Every rank draws the whole global batch (cheap next to a UNet step) and keeps its slice.
    """
    n = latent_shape[0]
    total = n * world
    gen = micro_step_generator(seed, micro_step)
    noise = torch.randn((total, *latent_shape[1:]), generator=gen)
    if noise_offset:  # offset noise (per sample and channel) as diffusers' train_text_to_image adds it
        noise += noise_offset * torch.randn((total, latent_shape[1], 1, 1), generator=gen)
    timesteps = torch.randint(0, num_train_timesteps, (total,), generator=gen)
    captioned = torch.rand(total, generator=gen) >= caption_dropout
    mine = slice(rank * n, (rank + 1) * n)
    return SampleDraws(noise=noise[mine], timesteps=timesteps[mine], captioned=captioned[mine])


@dataclass
class NoisedBatch:
    """One micro-step's training inputs: clean latents, the draws, and the noisy latents."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    captioned: torch.Tensor
    noisy: torch.Tensor


def noised_batch(comps, pixels: torch.Tensor, seed: int, micro_step: int, rank: int, world: int,
                 caption_dropout: float, noise_offset: float, input_dtype: torch.dtype) -> NoisedBatch:
    """Encode ``pixels`` and noise them with micro-step ``micro_step``'s draws (:func:`draw`).

    The one place the training inputs are made: the loop trains on them and ``filter.choose``
    picks its threshold on them, so the threshold is a quantile of exactly the samples, noise and
    timesteps the run's first micro-steps train on.
    """
    n = pixels.shape[0]
    posterior = posterior_generators(seed, micro_step, rank, n) if comps.vae is not None else None
    latents = comps.encode_images(pixels, posterior).float()
    sched = comps.noise_scheduler
    drawn = draw(seed, micro_step, latents.shape, rank, world, sched.config.num_train_timesteps, caption_dropout,
                 noise_offset)
    noise, timesteps = drawn.noise.to(latents.device), drawn.timesteps.to(latents.device)
    noisy = sched.add_noise(latents, noise, timesteps).to(input_dtype)
    return NoisedBatch(latents, noise, timesteps, drawn.captioned.to(latents.device), noisy)


def posterior_generators(seed: int, micro_step: int, rank: int, n: int) -> list[torch.Generator]:
    """One generator per sample for the VAE's posterior sample, addressed like :func:`draw`."""
    first = micro_step_generator(seed, micro_step).initial_seed() * 7_919
    return [torch.Generator().manual_seed((first + rank * n + i + 1) % 2**63) for i in range(n)]


def judge_noise(seed: int, micro_step: int, rank: int, n: int, world: int) -> torch.Tensor:
    """One uniform draw per sample, addressed like :func:`draw`: the seeded tie-break of
    ``filter.judge_fraction``'s choice of which samples to judge."""
    gen = micro_step_generator(seed + 2, micro_step)  # seed + 1 draws the text-embedding noise
    return torch.rand(n * world, generator=gen)[rank * n:(rank + 1) * n]


def placebo_order(seed: int, micro_step: int, rank: int, n: int, world: int) -> torch.Tensor:
    """One uniform draw per sample, addressed like :func:`draw`: the seeded permutation by which a
    placebo filter (``filter.placebo``) moves magnitudes between judged samples."""
    gen = micro_step_generator(seed + 3, micro_step)
    return torch.rand(n * world, generator=gen)[rank * n:(rank + 1) * n]
