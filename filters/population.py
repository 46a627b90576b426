"""The calibrated filter's drop limit: median + z robust SDs of the pairs' average relative magnitudes.

The limit is a statistic of every pair judged often enough, so computed exactly it costs
O(pairs) per step: fine for the embedded world's 2,000 pairs, about 0.1 s per step at 10^7
LAION pairs (``bench/filter_state.py``). Two estimators share one interface:

- :class:`ExactLimit` selects the eligible averages and takes torch's median and median absolute
  deviation each time the population changed (what memsieve always did);
- :class:`HistogramLimit` keeps a histogram of the eligible averages over fixed log-spaced bins
  (1,024 per octave over 2^-8..2^8, i.e. 0.07% wide), moved by the pairs a batch touched, and
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
    """Median and MAD read from a histogram of the eligible averages (O(bins) per step)."""

    LOW, HIGH, PER_OCTAVE = -8.0, 8.0, 1024

    def __init__(self, device: torch.device | str = "cpu"):
        bins = int((self.HIGH - self.LOW) * self.PER_OCTAVE)
        self.edges = torch.exp2(torch.linspace(self.LOW, self.HIGH, bins + 1, dtype=torch.float64)).to(device)
        self.counts = torch.zeros(bins, dtype=torch.float64, device=device)

    def to(self, device: torch.device | str) -> HistogramLimit:
        self.edges, self.counts = self.edges.to(device), self.counts.to(device)
        return self

    def bin_of(self, average: torch.Tensor) -> torch.Tensor:
        scaled = (torch.log2(average.double().clamp(min=2.0**self.LOW)) - self.LOW) * self.PER_OCTAVE
        return scaled.floor().long().clamp(0, self.counts.numel() - 1)

    def rebuild(self, count: torch.Tensor, average: torch.Tensor, min_observations: int) -> None:
        bins = self.bin_of(average[count >= min_observations])
        self.counts = torch.bincount(bins, minlength=self.counts.numel()).double()

    def move(self, old_count, old_average, new_count, new_average, min_observations):
        """Take the touched pairs' old averages out and their new ones in (eligible ones only)."""
        was, now = (old_count >= min_observations).double(), (new_count >= min_observations).double()
        self.counts.index_add_(0, self.bin_of(old_average), -was)
        self.counts.index_add_(0, self.bin_of(new_average), now)

    def cdf(self, x: torch.Tensor, cumulative: torch.Tensor) -> torch.Tensor:
        """Number of averages <= x, values spread evenly within each bin."""
        k = (torch.searchsorted(self.edges, x, right=True) - 1).clamp(0, self.counts.numel() - 1)
        lo, hi = self.edges[k], self.edges[k + 1]
        inside = ((x - lo) / (hi - lo)).clamp(0, 1)
        return torch.where(x < self.edges[0], 0.0, cumulative[k] + inside * self.counts[k])

    def limit(self, count, average, min_observations, min_prompts, z):
        total = self.counts.sum()
        cumulative = torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)])
        half = total / 2
        # Median: where the cumulative count crosses half, interpolated inside that bin.
        k = (torch.searchsorted(cumulative, half.reshape(1)) - 1).clamp(0, self.counts.numel() - 1)
        width = self.edges[k + 1] - self.edges[k]
        median = self.edges[k] + (half - cumulative[k]) / self.counts[k].clamp(min=1e-12) * width
        # MAD: the d with cdf(m + d) - cdf(m - d) = half. That function is linear between the
        # distances from the median to the bin edges, so interpolate between the two around half.
        d = torch.cat([median.new_zeros(1), (self.edges - median).abs()]).sort().values
        within = self.cdf(median + d, cumulative) - self.cdf(median - d, cumulative)
        above = torch.searchsorted(within, half.reshape(1)).clamp(1, d.numel() - 1)
        d0, d1, w0, w1 = d[above - 1], d[above], within[above - 1], within[above]
        mad = d0 + (half - w0) / (w1 - w0).clamp(min=1e-12) * (d1 - d0)
        value = (median + z * MAD_TO_SD * mad).float().reshape(())
        return torch.where(total >= max(min_prompts, 1), value, torch.tensor(float("inf"), device=value.device))


def build_limit(kind: str, num_pairs: int, device: torch.device | str = "cpu") -> ExactLimit | HistogramLimit:
    """``filter.quantile``: ``exact``, ``histogram`` or ``auto`` (exact up to 100,000 pairs)."""
    if kind not in ("auto", "exact", "histogram"):
        raise ValueError(f"filter.quantile={kind!r}; expected auto, exact or histogram")
    if kind == "exact" or (kind == "auto" and num_pairs <= 100_000):
        return ExactLimit()
    return HistogramLimit(device)
