"""Training-time filters: which samples of a batch enter the loss, judged by their magnitude.

The policy interface, as the loop (``train/loop.py``) drives it once per micro-step:

1. ``judge(pairs, timesteps, noise)``: which of this rank's samples get the extra no-grad forward
   that measures their magnitude (all of them unless ``filter.judge_fraction`` < 1); ``noise`` is
   one uniform draw per sample, addressed by global batch position (``train.randomness``).
2. ``keep(magnitude, timesteps, step, pairs)``: which of this rank's samples enter the loss.
   ``magnitude`` is ``nan`` where the sample was not judged.
3. ``observe(magnitude, timesteps, valid, pairs)``: update the statistics with the whole
   gathered (all-rank) batch; ``valid`` marks captioned, judged samples.

``pairs`` are base-pair indices (``batch["pair"]``: the pair a sample was drawn from, whatever
caption augmentation, repetition or ``image_only`` duplication did to its caption), in
``[0, num_pairs)``. Decisions use only statistics from earlier steps (``observe`` runs after
``keep``) and every rank observes the same gathered batch in the same order, so every rank holds
the same state and drops by the same rule under DDP. ``state_dict``/``load_state_dict`` save and
restore that state (accelerate checkpoints it); ``to(device)`` moves it to the training device.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from filters.population import ExactLimit, HistogramLimit, build_limit


class FilterPolicy:
    """Keep everything: the magnitude is still computed and logged (``filter=none``).

    ``judge_fraction`` < 1 measures it for that share of each rank's batch only, drawn by the
    seeded ``noise``: the logged curves (duplicated against other samples, by noise band) stay
    unbiased estimates while an unfiltered run pays for the extra forward on fewer samples.
    """

    def __init__(self, judge_fraction: float = 1.0):
        if not 0 < judge_fraction <= 1:
            raise ValueError(f"filter.judge_fraction={judge_fraction} must lie in (0, 1]")
        self.judge_fraction = judge_fraction

    def to(self, device: torch.device | str) -> FilterPolicy:
        return self

    def judge(self, pairs: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Which samples get their magnitude measured: every one, or ``judge_fraction`` of them at random."""
        k = math.ceil(self.judge_fraction * pairs.numel())
        if k >= pairs.numel():
            return torch.ones_like(pairs, dtype=torch.bool)
        chosen = torch.zeros_like(pairs, dtype=torch.bool)
        chosen[noise.to(pairs.device).topk(k, largest=False).indices] = True
        return chosen

    def keep(self, magnitude: torch.Tensor, timesteps: torch.Tensor, step: int,
             pairs: torch.Tensor | None = None) -> torch.Tensor:
        """Which samples enter the loss."""
        return torch.ones_like(magnitude, dtype=torch.bool)

    def observe(self, magnitude: torch.Tensor, timesteps: torch.Tensor, valid: torch.Tensor,
                pairs: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> None:
        """Update running statistics with the whole (all-rank) batch; ``kept`` is what ``keep``
        decided for it, gathered like the rest (``None``: nothing was dropped)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FixedThreshold(FilterPolicy):
    """Drop samples whose magnitude reaches a fixed threshold (Wen et al. used 2 on SD v1.4).

    As the reference code, a sample is kept when ``magnitude < threshold``.
    """

    def __init__(self, threshold: float, start_step: int = 0):
        super().__init__()  # every sample judged: an unjudged one (nan) would count as above the threshold
        if threshold <= 0:
            raise ValueError(f"filter.threshold={threshold} must be > 0")
        self.threshold, self.start_step = threshold, start_step

    def keep(self, magnitude, timesteps, step, pairs=None):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        return magnitude < self.threshold


class TimestepCalibrated(FilterPolicy):
    """Timestep-aware relative magnitudes, averaged per pair, judged against the other pairs.

    Three problems with a fixed threshold, each measured on the embedded model
    (BENCHMARKS.md), and the answer to each:

    1. The magnitude's scale changes with the timestep (2-3x between t=900 and t=300) and with
       training progress. So each timestep bucket keeps a window of recent magnitudes and a
       sample's *relative magnitude* is its magnitude over its bucket's median.
    2. One relative magnitude is a noisy judgement (one noise draw, one timestep), and at low
       noise it hardly separates memorized samples. So each pair keeps a running average of its
       relative magnitudes from the judged timesteps ``[min_timestep, max_timestep]`` (a plain
       mean, then an EMA with weight ``memory_decay``); a duplicated pair is seen often, so its
       average is precise, and once judged it leaves the loss at every timestep. The memory is
       keyed by the pair, not the caption as drawn, so caption variants of one pair pool.
    3. Duplicated samples can be a large share of the *samples* (half of them in the default
       world), which shifts any per-sample reference. They are a tiny share of the *pairs*.
       So a pair is dropped when its average lies more than ``z`` robust standard deviations
       (1.4826 MAD) above the median average of all pairs with ``min_observations`` judgements,
       once it has ``drop_observations`` judgements itself: a pair seen only a few times has
       had little chance to be memorized and gives too little evidence to drop it.

    The per-pair memory is two dense tensors on the training device, ``count`` (int32) and
    ``average`` (float32): 8 bytes per pair, read and written for a batch's pairs only, with no
    per-sample Python. The limit of point 3 comes from :mod:`filters.population` (exact, or a
    histogram estimate whose cost does not grow with the number of pairs). With
    ``judge_fraction`` < 1 only that fraction of each rank's batch is judged (the extra forward),
    preferring pairs with the fewest judgements in the judged timestep range; every sample is
    decided from memory either way.

    With ``sticky`` a pair once dropped stays dropped. Per pair, a duplicated pair's average
    hovers at the limit: each time training on it stops, its magnitude sinks back under the limit
    and it is trained on again, so it is dropped in only 40% to 100% of its samples window to
    window (BENCHMARKS.md). Dropping it for good, as deduplication would, ends that cycle.
    """

    def __init__(self, num_train_timesteps: int, num_pairs: int, z: float = 3.0, buckets: int = 20,
                 window: int = 256, min_samples: int = 64, min_timestep: int = 0, max_timestep: int | None = None,
                 start_step: int = 0, memory_decay: float = 0.2, min_observations: int = 3,
                 min_prompts: int = 50, drop_observations: int = 3, judge_fraction: float = 1.0,
                 quantile: str = "auto", sticky: bool = False):
        if buckets < 1 or window < min_samples or min_samples < 1:
            raise ValueError(
                f"filter needs buckets >= 1 and window >= min_samples >= 1, got {buckets}, {window}, {min_samples}"
            )
        if not 0 < memory_decay <= 1:
            raise ValueError(f"filter.memory_decay={memory_decay} must lie in (0, 1]")
        super().__init__(judge_fraction)
        if num_pairs < 1:
            raise ValueError(f"the calibrated filter needs the number of base pairs (>= 1), got {num_pairs}")
        self.num_train_timesteps, self.buckets, self.z = num_train_timesteps, buckets, z
        self.min_samples, self.start_step = min_samples, start_step
        self.min_timestep = min_timestep
        self.max_timestep = num_train_timesteps - 1 if max_timestep is None else max_timestep
        self.memory_decay, self.min_observations, self.min_prompts = memory_decay, min_observations, min_prompts
        self.drop_observations, self.sticky = drop_observations, sticky
        self.values = torch.full((buckets, window), float("nan"))
        self.cursor = torch.zeros(buckets, dtype=torch.long)
        self.count = torch.zeros(num_pairs, dtype=torch.int32)  # judgements per pair
        self.average = torch.zeros(num_pairs, dtype=torch.float32)  # average relative magnitude per pair
        self.dropped = torch.zeros(num_pairs, dtype=torch.bool)  # pairs dropped for good (sticky only)
        self.population: ExactLimit | HistogramLimit = build_limit(quantile, num_pairs)
        self._medians: torch.Tensor | None = None  # caches, reset by observe()
        self._limit: torch.Tensor | None = None

    def to(self, device):
        for name in ("values", "cursor", "count", "average", "dropped"):
            setattr(self, name, getattr(self, name).to(device))
        if isinstance(self.population, HistogramLimit):
            self.population.to(device)
        self._medians = self._limit = None
        return self

    def bucket_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        t = timesteps.long().to(self.cursor.device)
        return (t * self.buckets // self.num_train_timesteps).clamp(max=self.buckets - 1)

    def medians(self) -> torch.Tensor:
        """Per-bucket median magnitude; ``nan`` where a bucket has too few samples."""
        if self._medians is None:
            seen = (~self.values.isnan()).sum(dim=1)
            median = self.values.nanmedian(dim=1).values
            self._medians = torch.where(seen >= self.min_samples, median, float("nan"))
        return self._medians

    def relative(self, magnitude: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Magnitude over its bucket's median (``nan`` while the bucket is uncalibrated)."""
        return magnitude.float().to(self.values.device) / self.medians()[self.bucket_of(timesteps)]

    def judged(self, timesteps: torch.Tensor) -> torch.Tensor:
        t = timesteps.to(self.cursor.device)
        return (t >= self.min_timestep) & (t <= self.max_timestep)

    def prompt_limit(self) -> torch.Tensor:
        """Median + z * 1.4826 * MAD of the averages of pairs judged often enough (inf until
        ``min_prompts`` such pairs exist); a 0-dim tensor on the state's device."""
        if self._limit is None:
            self._limit = self.population.limit(self.count, self.average, self.min_observations,
                                                self.min_prompts, self.z)
        return self._limit

    def remembered(self, pairs: torch.Tensor) -> torch.Tensor:
        """Which of ``pairs`` the memory drops: judged often enough and above the limit."""
        p = pairs.to(self.count.device).long()
        needed = max(self.min_observations, self.drop_observations)
        return ((self.count[p] >= needed) & (self.average[p] > self.prompt_limit())) | self.dropped[p]

    def judge(self, pairs, timesteps, noise):
        n = pairs.numel()
        k = math.ceil(self.judge_fraction * n)
        if k >= n:
            return super().judge(pairs, timesteps, noise)
        # Fewest judgements first, judged timesteps before the others, ties broken by the seeded noise.
        count = self.count[pairs.to(self.count.device).long()].double()
        priority = count + noise.to(count.device).double() + (~self.judged(timesteps)).double() * 2.0**40
        chosen = torch.zeros(n, dtype=torch.bool, device=count.device)
        chosen[priority.topk(k, largest=False).indices] = True
        return chosen.to(pairs.device)

    def keep(self, magnitude, timesteps, step, pairs=None):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        if pairs is None:
            raise ValueError("filter=calibrated needs the batch's pair indices; the loop passes batch['pair']")
        return ~self.remembered(pairs).to(magnitude.device)

    def observe(self, magnitude, timesteps, valid, pairs=None, kept=None):
        magnitude = magnitude.float().to(self.values.device)
        valid = valid.to(self.values.device).bool() & ~magnitude.isnan()
        bucket = self.bucket_of(timesteps)
        if pairs is not None and self.sticky and kept is not None:
            # Every rank observes the same gathered batch and decisions, so every rank marks the same pairs.
            self.dropped[pairs.to(self.count.device).long()[~kept.to(self.count.device).bool()]] = True
        if pairs is not None:
            rel = self.relative(magnitude, timesteps)
            use = valid & self.judged(timesteps) & ~rel.isnan()
            self.remember(pairs.to(self.count.device).long()[use], rel[use])
        self.record(magnitude[valid], bucket[valid])

    def remember(self, pairs: torch.Tensor, rel: torch.Tensor) -> None:
        """Fold each judgement into its pair's average, in batch order within each pair.

        A pair can occur several times in one batch; its k-th occurrence is applied in round k,
        and within a round every pair is distinct, so each round is one vectorized update.
        """
        if pairs.numel() == 0:
            return
        sorted_pairs, order = torch.sort(pairs, stable=True)
        position = torch.arange(pairs.numel(), device=pairs.device)
        first = torch.ones_like(sorted_pairs, dtype=torch.bool)
        first[1:] = sorted_pairs[1:] != sorted_pairs[:-1]
        group_start = torch.where(first, position, 0).cummax(dim=0).values
        occurrence = torch.empty_like(position)
        occurrence[order] = position - group_start
        for round_ in range(int(occurrence.max()) + 1):
            mine = occurrence == round_
            p, r = pairs[mine], rel[mine]
            count, average = self.count[p], self.average[p]
            weight = (1.0 / (count + 1).float()).clamp(min=self.memory_decay)  # a mean first, then the EMA
            new_count, new_average = count + 1, (1 - weight) * average + weight * r
            self.population.move(count, average, new_count, new_average, self.min_observations)
            self.count[p], self.average[p] = new_count, new_average
        self._limit = None

    def record(self, magnitude: torch.Tensor, bucket: torch.Tensor) -> None:
        """Write magnitudes into their buckets' ring buffers, in batch order."""
        if magnitude.numel() == 0:
            return
        window = self.values.shape[1]
        onehot = torch.nn.functional.one_hot(bucket, self.buckets)
        rank = (onehot.cumsum(dim=0) - 1).gather(1, bucket[:, None]).squeeze(1)  # order within the bucket
        per_bucket = onehot.sum(dim=0)
        last = rank >= per_bucket[bucket] - window  # later samples overwrite earlier ones beyond a window
        self.values[bucket[last], (self.cursor[bucket] + rank)[last] % window] = magnitude[last]
        self.cursor += per_bucket
        self._medians = None

    def state_dict(self):
        return {"values": self.values.clone(), "cursor": self.cursor.clone(), "count": self.count.clone(),
                "average": self.average.clone(), "dropped": self.dropped.clone()}

    def load_state_dict(self, state):
        if "count" not in state:
            raise ValueError("this checkpoint's filter memory is keyed by caption (memsieve before pair-keyed "
                             "memory); resume it with that version or start the run again")
        if state["count"].shape != self.count.shape:
            raise ValueError(f"the checkpoint's filter remembers {state['count'].numel()} pairs; this run's data "
                             f"has {self.count.numel()}")
        for name in ("values", "cursor", "count", "average"):
            getattr(self, name).copy_(state[name])
        if "dropped" in state:  # absent from checkpoints written before filter.sticky existed: none dropped yet
            self.dropped.copy_(state["dropped"])
        self.population.rebuild(self.count, self.average, self.min_observations)
        self._medians = self._limit = None


def build_policy(cfg: DictConfig, num_train_timesteps: int, num_pairs: int) -> FilterPolicy:
    """The policy named by ``cfg.kind`` (config group ``filter``) for a source of ``num_pairs`` base pairs."""
    if cfg.kind == "none":
        return FilterPolicy(cfg.get("judge_fraction", 1.0))
    if cfg.kind == "threshold":
        return FixedThreshold(cfg.threshold, cfg.start_step)
    if cfg.kind == "calibrated":
        return TimestepCalibrated(num_train_timesteps, num_pairs, cfg.z, cfg.buckets, cfg.window, cfg.min_samples,
                                  cfg.min_timestep, cfg.max_timestep, cfg.start_step, cfg.memory_decay,
                                  cfg.min_observations, cfg.min_prompts, cfg.drop_observations,
                                  cfg.get("judge_fraction", 1.0), cfg.get("quantile", "auto"),
                                  cfg.get("sticky", False))
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
