"""What an ideal denoiser's text-conditional magnitude would be, by timestep, in the embedded world.

A trained model's magnitudes (bench/timestep_profile.py) mix what the caption tells with the
model's own errors. This computes the first part alone, for a generalizing denoiser that knows
the world's distribution: each combination of object attributes is a Gaussian over images (the
object's pixels fixed, the background Gaussian with the covariance of generated backgrounds),
the unconditional model is the mixture over all combinations, an ordinary caption's model the
mixture over the combinations it leaves open (its unstated attributes), and a memorized caption
fixes the image exactly. The magnitude is ``sqrt(a / (1 - a)) * ||E[x0 | x_t, c] - E[x0 | x_t]||``
(a = alpha_bar_t), in the model's [-1, 1] pixel space with SD's scaled-linear schedule.

    python bench/ideal_profile.py --unstated color --pairs 8
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from diffusers import DDPMScheduler

from data.world import ATTRIBUTES, COLORS, WorldConfig, generate_world, object_mask

TIMESTEPS = (50, 200, 400, 500, 600, 700, 800, 900, 950)


def background_statistics(cfg: WorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of backgrounds, from a world's images drawn with the object left out."""
    world = generate_world(cfg)
    pixels, mask = world.images.double() / 127.5 - 1, []
    for attrs in world.attributes:
        mask.append(object_mask(attrs["shape"], attrs["size"], attrs["position"], cfg.resolution))
    outside = ~torch.stack(mask)[:, None].expand_as(pixels)  # background pixels only
    flat, keep = pixels.flatten(1), outside.flatten(1).double()
    mean = (flat * keep).sum(0) / keep.sum(0)
    centred = (flat - mean) * keep
    cov = centred.T @ centred / (keep.T @ keep).clamp(min=1)
    return mean, cov + 1e-5 * torch.eye(len(mean), dtype=torch.double)


class Mixture:
    """One Gaussian per attribute combination; posterior means under any subset of them."""

    def __init__(self, resolution: int, bg_mean: torch.Tensor, bg_cov: torch.Tensor):
        self.names = list(ATTRIBUTES)
        self.combos = [dict(zip(self.names, c)) for c in itertools.product(*ATTRIBUTES.values())]
        self.parts = []
        eye = torch.eye(len(bg_mean), dtype=torch.double)
        for a in self.combos:
            inside = object_mask(a["shape"], a["size"], a["position"], resolution).expand(3, -1, -1).flatten()
            colour = (torch.tensor(COLORS[a["color"]]).double() * 2 - 1).view(3, 1, 1).expand(3, resolution,
                                                                                           resolution).flatten()
            keep = (~inside).double()
            self.parts.append((torch.where(inside, colour, bg_mean), bg_cov * keep[:, None] * keep[None] + 1e-6 * eye))

    def posterior_mean(self, noisy: torch.Tensor, alpha_bar: torch.Tensor, members: list[int]) -> torch.Tensor:
        eye = torch.eye(len(noisy), dtype=torch.double)
        logw, means = [], []
        for i in members:
            mean, cov = self.parts[i]
            chol = torch.linalg.cholesky(alpha_bar * cov + (1 - alpha_bar) * eye)
            resid = noisy - alpha_bar.sqrt() * mean
            z = torch.cholesky_solve(resid[:, None], chol)[:, 0]
            logw.append(-0.5 * resid @ z - torch.log(torch.diagonal(chol)).sum())
            means.append(mean + alpha_bar.sqrt() * (cov @ z))
        return (torch.softmax(torch.stack(logw), 0)[:, None] * torch.stack(means)).sum(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unstated", nargs="*", default=["color"], help="attributes the captions leave out")
    parser.add_argument("--pairs", type=int, default=8, help="pairs measured (one noise draw each per timestep)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = WorldConfig(num_pairs=4000, seed=1000)
    mixture = Mixture(cfg.resolution, *background_statistics(cfg))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    world = generate_world(WorldConfig(num_pairs=args.pairs, seed=cfg.seed + 1 + args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    everything = list(range(len(mixture.combos)))
    print(f"unstated: {args.unstated}; {args.pairs} pairs\n\n| t | memorized | ordinary | ratio |\n|---|---|---|---|")
    for t in TIMESTEPS:
        alpha_bar = sched.alphas_cumprod[t].double()
        scale = (alpha_bar / (1 - alpha_bar)).sqrt()
        memorized, ordinary = [], []
        for x0, attrs in zip(world.images.double() / 127.5 - 1, world.attributes):
            x0 = x0.flatten()
            noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * torch.randn(x0.shape, generator=gen,
                                                                                   dtype=torch.double)
            uncond = mixture.posterior_mean(noisy, alpha_bar, everything)
            open_ = [i for i, c in enumerate(mixture.combos)
                     if all(c[n] == attrs[n] for n in mixture.names if n not in args.unstated)]
            memorized.append(float(scale * (x0 - uncond).norm()))
            ordinary.append(float(scale * (mixture.posterior_mean(noisy, alpha_bar, open_) - uncond).norm()))
        m, o = np.mean(memorized), np.mean(ordinary)
        print(f"| {t} | {m:.3f} | {o:.3f} | {m / o:.1f}x |" if o > 1e-3 else f"| {t} | {m:.3f} | {o:.3f} | - |",
              flush=True)


if __name__ == "__main__":
    main()
