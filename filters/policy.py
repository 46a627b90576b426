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

    def __init__(self, threshold: float, start_step: int = 0):
        if threshold <= 0:
            raise ValueError(f"filter.threshold={threshold} must be > 0")
        self.threshold, self.start_step = threshold, start_step

    def keep(self, magnitude, timesteps, step, prompt_ids=None):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        return magnitude <= self.threshold


class TimestepCalibrated(FilterPolicy):
    """Timestep-aware relative magnitudes, averaged per prompt, judged against the other prompts.

    Three problems with a fixed threshold, each measured on the embedded model
    (BENCHMARKS.md), and the answer to each:

    1. The magnitude's scale changes with the timestep (2-3x between t=900 and t=300) and with
       training progress. So each timestep bucket keeps a window of recent magnitudes and a
       sample's *relative magnitude* is its magnitude over its bucket's median.
    2. One relative magnitude is a noisy judgement (one noise draw, one timestep), and at low
       noise it hardly separates memorized samples. So each prompt keeps a running average of its
       relative magnitudes from the judged timesteps ``[min_timestep, max_timestep]`` (a plain
       mean, then an EMA with weight ``memory_decay``); a duplicated prompt is seen often, so its
       average is precise, and once judged it leaves the loss at every timestep.
    3. Duplicated samples can be a large share of the *samples* (half of them in the default
       world), which shifts any per-sample reference. They are a tiny share of the *prompts*.
       So a prompt is dropped when its average lies more than ``z`` robust standard deviations
       (1.4826 MAD) above the median average of all prompts with ``min_observations`` judgements,
       once it has ``drop_observations`` judgements itself: a prompt seen only a few times has
       had little chance to be memorized and gives too little evidence to drop it.
    """

    def __init__(self, num_train_timesteps: int, z: float = 3.0, buckets: int = 20, window: int = 256,
                 min_samples: int = 64, min_timestep: int = 0, max_timestep: int | None = None,
                 start_step: int = 0, memory_decay: float = 0.2, min_observations: int = 3,
                 min_prompts: int = 50, drop_observations: int = 3):
        if buckets < 1 or window < min_samples or min_samples < 1:
            raise ValueError(
                f"filter needs buckets >= 1 and window >= min_samples >= 1, got {buckets}, {window}, {min_samples}"
            )
        if not 0 < memory_decay <= 1:
            raise ValueError(f"filter.memory_decay={memory_decay} must lie in (0, 1]")
        self.num_train_timesteps, self.buckets, self.z = num_train_timesteps, buckets, z
        self.min_samples, self.start_step = min_samples, start_step
        self.min_timestep = min_timestep
        self.max_timestep = num_train_timesteps - 1 if max_timestep is None else max_timestep
        self.memory_decay, self.min_observations, self.min_prompts = memory_decay, min_observations, min_prompts
        self.drop_observations = drop_observations
        self.values = torch.full((buckets, window), float("nan"))
        self.cursor = torch.zeros(buckets, dtype=torch.long)
        self.memory: dict[int, tuple[int, float]] = {}  # prompt id -> (judgements, average relative magnitude)
        self._limit: float | None = None  # cache of prompt_limit(), reset by observe()

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

    def prompt_limit(self) -> float:
        """Median + z * 1.4826 * MAD of the averages of prompts judged often enough (inf until
        ``min_prompts`` such prompts exist)."""
        if self._limit is None:
            averages = torch.tensor([a for n, a in self.memory.values() if n >= self.min_observations])
            self._limit = float("inf")
            if averages.numel() >= self.min_prompts:
                median = averages.median()
                self._limit = float(median + self.z * 1.4826 * (averages - median).abs().median())
        return self._limit

    def remembered(self, prompt_id: int) -> bool:
        count, average = self.memory.get(prompt_id, (0, 0.0))
        return count >= max(self.min_observations, self.drop_observations) and average > self.prompt_limit()

    def keep(self, magnitude, timesteps, step, prompt_ids=None):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        if prompt_ids is None:
            raise ValueError("filter=calibrated needs prompt ids; the loop passes them")
        drop = torch.tensor([self.remembered(int(p)) for p in prompt_ids.cpu()], dtype=torch.bool)
        return ~drop.to(magnitude.device)

    def observe(self, magnitude, timesteps, valid, prompt_ids=None):
        valid = valid.cpu().bool()
        if prompt_ids is not None:
            rel = self.relative(magnitude, timesteps)
            use = valid & self.judged(timesteps) & ~rel.isnan()
            for p, r in zip(prompt_ids.cpu()[use].tolist(), rel[use].tolist()):
                count, average = self.memory.get(p, (0, 0.0))
                weight = max(self.memory_decay, 1.0 / (count + 1))  # a mean first: early scores not overweighted
                self.memory[p] = (count + 1, (1 - weight) * average + weight * r)
            self._limit = None
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
        self._limit = None


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
        return TimestepCalibrated(num_train_timesteps, cfg.z, cfg.buckets, cfg.window, cfg.min_samples,
                                  cfg.min_timestep, cfg.max_timestep, cfg.start_step, cfg.memory_decay,
                                  cfg.min_observations, cfg.min_prompts, cfg.drop_observations)
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
