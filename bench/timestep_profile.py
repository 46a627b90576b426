"""Text-conditional magnitude by timestep, duplicated against other pairs, for saved models.

Training-time magnitudes mix every timestep, and the timestep moves them more than
memorization does; this measures each timestep on its own. For a run's world and duplicates
(its ``config.yaml`` and ``manifest.json``), every duplicated pair and ``--other`` other pairs are
noised at each timestep with the same ``--noises`` draws for every model, and each model's
magnitude (filters/magnitude.py, the loop's own definition) is reported as the duplicated and
other means, their ratio, the per-sample AUC (how well one magnitude at that timestep tells the
two apart) and the other pairs' epsilon MSE of the conditional and the unconditional branch
(a growing gap between the two is the unconditional branch falling behind).

    python bench/timestep_profile.py runs/demo_X/unfiltered train/assets/embedded_base runs/demo_X/unfiltered/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from data.world import WorldConfig, generate_world
from filters.magnitude import predict_pair, text_conditional_magnitude
from train.components import load_pretrained

TIMESTEPS = (20, 100, 200, 300, 400, 500, 600, 700, 800, 900, 980)


def branch_predictions(comps, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
                       t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Magnitudes ``[noises, N]`` and each branch's epsilon MSE ``[noises, N]`` at timestep ``t``."""
    tt = torch.full((len(x0),), t)
    mags, mse_c, mse_u = [], [], []
    for eps in noise:
        noisy = comps.noise_scheduler.add_noise(x0, eps, tt)  # the training loop's own noising
        with torch.no_grad():
            pred_c, pred_u = predict_pair(comps.unet, noisy, tt, cond, uncond)
        mags.append(text_conditional_magnitude(pred_c, pred_u, comps.noise_scheduler, tt))
        mse_c.append(((pred_c - eps) ** 2).flatten(1).mean(1))
        mse_u.append(((pred_u - eps) ** 2).flatten(1).mean(1))
    return torch.stack(mags), torch.stack(mse_c), torch.stack(mse_u)


def profile(model: Path, x0: torch.Tensor, captions: list[str], is_dup: np.ndarray, noise: torch.Tensor,
            timesteps: tuple[int, ...], per_pair: int | None) -> tuple[list[dict], np.ndarray | None]:
    """Per-timestep rows, and with ``per_pair`` each pair's mean magnitude at that timestep."""
    comps = load_pretrained(str(model), local_files_only=True)
    cond, uncond = comps.encode_text(captions), comps.encode_text([""])
    rows, pairs = [], None
    for j, t in enumerate(timesteps):
        mags, mse_c, mse_u = branch_predictions(comps, x0, cond, uncond, noise[j], t)
        m = mags.numpy()
        if t == per_pair:
            pairs = m.mean(0)
        other = ~is_dup
        rows.append({"t": t, "duplicated": float(m[:, is_dup].mean()), "other": float(m[:, other].mean()),
                     "auc": float(roc_auc_score(np.tile(is_dup, len(m)), m.ravel())),
                     "other_mse_cond": float(mse_c[:, other].mean()),
                     "other_mse_uncond": float(mse_u[:, other].mean())})
    return rows, pairs


def print_pairs(pairs: np.ndarray, captions: list[str], is_dup: np.ndarray, t: int) -> None:
    """Each duplicated pair's magnitude and where it ranks among the other pairs': a pair near the
    others' median is one the model did not single out, whatever the group's mean says."""
    others = pairs[~is_dup]
    print(f"\nPer duplicated pair at t={t} (mean over noises; other pairs: median {np.median(others):.3f}, "
          f"p90 {np.quantile(others, 0.9):.3f}, max {others.max():.3f})\n")
    print("| caption | magnitude | share of other pairs below |")
    print("|---|---|---|")
    for i in np.flatnonzero(is_dup):
        print(f"| {captions[i]} | {pairs[i]:.3f} | {(others < pairs[i]).mean():.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run directory of the embedded world (config.yaml, manifest.json)")
    parser.add_argument("models", type=Path, nargs="+", help="model folders (diffusers components)")
    parser.add_argument("--other", type=int, default=100, help="other pairs measured")
    parser.add_argument("--noises", type=int, default=4, help="noise draws per pair and timestep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-pair", type=int, choices=TIMESTEPS, default=None,
                        help="also list each duplicated pair's magnitude at this timestep (980: about the first "
                             "sampling step's)")
    args = parser.parse_args()
    for name in ("config.yaml", "manifest.json"):
        if not (args.run / name).is_file():
            raise SystemExit(f"timestep_profile: {args.run} has no {name}; expected a memsieve-train run directory")
    cfg = OmegaConf.load(args.run / "config.yaml")
    world = generate_world(WorldConfig(**OmegaConf.to_container(cfg.data.world, resolve=True)))
    manifest = json.loads((args.run / "manifest.json").read_text())
    dup = [world.keys.index(k) for k in manifest["counts"]]
    gen = torch.Generator().manual_seed(args.seed)
    duplicated = set(dup)
    others = [i for i in torch.randperm(len(world.keys), generator=gen).tolist() if i not in duplicated][:args.other]
    chosen = dup + others
    is_dup = np.array([True] * len(dup) + [False] * len(others))
    x0 = world.images[chosen].float() / 127.5 - 1
    noise = torch.randn(len(TIMESTEPS), args.noises, *x0.shape, generator=gen)
    captions = [world.captions[i] for i in chosen]
    for model in args.models:
        print(f"\n**{model}** ({len(dup)} duplicated, {len(others)} other pairs, {args.noises} noises each)\n")
        print("| t | duplicated | other | ratio | per-sample AUC | other eps-MSE cond / uncond |")
        print("|---|---|---|---|---|---|")
        rows, pairs = profile(model, x0, captions, is_dup, noise, TIMESTEPS, args.per_pair)
        for r in rows:
            print(f"| {r['t']} | {r['duplicated']:.3f} | {r['other']:.3f} | {r['duplicated'] / r['other']:.2f}x | "
                  f"{r['auc']:.3f} | {r['other_mse_cond']:.4f} / {r['other_mse_uncond']:.4f} |", flush=True)
        if pairs is not None:
            print_pairs(pairs, captions, is_dup, args.per_pair)


if __name__ == "__main__":
    main()
