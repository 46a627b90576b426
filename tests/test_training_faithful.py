"""The training loop as the reference runs it: every draw judged in epsilon space, and a step that keeps
nothing makes no update. Real tiny runs of :func:`train.loop.train`, checked by hand."""

from __future__ import annotations

import json

import torch

from data.dataset import build_data
from data.world import VOCABULARY
from tests.conftest import MICRO, compose_train
from train.components import build_components
from train.loop import train
from train.randomness import draw

QUIET = ["logging.wandb.enabled=false", "logging.progress=false", "eval.enabled=false", "validation.every=0"]


def test_dropped_captions_are_judged_in_epsilon_space(tmp_path):
    """With every caption dropped, each draw still gets its pair's real magnitude: the training forward is the
    unconditional prediction, the no-grad one takes the caption. On a v-prediction model it is the norm of
    the difference of the noises the two predictions imply, written out here."""
    cfg = compose_train([*MICRO, *QUIET, "train.steps=1", "train.caption_dropout=1.0",
                         "train.prediction_type=v_prediction", "logging.decisions=true", f"run_dir={tmp_path}"])
    train(cfg, tmp_path)
    logged = json.loads((tmp_path / "decisions.jsonl").read_text().splitlines()[0])

    comps = build_components(cfg.model, list(VOCABULARY))  # the same initial weights the step used
    comps.unet.eval()
    sched = comps.noise_scheduler
    data = build_data(cfg.data, comps.tokenizer)
    batch = next(data.batches(cfg.train.batch_size, cfg.seed, 0, 1))
    x0 = comps.encode_images(batch["pixel_values"])
    drawn = draw(cfg.seed, 0, x0.shape, 0, 1, sched.config.num_train_timesteps, 1.0)
    assert not drawn.captioned.any() and logged["key"] == list(batch["key"])
    x_t = sched.add_noise(x0, drawn.noise, drawn.timesteps)
    with torch.no_grad():
        v_cond = comps.unet(x_t, drawn.timesteps, comps.encode_text(list(batch["caption"]))).sample
        v_uncond = comps.unet(x_t, drawn.timesteps, comps.encode_text([""] * len(x0))).sample
    a = sched.alphas_cumprod[drawn.timesteps].view(-1, 1, 1, 1).double()
    eps = [a.sqrt() * v.double() + (1 - a).sqrt() * x_t.double() for v in (v_cond, v_uncond)]
    hand = (eps[0] - eps[1]).flatten(1).norm(dim=1)
    assert (hand > 0).all()
    torch.testing.assert_close(torch.tensor(logged["magnitude"], dtype=torch.float64), hand, rtol=1e-3, atol=1e-5)


def unet_state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_a_step_that_keeps_nothing_makes_no_update_and_is_counted(tmp_path):
    """A threshold under every magnitude drops everything: no AdamW step (its momentum and weight decay would
    move the weights), no LR step, no EMA step, and each such step is counted; a resumed run counts on."""
    overrides = [*MICRO, *QUIET, "train.steps=3", "train.checkpoint_every=2", "train.ema.enabled=true",
                 "train.lr_scheduler=linear", "train.lr_warmup_steps=2", "filter=threshold",
                 "filter.threshold=1e-9", f"run_dir={tmp_path}"]
    cfg = compose_train(overrides)
    initial = unet_state(build_components(cfg.model, list(VOCABULARY)).unet)
    result = train(cfg, tmp_path)
    assert result.counts.skipped_steps == 3 and result.counts.dropped_fraction() == {"duplicated": 1.0, "other": 1.0}
    final = unet_state(result.components.unet)
    assert all(torch.equal(initial[k], final[k]) for k in initial)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [2, 3] and records[0]["lr"] == records[-1]["lr"]
    checkpoint = tmp_path / "checkpoints" / "step-2"
    assert torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"] == {}  # AdamW never stepped
    assert torch.load(checkpoint / "scheduler.bin", weights_only=False)["last_epoch"] == 0
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert ema["optimization_step"] == 0
    (tmp_path / "model").rename(tmp_path / "first_model")
    resumed = train(compose_train(overrides), tmp_path)  # from step 2: the count comes back with the state
    assert resumed.counts.skipped_steps == 3
    assert [json.loads(x)["skipped_steps"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 3]
