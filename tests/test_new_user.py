"""What a new user ran into (issue 15): mixed resumes, truncated shards, wrong model paths, lost
training statistics, silent ends, late metric failures, embedded-world shards, copy.ratio, and
the smaller ones (--help, '+' keys, a float32 warning, W&B resume)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from data.dataset import build_data
from data.samples import world, write_shards
from evaluation.scores import MetricUnavailable, Scored, alignment_scores, copy_scores, copy_summary
from tests.conftest import ENV, MICRO, compose_train, python_cli, run_cli
from train.overrides import unknown_added_keys
from train.resume_check import check_resume

QUICK = [*MICRO, "eval.enabled=false", "logging.wandb.enabled=false"]


def fails(args: list[str], cwd, timeout: int = 300) -> list[str]:
    """Run an entry point that must fail; its stderr lines."""
    proc = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stderr.strip().splitlines()


# ------------------------------------------------------------------ 1. resume with other settings


def test_resume_refuses_other_settings_allows_safe_ones_and_records_them(tmp_path):
    run_dir = tmp_path / "run"
    common = [*MICRO, "eval.enabled=false", "train.checkpoint_every=2", f"run_dir={run_dir}"]
    first = [*common, "train.steps=4", "filter=calibrated"]
    run_cli(python_cli("train", *first), cwd=tmp_path)
    shutil.rmtree(run_dir / "model")  # as if killed after the step-2 checkpoint
    lines = fails(python_cli("train", *common, "filter=threshold", "filter.threshold=0.5", "seed=3",
                             "train.steps=6"), cwd=tmp_path)
    assert len(lines) == 1 and lines[0].startswith("memsieve-train: error: cannot resume")
    assert "filter.kind (calibrated -> threshold)" in lines[0] and "seed (0 -> 3)" in lines[0]
    assert "train.steps" not in lines[0]  # more steps are allowed (constant learning rate)
    assert not (run_dir / "resumes.jsonl").exists() and not (run_dir / "model").exists()

    proc = run_cli(python_cli("train", *common, "filter=calibrated", "train.steps=6", "logging.every=3"),
                   cwd=tmp_path)
    assert "resumed from" in proc.stdout
    resumes = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["step"] == 2
    assert resumes[0]["changed"] == {"train.steps": {"was": 4, "now": 6}, "logging.every": {"was": 2, "now": 3}}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6 and saved["filter"]["kind"] == "calibrated"
    # W&B: the resumed run continues the first one's id (offline: a second folder with the same id).
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1


def test_more_steps_are_refused_when_the_schedule_depends_on_them(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    base = ["run_dir=unused", "train.lr_scheduler=cosine", "train.steps=4"]
    OmegaConf.save(compose_train(base), tmp_path / "config.yaml")
    assert check_resume(compose_train([*base, "eval.num_seeds=9"]), ckpt, 2) == {"eval.num_seeds": (4, 9)}
    with pytest.raises(ValueError, match=r"train.steps \(4 -> 8\); train.steps can grow only with lr_scheduler"):
        check_resume(compose_train([*base[:2], "train.steps=8"]), ckpt, 2)


# ------------------------------------------------------------------ 2. truncated shards


def truncate(path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


def test_truncated_shards_are_skipped_counted_and_named(tmp_path, caplog):
    root = tmp_path / "shards"
    write_shards(world(40, 16), root, 10)
    truncate(root / "00001.tar", (root / "00001.tar").stat().st_size // 2)  # an interrupted download
    truncate(root / "00002.tar", 700)  # cut inside the first header: tarfile's "empty header"
    for access in ("indexed", "stream"):
        cfg = compose_train(["data=webdataset", f"data.urls={root}", "data.resolution=16", f"data.access={access}",
                             "data.shuffle_buffer=1", "run_dir=unused"])
        with caplog.at_level(logging.WARNING):
            data = build_data(cfg.data)
        assert data.skipped == {"truncated_shard": 2}
        assert f"shard {root / '00001.tar'} is truncated" in caplog.text
        assert f"shard {root / '00002.tar'} is truncated" in caplog.text
        assert 20 < len(data.pairs) < 30  # two whole shards and the readable part of the first truncated one
        keys = set()
        batches = data.batches(8, seed=0, rank=0, world_size=1)
        for _ in range(8):
            keys.update(next(batches)["key"])
        assert keys == set(data.pairs.keys)  # every indexed sample is read, nothing past the damage
        caplog.clear()


def test_only_truncated_shards_stop_in_one_line(tmp_path):
    root = tmp_path / "shards"
    write_shards(world(10, 16), root, 10)
    truncate(root / "00000.tar", 700)
    lines = fails(python_cli("data.cli", "stats", "data=webdataset", f"data.urls={root}"), cwd=tmp_path)
    assert lines[-1] == (f"memsieve-data: error: data source data.urls='{root}' has no usable image-caption pairs "
                         "(truncated_shard=1)")
    assert not any("Traceback" in line for line in lines)


# ------------------------------------------------------------------ 3. wrong model.pretrained


def test_wrong_model_paths_fail_in_one_line_in_train_and_detect(tmp_path, tiny_sd_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    shutil.rmtree(broken / "scheduler")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    cases = [
        ("train", [*QUICK, "model=sd", "model.pretrained=no/such/model", f"run_dir={tmp_path / 'r'}"],
         "memsieve-train: error: model.pretrained=no/such/model does not exist; expected a diffusers model folder "
         "or a hub id such as CompVis/stable-diffusion-v1-4"),
        ("filters.detect", [f"model.pretrained={broken}", f"prompts={prompts}", f"out_dir={tmp_path / 'd'}"],
         f"memsieve-detect: error: model.pretrained={broken} is not a diffusers model folder: it lacks "
         "unet/diffusion_pytorch_model.safetensors, scheduler/"),
        ("filters.detect", ["model.pretrained=CompVis/stable-diffusion-v1-4", f"prompts={prompts}",
                            "model.local_files_only=true", f"out_dir={tmp_path / 'd'}"],
         "memsieve-detect: error: model.pretrained=CompVis/stable-diffusion-v1-4 is not a local folder and could not "
         "be loaded as a hub id: only the local cache was searched (model.local_files_only=true, HF_HUB_OFFLINE set)"),
    ]
    for module, args, expected in cases:
        lines = fails(python_cli(module, *args), cwd=tmp_path)
        assert len(lines) == 1 and lines[0].startswith(expected), lines
    # Downloads allowed but no connection (a closed port as the hub): at once, not after retries.
    env = {**{k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}, "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run(python_cli("filters.detect", "model.pretrained=CompVis/stable-diffusion-v1-4",
                                     f"prompts={prompts}", f"out_dir={tmp_path / 'd'}"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith(
        "memsieve-detect: error: model.pretrained=CompVis/stable-diffusion-v1-4 is not a local folder and could not "
        "be loaded as a hub id: http://127.0.0.1:9 cannot be reached from this machine, so only the local cache was "
        "searched; download the model where there is a connection and give its folder"), lines


# ---------------------------------------- 4, 5, 7, 3. train without evaluation, evaluate later


def test_train_then_evaluate_later_keeps_statistics_prints_results_and_checks_first(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(python_cli("train", *QUICK, "train.steps=2", "filter=calibrated", f"run_dir={run_dir}"),
                   cwd=tmp_path)
    out = proc.stdout.strip().splitlines()
    assert out[-1] == str(run_dir)  # 5: the run directory last, after a few result lines
    assert any(line.startswith("[memsieve-train] 2 steps,") and "filter calibrated dropped" in line for line in out)
    assert not (tmp_path / "runs").exists()  # 5: no stray Hydra folder when run_dir is given
    trained = json.loads((run_dir / "summary.json").read_text())  # 4: written when training ends
    assert set(trained) == {"filter", "timing", "data"} and trained["filter"]["kind"] == "calibrated"

    # 7: named but missing SSCD weights fail before any work, leaving no output folder behind.
    # (--out before the overrides: options go anywhere)
    lines = fails(python_cli("evaluation.reeval", str(run_dir), "--out", str(tmp_path / "out"),
                             "eval.copy.metric=sscd", f"eval.copy.sscd.weights={tmp_path / 'no.pt'}"),
                  cwd=tmp_path)
    assert lines == [f"memsieve-eval: error: SSCD weights not found at eval.copy.sscd.weights={tmp_path / 'no.pt'}"]
    assert not (tmp_path / "out").exists()

    run_cli(python_cli("evaluation.reeval", str(run_dir)), cwd=tmp_path)
    evaluated = json.loads((run_dir / "summary.json").read_text())
    assert {k: evaluated[k] for k in trained} == trained  # 4: memsieve-eval keeps the training half
    assert isinstance(evaluated["copy"]["duplicated"], float)

    # 3: memsieve-eval on a damaged model says what is missing.
    (run_dir / "model" / "unet" / "config.json").unlink()
    lines = fails(python_cli("evaluation.reeval", str(run_dir)), cwd=tmp_path)
    assert lines == [f"memsieve-eval: error: model.pretrained={run_dir / 'model'} is not a diffusers model folder: "
                     "it lacks unet/config.json"]


def test_missing_sscd_weights_stop_training_before_it_starts(tmp_path):
    run_dir = tmp_path / "run"
    lines = fails(python_cli("train", *MICRO, "eval.copy.metric=sscd", f"eval.copy.sscd.weights={tmp_path / 'x.pt'}",
                             f"run_dir={run_dir}"), cwd=tmp_path)
    assert lines == [f"memsieve-train: error: SSCD weights not found at eval.copy.sscd.weights={tmp_path / 'x.pt'}"]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_metric_checks_fail_on_named_weights_and_announce_missing_ones(tmp_path):
    from evaluation.preflight import check_metrics

    (tmp_path / "clip").mkdir()
    for model, expected in ((tmp_path / "nope", "does not exist"),
                            (tmp_path / "clip", "is not a CLIP checkpoint in transformers' format")):
        cfg = compose_train(["run_dir=unused", "eval.alignment.metric=clip", f"eval.alignment.clip.model={model}"])
        with pytest.raises(FileNotFoundError, match=expected):
            check_metrics(cfg, strict=False)
    said = []
    cfg = compose_train(["run_dir=unused", "eval.copy.metric=sscd"])
    check_metrics(cfg, strict=False, say=said.append)  # not given: the run goes on and reports it unavailable
    assert said == ["copy will not be measured: eval.copy.metric=sscd needs eval.copy.sscd.weights (a TorchScript "
                    "file such as sscd_disc_large.torchscript.pt); none given"]
    with pytest.raises(FileNotFoundError, match="needs eval.copy.sscd.weights"):
        check_metrics(cfg, strict=True)  # memsieve-eval runs only to measure


# ------------------------------------------------------------------ 6. embedded-world shards


def test_embedded_metrics_apply_to_embedded_world_shards(tmp_path):
    root = tmp_path / "world_shards"
    write_shards(world(30, 32), root, 10)  # the README's "try it without LAION" path
    cfg = compose_train(["data=webdataset", f"data.urls={root}", "data.resolution=16", "run_dir=unused"])
    data = build_data(cfg.data)
    picks = [0, 1]
    images = data.pairs.images_at(picks)[:, None]  # generations that copy their training images exactly
    captions = [data.pairs.captions[i] for i in picks]
    scored, _ = copy_scores(cfg.eval["copy"], images, images[:, 0], captions, data, "cpu")
    assert torch.allclose(scored.own, torch.ones(2, 1), atol=1e-4)
    aligned, _ = alignment_scores(cfg.eval.alignment, images, captions, data, "cpu")
    assert float(aligned.mean()) > 0.7
    (root / "embedded_world.json").unlink()  # other shards: the embedded metrics do not apply
    with pytest.raises(MetricUnavailable, match="needs the embedded world or files of it"):
        copy_scores(cfg.eval["copy"], images, images[:, 0], captions, build_data(cfg.data), "cpu")


# ------------------------------------------------------------------ 8. copy.ratio


def test_copy_summary_has_no_ratio_and_a_gap_that_keeps_its_sign():
    """copy.ratio was duplicated / max(other, 0.01): -8.25 for -0.0825 over a slightly negative other."""
    cc = OmegaConf.create({"metric": "embedded", "threshold": 0.5})
    is_dup = torch.tensor([True, False])
    for own, gap in (([[-0.0825, -0.0825], [-0.02, -0.02]], -0.0625), ([[0.6, 0.6], [0.1, 0.1]], 0.5)):
        out = copy_summary(Scored(torch.tensor(own)), "test", cc, is_dup, torch.tensor([0, 1]), 2)
        assert "ratio" not in out
        assert abs(out["gap"] - gap) < 1e-6
        assert abs(out["gap"] - (out["duplicated"] - out["other"])) < 1e-9


# ------------------------------------------------------------------ 9. smaller ones


def test_help_lists_only_selectable_groups_and_plus_typos_are_refused(tmp_path):
    help_text = run_cli(python_cli("train", "--help"), cwd=tmp_path).stdout
    assert "filter: calibrated, calibrated_z, none, threshold" in help_text and "accelerate:" not in help_text
    lines = fails(python_cli("train", *QUICK, "+train.stepz=5", f"run_dir={tmp_path / 'r'}"), cwd=tmp_path)
    assert lines == ["memsieve-train: error: +train.stepz=5 adds train.stepz, which is not a memsieve setting; did "
                     "you mean train.steps? set existing settings without '+' (see --help)"]
    # '+' still fills a slot the config leaves open (data.weighted is null by default).
    overrides = ["data=folder", "data.path=x", "+data.weighted.fraction=0.1", "+data.weighted.weight=8"]
    assert unknown_added_keys(compose_train([*overrides, "run_dir=unused"]), overrides) == []
    # A setting the config marks ??? and the command leaves out is named in one line, not a traceback.
    assert fails(python_cli("filters.detect", f"out_dir={tmp_path / 'd'}"), cwd=tmp_path) == [
        "memsieve-detect: error: prompts must be set: add prompts=VALUE to the command"]


def test_impossible_training_settings_are_refused_in_one_line():
    """(A negative filter.z is allowed: it drops every pair once judged drop_observations times, as tests use.)"""
    from train.loop import check_settings

    good = {"steps": 10, "batch_size": 4, "gradient_accumulation_steps": 1, "lr": 1e-4}
    check_settings(OmegaConf.create(good))
    for key, bad in (("steps", -5), ("batch_size", 0), ("gradient_accumulation_steps", 0), ("lr", 0.0)):
        with pytest.raises(ValueError, match=rf"^train.{key}={bad} must be"):
            check_settings(OmegaConf.create({**good, key: bad}))


def test_loading_for_inference_does_not_warn_about_float32_modules(tiny_sd_path, capfd):
    from train.components import load_pretrained

    load_pretrained(str(tiny_sd_path), local_files_only=True).for_inference("cpu")
    assert "should be kept in float32" not in capfd.readouterr().err


def test_gitignore_covers_the_readmes_world_shards():
    from tests.conftest import ROOT

    assert "world_shards/" in (ROOT / ".gitignore").read_text().splitlines()
    assert os.path.isfile(ROOT / "configs" / "accelerate" / "multi_gpu.yml")
