import json

import pytest
import torch

from filters.threshold_choice import CHOICE_FILE, choose_threshold
from tests.conftest import compose_train


def test_the_threshold_is_chosen_once_from_the_starting_magnitudes_and_read_back_on_resume(tmp_path):
    cfg = compose_train(["run_dir=x", "filter=threshold", "filter.choose.quantile=0.75", "filter.choose.samples=5"])
    asked = []
    choose_threshold(cfg, tmp_path, False, lambda n: asked.append(n) or torch.arange(1.0, 6.0))
    assert asked == [5] and cfg.filter.threshold == 4.0  # the 75th percentile of 1..5
    assert json.loads((tmp_path / CHOICE_FILE).read_text())["threshold"] == 4.0
    resumed = compose_train(["run_dir=x", "filter=threshold", "filter.choose.quantile=0.75"])
    choose_threshold(resumed, tmp_path, True, lambda n: pytest.fail("a resumed run must not choose again"))
    assert resumed.filter.threshold == 4.0


def test_a_given_threshold_and_other_filters_are_left_alone_and_bad_quantiles_fail(tmp_path):
    for overrides in (["filter=threshold", "filter.threshold=1.5"], ["filter=calibrated"]):
        cfg = compose_train(["run_dir=x", *overrides])
        choose_threshold(cfg, tmp_path, False, lambda n: pytest.fail("nothing to choose"))
        assert cfg.filter.get("threshold") == (1.5 if "filter=threshold" in overrides else None)
    cfg = compose_train(["run_dir=x", "filter=threshold", "filter.choose.quantile=1.5"])
    with pytest.raises(ValueError, match="filter.choose.quantile=1.5"):
        choose_threshold(cfg, tmp_path, False, lambda n: torch.ones(3))
    assert not (tmp_path / CHOICE_FILE).exists()
