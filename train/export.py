"""The trained UNet as one plain module, whatever wrapped it during training.

``accelerator.get_state_dict`` returns the full weights under DDP, a DeepSpeed engine (ZeRO-2
keeps full parameters on every rank; they may be fp16 there) and FSDP (shards gathered to
rank 0; the other ranks get nothing). A fresh float32 module takes them, then the EMA weights
when EMA is on, so the training module is never changed in place and the saved and evaluated
model is the same on every backend.
"""

from __future__ import annotations

from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel


def trained_unet(accelerator: Accelerator, unet, template: UNet2DConditionModel,
                 ema: EMAModel | None) -> UNet2DConditionModel:
    """Every rank must call this (FSDP gathers collectively); only the main process's copy is
    complete under FSDP, and only the main process saves or evaluates it."""
    state = accelerator.get_state_dict(unet)
    final = type(template).from_config(template.config)
    if state:
        final.load_state_dict(state)
    if ema is not None:
        ema.copy_to(final.parameters())
    return final.to(accelerator.device).eval()
