"""The per-sample training loss: the regression target and Min-SNR-gamma weighting.

Everything here is per sample, so the filter can drop samples from the loss afterwards with
:func:`filters.policy.filtered_mean`: a sample's weight travels with its own loss. The
reference fine-tuning code applied Min-SNR weights to the whole batch after filtering the
predictions, which paired weights with the wrong samples; here they cannot come apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

PREDICTION_TYPES = ("epsilon", "v_prediction")


def set_prediction_type(scheduler: DDPMScheduler, kind: str | None) -> None:
    """``train.prediction_type`` over the scheduler's own (null keeps it); saved with the model."""
    if kind is None:
        return
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"train.prediction_type={kind!r}; expected one of {PREDICTION_TYPES} or null")
    scheduler.register_to_config(prediction_type=kind)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type={kind!r}; expected one of {PREDICTION_TYPES}")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al., 2023), as diffusers' scripts compute them.

    epsilon: ``min(snr, gamma) / snr``; v-prediction: ``min(snr, gamma) / (snr + 1)``. A
    timestep with zero SNR (zero-terminal-SNR schedules) gets weight 1 instead of 0/0.
    """
    if gamma <= 0:
        raise ValueError(f"train.snr_gamma={gamma} must be > 0 (5.0 is the paper's value), or null to disable")
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    weights = clipped / denominator
    return torch.where(snr == 0, torch.ones_like(weights), weights)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, scheduler: DDPMScheduler, timesteps: torch.Tensor,
                    snr_gamma: float | None) -> torch.Tensor:
    """Each sample's MSE, Min-SNR weighted when ``snr_gamma`` is set; shape ``[batch]``, float32."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma is None:
        return loss
    return loss * min_snr_weights(scheduler, timesteps, snr_gamma).to(loss.device)
