"""On a complete toy SD pipeline folder: the pipeline monitor against the detector, and memsieve-detect."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from filters.callback import MemorizationMonitor
from filters.detection import DetectionThreshold
from filters.sampling import sample_prompts
from tests.conftest import ROOT, python_cli, run_cli
from train.components import load_pretrained

# ../shared beside the checkout (a worktree one level deeper finds it one level up).
WEBSTER = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.is_dir()),
               ROOT.parent / "shared") / "prompts" / "sdv1_500_memorized.jsonl"
PROMPTS = ["a photo of the red cat", "a blue square"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_monitor_records_the_detectors_magnitudes(tiny_sd_path, tmp_path, prediction_type):
    """Both in epsilon space: on a v-prediction pipeline the monitor converts at the UNet's own timestep."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    seed, steps = 11, 4
    comps = load_pretrained(str(tiny_sd_path))
    comps.noise_scheduler.register_to_config(prediction_type=prediction_type)
    _, detector = sample_prompts(comps, PROMPTS, [seed], steps, 7.5, batch_size=8)
    scores = detector[:, 0, :2].mean(dim=1)
    # Calibration scores: three between the two prompts' scores and one below both.
    reference = [float(scores.mean())] * 3 + [float(scores.min()) - 1]
    calibration = DetectionThreshold(threshold=0.0, fpr=0.01, steps=2, generations=1, num_inference_steps=steps,
                                     guidance_scale=7.5, model=str(tiny_sd_path), calibration_prompts=4,
                                     reference_scores=reference)
    calibration.save(tmp_path / "threshold.json")
    monitor = MemorizationMonitor.from_file(tmp_path / "threshold.json", fdr=0.9)
    with monitor.attach(pipe):
        pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
             generator=[torch.Generator().manual_seed(seed) for _ in PROMPTS], callback_on_step_end=monitor)
    assert monitor.per_step.shape == (len(PROMPTS), steps)
    torch.testing.assert_close(monitor.per_step, detector[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(monitor.scores, scores, rtol=1e-4, atol=1e-5)
    assert monitor.flagged.all()  # every magnitude is above a threshold of 0
    # p-values against the 4 calibration scores: the higher prompt beats all 4, the lower one only 1.
    high = int(scores.argmax())
    assert monitor.p_values[high] == 1 / 5 and monitor.p_values[1 - high] == 4 / 5
    assert monitor.fdr_flagged.tolist() == [True, True]  # BH at 0.9: 1/5 <= 0.45 and 4/5 <= 0.9
    monitor.fdr = 0.5  # 1/5 <= 0.25 but 4/5 > 0.5
    assert monitor.fdr_flagged.tolist() == [i == high for i in range(2)]
    with pytest.raises(ValueError, match="needs classifier-free guidance"), monitor.attach(pipe):
        pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, output_type="latent", callback_on_step_end=monitor)
    # A call in another setting than the calibration's is refused at its first step, naming both.
    with pytest.raises(ValueError, match=r"calibrated on first 2 of 4 steps x 1 generation\(s\), guidance 7.5, "
                                         r"model .*, but this pipeline call scores first 2 of 6 steps"), \
            monitor.attach(pipe):
        pipe(PROMPTS[:1], num_inference_steps=6, guidance_scale=7.5, output_type="latent", callback_on_step_end=monitor)
    with pytest.raises(ValueError, match="scores first 2 of 4 steps x 1 generation\\(s\\), guidance 5"), \
            monitor.attach(pipe):
        pipe(PROMPTS[:1], num_inference_steps=4, guidance_scale=5.0, output_type="latent", callback_on_step_end=monitor)
    # The monitor scores one image: a threshold over several generations is refused.
    DetectionThreshold(**{**calibration.__dict__, "generations": 4}).save(tmp_path / "four.json")
    with pytest.raises(ValueError, match="needs a one-generation threshold; .* was calibrated on first 2 of 4 steps "
                                         "x 4 generation"):
        MemorizationMonitor.from_file(tmp_path / "four.json")


@pytest.mark.skipif(not WEBSTER.exists(), reason="../shared/prompts is not beside this checkout")
def test_memsieve_detect_reads_websters_memorized_prompts(tiny_sd_path, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(WEBSTER.read_text().splitlines(keepends=True)[:6]))
    (tmp_path / "other.txt").write_text("a photo of the dog\n\na red circle\nthe blue cat\n")
    out = tmp_path / "out"
    run_cli(python_cli("filters.detect", f"model.pretrained={tiny_sd_path}", "model.local_files_only=true",
                       f"prompts={few}", f"nonmemorized={tmp_path / 'other.txt'}", "detection.batch_size=4",
                       "detection.seed_sets=2", f"out_dir={out}"), cwd=tmp_path)
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    captions = [json.loads(line)["caption"] for line in few.read_text().splitlines()]
    assert [r["prompt"] for r in records] == captions + ["a photo of the dog", "a red circle", "the blue cat"]
    assert all(r["score"] > 0 and len(r["magnitudes"]) == 1 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"]["count"] == 6 and summary["nonmemorized"]["count"] == 3
    assert Path(out / "roc.png").exists() and (out / "threshold.json").exists()
