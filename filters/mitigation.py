"""Inference-time mitigation (Wen et al., Sec. 4.2): steer a memorized prompt away from its copy.

At the first sampling step the prompt's text-encoder output embedding is optimized with AdamW
(lr 0.05) to lower the text-conditional magnitude, stopping once it is under a target or after
at most 10 iterations; the whole trajectory is then sampled with the optimized embedding. A
generation whose first-step magnitude is already under the target (or under ``threshold``,
when given) is left untouched. ``threshold`` exists because one target serves two purposes
badly on the embedded model: low enough to stop copying, it also rewrites ordinary prompts
(BENCHMARKS.md); gating on a calibrated detection threshold keeps them intact. The start
token's embedding, the same for every prompt, is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from filters.magnitude import first_step_input, magnitude_gradient, unconditional_prediction


@dataclass(frozen=True)
class Mitigation:
    """Settings of the first-step embedding optimization (``mitigation:`` blocks in the configs)."""

    target: float
    lr: float = 0.05
    max_iterations: int = 10
    threshold: float | None = None  # mitigate only generations whose first magnitude exceeds it (default: target)

    def __post_init__(self):
        if self.target <= 0:
            raise ValueError(f"mitigation.target={self.target} must be > 0 (a magnitude to get under)")
        if self.max_iterations < 1 or self.lr <= 0:
            raise ValueError(f"mitigation needs max_iterations >= 1 and lr > 0, got {self.max_iterations}, {self.lr}")

    @classmethod
    def from_config(cls, cfg: DictConfig | None, target: float | None = None) -> Mitigation | None:
        """``None`` when the block is absent or disabled; ``target`` fills ``cfg.target: null``."""
        if cfg is None or not cfg.enabled:
            return None
        chosen = cfg.target if cfg.target is not None else target
        if chosen is None:
            raise ValueError("mitigation.target=null and no calibrated threshold to use; give mitigation.target=NUMBER")
        threshold = cfg.get("threshold")
        return cls(float(chosen), float(cfg.lr), int(cfg.max_iterations),
                   None if threshold is None else float(threshold))


@dataclass
class MitigationResult:
    """Optimized embeddings ``[B, L, D]`` and, per sample, magnitudes before and after and AdamW steps taken."""

    embeddings: torch.Tensor
    initial_magnitude: torch.Tensor
    final_magnitude: torch.Tensor
    iterations: torch.Tensor


def mitigate_embeddings(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor,
                        num_steps: int, mitigation: Mitigation) -> MitigationResult:
    """Optimize each sample's prompt embedding at the first of ``num_steps`` sampling steps.

    ``latents`` are the unscaled initial noises ``[B, ...]`` that sampling will start from. Each
    sample stops on its own: its loss is its own magnitude, and once under the target its
    embedding is restored after every later AdamW step, so a sample's result does not depend
    on what else shares the batch. Gradients are taken only with respect to the embeddings.
    """
    x, t = first_step_input(scheduler, latents, num_steps)
    eps_uncond = unconditional_prediction(unet, x, t, uncond)
    emb = cond.detach().float().clone().requires_grad_(True)
    start = emb.detach()[:, 0].clone()
    optimizer = torch.optim.AdamW([emb], lr=mitigation.lr)
    iterations = torch.zeros(x.shape[0], dtype=torch.long)
    for i in range(mitigation.max_iterations + 1):
        magnitude, grad = magnitude_gradient(unet, x, t, emb, eps_uncond)
        if i == 0:
            initial = magnitude
            eligible = initial > (mitigation.target if mitigation.threshold is None else mitigation.threshold)
        active = (magnitude > mitigation.target) & eligible
        if i == mitigation.max_iterations or not active.any():
            break
        emb.grad = grad
        frozen = emb.detach()[~active].clone()
        optimizer.step()
        with torch.no_grad():
            emb[~active] = frozen
            emb[:, 0] = start  # the start token's output is the same for every prompt, the empty one included
        iterations += active.cpu().long()
    return MitigationResult(emb.detach().to(cond.dtype), initial.cpu(), magnitude.cpu(), iterations)
