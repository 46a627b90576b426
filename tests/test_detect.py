"""Detection on a micro model trained here on a few heavily duplicated pairs, and memsieve-detect on its run."""

import json

import numpy as np
import pytest
import torch

from filters.detection import calibrate_threshold, first_steps_magnitudes
from tests.conftest import compose_train, python_cli, run_cli

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


def test_memsieve_detect_on_a_run(trained, tmp_path):
    run_dir, _, captions, labels = trained
    (tmp_path / "dup.txt").write_text("\n".join(c for c, d in zip(captions, labels) if d) + "\n")
    (tmp_path / "other.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n"
                                                  for c, d in zip(captions, labels) if not d))
    out = tmp_path / "out"
    proc = run_cli(python_cli("filters.detect", f"run={run_dir}", f"prompts={tmp_path / 'dup.txt'}",
                              f"nonmemorized={tmp_path / 'other.jsonl'}", "detection.num_inference_steps=10",
                              "detection.steps=2", "detection.generations=2", "triggers.enabled=true",
                              "triggers.show=2", "mitigation.enabled=true", f"out_dir={out}"), cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == str(out / "summary.json")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["set"] for r in records] == ["prompts"] * int(labels.sum()) + ["nonmemorized"] * int((~labels).sum())
    assert all(np.array(r["magnitudes"]).shape == (2, 2) for r in records)
    scores = np.array([r["score"] for r in records])
    assert summary["detection"]["auc"] > 0.5 and 0 <= summary["detection"]["tpr_at_1pct_fpr"] <= 1
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["threshold"] == calibrate_threshold(scores[int(labels.sum()):], 0.01)
    assert summary["threshold"]["flagged"]["nonmemorized"] <= 0.01 * (~labels).sum()
    assert (out / "roc.png").stat().st_size > 0
    triggers = [json.loads(line) for line in (out / "triggers.jsonl").read_text().splitlines()]
    assert [t["prompt"] for t in triggers] == [r["prompt"] for r in records if r["set"] == "prompts"]
    assert "[[" in proc.stdout  # highlighted tokens (no terminal, so brackets)
    # Mitigation targets the calibrated threshold: every mitigated generation ends under it or used its 10 steps.
    prompts = [r for r in records if r["set"] == "prompts"]
    assert all("mitigated_score" in r for r in prompts)
    assert len(list((out / "mitigated").glob("*.png"))) == 2 * len(prompts)
    flagged = [r for r in prompts if r["flagged"]]
    assert all(r["mitigated_score"] < r["score"] for r in flagged)


def test_bad_prompt_file_fails_with_one_clear_line(tmp_path):
    import subprocess

    from tests.conftest import ENV

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no caption here"}\n')
    proc = subprocess.run(python_cli("filters.detect", f"prompts={bad}", f"model.pretrained={tmp_path}",
                                     f"out_dir={tmp_path / 'o'}"), cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (f"memsieve-detect: error: {bad}:1 has no string 'caption' field; "
                                                    "expected one object with one per line")
