"""Detection on a micro model trained here on a few heavily duplicated pairs, and memsieve-detect on its run."""

import json
import subprocess

import numpy as np
import pytest
import torch

from filters.detection import calibrate_threshold, calibration_split, first_steps_magnitudes
from filters.sampling import PromptSeeds
from tests.conftest import ENV, compose_train, python_cli, run_cli

# 40 pairs, 4 of them 30 times each: after 150 steps the duplicated ones are being memorized.
TRAINED = ["data.world.num_pairs=40", "data.duplication.num_duplicated=4", "data.duplication.copies=30",
           "train.batch_size=16", "train.steps=150", "train.checkpoint_every=0", "eval.enabled=false",
           "logging.wandb.enabled=false", "logging.progress=false", "logging.every=150",
           "filter.compute_magnitude=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run (model/ and config) and the labelled captions of its world."""
    from train.loop import train

    run_dir = tmp_path_factory.mktemp("micro_run")
    torch.set_num_threads(2)
    result = train(compose_train([*TRAINED, f"run_dir={run_dir}"]), run_dir)
    pairs, manifest = result.data.pairs, result.data.manifest
    labels = np.array([manifest.is_duplicated(k) for k in pairs.keys])
    result.components.unet.eval()
    return run_dir, result.components, list(pairs.captions), labels


def test_duplicated_prompts_score_higher(trained):
    _, comps, captions, labels = trained
    magnitudes = first_steps_magnitudes(comps, captions, [0, 1], 50, 7.5, first_steps=2, batch_size=128)
    assert magnitudes.shape == (len(captions), 2, 2)
    scores = magnitudes.mean(dim=(1, 2)).numpy()
    assert scores[labels].mean() > scores[~labels].mean()
    assert np.median(scores[labels]) > np.median(scores[~labels])


def test_batching_gives_the_same_scores_as_one_prompt_at_a_time(trained):
    _, comps, captions, labels = trained
    chosen = [captions[i] for i in [*np.flatnonzero(labels)[:2], *np.flatnonzero(~labels)[:3]]]
    batched = first_steps_magnitudes(comps, chosen, [5, 6], 50, 7.5, first_steps=3, batch_size=64)
    single = torch.cat([first_steps_magnitudes(comps, [p], [5, 6], 50, 7.5, first_steps=3, batch_size=1)
                        for p in chosen])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    # Per-prompt noise: prompt i is seeded 5 + i whatever the batch, and its generations do not
    # depend on how many are drawn.
    per_prompt = first_steps_magnitudes(comps, chosen, PromptSeeds(5, 2), 50, 7.5, first_steps=3, batch_size=3)
    alone = torch.cat([first_steps_magnitudes(comps, [p], PromptSeeds(5 + i, 2), 50, 7.5, first_steps=3, batch_size=1)
                       for i, p in enumerate(chosen)])
    torch.testing.assert_close(per_prompt, alone, rtol=1e-5, atol=1e-6)
    one = first_steps_magnitudes(comps, chosen, PromptSeeds(5, 1), 50, 7.5, first_steps=3, batch_size=64)
    torch.testing.assert_close(one, per_prompt[:, :1], rtol=1e-5, atol=1e-6)


def test_prompt_seeds_give_each_prompt_its_own_noise():
    seeds, shape = PromptSeeds(10, 3), (4, 8, 8)
    noises = torch.stack([torch.stack([seeds.latent(p, j, shape) for j in range(3)]) for p in range(4)])
    flat = noises.flatten(2)
    assert len({tuple(x[:4].tolist()) for x in flat.flatten(0, 1)}) == 12  # 4 prompts x 3 generations, all distinct
    # The reference's draws: prompt i's generator is seeded seed + i and yields its generations in turn.
    generator = torch.Generator().manual_seed(12)
    assert torch.equal(noises[2, 0], torch.randn(shape, generator=generator))
    assert torch.equal(noises[2, 1], torch.randn(shape, generator=generator))


def test_memsieve_detect_on_a_run(trained, tmp_path):
    run_dir, _, captions, labels = trained
    (tmp_path / "dup.txt").write_text("\n".join(c for c, d in zip(captions, labels) if d) + "\n")
    (tmp_path / "other.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n"
                                                  for c, d in zip(captions, labels) if not d))
    out = tmp_path / "out"
    proc = run_cli(python_cli("filters.detect", f"run={run_dir}", f"prompts={tmp_path / 'dup.txt'}",
                              f"nonmemorized={tmp_path / 'other.jsonl'}", "detection.num_inference_steps=10",
                              "detection.steps=2", "detection.generations=2", "detection.seed_sets=3",
                              "triggers.enabled=true", "show=2", "mitigation.enabled=true",
                              "mitigation.target=0.05", "seed=7", f"out_dir={out}"), cwd=tmp_path)
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1] == str(out / "summary.json")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    dup, other = int(labels.sum()), int((~labels).sum())
    assert [r["set"] for r in records] == ["prompts"] * dup + ["nonmemorized"] * other
    assert [r["seed"] for r in records] == [7 + i for i in range(dup + other)]  # each prompt its own noise
    assert all(np.array(r["magnitudes"]).shape == (2, 2) for r in records)
    scores = np.array([r["score"] for r in records])
    figures = summary["detection"]
    assert figures["seed_sets"] == 3 and len(figures["per_seed"]["auc"]) == 3
    assert figures["auc"] == pytest.approx(np.mean(figures["per_seed"]["auc"]))
    assert figures["negatives"] == other and "warning" in figures  # 36 negatives: under 100
    assert f"({other} negatives, {dup} positives; mean ± std over 3 seed sets)" in proc.stdout
    assert "warning: only 36 non-memorized prompts" in proc.stdout
    # Calibration on one half, FPR on the other; the p-values are against the calibration half.
    calibration, test = calibration_split(other, 7)
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["threshold"] == calibrate_threshold(scores[dup + calibration], 0.01)
    assert threshold["reference_scores"] == scores[dup + calibration].tolist()
    assert (threshold["steps"], threshold["generations"], threshold["num_inference_steps"]) == (2, 2, 10)
    assert threshold["model"] == str((run_dir / "model").resolve())
    assert [r.get("split") for r in records[dup:]] == ["calibration" if i in calibration else "test"
                                                       for i in range(other)]
    assert figures["per_seed"]["heldout_fpr"][0] == np.mean(scores[dup + test] > threshold["threshold"])
    tested = [r for r in records if r.get("split") != "calibration"]
    assert all("p_value" not in r for r in records if r.get("split") == "calibration")
    reference = scores[dup + calibration]
    for r in tested:
        assert r["p_value"] == (1 + (reference >= r["score"]).sum()) / (len(reference) + 1)
    flagged = summary["threshold"]["flagged"]
    assert flagged["nonmemorized_calibration_in_sample"] <= 0.01 * len(calibration)
    assert flagged["nonmemorized"] == sum(r["flagged"] for r in tested if r["set"] == "nonmemorized")
    assert summary["threshold"]["fdr"]["tested"] == len(tested)
    # The printed table: the 2 highest-scoring prompts with score and p-value, trigger tokens highlighted.
    header = lines.index(f"{'score':>8}  {'p-value':>7}  {'>thr':>4}  {'BH':>3}  prompt")
    top = sorted(records[:dup], key=lambda r: -r["score"])[:2]
    for line, r in zip(lines[header + 1:header + 3], top):
        assert line.split()[:2] == [f"{r['score']:.4f}", f"{r['p_value']:.4f}"] and "[[" in line
    triggers = [json.loads(line) for line in (out / "triggers.jsonl").read_text().splitlines()]
    assert [t["prompt"] for t in triggers] == [r["prompt"] for r in records if r["set"] == "prompts"]
    # Mitigation: every mitigated generation above the target ends under it or used its 10 steps.
    prompts = [r for r in records if r["set"] == "prompts"]
    assert all("mitigated_score" in r for r in prompts)
    assert len(list((out / "mitigated").glob("*_gen[01].png"))) == 2 * len(prompts)
    assert all(r["mitigated_score"] < r["score"] for r in prompts if min(m[0] for m in r["magnitudes"]) > 0.05)


def test_a_threshold_is_only_used_for_the_setting_it_was_calibrated_on(trained, tmp_path):
    run_dir, _, captions, labels = trained
    (tmp_path / "dup.txt").write_text("\n".join(c for c, d in zip(captions, labels) if d) + "\n")
    (tmp_path / "other.txt").write_text("\n".join(c for c, d in zip(captions, labels) if not d) + "\n")
    common = [f"run={run_dir}", f"prompts={tmp_path / 'dup.txt'}", "detection.num_inference_steps=10"]
    run_cli(python_cli("filters.detect", *common, f"nonmemorized={tmp_path / 'other.txt'}", "detection.steps=2",
                       "detection.seed_sets=1", f"out_dir={tmp_path / 'cal'}"), cwd=tmp_path)
    calibrated = tmp_path / "cal" / "threshold.json"
    expected = "first 2 of 10 steps x 1 generation(s), guidance 7.5, model " + str((run_dir / "model").resolve())
    for extra, scores in ((["detection.steps=2", "detection.generations=4"], "first 2 of 10 steps x 4 generation(s)"),
                          (["detection.steps=2", "mitigation.enabled=true"], "first 1 of 10 steps x 1 generation(s)")):
        proc = subprocess.run(python_cli("filters.detect", *common, f"threshold={calibrated}", *extra,
                                         f"out_dir={tmp_path / 'use'}"), cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith(f"memsieve-detect: error: the threshold was calibrated on {expected}, but ")
        assert scores in error
    # The same setting is accepted, and every prompt gets a p-value against the calibration scores.
    run_cli(python_cli("filters.detect", *common, f"threshold={calibrated}", "detection.steps=2",
                       f"out_dir={tmp_path / 'use'}"), cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "use" / "scores.jsonl").read_text().splitlines()]
    assert len(records) == int(labels.sum()) and all(0 < r["p_value"] <= 1 for r in records)


def test_bad_prompt_file_fails_with_one_clear_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no caption here"}\n')
    proc = subprocess.run(python_cli("filters.detect", f"prompts={bad}", f"model.pretrained={tmp_path}",
                                     f"out_dir={tmp_path / 'o'}"), cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (f"memsieve-detect: error: {bad}:1 has no string 'caption' field; "
                                                    "expected one object with one per line")
