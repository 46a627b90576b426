"""What a new user ran into (issue 15): mixed resumes, truncated shards, wrong model paths, lost
training statistics, silent ends, late metric failures, embedded-world shards, copy.ratio."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from evaluation.scores import Scored, copy_summary


def test_copy_summary_has_no_ratio_and_a_gap_that_keeps_its_sign():
    """copy.ratio was duplicated / max(other, 0.01): -8.25 for -0.0825 over a slightly negative other."""
    cc = OmegaConf.create({"metric": "embedded", "threshold": 0.5})
    is_dup = torch.tensor([True, False])
    for own, gap in (([[-0.0825, -0.0825], [-0.02, -0.02]], -0.0625), ([[0.6, 0.6], [0.1, 0.1]], 0.5)):
        out = copy_summary(Scored(torch.tensor(own)), "test", cc, is_dup, torch.tensor([0, 1]), 2)
        assert "ratio" not in out
        assert abs(out["gap"] - gap) < 1e-6
        assert abs(out["gap"] - (out["duplicated"] - out["other"])) < 1e-9
