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
    task = ["train.steps=50", "filter.z=1.0"]
    own = ["filter=threshold", "filter.choose.quantile=0.99"]
    cfg = compose_train([*run_overrides(task, "embedded_finetune", own, False), "run_dir=x"])
    assert cfg.model.kind == "pretrained" and cfg.model.pretrained == str(ASSETS / "embedded_base")
    assert (ASSETS / "embedded_base" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert cfg.train.steps == 50 and cfg.train.caption_dropout == 0.0
    assert cfg.filter.kind == "threshold" and cfg.filter.choose.quantile == 0.99
    own = ["filter=calibrated", "filter.min_observations=2", "filter.sticky=true"]
    calibrated = compose_train([*run_overrides(task, "embedded_finetune", own, True), "run_dir=x"])
    assert calibrated.filter.z == 1.0 and calibrated.filter.min_observations == 2 and calibrated.filter.sticky
