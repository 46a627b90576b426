"""The calibrated filter's drop limit: median + z robust SDs of the pairs' average relative magnitudes.

The limit is a statistic of every pair judged often enough, so computed exactly it costs
O(pairs) per step: fine for the embedded world's 2,000 pairs, about 0.1 s per step at 10^7
LAION pairs (``bench/filter_state.py``). Two estimators share one interface:

- :class:`ExactLimit` selects the eligible averages and takes torch's median and median absolute
  deviation each time the population changed (what memsieve always did);
- :class:`HistogramLimit` keeps a histogram of the eligible averages over fixed log-spaced bins
  (512 per octave over 2^-4..2^4, i.e. 0.14% wide), moved by the pairs a batch touched, and
  reads median and MAD from its piecewise-linear CDF: O(bins) per step whatever the number of
  pairs. Its limit differs from the exact one by a fraction of a bin; how many decisions that
  changes on a real run is in BENCHMARKS.md.

Both hold only derived state: a checkpoint stores the per-pair tables and :meth:`rebuild`
recomputes the rest, so either can resume a run written by the other.
"""

from __future__ import annotations

import torch

MAD_TO_SD = 1.4826  # a normal distribution's SD over its median absolute deviation


class ExactLimit:
    """Median and MAD over the selected averages (O(pairs) per recomputation)."""

    def rebuild(self, count: torch.Tensor, average: torch.Tensor, min_observations: int) -> None:
        """Nothing to rebuild: the tables are read directly."""

    def move(self, old_count: torch.Tensor, old_average: torch.Tensor, new_count: torch.Tensor,
             new_average: torch.Tensor, min_observations: int) -> None:
        """Nothing to move: the tables are read directly."""

    def limit(self, count: torch.Tensor, average: torch.Tensor, min_observations: int, min_prompts: int,
              z: float) -> torch.Tensor:
        averages = average[count >= min_observations]
        if averages.numel() < max(min_prompts, 1):
            return torch.tensor(float("inf"), device=average.device)
        median = averages.median()
        return median + z * MAD_TO_SD * (averages - median).abs().median()


class HistogramLimit:
    """Median and MAD read from a histogram of the eligible averages (O(bins) per step).

    Bins are log-spaced, 512 per octave (0.14% wide) over 2^-4..2^4 of the relative magnitude
    (averages beyond fall in the end bins: the median and MAD do not look at them), and values
    are spread evenly in log scale within a bin.
    """

    LOW, HIGH, PER_OCTAVE = -4.0, 4.0, 512

    def __init__(self, device: torch.device | str = "cpu"):
        self.bins = int((self.HIGH - self.LOW) * self.PER_OCTAVE)
        self.counts = torch.zeros(self.bins, dtype=torch.float64, device=device)
        self.edges = self.value_at(torch.arange(self.bins + 1, dtype=torch.float64, device=device))

    def to(self, device: torch.device | str) -> HistogramLimit:
        self.edges, self.counts = self.edges.to(device), self.counts.to(device)
        return self

    def position(self, value: torch.Tensor) -> torch.Tensor:
        """Fractional bin coordinate in [0, bins]."""
        octaves = torch.log2(value.double().clamp(min=2.0**self.LOW))
        return ((octaves - self.LOW) * self.PER_OCTAVE).clamp(0, self.bins)

    def value_at(self, position: torch.Tensor) -> torch.Tensor:
        return torch.exp2(self.LOW + position / self.PER_OCTAVE)

    def bin_of(self, average: torch.Tensor) -> torch.Tensor:
        return self.position(average).long().clamp(max=self.bins - 1)

    def rebuild(self, count: torch.Tensor, average: torch.Tensor, min_observations: int) -> None:
        bins = self.bin_of(average[count >= min_observations])
        self.counts = torch.bincount(bins, minlength=self.bins).double()

    def move(self, old_count, old_average, new_count, new_average, min_observations):
        """Take the touched pairs' old averages out and their new ones in (eligible ones only)."""
        was, now = (old_count >= min_observations).double(), (new_count >= min_observations).double()
        self.counts.index_add_(0, self.bin_of(old_average), -was)
        self.counts.index_add_(0, self.bin_of(new_average), now)

    def cdf(self, value: torch.Tensor, cumulative: torch.Tensor) -> torch.Tensor:
        """Number of averages <= value."""
        position = self.position(value)
        k = position.long().clamp(max=self.bins - 1)
        return cumulative[k] + (position - k) * self.counts[k]

    def limit(self, count, average, min_observations, min_prompts, z):
        total = self.counts.sum()
        cumulative = torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)])
        half = (total / 2).reshape(1)
        # Median: where the cumulative count crosses half, interpolated inside that bin.
        k = (torch.searchsorted(cumulative, half) - 1).clamp(0, self.bins - 1)
        median = self.value_at(k + (half - cumulative[k]) / self.counts[k].clamp(min=1e-12))
        # MAD: the distance d with cdf(m + d) - cdf(m - d) = half. Its breakpoints are the distances
        # from the median to the bin edges; interpolate between the two that bracket half.
        d = torch.cat([median.new_zeros(1), (self.edges - median).abs()])
        within = self.cdf(median + d, cumulative) - self.cdf(median - d, cumulative)
        above = within >= half
        hi = torch.where(above, d, float("inf")).argmin()
        lo = torch.where(above, -1.0, d).argmax()  # d = 0 is always below half
        mad = d[lo] + (half - within[lo]) / (within[hi] - within[lo]).clamp(min=1e-12) * (d[hi] - d[lo])
        value = (median + z * MAD_TO_SD * mad).float().reshape(())
        return torch.where(total >= max(min_prompts, 1), value, torch.tensor(float("inf"), device=value.device))


def build_limit(kind: str, num_pairs: int, device: torch.device | str = "cpu") -> ExactLimit | HistogramLimit:
    """``filter.quantile``: ``exact``, ``histogram`` or ``auto`` (exact up to 100,000 pairs)."""
    if kind not in ("auto", "exact", "histogram"):
        raise ValueError(f"filter.quantile={kind!r}; expected auto, exact or histogram")
    if kind == "exact" or (kind == "auto" and num_pairs <= 100_000):
        return ExactLimit()
    return HistogramLimit(device)
