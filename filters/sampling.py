"""Classifier-free-guidance sampling that records the magnitude at every step.

Generation, detection and mitigation share this loop: the conditional and unconditional
predictions CFG computes anyway give the magnitude for free, and ``stop_after`` lets detection
stop after the first steps instead of paying for the whole trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from filters.magnitude import predict_pair, text_conditional_magnitude
from filters.mitigation import Mitigation, mitigate_embeddings


def latent_shape(unet) -> tuple[int, int, int]:
    """``(channels, size, size)`` of one latent the UNet denoises."""
    c = unet.config
    return (c.in_channels, c.sample_size, c.sample_size)


def initial_latents(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One latent per seed, each from its own generator, so batching never changes a sample.

    Drawn in float32 on the CPU, as diffusers pipelines draw from CPU generators, then moved.
    """
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device, dtype)


@dataclass(frozen=True)
class PromptSeeds:
    """Starting noises of one's own per prompt, as Wen et al.'s detection seeds them.

    Generation ``j`` of prompt ``i`` (its position in the prompt list) is the ``j``-th draw of a
    generator seeded ``seed + i`` (the reference: ``seed = i + gen_seed``, its generations drawn
    in turn). A plain list of seeds instead gives every prompt the same noise per generation, so
    a one-generation ranking would hang on that one shared draw.
    """

    seed: int
    generations: int

    def __len__(self) -> int:
        return self.generations

    def latent(self, prompt: int, generation: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Prompt ``prompt``'s ``generation``-th noise, drawn in float32 on the CPU; the same whatever the batch."""
        generator = torch.Generator().manual_seed(self.seed + prompt)
        for _ in range(generation):
            torch.randn(shape, generator=generator)
        return torch.randn(shape, generator=generator)


Seeds = list[int] | PromptSeeds


def pair_latents(seeds: Seeds, pairs: list[tuple[int, int]], shape: tuple[int, ...],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Starting noise of each ``(prompt index, generation index)`` pair under ``seeds``."""
    if isinstance(seeds, PromptSeeds):
        return torch.stack([seeds.latent(p, j, shape) for p, j in pairs]).to(device, dtype)
    return initial_latents([seeds[j] for _, j in pairs], shape, device, dtype)


@torch.no_grad()
def guided_sample(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor,
                  num_steps: int, guidance_scale: float, stop_after: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run DDIM-style sampling; return final latents and magnitudes ``[steps_run, batch]``.

    ``scheduler`` is any diffusers scheduler; it is reset here, so callers may share one.
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    magnitudes = []
    for i, t in enumerate(scheduler.timesteps):
        if stop_after is not None and i >= stop_after:
            break
        model_in = scheduler.scale_model_input(latents, t)
        tt = t.expand(latents.shape[0]).to(latents.device)
        eps_cond, eps_uncond = predict_pair(unet, model_in, tt, cond, uncond)
        magnitudes.append(text_conditional_magnitude(eps_cond, eps_uncond, scheduler, tt))
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents, torch.stack(magnitudes)


def sample_prompts(comps, prompts: list[str], seeds: Seeds, num_steps: int, guidance_scale: float,
                   batch_size: int, stop_after: int | None = None, progress: bool = False,
                   mitigation: Mitigation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[P, S, ...]`` and magnitudes ``[P, S, steps_run]`` for every prompt x seed.

    Many (prompt, generation) pairs share each forward; each pair's noise (``seeds``: one seed
    per generation shared by every prompt, or :class:`PromptSeeds`) is the same whatever the
    batch, so results do not depend on ``batch_size``. With ``mitigation`` each pair's prompt
    embedding is first optimized at the first step (:mod:`filters.mitigation`) and the recorded
    magnitudes are those of the mitigated trajectory; in its joint mode a prompt's seeds share one
    forward batch and one embedding.
    """
    pairs = [(p, j) for p in range(len(prompts)) for j in range(len(seeds))]
    uncond = comps.encode_text([""])
    scheduler = comps.sampling_scheduler()
    if mitigation is not None and mitigation.mode == "joint":
        batch_size = len(seeds) * max(1, batch_size // len(seeds))
    latents_out, mags = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="sample", disable=not progress):
        chunk = pairs[start:start + batch_size]
        cond = comps.encode_text([prompts[p] for p, _ in chunk])
        latents = pair_latents(seeds, chunk, latent_shape(comps.unet), comps.unet.device, comps.unet.dtype)
        if mitigation is not None:
            cond = mitigate_embeddings(comps.unet, scheduler, cond, uncond, latents, num_steps, mitigation,
                                       len(seeds)).embeddings
        latents, magnitude = guided_sample(comps.unet, scheduler, cond, uncond, latents, num_steps,
                                           guidance_scale, stop_after=stop_after)
        latents_out.append(latents)
        mags.append(magnitude.T.cpu())
    shape = (len(prompts), len(seeds))
    return torch.cat(latents_out).view(*shape, *latents_out[0].shape[1:]), torch.cat(mags).view(*shape, -1)
