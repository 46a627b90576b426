"""Inference-time mitigation (Wen et al., Sec. 4.2): steer a memorized prompt away from its copy.

At the first sampling step the prompt's text-encoder output embedding is optimized with AdamW
(lr 0.05) to lower the text-conditional magnitude, stopping once it is under a target or after
at most 10 iterations; the whole trajectory is then sampled with the optimized embedding. A
generation whose first-step magnitude is already under the target (or under ``threshold``,
when given) is left untouched. ``threshold`` exists because one target serves two purposes
badly on the embedded model: low enough to stop copying, it also rewrites ordinary prompts
(BENCHMARKS.md); gating on a calibrated detection threshold keeps them intact. The start
token's embedding, the same for every prompt, is never changed.

Two modes (``mitigation.mode``):

- ``per_generation`` (default): each generation gets its own embedding and stops on its own
  first-step magnitude (one image's norm), so a generation's result does not depend on how many
  seeds are drawn with it and the target is on the scale of the detection threshold and the
  monitor, which also judge one image.
- ``joint`` (the reference code's): one embedding per prompt, optimized over all its
  generations at once, the loss being the joint norm of their stacked differences,
  ``sqrt(sum_g m_g^2)``. Target and threshold are then on that scale: for G generations of
  equal magnitude ``m`` the joint norm is ``sqrt(G) m``, so the reference's target 3 over its 4
  generations is about 1.5 per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from omegaconf import DictConfig

from filters.magnitude import first_step_input, magnitude_gradient, unconditional_prediction

MODES = ("per_generation", "joint")


@dataclass(frozen=True)
class Mitigation:
    """Settings of the first-step embedding optimization (``mitigation:`` blocks in the configs)."""

    target: float
    lr: float = 0.05
    max_iterations: int = 10
    threshold: float | None = None  # mitigate only generations whose first magnitude exceeds it (default: target)
    mode: Literal["per_generation", "joint"] = "per_generation"  # joint: one embedding per prompt (the reference's)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mitigation.mode={self.mode!r}; expected one of {MODES}")
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
                   None if threshold is None else float(threshold), cfg.get("mode", "per_generation"))


@dataclass
class MitigationResult:
    """Optimized embeddings ``[B, L, D]`` (one per generation) and, per optimized embedding (each generation, or
    each prompt in joint mode), the magnitude before and after and the AdamW steps taken."""

    embeddings: torch.Tensor
    initial_magnitude: torch.Tensor
    final_magnitude: torch.Tensor
    iterations: torch.Tensor


def mitigate_embeddings(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor,
                        num_steps: int, mitigation: Mitigation, generations: int = 1) -> MitigationResult:
    """Optimize the prompt embeddings ``cond [B, L, D]`` at the first of ``num_steps`` sampling steps.

    ``latents`` are the unscaled initial noises ``[B, ...]`` that sampling will start from. In
    joint mode each run of ``generations`` consecutive samples is one prompt's generations (the
    same embedding) and shares one optimized embedding; otherwise every sample is its own. Each
    optimized embedding stops on its own: its loss is its own magnitude, and once under the
    target it is restored after every later AdamW step, so its result does not depend on what
    else shares the batch. Gradients are taken only with respect to the embeddings.
    """
    group = generations if mitigation.mode == "joint" else 1
    if cond.shape[0] % group:
        raise ValueError(f"{cond.shape[0]} samples do not split into prompts of {group} generations")
    x, t = first_step_input(scheduler, latents, num_steps)
    eps_uncond = unconditional_prediction(unet, x, t, uncond)
    emb = cond[::group].detach().float().clone().requires_grad_(True)
    start = emb.detach()[:, 0].clone()
    optimizer = torch.optim.AdamW([emb], lr=mitigation.lr)
    iterations = torch.zeros(emb.shape[0], dtype=torch.long)
    for i in range(mitigation.max_iterations + 1):
        magnitude, grad = magnitude_gradient(unet, scheduler, x, t, emb, eps_uncond, group, joint=group > 1)
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
    embeddings = emb.detach().to(cond.dtype).repeat_interleave(group, dim=0)
    return MitigationResult(embeddings, initial.cpu(), magnitude.cpu(), iterations)
