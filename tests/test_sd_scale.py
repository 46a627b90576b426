"""Stable Diffusion at scale: a real SD pipeline folder fine-tuned with every feature on, the
papers' presets, the accelerate config files, and the per-sample loss pieces the filter relies on."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from diffusers import DDPMScheduler, StableDiffusionPipeline
from omegaconf import OmegaConf
from safetensors.torch import load_file

from filters.policy import filtered_mean
from tests.conftest import MICRO, ROOT, compose_train, python_cli, run_cli
from train.components import set_attention
from train.loss import min_snr_weights, per_sample_loss
from train.optim import build_optimizer
from train.randomness import draw


def test_tiny_sd_fine_tune_with_ema_min_snr_and_filter_saves_a_loadable_pipeline(tiny_sd_path, tmp_path):
    run = tmp_path / "run"
    run_cli(python_cli("train", *MICRO, "data.world.resolution=32", "model=sd", f"model.pretrained={tiny_sd_path}",
                       "model.local_files_only=true", "train.mixed_precision=no", "train.steps=4",
                       "train.ema.enabled=true", "train.snr_gamma=5.0", "filter=threshold", "filter.threshold=1.5",
                       "logging.decisions=true", "eval.enabled=false", "validation.every=2",
                       "validation.num_prompts=1", "validation.seeds=[0]", "validation.num_inference_steps=1",
                       f"run_dir={run}"), cwd=tmp_path)
    kept = [k for line in (run / "decisions.jsonl").read_text().splitlines() for k in json.loads(line)["keep"]]
    assert len(kept) == 4 * 8 and any(kept) and not all(kept)  # the filter dropped some samples, kept others
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert len(list(run.glob("wandb/offline-run-*/files/media/images/validation_*.png"))) == 4  # 2 steps x 2 prompts

    assert (run / "model" / "model_index.json").exists()
    pipe = StableDiffusionPipeline.from_pretrained(run / "model", local_files_only=True)
    image = pipe("a red circle", num_inference_steps=1, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0
    base = load_file(tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    frozen = [load_file(d / "text_encoder" / "model.safetensors") for d in (tiny_sd_path, run / "model")]
    assert all(torch.equal(frozen[0][k], v) for k, v in frozen[1].items())


PRESETS = {
    "wen2024": {
        "data.source": "webdataset", "data.resolution": 512, "data.center_crop": True, "data.num_pairs": 120200,
        "data.duplication.mode": "exact", "data.duplication.num_duplicated": 200, "data.duplication.copies": 200,
        "model.kind": "pretrained", "model.pretrained": "CompVis/stable-diffusion-v1-4",
        "train.steps": 20000, "train.batch_size": 8, "train.lr": 1e-5, "train.lr_scheduler": "constant",
        "train.weight_decay": 1e-2, "train.ema.enabled": True, "train.mixed_precision": "fp16",
        "train.gradient_checkpointing": True, "filter.kind": "threshold", "filter.threshold": 2.0,
        "train.caption_dropout": 0,
    },
    "somepalli2023": {
        "data.source": "webdataset", "data.resolution": 256, "data.num_pairs": 10000, "data.random_flip": True,
        "data.weighted.fraction": 0.05, "data.weighted.weight": 5, "data.duplication.mode": "exact",
        "model.kind": "pretrained", "model.pretrained": "stabilityai/stable-diffusion-2-1",
        "train.lr": 5e-6, "train.lr_scheduler": "constant_with_warmup", "train.lr_warmup_steps": 5000,
        "train.batch_size": 16, "train.caption_dropout": 0,
    },
    "embedded": {"data.source": "embedded", "model.kind": "embedded", "filter.kind": "none"},
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_compose_with_the_papers_values(name):
    cfg = compose_train([f"experiment={name}", "run_dir=unused"])
    for key, value in PRESETS[name].items():
        assert OmegaConf.select(cfg, key) == value, key
    assert compose_train(["experiment=embedded", "run_dir=unused"]) == compose_train(["run_dir=unused"])


def test_somepalli2023_switches_duplication_mode():
    cfg = compose_train(["experiment=somepalli2023", "data.duplication.mode=image_only", "run_dir=unused"])
    assert cfg.data.duplication.mode == "image_only" and cfg.data.weighted.weight == 5


EXPECTED_BACKENDS = {"single_gpu": (DistributedType.NO, 1), "multi_gpu": (DistributedType.MULTI_GPU, 1),
                     "multi_node": (DistributedType.MULTI_GPU, 2), "fsdp": (DistributedType.FSDP, 1),
                     "deepspeed_zero2": (DistributedType.DEEPSPEED, 1)}


@pytest.mark.parametrize("name", sorted(EXPECTED_BACKENDS))
def test_accelerate_config_files_load(name):
    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yml"))
    assert (config.distributed_type, config.num_machines) == EXPECTED_BACKENDS[name]
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
    if name == "fsdp":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_travel_with_their_samples_through_the_filter(prediction_type):
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 900, 500, 50])
    keep = torch.tensor([True, True, False, False])
    weights = min_snr_weights(sched, timesteps, 5.0)
    assert bool((weights > 0).all() and (weights <= 1).all())
    if prediction_type == "epsilon":  # min(snr, 5) / snr: only high-SNR (low t) samples are down-weighted
        assert weights[0] < 1 and weights[1] == 1
    loss = filtered_mean(per_sample_loss(pred, target, sched, timesteps, 5.0), keep, int(keep.sum()))
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (mse[:2] * weights[:2]).mean())
    # A dropped sample's timestep (hence weight) does not reach the loss.
    moved = torch.tensor([10, 900, 999, 1])
    assert torch.allclose(loss, filtered_mean(per_sample_loss(pred, target, sched, moved, 5.0), keep, 2))


def test_draws_depend_on_global_position_not_rank():
    shape = torch.Size([4, 3, 8, 8])
    whole = draw(7, 3, shape, rank=0, world=1, num_train_timesteps=1000, caption_dropout=0.5, noise_offset=0.1)
    halves = [draw(7, 3, torch.Size([2, 3, 8, 8]), rank=r, world=2, num_train_timesteps=1000, caption_dropout=0.5,
                   noise_offset=0.1) for r in (0, 1)]
    for field in ("noise", "timesteps", "captioned"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]))


def test_sdpa_and_eager_attention_agree(tiny_components):
    unet = tiny_components.unet.eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    cond = torch.randn(2, 16, unet.config.cross_attention_dim)
    with torch.no_grad():
        set_attention(unet, "eager")
        eager = unet(x, t, cond).sample
        set_attention(unet, "sdpa")
        sdpa = unet(x, t, cond).sample
    assert torch.allclose(eager, sdpa, atol=1e-5)
    with pytest.raises(ValueError, match="train.attention='flash'"):
        set_attention(unet, "flash")


def test_8bit_adamw_without_bitsandbytes_is_a_one_line_error():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    tc = compose_train(["train.optimizer=adamw_8bit", "run_dir=unused"]).train
    with pytest.raises(ValueError, match="train.optimizer=adamw_8bit needs bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], tc)



def test_relaunch_command_runs_the_job_under_accelerate_with_its_own_overrides(tmp_path):
    from train.relaunch import relaunch_command

    config_file = ROOT / "configs" / "accelerate" / "multi_gpu.yml"
    cfg = compose_train([f"launch.accelerate_config={config_file}", "launch.num_processes=4", "run_dir=unused"])
    cmd = relaunch_command(cfg, ["train.lr=1e-4", f"launch.accelerate_config={config_file}", "hydra.job.num=3"],
                           str(tmp_path))
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(config_file), "--num_processes", "4",
                       "-m", "train", "train.lr=1e-4", f"hydra.run.dir={tmp_path}"]
    cfg.launch.accelerate_config = str(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="launch.accelerate_config=.*missing.yaml does not exist"):
        relaunch_command(cfg, [], str(tmp_path))


def test_saved_unet_takes_the_ema_weights_and_leaves_the_training_module_alone(tiny_components):
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from train.export import trained_unet

    unet = tiny_components.unet
    ema = EMAModel(unet.parameters(), decay=0.5, model_cls=type(unet), model_config=unet.config)
    for _ in range(3):  # EMAModel copies on its first step, averages after
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(1.0)
        ema.step(unet.parameters())
    raw = {k: v.clone() for k, v in unet.state_dict().items()}
    final = trained_unet(Accelerator(cpu=True), unet, unet, ema)
    assert all(torch.equal(a, b) for a, b in zip(final.parameters(), ema.shadow_params))
    assert not all(torch.equal(a, b) for a, b in zip(final.parameters(), unet.parameters()))
    assert all(torch.equal(raw[k], v) for k, v in unet.state_dict().items())
    assert final is not unet and not final.training
