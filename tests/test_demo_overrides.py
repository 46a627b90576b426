from pathlib import Path

from hydra import compose, initialize_config_module

from tests.conftest import compose_train
from train.demo import pretrain_overrides, variant_overrides


def test_filter_overrides_reach_only_the_filtered_run_and_compose():
    task = ["train.steps=50", "filter=threshold", "filter.threshold=1.5", "demo.progress_every=5"]
    unfiltered = variant_overrides(task, "unfiltered", "threshold", None)
    filtered = variant_overrides(task, "filtered", "threshold", None)
    assert unfiltered == ["train.steps=50", "filter=none"]
    assert filtered == ["train.steps=50", "filter=threshold", "filter.threshold=1.5"]
    assert compose_train([*filtered, "run_dir=x"]).filter.threshold == 1.5
    assert compose_train([*unfiltered, "run_dir=x"]).filter.kind == "none"


def test_with_a_base_model_fine_tunes_load_it_and_user_settings_win():
    task = ["train.steps=50", "model.unet.layers_per_block=2", "filter.z=1.0"]
    base = Path("/runs/demo/pretrain/model")
    finetune = ["train.steps=1200", "train.caption_dropout=0.0"]
    filtered = variant_overrides(task, "filtered", "calibrated", base, finetune)
    cfg = compose_train([*filtered, "run_dir=x"])
    assert cfg.model.kind == "pretrained" and cfg.model.pretrained == str(base)
    assert cfg.train.steps == 50 and cfg.train.caption_dropout == 0.0 and cfg.filter.z == 1.0
    with initialize_config_module("configs", version_base="1.3"):
        demo = compose("demo", overrides=["run_dir=x", "demo.pretrain.steps=7"]).demo
    pre = compose_train([*pretrain_overrides(task, demo.pretrain), "run_dir=x"])
    assert pre.model.unet.layers_per_block == 2 and pre.data.duplication.num_duplicated == 0
    assert pre.data.world.seed != compose_train(["run_dir=x"]).data.world.seed  # a disjoint world
    assert pre.train.steps == 7 and not pre.eval.enabled
