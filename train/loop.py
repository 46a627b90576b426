"""The training loop: SD fine-tuning with the magnitude filter, one screen per idea.

Every step computes each sample's magnitude (in epsilon space) at its own noisy input and
timestep: the training forward gives one of the two predictions, a second forward without
gradients the other (the empty prompt's, or, for a draw whose caption was dropped and whose
training forward therefore is the unconditional one, its real caption's), so every draw is
judged at the same cost. The filter policy decides which samples enter the loss; a step in
which it drops every sample on every rank makes no update. The pieces
live beside it: per-sample draws addressed by global batch position (``randomness``), the
per-sample loss with Min-SNR weights (``loss``), backend settings (``distributed``), validation
images (``validation``) and the final UNet gathered from any wrapper (``export``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.captions import perturb_text_embeddings
from data.dataset import TrainingData, build_data
from data.fingerprint import KeySpec
from data.world import VOCABULARY
from filters.magnitude import text_conditional_magnitude
from filters.policy import build_policy, filtered_mean
from filters.threshold_choice import choose_threshold, starting_magnitudes
from train.checkpoint import resolve_resume, save_checkpoint, step_of
from train.components import Components, build_components, place, set_attention
from train.distributed import configure_backend, gather_columns, schedule_steps_per_step, shared_run_dir
from train.export import trained_unet
from train.loss import per_sample_loss, set_prediction_type, training_target
from train.optim import build_optimizer
from train.randomness import judge_noise, micro_step_generator, noised_batch, placebo_order
from train.resume_check import check_resume, record_resume
from train.tracking import JsonlLog, wandb_init_kwargs
from train.validation import run_validation, validation_prompts


@dataclass
class FilterCounts:
    """Samples seen and dropped over the whole run, split by the manifest; checkpointed."""

    seen: dict[str, int] = field(default_factory=lambda: {"duplicated": 0, "other": 0})
    dropped: dict[str, int] = field(default_factory=lambda: {"duplicated": 0, "other": 0})
    skipped_steps: int = 0  # optimizer steps with nothing kept on any rank: no optimizer, LR or EMA step

    def add(self, duplicated: torch.Tensor, keep: torch.Tensor) -> None:
        for name, mask in (("duplicated", duplicated), ("other", ~duplicated)):
            self.seen[name] += int(mask.sum())
            self.dropped[name] += int((mask & ~keep).sum())

    def dropped_fraction(self) -> dict[str, float]:
        return {k: self.dropped[k] / self.seen[k] if self.seen[k] else 0.0 for k in self.seen}

    def state_dict(self) -> dict:
        return {"seen": dict(self.seen), "dropped": dict(self.dropped), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.dropped = dict(state["seen"]), dict(state["dropped"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


@dataclass
class TrainResult:
    run_dir: Path
    components: Components
    data: TrainingData
    counts: FilterCounts
    accelerator: Accelerator
    seconds_per_step: float
    keys_dropped: int | None = None  # keys a calibrated filter dropped for good (None: the filter has no such memory)


def check_settings(tc: DictConfig) -> None:
    """Refuse, before any work, a run that cannot train: no steps or samples, or a learning rate
    that does not move the weights (a negative ``train.steps`` used to save the untrained model)."""
    for key in ("steps", "batch_size", "gradient_accumulation_steps"):
        if tc[key] < 1:
            raise ValueError(f"train.{key}={tc[key]} must be >= 1")
    if tc.lr <= 0:
        raise ValueError(f"train.lr={tc.lr} must be > 0 (Wen et al. fine-tune SD v1.4 at 1e-5)")


def train(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """Train per ``cfg`` into ``run_dir``; resume from its latest checkpoint when asked."""
    tc = cfg.train
    check_settings(tc)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file checkpoint INFO lines drown the log
    accelerator = Accelerator(gradient_accumulation_steps=tc.gradient_accumulation_steps,
                              mixed_precision=tc.mixed_precision,
                              log_with="wandb" if cfg.logging.wandb.enabled else None)
    run_dir = shared_run_dir(accelerator, run_dir)
    ckpt_root = run_dir / "checkpoints"
    resume = resolve_resume(tc.resume, ckpt_root)
    changed = check_resume(cfg, resume, step_of(resume)) if resume is not None else {}  # before any work
    set_seed(cfg.seed)
    comps = build_components(cfg.model, list(VOCABULARY))
    data = build_data(cfg.data, comps.tokenizer, KeySpec.from_filter(cfg.filter))
    sched = comps.noise_scheduler
    set_prediction_type(sched, tc.prediction_type)
    unet = comps.unet
    unet.train()
    set_attention(unet, tc.attention)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.mixed_precision, torch.float32)
    input_dtype = configure_backend(accelerator, cfg, weight_dtype)
    for frozen in (comps.text_encoder, comps.vae):
        if frozen is not None:
            place(frozen, accelerator.device, weight_dtype)

    ema = EMAModel(unet.parameters(), decay=tc.ema.decay, model_cls=type(unet), model_config=unet.config) \
        if tc.ema.enabled else None
    optimizer = build_optimizer(unet.parameters(), tc)
    per_step = schedule_steps_per_step(accelerator)
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps * per_step,
                                 num_training_steps=tc.steps * per_step)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    choose_threshold(cfg, run_dir, resume is not None, lambda samples: starting_magnitudes(
        unet, comps, data, cfg, accelerator, input_dtype, weight_dtype, samples))
    policy = build_policy(cfg.filter, sched.config.num_train_timesteps, data.num_keys).to(accelerator.device)
    counts = FilterCounts()
    accelerator.register_for_checkpointing(policy, counts)

    start_step = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        start_step = step_of(resume)
        accelerator.print(f"resumed from {resume} at step {start_step}")

    metrics = JsonlLog(run_dir / "metrics.jsonl")
    decisions = JsonlLog(run_dir / "decisions.jsonl") if cfg.logging.decisions else None
    if accelerator.is_main_process:
        for log in (metrics, decisions):
            if log is not None:
                log.truncate_after(start_step)
        OmegaConf.save(cfg, run_dir / "config.yaml")  # a resume differs only in allowed settings (resume_check)
        if resume is not None:
            record_resume(run_dir, resume, start_step, changed, accelerator.num_processes)
        else:
            data.manifest.save(run_dir / "manifest.json")
    if accelerator.is_main_process and cfg.logging.wandb.enabled:
        accelerator.init_trackers(cfg.logging.wandb.project, OmegaConf.to_container(cfg, resolve=True),
                                  init_kwargs=wandb_init_kwargs(cfg.logging.wandb, run_dir, run_dir.name))

    accum, rank, world = tc.gradient_accumulation_steps, accelerator.process_index, accelerator.num_processes
    batches = data.batches(tc.batch_size, cfg.seed, rank, world, start_micro_step=start_step * accum,
                           num_workers=tc.num_workers)
    uncond = comps.encode_text([""]).to(weight_dtype)
    # filter=none may skip the unconditional forward (plain fine-tuning, the benchmarks' baseline).
    with_magnitude = cfg.filter.kind != "none" or cfg.filter.get("compute_magnitude", True)
    prompts = validation_prompts(cfg.validation, data) if cfg.validation.every else []
    quiet = bool(os.environ.get("CI")) or not cfg.logging.progress
    bar = tqdm(range(start_step, tc.steps), initial=start_step, total=tc.steps, desc="train",
               disable=quiet or not accelerator.is_main_process)
    window: list[dict] = []
    started, timed_from = time.perf_counter(), start_step
    for step in bar:
        step_kept = 0  # samples kept on all ranks over this step's micro-steps
        for micro in range(accum):
            micro_step = step * accum + micro
            batch = next(batches)
            pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
            n = pixels.shape[0]
            b = noised_batch(comps, pixels, cfg.seed, micro_step, rank, world, tc.caption_dropout, tc.noise_offset,
                             input_dtype)
            latents, noisy, timesteps = b.latents, b.noisy, b.timesteps
            real = comps.encode_text(list(batch["caption"])).to(weight_dtype)
            real = perturb_text_embeddings(real, cfg.data, micro_step_generator(cfg.seed + 1, micro_step), rank,
                                           world)
            captioned = b.captioned.view(-1, 1, 1)
            cond = torch.where(captioned, real, uncond)  # a dropped caption trains the unconditional branch
            target = training_target(sched, latents, b.noise, timesteps)

            pairs = data.filter_keys(batch).to(latents.device)  # filter.key: content fingerprints, or the oracle
            order = placebo_order(cfg.seed, micro_step, rank, n, world).to(latents.device)
            judge = policy.judge(pairs, timesteps, judge_noise(cfg.seed, micro_step, rank, n, world))
            with accelerator.accumulate(unet):
                pred = unet(noisy, timesteps, cond).sample
                magnitude = torch.full((n,), math.nan, device=latents.device)
                if with_magnitude:  # the branch the training forward did not take, for the judged samples only
                    judged = judge.nonzero().squeeze(1)
                    with torch.no_grad():
                        other = unet(noisy[judged], timesteps[judged],
                                     torch.where(captioned, uncond, real)[judged]).sample
                    magnitude[judged] = text_conditional_magnitude(pred.detach()[judged], other, sched,
                                                                   timesteps[judged])
                keep = policy.keep(magnitude, timesteps, step, pairs, order)
                dup = batch["duplicated"].to(latents.device)
                g_mag, g_t, g_valid, g_keep, g_dup, g_pairs, g_order = gather_columns(
                    accelerator, magnitude, timesteps, ~magnitude.isnan(), keep, dup, pairs, order)
                policy.observe(g_mag, g_t, g_valid, g_pairs, g_keep, g_order)
                counts.add(g_dup.cpu(), g_keep.cpu())
                step_kept += int(g_keep.sum())
                # Min-SNR weights are per sample, so the filter drops each with its own loss.
                per_sample = per_sample_loss(pred, target, sched, timesteps, tc.snr_gamma)
                loss = filtered_mean(per_sample, keep, int(g_keep.sum()), world)
                accelerator.backward(loss)
                # Nothing kept on any rank all step (a global count, so every rank agrees): AdamW would
                # still move the weights on stale momentum and weight decay, so skip the update as the
                # reference does. (DeepSpeed's engine steps inside backward: counted, not skipped there.)
                if step_kept or not accelerator.sync_gradients:
                    if accelerator.sync_gradients and tc.max_grad_norm:
                        accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(step_record(per_sample, g_mag, g_t, g_valid, g_keep, g_dup, accelerator))
            if decisions is not None:
                keys = gather_object(list(batch["key"]))
                plan_pairs = accelerator.gather(batch["pair"].to(latents.device))
                if accelerator.is_main_process:  # pair: the plan's (ground truth); filter_key: what the filter used
                    decisions.write({"step": step + 1, "micro_step": micro_step, "key": keys,
                                     "pair": plan_pairs.tolist(), "filter_key": g_pairs.tolist(),
                                     "order": g_order.tolist(), "t": g_t.tolist(), "magnitude": g_mag.float().tolist(),
                                     "valid": g_valid.tolist(), "keep": g_keep.tolist(), "duplicated": g_dup.tolist()})
        if not step_kept:
            counts.skipped_steps += 1
        elif ema is not None:
            ema.step(unet.parameters())
        done = step + 1
        if done == start_step + 1 and tc.steps - start_step > 1:  # time from the end of the first (warm-up) step
            started, timed_from = time.perf_counter(), done
        if done % cfg.logging.every == 0 or done == tc.steps:
            record, groups = summarize_window(window, done, lr_scheduler.get_last_lr()[0], counts)
            window.clear()
            record.update({f"data/skipped/{reason}": n for reason, n in data.skipped.items()})
            if accelerator.is_main_process:
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", kept=f"{record['kept_fraction']:.3f}")
                accelerator.log({**record, **histograms(groups, cfg.logging.wandb.enabled)}, step=done)
        if cfg.validation.every and done % cfg.validation.every == 0 and accelerator.is_main_process:
            run_validation(comps, ema, prompts, cfg.validation, done, run_dir, accelerator, weight_dtype,
                           cfg.logging.wandb.enabled)
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
            save_checkpoint(accelerator, ckpt_root, done, tc.checkpoints_total_limit)

    accelerator.wait_for_everyone()
    seconds_per_step = (time.perf_counter() - started) / max(tc.steps - timed_from, 1)
    comps.unet = trained_unet(accelerator, unet, comps.unet, ema)
    for frozen in (comps.text_encoder, comps.vae):  # saved and evaluated in float32, as loaded
        if frozen is not None:
            frozen.float()
    if accelerator.is_main_process:
        comps.save(run_dir / "model")
    accelerator.wait_for_everyone()
    dropped = getattr(policy, "dropped", None)
    return TrainResult(run_dir=run_dir, components=comps, data=data, counts=counts, accelerator=accelerator,
                       seconds_per_step=seconds_per_step, keys_dropped=None if dropped is None else int(dropped.sum()))


def step_record(per_sample, g_mag, g_t, g_valid, g_keep, g_dup, accelerator) -> dict:
    """What one micro-step contributes to the logs (all ranks' samples)."""
    loss = accelerator.gather(per_sample.detach()).float()
    kept = g_keep.bool()
    empty_ranks = int((~kept.view(accelerator.num_processes, -1).any(dim=1)).sum())
    return {"loss": float(loss[kept].mean()) if kept.any() else math.nan, "empty_ranks": empty_ranks,
            "mag": g_mag.float().cpu(), "t": g_t.cpu(), "valid": g_valid.cpu(), "keep": kept.cpu(),
            "dup": g_dup.cpu()}


def summarize_window(window: list[dict], step: int, lr: float, counts: FilterCounts,
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Loss, kept fraction and magnitude split by duplicated/other and by noise level; also the
    window's magnitudes per group for histograms."""
    cat = {k: torch.cat([w[k] for w in window]) for k in ("mag", "t", "valid", "keep", "dup")}
    losses = [w["loss"] for w in window if not math.isnan(w["loss"])]
    record = {"step": step, "lr": lr, "loss": sum(losses) / len(losses) if losses else math.nan,
              "kept_fraction": float(cat["keep"].float().mean()),
              "ranks_all_dropped": sum(w["empty_ranks"] for w in window), "skipped_steps": counts.skipped_steps}
    valid = cat["valid"].bool()
    groups = {}
    for name, sel in (("duplicated", cat["dup"].bool()), ("other", ~cat["dup"].bool())):
        record[f"kept_fraction/{name}"] = float(cat["keep"][sel].float().mean()) if sel.any() else math.nan
        for band, lo, hi in (("all", 0, 1000), ("t<500", 0, 500), ("t>=500", 500, 1000)):
            m = sel & valid & (cat["t"] >= lo) & (cat["t"] < hi)
            record[f"magnitude/{name}/{band}"] = float(cat["mag"][m].mean()) if m.any() else math.nan
        groups[name] = cat["mag"][sel & valid & ~cat["mag"].isnan()]
        for q in (10, 50, 90):
            values = groups[name]
            record[f"magnitude/{name}/p{q}"] = float(values.quantile(q / 100)) if values.numel() else math.nan
    for name, frac in counts.dropped_fraction().items():
        record[f"dropped_fraction/{name}"] = frac
    return record, groups


def histograms(groups: dict[str, torch.Tensor], enabled: bool) -> dict:
    """W&B histograms of the window's magnitudes, duplicated against other samples."""
    if not enabled:
        return {}
    import wandb

    return {f"magnitude_hist/{name}": wandb.Histogram(v.numpy()) for name, v in groups.items() if v.numel()}
