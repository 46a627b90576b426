"""The trade-off sweep: ``experiment=tradeoff`` at micro size (real runs, both duplication modes), the
figures and tables it ends with, and ``memsieve-compare`` grouping any runs by method and strength."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from evaluation.tradeoff import method_of
from tests.conftest import MICRO, compose_train, python_cli, run_cli

LEFT_OUT = ("calibrated", "calibrated_placebo", "rta", "replace", "repeat", "embedding_noise", "multiple", "dedup")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Both modes x (unmitigated, a threshold no magnitude reaches, its placebo): 6 real runs."""
    root = tmp_path_factory.mktemp("tradeoff")
    run_cli(python_cli("train", "experiment=tradeoff", *MICRO, "train.steps=4",
                       "hydra.sweeper.grids.threshold='filter=threshold filter.threshold=1000'",
                       "hydra.sweeper.grids.threshold_placebo='filter=threshold filter.placebo=true "
                       "filter.threshold=1000'",
                       *(f"hydra.sweeper.grids.{g}=null" for g in LEFT_OUT), f"hydra.sweep.dir={root / 'sweep'}"),
            cwd=root, timeout=1800)
    return root / "sweep"


def rows_of(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sweep_runs_the_union_of_grids_in_both_modes(sweep):
    jobs = sorted((d for d in sweep.iterdir() if (d / "summary.json").exists()), key=lambda d: int(d.name))
    overrides = [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) for d in jobs]
    swept = [[o for o in ov if o.startswith(("filter", "data.duplication.mode"))] for ov in overrides]
    assert swept == [[*grid, f"data.duplication.mode={mode}"] for mode in ("exact", "image_only")
                     for grid in (["filter=none"], ["filter=threshold", "filter.threshold=1000"],
                                  ["filter=threshold", "filter.placebo=True", "filter.threshold=1000"])]


def test_sweep_ends_with_one_figure_per_mode_and_the_tables(sweep):
    rows = rows_of(sweep / "tradeoff.csv")
    assert [(r["setting"], r["method"], r["strength"]) for r in rows] == [
        (mode, method, strength) for mode in ("exact", "image_only")
        for method, strength in (("none", ""), ("threshold", "threshold=1000"),
                                 ("threshold placebo", "threshold=1000"))]
    for mode in ("exact", "image_only"):
        assert (sweep / f"tradeoff_{mode}.png").stat().st_size > 0
    summaries = {int(d.name): json.loads((d / "summary.json").read_text())
                 for d in sweep.iterdir() if (d / "summary.json").exists()}
    for i, row in enumerate(rows):  # rows are in job order here: one run per point
        assert float(row["copy/duplicated"]) == pytest.approx(summaries[i]["copy"]["duplicated"])
        assert float(row["alignment/other"]) == pytest.approx(summaries[i]["alignment"]["other"])
        assert float(row["copy/nearest/duplicated/p95"]) == pytest.approx(
            summaries[i]["copy"]["nearest"]["duplicated"]["p95"])
        assert row["runs"] == "1"
    summary = json.loads((sweep / "tradeoff.json").read_text())
    for mode in ("exact", "image_only"):
        points = {p["method"]: p["mean"] for p in summary[mode]["points"]}
        # a threshold no magnitude reaches drops nothing, nor does its placebo: the unmitigated run again
        assert points["threshold"] == pytest.approx(points["none"])
        assert points["threshold placebo"] == pytest.approx(points["none"])
        pareto = summary[mode]["pareto"]["copy/duplicated"]["alignment/duplicated"]
        assert pareto["none"]["copy"] == pytest.approx(points["none"]["copy/duplicated"])
        assert pareto["none"]["copy_change"] == 0
        assert pareto["threshold"]["attributable_cut"] == pytest.approx(0) and "attributable_cut" not in pareto["none"]
    assert "### duplication mode image_only" in (sweep / "tradeoff.md").read_text()
    run = next((sweep / "wandb").glob("offline-run-*"))
    tables = [p.relative_to(run).as_posix() for p in run.rglob("*.table.json")]
    for mode in ("exact", "image_only"):  # per mode the point table and a line plot per panel
        assert sum(f"table/tradeoff/{mode}/" in t for t in tables) == 1 + 4, tables


def test_memsieve_compare_groups_any_runs_by_their_configs(sweep, tmp_path):
    out = tmp_path / "cmp"
    run_cli(python_cli("evaluation.compare", str(sweep / "1"), str(sweep / "0"), "--out", str(out),
                       "--wandb", "disabled"), cwd=tmp_path)
    assert [(r["setting"], r["method"], r["strength"]) for r in rows_of(out / "tradeoff.csv")] == [
        ("exact", "none", ""), ("exact", "threshold", "threshold=1000")]
    assert (out / "tradeoff_exact.png").exists() and not (out / "tradeoff_image_only.png").exists()


@pytest.mark.parametrize("overrides, expected", [
    ([], ("none", {})),
    (["filter=threshold", "filter.threshold=1.5"], ("threshold", {"threshold": 1.5})),
    (["filter=calibrated", "filter.fdr=0.01"], ("calibrated", {"fdr": 0.01})),
    (["filter=calibrated", "filter.placebo=true"], ("calibrated placebo", {"fdr": 0.001})),
    (["filter=calibrated_z", "filter.z=0.5"], ("calibrated_z", {"z": 0.5})),
    (["data.captions.augmentation=rta", "data.captions.probability=0.3"], ("rta", {"p": 0.3, "tokens": 2.0})),
    (["data.captions.augmentation=repeat", "data.captions.num_tokens=4"], ("repeat", {"p": 0.1, "tokens": 4.0})),
    (["data.captions.embedding_noise=0.1"], ("embedding_noise", {"std": 0.1})),
    (["data.captions.multiple=true", "data.world.num_captions=4"], ("multiple", {"captions": 4.0})),
    (["data.dedup.method=exact"], ("dedup", {"hamming": 0.0})),
    (["data.dedup.method=near", "data.dedup.max_distance=6"], ("dedup", {"hamming": 6.0})),
    (["filter=calibrated_z", "filter.z=1", "data.captions.embedding_noise=0.2"],
     ("calibrated_z+embedding_noise", {"calibrated_z.z": 1.0, "embedding_noise.std": 0.2})),
])
def test_method_and_strength_come_from_the_config(overrides, expected):
    assert method_of(compose_train(["run_dir=unused", *overrides])) == expected
