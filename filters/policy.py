"""Training-time filters: which samples of a batch enter the loss, judged by their magnitude.

A policy sees each sample's magnitude at the sample's own noisy input and timestep. Decisions
use only statistics from earlier steps (``observe`` runs after ``keep``), and every rank
observes the same gathered batch, so all ranks drop by the same rule under DDP.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig


class FilterPolicy:
    """Keep everything: the magnitude is still computed and logged (``filter=none``)."""

    name = "none"

    def keep(self, magnitude: torch.Tensor, timesteps: torch.Tensor, step: int) -> torch.Tensor:
        return torch.ones_like(magnitude, dtype=torch.bool)

    def observe(self, magnitude: torch.Tensor, timesteps: torch.Tensor, valid: torch.Tensor) -> None:
        """Update running statistics with the whole (all-rank) batch; ``valid`` marks captioned samples."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FixedThreshold(FilterPolicy):
    """Drop samples whose magnitude exceeds a fixed threshold (Wen et al. used 2 on SD v1.4)."""

    name = "threshold"

    def __init__(self, threshold: float, start_step: int = 0):
        if threshold <= 0:
            raise ValueError(f"filter.threshold={threshold} must be > 0")
        self.threshold, self.start_step = threshold, start_step

    def keep(self, magnitude, timesteps, step):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        return magnitude <= self.threshold


class TimestepCalibrated(FilterPolicy):
    """Per-timestep-bucket thresholds calibrated from running robust statistics.

    The magnitude's scale changes with the timestep (about 2x between t=300 and t=900 on the
    embedded model) and with training progress, so one fixed number drops by timestep rather
    than by memorization. Each bucket keeps a window of recent magnitudes; a sample is dropped
    when it lies more than ``z`` robust standard deviations (1.4826 MAD) above its bucket's
    median. Buckets outside ``[min_timestep, max_timestep]`` never drop, because at low noise
    the signal does not separate memorized samples (measured in BENCHMARKS.md).
    """

    name = "calibrated"

    def __init__(self, num_train_timesteps: int, buckets: int = 10, z: float = 3.0, window: int = 512,
                 min_samples: int = 64, min_timestep: int = 0, max_timestep: int | None = None,
                 start_step: int = 0):
        if buckets < 1 or window < min_samples or min_samples < 2:
            raise ValueError(
                f"filter needs buckets >= 1 and window >= min_samples >= 2, got {buckets}, {window}, {min_samples}"
            )
        self.num_train_timesteps, self.buckets, self.z = num_train_timesteps, buckets, z
        self.min_samples, self.start_step = min_samples, start_step
        self.min_timestep = min_timestep
        self.max_timestep = num_train_timesteps - 1 if max_timestep is None else max_timestep
        self.values = torch.full((buckets, window), float("nan"))
        self.cursor = torch.zeros(buckets, dtype=torch.long)

    def bucket_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        return (timesteps.long().cpu() * self.buckets // self.num_train_timesteps).clamp(max=self.buckets - 1)

    def thresholds(self) -> torch.Tensor:
        """Current per-bucket thresholds; ``inf`` where a bucket has too few samples."""
        out = torch.full((self.buckets,), float("inf"))
        for b in range(self.buckets):
            seen = self.values[b][~self.values[b].isnan()]
            if seen.numel() >= self.min_samples:
                median = seen.median()
                out[b] = median + self.z * 1.4826 * (seen - median).abs().median()
        return out

    def keep(self, magnitude, timesteps, step):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        limit = self.thresholds()[self.bucket_of(timesteps)].to(magnitude.device)
        judged = (timesteps >= self.min_timestep) & (timesteps <= self.max_timestep)
        return ~judged | (magnitude <= limit)

    def observe(self, magnitude, timesteps, valid):
        window = self.values.shape[1]
        for m, b in zip(magnitude[valid].float().cpu(), self.bucket_of(timesteps[valid])):
            self.values[b, self.cursor[b] % window] = m
            self.cursor[b] += 1

    def state_dict(self):
        return {"values": self.values.clone(), "cursor": self.cursor.clone()}

    def load_state_dict(self, state):
        self.values.copy_(state["values"])
        self.cursor.copy_(state["cursor"])


def build_policy(cfg: DictConfig, num_train_timesteps: int) -> FilterPolicy:
    """The policy named by ``cfg.kind`` (config group ``filter``)."""
    if cfg.kind == "none":
        return FilterPolicy()
    if cfg.kind == "threshold":
        return FixedThreshold(cfg.threshold, cfg.start_step)
    if cfg.kind == "calibrated":
        return TimestepCalibrated(num_train_timesteps, cfg.buckets, cfg.z, cfg.window, cfg.min_samples,
                                  cfg.min_timestep, cfg.max_timestep, cfg.start_step)
    raise ValueError(f"filter.kind={cfg.kind!r}; expected 'none', 'threshold' or 'calibrated'")


def filtered_mean(per_sample_loss: torch.Tensor, keep: torch.Tensor, global_kept: int,
                  num_processes: int = 1) -> torch.Tensor:
    """Mean of the kept samples' losses over all ranks, as DDP's gradient average will see it.

    Each rank returns ``sum(kept) * num_processes / global_kept``; averaging that over ranks gives
    the mean over every kept sample. With nothing kept the result is ``0 * sum`` so the graph
    still reaches every parameter and DDP's gradient sync runs on every rank.
    """
    kept_sum = (per_sample_loss * keep.to(per_sample_loss.dtype)).sum()
    if global_kept == 0:
        return per_sample_loss.sum() * 0.0
    return kept_sum * num_processes / global_kept
