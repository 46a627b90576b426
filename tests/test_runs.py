"""Real runs through the console entry points: micro end to end, exact resume, two-process DDP."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MICRO, ROOT, python_cli, run_cli


def unet_weights(run_dir):
    return load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def test_micro_run_end_to_end(tmp_path):
    run_cli(python_cli("train", *MICRO, "train.steps=8", "filter=calibrated", "filter.min_samples=4",
                       "filter.start_step=2", f"run_dir={tmp_path}"), cwd=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["filter"]["key"] == "content" and summary["filter"]["placebo"] is False  # what it knew
    assert "pixel digest" in summary["filter"]["knew"] and "ORACLE" not in summary["filter"]["knew"]
    for path in ("copy.duplicated", "copy.other", "alignment.duplicated", "alignment.other", "detection.auc",
                 "detection.tpr_at_1pct_fpr", "filter.dropped_fraction.duplicated",
                 "filter.dropped_fraction.other"):
        node = summary
        for part in path.split("."):
            node = node[part]
        assert isinstance(node, float), path
    assert summary["prompts"] == {"duplicated": 4, "other": 4, "seeds": [12345, 12346]}
    seen = summary["filter"]["seen"]
    assert seen["duplicated"] + seen["other"] == 8 * 8
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    assert {"loss", "kept_fraction", "magnitude/duplicated/all", "magnitude/other/all"} <= set(lines[-1])
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / "model" / "tokenizer" / "tokenizer.json").exists()


def test_resume_continues_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [*MICRO, "train.steps=8", "train.checkpoint_every=4", "eval.enabled=false",
              "filter=calibrated", "filter.min_samples=2", "filter.min_keys=2", "filter.min_observations=2",
              "filter.look_every=1", "filter.fdr=0.9",  # lenient, so that keys are flagged and dropped for good
              "filter.min_timestep=0", "filter.buckets=2", "train.ema.enabled=true",
              "logging.wandb.enabled=false"]
    run_cli(python_cli("train", *common, f"run_dir={full}"), cwd=tmp_path)
    # A run killed after step 4 had logged up to step 6; only its step-4 checkpoint survives.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    logged = (full / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(f"{line}\n" for line in logged[:3]))
    proc = run_cli(python_cli("train", *common, f"run_dir={resumed}"), cwd=tmp_path)
    assert "resumed from" in proc.stdout
    a, b = unet_weights(full), unet_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    after = lambda d: [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                       if r["step"] > 4]
    assert after(full) == after(resumed) and len(after(full)) == 2  # step 6 was logged once, not twice
    assert any(r["kept_fraction"] < 1.0 for r in after(full))  # the restored filter state made decisions


def decision_log(run_dir):
    return [json.loads(x) for x in (run_dir / "decisions.jsonl").read_text().splitlines()]


def test_two_processes_decide_as_one_process_over_the_same_samples(tmp_path):
    """2 ranks x batch 1 (real gloo DDP through the multi-GPU accelerate config, on CPU) against
    1 process x batch 2: same samples, noise draws and kept/dropped decisions, same weights."""
    threshold = 1.8
    common = [*MICRO, "train.steps=10", "logging.every=1", "eval.enabled=false", "logging.wandb.enabled=false",
              "filter=threshold", f"filter.threshold={threshold}", "train.snr_gamma=5.0", "logging.decisions=true",
              "train.lr_scheduler=linear", "train.lr_warmup_steps=4"]
    # memsieve-train relaunches itself as `accelerate launch --config_file multi_gpu.yml --num_processes 2`.
    launch = [f"launch.accelerate_config={ROOT / 'configs' / 'accelerate' / 'multi_gpu.yml'}",
              "launch.num_processes=2"]
    two, one = tmp_path / "two", tmp_path / "one"
    run_cli(python_cli("train", *launch, *common, "train.batch_size=1", f"run_dir={two}"), cwd=tmp_path,
            timeout=400, env={"ACCELERATE_USE_CPU": "1"})  # gloo on CPU: without it accelerate starts one process
    run_cli(python_cli("train", *common, "train.batch_size=2", f"run_dir={one}"), cwd=tmp_path)
    a, b = decision_log(one), decision_log(two)
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["t"] == y["t"]  # same samples, same timesteps
        assert torch.allclose(torch.tensor(x["magnitude"]), torch.tensor(y["magnitude"]), atol=1e-3)
        clear = [abs(m - threshold) > 1e-3 for m in x["magnitude"]]  # float noise only matters on the threshold
        assert [k for k, c in zip(x["keep"], clear) if c] == [k for k, c in zip(y["keep"], clear) if c]
    kept = [k for r in a for k in r["keep"]]
    assert any(kept) and not all(kept)
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records]
    assert lrs == [json.loads(x)["lr"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    # Warm-up and decay count optimizer updates on both; a step that kept nothing made none (issue 10).
    updates = [r["step"] - r["skipped_steps"] for r in records]
    peak = updates.index(4)
    assert lrs[peak] == max(lrs) and lrs[-1] < lrs[peak]
    assert sum(r["ranks_all_dropped"] for r in records) >= 1, "no step had one rank drop its whole batch"
    w1, w2 = unet_weights(one), unet_weights(two)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)  # DDP's filtered mean is the global one


def test_demo_fine_tunes_the_shipped_base_four_ways_and_compares(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(python_cli("train.demo", *MICRO, "train.steps=6", "filter.min_samples=4", "demo.progress_every=1",
                              'demo.runs.threshold=["filter=threshold","filter.choose.quantile=0.9","filter.choose.samples=16"]',
                              f"hydra.run.dir={out}"), cwd=tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    assert last == str(out / "comparison.json")
    comparison = json.loads((out / "comparison.json").read_text())
    runs = ("unfiltered", "threshold", "calibrated", "calibrated_placebo")
    assert [comparison[r]["filter"]["kind"] for r in runs] == ["none", "threshold", "calibrated", "calibrated"]
    assert [comparison[r]["filter"].get("placebo") for r in runs] == [None, False, False, True]
    assert comparison["unfiltered"]["filter"]["dropped_fraction"] == {"duplicated": 0.0, "other": 0.0}
    # Same seed, same world: every run saw the same samples.
    assert comparison["unfiltered"]["filter"]["seen"] == comparison["threshold"]["filter"]["seen"] \
        == comparison["calibrated"]["filter"]["seen"] == comparison["calibrated_placebo"]["filter"]["seen"]
    # The paper's threshold was chosen once from the base model and is the one the run used.
    choice = json.loads((out / "threshold" / "threshold.json").read_text())
    assert choice["samples"] == 16 and choice["threshold"] == comparison["threshold"]["filter"]["threshold"]
    table = (out / "comparison.md").read_text()
    assert "| metric | unfiltered | threshold | calibrated | calibrated_placebo |" in table
    assert "| copy/duplicated |" in table and "| filter/placebo |" in table
    # The last table: the calibrated filter beside its placebo, and what each knew.
    attributed = json.loads((out / "attribution.json").read_text())["worlds"]
    calibrated = next(row for row in attributed if row["run"] == "calibrated")
    assert calibrated["placebo_run"] == "calibrated_placebo" and calibrated["unfiltered_run"] == "unfiltered"
    assert calibrated["attributable_cut"] == pytest.approx(calibrated["copy_cut"] - calibrated["placebo_copy_cut"])
    assert "pixel digest" in calibrated["knew"]
    assert "attributable cut" in proc.stdout.split("what the magnitude caused")[1]
    assert (out / "comparison.png").stat().st_size > 0 and (out / "comparison.csv").exists()
    assert list((out / "wandb").glob("offline-run-*"))
    for run in runs:
        assert list((out / run / "wandb").glob("offline-run-*"))
        run_cfg = (out / run / "config.yaml").read_text()
        assert "embedded_base" in run_cfg  # every run fine-tunes the shipped base
        assert "caption_dropout: 0.0" in run_cfg and "steps: 6" in run_cfg
    # The unfiltered run measures a quarter of each batch's magnitudes, and still logs them.
    logged = [json.loads(x) for x in (out / "unfiltered" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get(f"magnitude/{g}/all", math.nan)) for r in logged for g in ("duplicated", "other"))


def test_model_sd_fine_tunes_a_saved_diffusers_folder(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    quick = [*MICRO, "train.steps=2", "eval.enabled=false", "logging.wandb.enabled=false"]
    run_cli(python_cli("train", *quick, f"run_dir={base}"), cwd=tmp_path)
    run_cli(python_cli("train", *quick, "train.steps=3", "model=sd", f"model.pretrained={base / 'model'}",
                       "model.local_files_only=true", f"run_dir={tuned}"), cwd=tmp_path)
    before, after = unet_weights(base), unet_weights(tuned)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained from the loaded weights
    frozen = [load_file(d / "model" / "text_encoder" / "model.safetensors") for d in (base, tuned)]
    assert all(torch.equal(frozen[0][k], v) for k, v in frozen[1].items())


def test_bad_model_path_fails_with_one_clear_line(tmp_path):
    import subprocess

    from tests.conftest import ENV

    proc = subprocess.run(python_cli("train", *MICRO, "model=sd", f"model.pretrained={tmp_path}",
                                     f"run_dir={tmp_path / 'r'}"), cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"memsieve-train: error: model.pretrained={tmp_path} is not a diffusers model folder: it lacks unet/, "
        "text_encoder/, tokenizer/, scheduler/"]


def test_image_only_duplicates_pool_their_judgements_by_pair(tmp_path):
    """Each image_only repeat carries another caption; the filter's memory is keyed by the image's
    pixel digest (filter.key=content, no manifest), so a duplicated pair gathers judgements over all
    its captions and is dropped (here by the frequency-only robust-z rule at z=-100), while no single
    caption is drawn often enough (at most 6 times here) to reach drop_observations=10."""
    from data.dataset import build_data
    from tests.conftest import compose_train

    common = [*MICRO, "data.duplication.mode=image_only", "train.steps=40", "eval.enabled=false",
              "logging.wandb.enabled=false", "logging.decisions=true"]
    filt = ["filter=calibrated_z", "filter.buckets=2", "filter.min_samples=4", "filter.min_timestep=0",
            "filter.min_observations=1", "filter.min_prompts=2", "filter.drop_observations=10", "filter.z=-100"]
    run_cli(python_cli("train", *common, *filt, f"run_dir={tmp_path}"), cwd=tmp_path)
    duplicated = set(json.loads((tmp_path / "manifest.json").read_text())["counts"])
    dropped_keys = {k for r in decision_log(tmp_path) for k, kept in zip(r["key"], r["keep"]) if not kept}
    assert dropped_keys == duplicated  # every duplicated pair, and nothing else
    data = build_data(compose_train([*common, "run_dir=unused"]).data)
    for pair in {e.pair for e in data.dataset.entries if data.pairs.keys[e.pair] in duplicated}:
        captions = {data.dataset.sample(e, (0,))["caption"] for e in data.dataset.entries if e.pair == pair}
        assert len(captions) == 5  # five copies, five different captions, one pair in the filter's memory


def test_two_processes_hold_one_filter_state_with_judged_subsampling(tmp_path):
    """2 gloo ranks, a calibrated filter judging half of each rank's batch: replaying the gathered
    log through one policy reproduces both ranks' decisions, so both ranks held that one state
    (with sticky drops, so both marked the same keys as dropped for good, and as a placebo, so
    both drew the same placebo magnitudes)."""
    from omegaconf import OmegaConf

    from filters.policy import build_policy

    launch = [f"launch.accelerate_config={ROOT / 'configs' / 'accelerate' / 'multi_gpu.yml'}",
              "launch.num_processes=2"]
    run_cli(python_cli("train", *launch, *MICRO, "train.steps=12", "train.batch_size=2", "eval.enabled=false",
                       "logging.wandb.enabled=false", "logging.decisions=true", "filter=calibrated_z",
                       "filter.placebo=true",
                       "filter.judge_fraction=0.5", "filter.buckets=2", "filter.min_samples=2",
                       "filter.min_timestep=0", "filter.min_observations=1", "filter.min_prompts=2",
                       "filter.drop_observations=1", "filter.z=0", "filter.sticky=true", f"run_dir={tmp_path}"),
            cwd=tmp_path, timeout=400, env={"ACCELERATE_USE_CPU": "1"})
    cfg = OmegaConf.load(tmp_path / "config.yaml")
    policy = build_policy(cfg.filter, 1000, cfg.data.world.num_pairs)
    records = decision_log(tmp_path)
    assert len(records) == 12
    for r in records:
        magnitude, t, pairs = torch.tensor(r["magnitude"]), torch.tensor(r["t"]), torch.tensor(r["filter_key"])
        assert (~magnitude.isnan()).view(2, 2).sum(dim=1).tolist() == [1, 1]  # one judged sample per rank
        keep = policy.keep(magnitude, t, r["step"] - 1, pairs)
        assert keep.tolist() == r["keep"]
        policy.observe(magnitude, t, torch.tensor(r["valid"]), pairs, keep, torch.tensor(r["order"]))
    kept = [k for r in records for k in r["keep"]]
    assert any(kept) and not all(kept)
