"""The calibrated filter: a key leaves the loss on evidence that its magnitude stands above the others'.

Why this rule (issue 26; the measurements are in BENCHMARKS.md, "What the filter knew"):

1. *Timestep scale.* One magnitude is read against recent magnitudes at nearby timesteps
   (:class:`filters.timestep_scale.TimestepScale`): its *relative magnitude* is
   ``log(magnitude / bucket median)``, taken only at the judged timesteps ``t >= min_timestep``,
   where memorized samples stand apart (at low noise every sample's magnitude is large).
2. *Evidence, not frequency.* Each key pools its relative magnitudes: ``count`` and ``total``.
   Every ``look_every`` observed micro-steps, each key with ``min_observations`` judgements gets
   a one-sided z: its mean minus the median of all such keys' means, over the pooled within-key
   standard deviation divided by the square root of its own count. A key judged a thousand times
   with no signal has a precise mean near the median, so its z stays small: being judged often is
   no evidence by itself, which is what made the earlier robust-z rule (``filter=calibrated_z``)
   drop every duplicated pair of the demo with the magnitude's link to the sample removed.
3. *False discoveries.* Benjamini-Hochberg at ``fdr`` over the keys tested at that look picks
   the flagged keys; a flagged key is dropped for good, as deduplication would drop it.

State per key: ``count`` (int32), ``total`` (float32) and ``dropped`` (bool), 9 bytes, plus the
pooled sums (two float64) and the timestep buckets. The update is a vectorized scatter over a
batch's keys; a look is O(keys) (a median and an elementwise z), then a sort of the keys whose
p-value is under ``fdr`` only: every ``look_every`` steps, not every step.
"""

from __future__ import annotations

import math

import torch

from filters.policy import KeyedPolicy
from filters.timestep_scale import TimestepScale, occurrence_rounds


def benjamini_hochberg(p: torch.Tensor, fdr: float) -> torch.Tensor:
    """Which of the p-values BH rejects at ``fdr`` (as :func:`filters.detection.benjamini_hochberg`),
    sorting only the candidates: a rejected p-value is at most ``fdr``."""
    flagged = torch.zeros_like(p, dtype=torch.bool)
    candidates = (p <= fdr).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return flagged
    ordered, order = p[candidates].sort(stable=True)
    ranks = torch.arange(1, ordered.numel() + 1, device=p.device, dtype=p.dtype)
    below = (ordered <= fdr * ranks / p.numel()).nonzero()
    if below.numel():
        flagged[candidates[order[: int(below.max()) + 1]]] = True
    return flagged


class PairEvidence(KeyedPolicy):
    """``filter=calibrated``: per-key z of the mean relative magnitude, Benjamini-Hochberg over keys."""

    STATE = ("count", "total", "dropped", "sums", "observed")

    def __init__(self, num_train_timesteps: int, num_keys: int, fdr: float = 0.001, look_every: int = 10,
                 buckets: int = 20, window: int = 256, min_samples: int = 16, min_timestep: int = 600,
                 max_timestep: int | None = None, min_observations: int = 3, min_keys: int = 50,
                 start_step: int = 0, judge_fraction: float = 1.0, placebo: bool = False):
        super().__init__(judge_fraction)
        if not 0 < fdr < 1:
            raise ValueError(f"filter.fdr={fdr} must lie in (0, 1)")
        if look_every < 1 or min_observations < 2 or num_keys < 1:
            raise ValueError(f"filter needs look_every >= 1, min_observations >= 2 (a within-key spread) and "
                             f"keys >= 1, got {look_every}, {min_observations}, {num_keys}")
        self.scale = TimestepScale(num_train_timesteps, buckets, window, min_samples)
        self.fdr, self.look_every, self.min_observations, self.min_keys = fdr, look_every, min_observations, min_keys
        self.min_timestep = min_timestep
        self.max_timestep = num_train_timesteps - 1 if max_timestep is None else max_timestep
        self.start_step, self.placebo = start_step, placebo
        self.count = torch.zeros(num_keys, dtype=torch.int32)  # judgements per key
        self.total = torch.zeros(num_keys, dtype=torch.float32)  # sum of the key's relative magnitudes
        self.dropped = torch.zeros(num_keys, dtype=torch.bool)  # flagged at some look: out for good
        self.sums = torch.zeros(2, dtype=torch.float64)  # judgements, sum of squared relative magnitudes
        self.observed = torch.zeros((), dtype=torch.long)  # observe() calls, for the looks

    def to(self, device):
        self.scale.to(device)
        for name in self.STATE:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def drops(self, keys: torch.Tensor) -> torch.Tensor:
        """Flagged at some look."""
        return self.dropped[keys]

    def observe(self, magnitude, timesteps, valid, pairs=None, kept=None, order=None):
        device = self.count.device
        magnitude, timesteps = magnitude.float().to(device), timesteps.to(device)
        valid = valid.to(device).bool() & ~magnitude.isnan()
        if pairs is not None:
            use = valid & self.judged(timesteps)
            read = self.scale.placebo(magnitude, timesteps, use, order) if self.placebo else magnitude
            rel = self.scale.relative(read, timesteps).log()
            use &= rel.isfinite()
            self.remember(pairs.to(device).long()[use], rel[use])
        self.scale.record(magnitude[valid], timesteps[valid])
        self.observed += 1
        if int(self.observed) % self.look_every == 0:
            self.look()

    def remember(self, keys: torch.Tensor, rel: torch.Tensor) -> None:
        """Add each judgement to its key's count and total (round by round: the same sums on every rank)."""
        if keys.numel() == 0:
            return
        occurrence = occurrence_rounds(keys)
        for round_ in range(int(occurrence.max()) + 1):
            mine = occurrence == round_
            self.count[keys[mine]] += 1
            self.total[keys[mine]] += rel[mine]
        self.sums += torch.stack([torch.tensor(float(keys.numel()), dtype=torch.float64, device=rel.device),
                                  (rel.double() ** 2).sum()])

    def z_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tested keys (``min_observations`` judgements) and each one's z against the median key."""
        tested = self.count >= self.min_observations
        seen = self.count > 0
        n = self.count[seen].double()
        within = self.sums[1] - (self.total[seen].double() ** 2 / n).sum()  # sum of squares about each key's mean
        dof = self.sums[0] - seen.sum()
        if int(tested.sum()) < self.min_keys or float(dof) < 1:
            return tested & False, torch.zeros_like(self.total, dtype=torch.float64)
        sd = (within.clamp(min=0) / dof).sqrt().clamp(min=1e-12)
        mean = self.total.double() / self.count.double().clamp(min=1)
        reference = mean[tested].median()
        return tested, (mean - reference) / (sd / self.count.double().clamp(min=1).sqrt())

    def look(self) -> None:
        """Benjamini-Hochberg over the tested keys' one-sided p-values; flagged keys leave the loss."""
        tested, z = self.z_scores()
        if not tested.any():
            return
        p = 0.5 * torch.erfc(z[tested] / math.sqrt(2))
        flagged = torch.zeros_like(tested)
        flagged[tested] = benjamini_hochberg(p, self.fdr)
        self.dropped |= flagged

    def load_state_dict(self, state):
        if "total" not in state:
            raise ValueError("this checkpoint's filter state is the robust-z rule's (filter=calibrated_z, the "
                             "calibrated filter before issue 26); resume it with filter=calibrated_z")
        self.load_tables(state)
