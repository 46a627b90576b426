"""Training-time filters: which samples of a batch enter the loss, judged by their magnitude.

The policy interface, as the loop (``train/loop.py``) drives it once per micro-step:

1. ``judge(pairs, timesteps, noise)``: which of this rank's samples get the extra no-grad forward
   that measures their magnitude (all of them unless ``filter.judge_fraction`` < 1); ``noise`` is
   one uniform draw per sample, addressed by global batch position (``train.randomness``).
2. ``keep(magnitude, timesteps, step, pairs, order)``: which of this rank's samples enter the loss.
   ``magnitude`` is ``nan`` where the sample was not judged.
3. ``observe(magnitude, timesteps, valid, pairs, kept, order)``: update the statistics with the
   whole gathered (all-rank) batch; ``valid`` marks captioned, judged samples.

``pairs`` are the keys the filter pools a pair's judgements under (``filter.key``,
:mod:`data.fingerprint`): content fingerprints by default, the injection plan's base-pair index
only as the named oracle; integers in ``[0, num_keys)``. Decisions use only statistics from
earlier steps (``observe`` runs after ``keep``) and every rank observes the same gathered batch in
the same order, so every rank holds the same state and drops by the same rule under DDP.
``state_dict``/``load_state_dict`` save and restore that state (accelerate checkpoints it);
``to(device)`` moves it to the training device.

**Placebo** (``filter.placebo=true``): the same policy on the same judged samples, timesteps and
decision machinery, with each magnitude's link to its sample removed before the rule reads it,
by ``order`` (one seeded uniform draw per sample, ``train.randomness.placebo_order``): the
calibrated filters read, for each judged sample, a recent magnitude of the same timestep bucket
drawn from the bucket's window (:meth:`filters.timestep_scale.TimestepScale.placebo`); the fixed
threshold reads another judged sample's magnitude from the same batch (as many drops per batch).
The population of magnitudes, their timestep scale and how often each key is judged stay; only
which sample a magnitude belongs to goes. Whatever a placebo run cuts, the magnitude did not cause.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from filters.population import ExactLimit, HistogramLimit, build_limit
from filters.timestep_scale import TimestepScale, occurrence_rounds


def shuffled(values: torch.Tensor, mask: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``values`` with the entries under ``mask`` permuted among themselves by ``order`` (the placebo)."""
    at = mask.nonzero().squeeze(1)
    out = values.clone()
    out[at] = values[at][order.to(values.device)[at].argsort()]
    return out


class FilterPolicy:
    """Keep everything: the magnitude is still computed and logged (``filter=none``).

    ``judge_fraction`` < 1 measures it for that share of each rank's batch only, drawn by the
    seeded ``noise``: the logged curves (duplicated against other samples, by noise band) stay
    unbiased estimates while an unfiltered run pays for the extra forward on fewer samples.
    """

    placebo = False

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

    def least_judged_first(self, count: torch.Tensor, in_range: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``judge_fraction`` of the samples: those of the keys with the fewest judgements (``count``, per
        sample) in the judged timestep range (``in_range``) first, ties broken by the seeded noise."""
        n = count.numel()
        k = math.ceil(self.judge_fraction * n)
        if k >= n:
            return torch.ones(n, dtype=torch.bool, device=count.device)
        chosen = torch.zeros(n, dtype=torch.bool, device=count.device)
        priority = count.double() + noise.to(count.device).double() + (~in_range).double() * 2.0**40
        chosen[priority.topk(k, largest=False).indices] = True
        return chosen

    def keep(self, magnitude: torch.Tensor, timesteps: torch.Tensor, step: int,
             pairs: torch.Tensor | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
        """Which samples enter the loss."""
        return torch.ones_like(magnitude, dtype=torch.bool)

    def observe(self, magnitude: torch.Tensor, timesteps: torch.Tensor, valid: torch.Tensor,
                pairs: torch.Tensor | None = None, kept: torch.Tensor | None = None,
                order: torch.Tensor | None = None) -> None:
        """Update running statistics with the whole (all-rank) batch; ``kept`` is what ``keep``
        decided for it, gathered like the rest (``None``: nothing was dropped)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FixedThreshold(FilterPolicy):
    """Drop samples whose magnitude reaches a fixed threshold (Wen et al. used 2 on SD v1.4).

    As the reference code, a sample is kept when ``magnitude < threshold``. Its placebo compares
    the threshold with another judged sample's magnitude from the same rank's batch: as many
    samples are dropped per batch, none for its own magnitude.
    """

    def __init__(self, threshold: float, start_step: int = 0, placebo: bool = False):
        super().__init__()  # every sample judged: an unjudged one (nan) would count as above the threshold
        if threshold <= 0:
            raise ValueError(f"filter.threshold={threshold} must be > 0")
        self.threshold, self.start_step, self.placebo = threshold, start_step, placebo

    def keep(self, magnitude, timesteps, step, pairs=None, order=None):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        if self.placebo:
            magnitude = shuffled(magnitude, ~magnitude.isnan(), order)
        return magnitude < self.threshold


class KeyedPolicy(FilterPolicy):
    """What the calibrated filters share: a per-key memory (``count``, judgements per key) read at the
    judged timesteps ``[min_timestep, max_timestep]``, the least-judged keys judged first, and every
    sample kept or dropped by its key's memory alone (:meth:`drops`) from ``start_step`` on."""

    count: torch.Tensor
    min_timestep: int
    max_timestep: int
    start_step: int
    scale: TimestepScale
    STATE: tuple[str, ...] = ()  # the per-key tables and counters a checkpoint holds, beside the scale's

    def state_dict(self) -> dict:
        return {**self.scale.state_dict(), **{name: getattr(self, name).clone() for name in self.STATE}}

    def load_tables(self, state: dict, optional: tuple[str, ...] = ()) -> None:
        """Restore :data:`STATE` (those in ``optional`` only when the checkpoint has them)."""
        if state["count"].shape != self.count.shape:
            raise ValueError(f"the checkpoint's filter remembers {state['count'].numel()} keys; this run's data "
                             f"has {self.count.numel()}")
        self.scale.load_state_dict(state)
        for name in self.STATE:
            if name in state or name not in optional:
                getattr(self, name).copy_(state[name])

    def judged(self, timesteps: torch.Tensor) -> torch.Tensor:
        t = timesteps.to(self.count.device)
        return (t >= self.min_timestep) & (t <= self.max_timestep)

    def judge(self, pairs, timesteps, noise):
        count = self.count[pairs.to(self.count.device).long()]
        return self.least_judged_first(count, self.judged(timesteps), noise).to(pairs.device)

    def drops(self, keys: torch.Tensor) -> torch.Tensor:
        """Which of ``keys`` (long, on the state's device) the memory drops."""
        raise NotImplementedError

    def keep(self, magnitude, timesteps, step, pairs=None, order=None):
        if step < self.start_step:
            return super().keep(magnitude, timesteps, step)
        if pairs is None:
            raise ValueError("a calibrated filter needs the batch's keys; the loop passes them")
        return ~self.drops(pairs.to(self.count.device).long()).to(magnitude.device)


class TimestepCalibrated(KeyedPolicy):
    """The robust-z rule (``filter=calibrated_z``; memsieve's calibrated filter before issue 26).

    Kept to reproduce the figures made with it, and as the control that shows why it was
    replaced: its cut is frequency's, not the magnitude's. Its placebo cuts as much as it does
    (BENCHMARKS.md, "What the filter knew"): a pair judged hundreds of times crosses the limit
    below by chance, and ``sticky`` keeps the first crossing for good.

    Each timestep bucket's running median (:class:`filters.timestep_scale.TimestepScale`) makes a
    sample's *relative magnitude* (its magnitude over the median); each key keeps a running
    average of its relative magnitudes from the judged timesteps ``[min_timestep, max_timestep]``
    (a plain mean, then an EMA with weight ``memory_decay``); a key is dropped when its average
    lies more than ``z`` robust standard deviations (1.4826 MAD) above the median average of all
    keys with ``min_observations`` judgements, once it has ``drop_observations`` judgements
    itself. With ``sticky`` a key once dropped stays dropped.

    The per-key memory is two dense tensors on the training device, ``count`` (int32) and
    ``average`` (float32): 8 bytes per key. The limit comes from :mod:`filters.population` (exact,
    or a histogram estimate whose cost does not grow with the number of keys).
    """

    STATE = ("count", "average", "dropped")

    def __init__(self, num_train_timesteps: int, num_pairs: int, z: float = 3.0, buckets: int = 20,
                 window: int = 256, min_samples: int = 64, min_timestep: int = 0, max_timestep: int | None = None,
                 start_step: int = 0, memory_decay: float = 0.2, min_observations: int = 3,
                 min_prompts: int = 50, drop_observations: int = 3, judge_fraction: float = 1.0,
                 quantile: str = "auto", sticky: bool = False, placebo: bool = False):
        if not 0 < memory_decay <= 1:
            raise ValueError(f"filter.memory_decay={memory_decay} must lie in (0, 1]")
        super().__init__(judge_fraction)
        if num_pairs < 1:
            raise ValueError(f"the calibrated filter needs the number of keys (>= 1), got {num_pairs}")
        self.scale = TimestepScale(num_train_timesteps, buckets, window, min_samples)
        self.z, self.start_step, self.placebo = z, start_step, placebo
        self.min_timestep = min_timestep
        self.max_timestep = num_train_timesteps - 1 if max_timestep is None else max_timestep
        self.memory_decay, self.min_observations, self.min_prompts = memory_decay, min_observations, min_prompts
        self.drop_observations, self.sticky = drop_observations, sticky
        self.count = torch.zeros(num_pairs, dtype=torch.int32)  # judgements per key
        self.average = torch.zeros(num_pairs, dtype=torch.float32)  # average relative magnitude per key
        self.dropped = torch.zeros(num_pairs, dtype=torch.bool)  # keys dropped for good (sticky only)
        self.population: ExactLimit | HistogramLimit = build_limit(quantile, num_pairs)
        self._limit: torch.Tensor | None = None  # cache, reset by remember()

    def to(self, device):
        self.scale.to(device)
        for name in self.STATE:
            setattr(self, name, getattr(self, name).to(device))
        if isinstance(self.population, HistogramLimit):
            self.population.to(device)
        self._limit = None
        return self

    def prompt_limit(self) -> torch.Tensor:
        """Median + z * 1.4826 * MAD of the averages of keys judged often enough (inf until
        ``min_prompts`` such keys exist); a 0-dim tensor on the state's device."""
        if self._limit is None:
            self._limit = self.population.limit(self.count, self.average, self.min_observations,
                                                self.min_prompts, self.z)
        return self._limit

    def drops(self, keys: torch.Tensor) -> torch.Tensor:
        """Judged often enough and above the limit, or dropped for good."""
        needed = max(self.min_observations, self.drop_observations)
        return ((self.count[keys] >= needed) & (self.average[keys] > self.prompt_limit())) | self.dropped[keys]

    def observe(self, magnitude, timesteps, valid, pairs=None, kept=None, order=None):
        magnitude = magnitude.float().to(self.count.device)
        valid = valid.to(self.count.device).bool() & ~magnitude.isnan()
        if pairs is not None and self.sticky and kept is not None:
            # Every rank observes the same gathered batch and decisions, so every rank marks the same keys.
            self.dropped[pairs.to(self.count.device).long()[~kept.to(self.count.device).bool()]] = True
        if pairs is not None:
            use = valid & self.judged(timesteps)
            read = self.scale.placebo(magnitude, timesteps, use, order) if self.placebo else magnitude
            rel = self.scale.relative(read, timesteps)
            use &= ~rel.isnan()
            self.remember(pairs.to(self.count.device).long()[use], rel[use])
        self.scale.record(magnitude[valid], timesteps.to(self.count.device)[valid])

    def remember(self, pairs: torch.Tensor, rel: torch.Tensor) -> None:
        """Fold each judgement into its key's average, in batch order within each key."""
        if pairs.numel() == 0:
            return
        occurrence = occurrence_rounds(pairs)
        for round_ in range(int(occurrence.max()) + 1):
            mine = occurrence == round_
            p, r = pairs[mine], rel[mine]
            count, average = self.count[p], self.average[p]
            weight = (1.0 / (count + 1).float()).clamp(min=self.memory_decay)  # a mean first, then the EMA
            new_count, new_average = count + 1, (1 - weight) * average + weight * r
            self.population.move(count, average, new_count, new_average, self.min_observations)
            self.count[p], self.average[p] = new_count, new_average
        self._limit = None

    def load_state_dict(self, state):
        if "count" not in state:
            raise ValueError("this checkpoint's filter memory is keyed by caption (memsieve before pair-keyed "
                             "memory); resume it with that version or start the run again")
        # dropped is absent from checkpoints written before filter.sticky existed: none dropped yet
        self.load_tables(state, optional=("dropped",))
        self.population.rebuild(self.count, self.average, self.min_observations)
        self._limit = None


def build_policy(cfg: DictConfig, num_train_timesteps: int, num_pairs: int) -> FilterPolicy:
    """The policy named by ``cfg.kind`` (config group ``filter``) for a source of ``num_pairs`` keys."""
    placebo = bool(cfg.get("placebo", False))
    if cfg.kind == "none":
        if placebo:
            raise ValueError("filter.placebo=true needs a filter that drops (threshold, calibrated, calibrated_z); "
                             "filter=none keeps every sample")
        return FilterPolicy(cfg.get("judge_fraction", 1.0))
    if cfg.kind == "threshold":
        return FixedThreshold(cfg.threshold, cfg.start_step, placebo)
    if cfg.kind == "calibrated":
        from filters.evidence import PairEvidence

        # Built from its config group: every setting of configs/filter/calibrated.yaml is a constructor argument.
        settings = {k: v for k, v in cfg.items() if k not in ("kind", "key", "table_size")}
        return PairEvidence(num_train_timesteps, num_pairs, **settings)
    if cfg.kind == "calibrated_z":
        return TimestepCalibrated(num_train_timesteps, num_pairs, cfg.z, cfg.buckets, cfg.window, cfg.min_samples,
                                  cfg.min_timestep, cfg.max_timestep, cfg.start_step, cfg.memory_decay,
                                  cfg.min_observations, cfg.min_prompts, cfg.drop_observations,
                                  cfg.get("judge_fraction", 1.0), cfg.get("quantile", "auto"),
                                  cfg.get("sticky", False), placebo)
    raise ValueError(f"filter.kind={cfg.kind!r}; expected 'none', 'threshold', 'calibrated' or 'calibrated_z'")


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
