from pathlib import Path

from omegaconf import OmegaConf

import configs
from tests.conftest import compose_train
from train.assets import ASSETS
from train.demo import run_overrides


def test_filter_overrides_reach_only_the_user_filter_run_and_compose():
    task = ["train.steps=50", "filter=threshold", "filter.threshold=1.5", "demo.progress_every=5"]
    unfiltered = run_overrides(task, None, ["filter=none"], False)
    filtered = run_overrides(task, None, [], True)
    assert unfiltered == ["train.steps=50", "filter=none"]
    assert filtered == ["train.steps=50", "filter=threshold", "filter.threshold=1.5"]
    assert compose_train([*filtered, "run_dir=x"]).filter.threshold == 1.5
    assert compose_train([*unfiltered, "run_dir=x"]).filter.kind == "none"


def test_the_fine_tune_preset_loads_the_shipped_base_and_user_settings_win():
    task = ["train.steps=50", "filter.fdr=0.01"]
    own = ["filter=threshold", "filter.choose.quantile=0.99"]
    cfg = compose_train([*run_overrides(task, "embedded_finetune", own, False), "run_dir=x"])
    assert cfg.model.kind == "pretrained" and cfg.model.pretrained == str(ASSETS / "embedded_base")
    assert (ASSETS / "embedded_base" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert cfg.train.steps == 50 and cfg.train.caption_dropout == 0.0
    assert cfg.filter.kind == "threshold" and cfg.filter.choose.quantile == 0.99
    own = ["filter=calibrated", "filter.min_observations=2", "filter.placebo=true"]
    calibrated = compose_train([*run_overrides(task, "embedded_finetune", own, True), "run_dir=x"])
    assert calibrated.filter.fdr == 0.01 and calibrated.filter.min_observations == 2 and calibrated.filter.placebo


def test_the_demo_runs_compose_and_only_the_unfiltered_one_detects_in_both_settings():
    runs = OmegaConf.load(Path(configs.__file__).parent / "demo.yaml").demo.runs
    for name, own in runs.items():
        cfg = compose_train([*run_overrides(["seed=1"], "embedded_finetune", list(own), False), "run_dir=x"])
        settings = set(cfg.eval.detection.settings)
        assert cfg.eval.detection.default in settings and cfg.seed == 1
        assert settings == ({"first_step_1gen", "first10_4gen"} if name == "unfiltered" else {"first_step_1gen"})
