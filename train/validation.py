"""Validation images every N steps: fixed prompts and seeds, sampled with the EMA weights when EMA
is on (as the model will be saved), written as PNG grids under ``run_dir/validation/`` and to W&B.

Sampling reuses evaluation's generator (CFG with DDIM), so validation images are what the
end-of-run evaluation would draw for those prompts at that step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig
from PIL import Image

from data.dataset import TrainingData
from evaluation.generate import generate
from train.components import Components


def validation_prompts(vc: DictConfig, data: TrainingData) -> list[str]:
    """``validation.prompts`` if given, else the captions of the first ``num_prompts`` duplicated
    and the first ``num_prompts`` other base pairs (memorization shows on the former first)."""
    if vc.prompts:
        return list(vc.prompts)
    pairs, manifest = data.pairs, data.manifest
    dup = [c for k, c in zip(pairs.keys, pairs.captions) if manifest.is_duplicated(k)][:vc.num_prompts]
    other = [c for k, c in zip(pairs.keys, pairs.captions) if not manifest.is_duplicated(k)][:vc.num_prompts]
    return dup + other


def image_grid(images: torch.Tensor) -> Image.Image:
    """``[rows, cols, 3, H, W]`` in [0, 1] to one image, rows = prompts, columns = seeds."""
    rows, cols, _, h, w = images.shape
    grid = images.permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)
    return Image.fromarray((grid.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


@torch.no_grad()
def run_validation(comps: Components, ema: EMAModel | None, prompts: list[str], vc: DictConfig, step: int,
                   run_dir: Path, accelerator: Accelerator, dtype: torch.dtype, wandb_enabled: bool) -> Path:
    """Sample every prompt x seed with ``comps.unet`` (EMA weights swapped in, then restored);
    main process only: the unwrapped UNet needs no other rank. Under fp16/bf16 ``dtype`` the
    frozen encoders (and, with DeepSpeed, the UNet) hold that dtype: autocast reconciles them."""
    unet = comps.unet
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    unet.eval()
    try:
        with torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32):
            images, _ = generate(comps, prompts, list(vc.seeds), vc.num_inference_steps, vc.guidance_scale,
                                 batch_size=len(prompts) * len(vc.seeds), progress=False)
    finally:
        unet.train()
        if ema is not None:
            ema.restore(unet.parameters())
    path = run_dir / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    if wandb_enabled:
        import wandb

        accelerator.log({"validation": [wandb.Image(image_grid(images[p:p + 1]), caption=prompt)
                                        for p, prompt in enumerate(prompts)]}, step=step)
    return path
