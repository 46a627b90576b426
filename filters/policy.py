"""Training-time filters: which samples of a batch enter the loss, judged by their magnitude.

A policy sees each sample's magnitude at the sample's own noisy input and timestep. Decisions
use only statistics from earlier steps (``observe`` runs after ``keep``), and every rank
observes the same gathered batch, so all ranks drop by the same rule under DDP.
"""

from __future__ import annotations

import hashlib

import torch
from omegaconf import DictConfig


class FilterPolicy:
    """Keep everything: the magnitude is still computed and logged (``filter=none``)."""

    name = "none"

    def keep(self, magnitude: torch.Tensor, timesteps: torch.Tensor, step: int,
             prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Which samples enter the loss; ``prompt_ids`` are stable hashes of the captions."""
        return torch.ones_like(magnitude, dtype=torch.bool)

    def observe(self, magnitude: torch.Tensor, timesteps: torch.Tensor, valid: torch.Tensor,
                prompt_ids: torch.Tensor | None = None) -> None:
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

    def keep(self, magnitude, timesteps, step, prompt_ids=None):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        return magnitude <= self.threshold


class TimestepCalibrated(FilterPolicy):
    """Timestep-aware relative thresholds, optionally remembered per prompt.

    The magnitude's scale changes with the timestep (2-3x between t=900 and t=300 on the
    embedded model) and with training progress, so one fixed number drops by timestep rather
    than by memorization. Each timestep bucket keeps a window of recent magnitudes, and a
    sample's *relative magnitude* is its magnitude over its bucket's median.

    A single relative magnitude is a noisy judgement (one noise draw, one timestep), and at low
    noise it hardly separates memorized samples. With ``memory_decay`` set, each prompt keeps a
    running average of its relative magnitudes from the judged timesteps ``[min_timestep,
    max_timestep]`` (a plain mean, then an EMA once it has ``1/memory_decay`` judgements), and
    the prompt is dropped at every timestep while that average exceeds ``threshold``: a
    duplicated prompt is seen often, so its average is precise and its copies leave the loss
    together. Without memory, a sample is dropped when its own
    relative magnitude exceeds ``threshold`` inside the judged range.
    """

    name = "calibrated"

    def __init__(self, num_train_timesteps: int, threshold: float = 1.3, buckets: int = 10, window: int = 512,
                 min_samples: int = 64, min_timestep: int = 0, max_timestep: int | None = None,
                 start_step: int = 0, memory_decay: float | None = None, min_observations: int = 1,
                 baseline_observations: int = 0):
        if buckets < 1 or window < min_samples or min_samples < 1:
            raise ValueError(
                f"filter needs buckets >= 1 and window >= min_samples >= 1, got {buckets}, {window}, {min_samples}"
            )
        if memory_decay is not None and not 0 < memory_decay <= 1:
            raise ValueError(f"filter.memory_decay={memory_decay} must lie in (0, 1] or be null")
        if baseline_observations and min_observations <= baseline_observations:
            raise ValueError(f"filter.min_observations={min_observations} must exceed "
                             f"filter.baseline_observations={baseline_observations}")
        self.num_train_timesteps, self.buckets, self.threshold = num_train_timesteps, buckets, threshold
        self.min_samples, self.start_step = min_samples, start_step
        self.min_timestep = min_timestep
        self.max_timestep = num_train_timesteps - 1 if max_timestep is None else max_timestep
        self.memory_decay, self.min_observations = memory_decay, min_observations
        self.baseline_observations = baseline_observations
        self.values = torch.full((buckets, window), float("nan"))
        self.cursor = torch.zeros(buckets, dtype=torch.long)
        # prompt id -> (judgements, baseline: mean of the first ones, running average since)
        self.memory: dict[int, tuple[int, float, float]] = {}

    def bucket_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        return (timesteps.long().cpu() * self.buckets // self.num_train_timesteps).clamp(max=self.buckets - 1)

    def medians(self) -> torch.Tensor:
        """Per-bucket median magnitude; ``nan`` where a bucket has too few samples."""
        out = torch.full((self.buckets,), float("nan"))
        for b in range(self.buckets):
            seen = self.values[b][~self.values[b].isnan()]
            if seen.numel() >= self.min_samples:
                out[b] = seen.median()
        return out

    def relative(self, magnitude: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Magnitude over its bucket's median (``nan`` while the bucket is uncalibrated)."""
        return magnitude.float().cpu() / self.medians()[self.bucket_of(timesteps)]

    def judged(self, timesteps: torch.Tensor) -> torch.Tensor:
        t = timesteps.cpu()
        return (t >= self.min_timestep) & (t <= self.max_timestep)

    def keep(self, magnitude, timesteps, step, prompt_ids=None):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        if self.memory_decay is None:
            drop = self.judged(timesteps) & (self.relative(magnitude, timesteps) > self.threshold)
        else:
            if prompt_ids is None:
                raise ValueError("filter.memory_decay needs prompt ids; the loop passes them")
            drop = torch.tensor([self.remembered(int(p)) for p in prompt_ids.cpu()], dtype=torch.bool)
        return ~drop.to(magnitude.device)

    def score(self, prompt_id: int) -> float:
        """A prompt's running relative magnitude, over its own baseline when one is kept."""
        count, baseline, average = self.memory.get(prompt_id, (0, 1.0, 0.0))
        return average / baseline if self.baseline_observations else average

    def remembered(self, prompt_id: int) -> bool:
        count = self.memory.get(prompt_id, (0,))[0]
        return count >= self.min_observations and self.score(prompt_id) > self.threshold

    def observe(self, magnitude, timesteps, valid, prompt_ids=None):
        valid = valid.cpu().bool()
        if self.memory_decay is not None and prompt_ids is not None:
            rel = self.relative(magnitude, timesteps)
            use = valid & self.judged(timesteps) & ~rel.isnan()
            for p, r in zip(prompt_ids.cpu()[use].tolist(), rel[use].tolist()):
                count, baseline, average = self.memory.get(p, (0, 0.0, 0.0))
                k = self.baseline_observations
                if count < k:  # still measuring the prompt's own level
                    baseline = (baseline * count + r) / (count + 1)
                    average = baseline
                else:  # a plain mean until 1/decay judgements, then an EMA
                    weight = max(self.memory_decay, 1.0 / (count - k + 1))
                    average = (1 - weight) * average + weight * r
                self.memory[p] = (count + 1, baseline, average)
        window = self.values.shape[1]
        for m, b in zip(magnitude.float().cpu()[valid], self.bucket_of(timesteps)[valid]):
            self.values[b, self.cursor[b] % window] = m
            self.cursor[b] += 1

    def state_dict(self):
        return {"values": self.values.clone(), "cursor": self.cursor.clone(), "memory": dict(self.memory)}

    def load_state_dict(self, state):
        self.values.copy_(state["values"])
        self.cursor.copy_(state["cursor"])
        self.memory = dict(state["memory"])


def prompt_ids(captions: list[str]) -> torch.Tensor:
    """Stable 63-bit hashes of captions: the same prompt gets the same id on every rank and run."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") >> 1
                         for c in captions], dtype=torch.long)


def build_policy(cfg: DictConfig, num_train_timesteps: int) -> FilterPolicy:
    """The policy named by ``cfg.kind`` (config group ``filter``)."""
    if cfg.kind == "none":
        return FilterPolicy()
    if cfg.kind == "threshold":
        return FixedThreshold(cfg.threshold, cfg.start_step)
    if cfg.kind == "calibrated":
        return TimestepCalibrated(num_train_timesteps, cfg.threshold, cfg.buckets, cfg.window, cfg.min_samples,
                                  cfg.min_timestep, cfg.max_timestep, cfg.start_step, cfg.memory_decay,
                                  cfg.min_observations, cfg.get("baseline_observations", 0))
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
