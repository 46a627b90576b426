"""Comparisons and re-evaluation through the console entry points, over a real micro duplication sweep."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from evaluation.reeval import run_config
from tests.conftest import MICRO, python_cli, run_cli
from tests.test_eval_metrics import write_tiny_clip, write_tiny_sscd

COUNTS = (3, 6)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """``experiment=dup_sweep`` at micro size: two duplication counts, unfiltered (two real runs)."""
    root = tmp_path_factory.mktemp("sweep")
    micro = [o for o in MICRO if not o.startswith("data.duplication.copies")]
    run_cli(python_cli("train", "experiment=dup_sweep", *micro, "train.steps=4",
                       "hydra.sweeper.grids.calibrated=null", "hydra.sweeper.grids.calibrated_placebo=null",
                       f"data.duplication.copies={','.join(map(str, COUNTS))}", f"hydra.sweep.dir={root / 'sweep'}"),
            cwd=root)
    return root / "sweep"


def read_rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_dup_sweep_ends_with_its_comparison(sweep):
    rows = read_rows(sweep / "comparison.csv")
    assert [(r["run"], r["filter"], r["copies"]) for r in rows] == [(f"copies={c}", "none", str(c)) for c in COUNTS]
    for name in ("comparison.png", "duplication.png", "comparison.md", "comparison.json"):
        assert (sweep / name).stat().st_size > 0, name
    assert list((sweep / "wandb").glob("offline-run-*"))


def test_memsieve_compare_writes_table_plots_and_wandb(sweep, tmp_path):
    out = tmp_path / "cmp"
    proc = run_cli(python_cli("evaluation.compare", str(sweep / "0"), str(sweep / "1"), "--out", str(out),
                              "--wandb", "offline"), cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == str(out / "comparison.json")
    rows = read_rows(out / "comparison.csv")
    assert [r["copies"] for r in rows] == [str(c) for c in COUNTS]
    summaries = [json.loads((sweep / d / "summary.json").read_text()) for d in ("0", "1")]
    for row, summary in zip(rows, summaries):
        assert float(row["copy/duplicated"]) == pytest.approx(summary["copy"]["duplicated"])
        assert float(row["copy/nearest/duplicated/mean_max"]) == pytest.approx(
            summary["copy"]["nearest"]["duplicated"]["mean_max"])
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0] == "| metric | copies=3 | copies=6 |"
    settings = summaries[0]["detection"]["settings"]
    assert {line.split(" | ")[0] for line in table[2:]} >= {"| copy/duplicated", "| copy/nearest/duplicated/p95",
                                                            "| alignment/duplicated",
                                                            *(f"| detection/settings/{s}/auc" for s in settings)}
    for row, summary in zip(rows, summaries):  # each detection setting's AUC, not only the default one
        for name, setting in summary["detection"]["settings"].items():
            assert float(row[f"detection/settings/{name}/auc"]) == pytest.approx(setting["auc"])
    assert (out / "comparison.png").stat().st_size > 0 and (out / "duplication.png").stat().st_size > 0
    run = next((out / "wandb").glob("offline-run-*"))
    logged = [p.name for p in run.rglob("*.table.json")]
    assert any(name.startswith("table_") for name in logged), logged
    assert len(list(run.rglob("*.png"))) == 2


def test_memsieve_eval_switches_metrics_without_regenerating_and_changes_seeds(sweep, tmp_path):
    run = sweep / "1"
    weights, clip = write_tiny_sscd(tmp_path / "sscd.torchscript.pt"), write_tiny_clip(tmp_path)
    out = tmp_path / "sscd_clip"
    proc = run_cli(python_cli("evaluation.reeval", str(run), "eval.copy.metric=sscd",
                              f"eval.copy.sscd.weights={weights}", "eval.copy.sscd.preprocess=skew_320",
                              "eval.copy.sscd.size=32",
                              f"eval.copy.cache_dir={tmp_path / 'cache'}",
                              "eval.alignment.metric=clip", f"eval.alignment.clip.model={clip}",
                              "eval.alignment.clip.local_files_only=true", "--out", str(out)), cwd=tmp_path)
    assert "reusing" in proc.stdout and proc.stdout.strip().splitlines()[-1] == str(out / "summary.json")
    old, new = (json.loads((d / "summary.json").read_text()) for d in (run, out))
    assert new["copy"]["metric"] == "sscd" and new["alignment"]["metric"] == "clip"
    assert new["copy"]["preprocess"] == "skew_320"
    assert set(new["copy"]["nearest"]["duplicated"]) == {"mean_max", "p95", "above_threshold", "own_is_nearest"}
    assert -1 <= new["alignment"]["duplicated"] <= 1
    assert new["detection"] == old["detection"] and new["filter"] == old["filter"]  # reused, not recomputed
    assert torch.equal(torch.load(out / "generations.pt")["images"], torch.load(run / "generations.pt")["images"])

    proc = run_cli(python_cli("evaluation.reeval", str(run), "eval.num_seeds=1", "eval.seed=7", "--out",
                              str(tmp_path / "seeds")), cwd=tmp_path)
    assert "reusing" not in proc.stdout
    regenerated = torch.load(tmp_path / "seeds" / "generations.pt")
    assert regenerated["seeds"] == [7] and regenerated["images"].shape[1] == 1
    assert json.loads((tmp_path / "seeds" / "summary.json").read_text())["prompts"]["seeds"] == [7]


def test_memsieve_eval_regenerates_for_new_weights(sweep, tmp_path):
    """A run whose model/ was rewritten since its evaluation (resumed or extended with
    eval.enabled=false) gets new generations and detection, not the old model's; then they are reused."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(sweep / "1", run)
    weights = run / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("conv_out.weight"))
    state[name] = state[name] + 0.05 * torch.randn_like(state[name])
    save_file(state, weights)
    old = json.loads((run / "summary.json").read_text())
    old_images = torch.load(run / "generations.pt")["images"]
    proc = run_cli(python_cli("evaluation.reeval", str(run)), cwd=tmp_path)
    assert "reusing" not in proc.stdout
    new = json.loads((run / "summary.json").read_text())
    assert new["detection"]["config"]["weights"] != old["detection"]["config"]["weights"]
    assert new["detection"]["auc"] != old["detection"]["auc"] or \
        new["detection"]["settings"] != old["detection"]["settings"]
    assert not torch.equal(torch.load(run / "generations.pt")["images"], old_images)
    proc = run_cli(python_cli("evaluation.reeval", str(run)), cwd=tmp_path)
    assert "reusing" in proc.stdout and json.loads((run / "summary.json").read_text())["detection"] == new["detection"]


def test_memsieve_eval_rejects_unknown_settings(sweep):
    with pytest.raises(ValueError, match="Key 'metirc' is not in struct"):
        run_config(sweep / "0", ["eval.copy.metirc=sscd"])


def test_checkpoint_evaluates_its_ema_weights(tmp_path):
    """A checkpoint at step 2 holds what a 2-step run saves as its model: the EMA-averaged UNet."""
    from safetensors.torch import load_file

    from evaluation.reeval import load_checkpoint_unet, reevaluate
    from train.components import load_pretrained

    common = [*MICRO, "eval.enabled=false", "logging.wandb.enabled=false", "train.ema.enabled=true",
              "train.ema.decay=0.5", "train.checkpoint_every=2"]
    long, short = tmp_path / "long", tmp_path / "short"
    run_cli(python_cli("train", *common, "train.steps=4", f"run_dir={long}"), cwd=tmp_path)
    run_cli(python_cli("train", *common, "train.steps=2", f"run_dir={short}"), cwd=tmp_path)
    unet = load_pretrained(str(long / "model"), local_files_only=True).unet
    load_checkpoint_unet(unet, long / "checkpoints" / "step-2", ema=True)
    expected = load_file(short / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(unet.state_dict()[k], v) for k, v in expected.items())
    raw = load_file(long / "checkpoints" / "step-2" / "model.safetensors")
    assert any(not torch.allclose(raw[k], v) for k, v in expected.items())  # the average, not the raw weights
    with pytest.raises(FileNotFoundError, match=r"step-9 does not exist; expected RUN_DIR/checkpoints/step-N, one "
                                                r"of step-2$"):
        reevaluate(long, [], checkpoint=long / "checkpoints" / "step-9")
    assert not (long / "eval_step-9").exists()
