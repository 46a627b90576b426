"""What the loop must settle with accelerate's backend before ``prepare``: one run directory for
every rank, and the settings DeepSpeed and FSDP need from memsieve's config.

Hydra's config stays the one source of truth: batch size, accumulation and clipping go into
DeepSpeed's config from ``train.*``, whatever the accelerate config file says.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from omegaconf import DictConfig


def shared_run_dir(accelerator: Accelerator, run_dir: str | Path) -> Path:
    """The main process's run directory, broadcast so every rank writes under one folder."""
    chosen = [str(run_dir)]
    broadcast_object_list(chosen, from_process=0)
    path = Path(chosen[0])
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return path


def configure_backend(accelerator: Accelerator, cfg: DictConfig, weight_dtype: torch.dtype) -> torch.dtype:
    """Backend settings that must precede ``prepare``; returns the dtype the UNet's inputs need.

    DeepSpeed casts the model itself to fp16/bf16 (no autocast), so its inputs must be cast
    too; DDP and FSDP keep float32 weights under autocast. FSDP shards parameters, so nothing
    that reads the full UNet on one rank (EMA, validation sampling) can run with it.
    """
    tc = cfg.train
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = tc.batch_size  # no dataloader goes through prepare
        ds["gradient_accumulation_steps"] = tc.gradient_accumulation_steps
        ds["train_batch_size"] = tc.batch_size * tc.gradient_accumulation_steps * accelerator.num_processes
        ds["gradient_clipping"] = float(tc.max_grad_norm or 0.0)  # DeepSpeed clips inside its step
        return weight_dtype
    if accelerator.distributed_type == DistributedType.FSDP:
        if tc.ema.enabled:
            raise ValueError("train.ema.enabled=true needs the full UNet on every rank, which FSDP shards; use "
                             "configs/accelerate/deepspeed_zero2.yml or train.ema.enabled=false")
        if cfg.validation.every:
            raise ValueError(f"validation.every={cfg.validation.every} samples the full UNet on the main process, "
                             "which FSDP shards; use validation.every=0 (the final model is still saved whole)")
    return torch.float32


def schedule_steps_per_step(accelerator: Accelerator) -> int:
    """How often the prepared LR scheduler advances per optimizer step.

    accelerate steps it once per process (it assumes a dataloader sharded over ranks); the
    DeepSpeed engine steps it once. Schedules are built with their lengths times this, so
    warm-up and decay last ``train.*`` optimizer steps on any number of processes.
    """
    return 1 if accelerator.distributed_type == DistributedType.DEEPSPEED else accelerator.num_processes


def gather_columns(accelerator: Accelerator, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All ranks' values of several per-sample tensors (rank order), in one collective.

    The filter needs six per-sample fields from every rank each step; gathered one by one that
    is six collectives, whose latency dominates at these sizes (``bench/filter_state.py``). Packed
    as float64 columns (exact for float32/16 values, booleans and integers below 2^53: pair
    indices, timesteps) they travel in one, and come back in their own dtypes.
    """
    packed = torch.stack([c.to(torch.float64) for c in columns], dim=1)
    gathered = accelerator.gather(packed)
    return tuple(gathered[:, i].to(c.dtype) for i, c in enumerate(columns))
