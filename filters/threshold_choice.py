"""The paper's fixed threshold, chosen once before fine-tuning from the starting model.

Wen et al. drop every sample whose magnitude exceeds one number for the whole fine-tune (2 on
SD v1.4). The number is the model's: another model (the embedded one, a different SD) needs its
own. ``filter.choose.quantile`` picks it the way one would by hand: before the first optimizer
step, the starting (pretrained) model's training-time magnitudes are computed on the
fine-tuning data, for the very samples, noise and timesteps the run's first micro-steps draw
(``filter.choose.samples`` of them, each with its real caption), and the threshold is their
``quantile``. It is then fixed for the whole run, as in the paper: ``filter=threshold`` runs
with it unchanged. The choice is written to ``run_dir/threshold.json`` (and the number into
``config.yaml`` and ``summary.json``); a resumed run reads it back instead of choosing again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from omegaconf import DictConfig, OmegaConf, open_dict

from data.dataset import TrainingData
from filters.magnitude import predict_pair, text_conditional_magnitude
from train.components import Components
from train.randomness import noised_batch

CHOICE_FILE = "threshold.json"


@torch.no_grad()
def starting_magnitudes(unet, comps: Components, data: TrainingData, cfg: DictConfig, accelerator: Accelerator,
                        input_dtype: torch.dtype, weight_dtype: torch.dtype, samples: int) -> torch.Tensor:
    """Magnitudes of the first ``samples`` training samples (rounded up to whole global batches)
    under the model as it is now, at their own noise and timesteps, all ranks gathered."""
    tc, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    sched = comps.noise_scheduler
    micro_steps = math.ceil(samples / (tc.batch_size * world))
    batches = data.batches(tc.batch_size, cfg.seed, rank, world, start_micro_step=0, num_workers=0)
    uncond = comps.encode_text([""]).to(weight_dtype)
    found = []
    for micro_step in range(micro_steps):
        batch = next(batches)
        pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
        b = noised_batch(comps, pixels, cfg.seed, micro_step, rank, world, 0.0, tc.noise_offset,
                         input_dtype)  # every sample judged with its caption
        cond = comps.encode_text(list(batch["caption"])).to(weight_dtype)
        eps_cond, eps_uncond = predict_pair(unet, b.noisy, b.timesteps, cond, uncond)
        found.append(accelerator.gather(text_conditional_magnitude(eps_cond, eps_uncond, sched, b.timesteps)))
    return torch.cat(found).float().cpu()


def choose_threshold(cfg: DictConfig, run_dir: Path, resuming: bool, magnitudes) -> None:
    """Set ``cfg.filter.threshold`` from the starting model when ``filter.choose.quantile`` asks.

    ``magnitudes(samples)`` computes the starting model's magnitudes (:func:`starting_magnitudes`);
    a resumed run reads its first choice back instead (every rank: all take the same branch). A
    threshold given as a number, or any other filter, is left as it is.
    """
    choose = cfg.filter.get("choose")
    if cfg.filter.kind != "threshold" or choose is None or choose.get("quantile") is None:
        return
    if not 0 < choose.quantile < 1:
        raise ValueError(f"filter.choose.quantile={choose.quantile} must lie in (0, 1), e.g. 0.99")
    path = Path(run_dir) / CHOICE_FILE
    if resuming:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; a resumed filter.choose run needs the threshold it chose")
        choice = json.loads(path.read_text())
    else:
        values = magnitudes(choose.samples)
        probs = torch.tensor([0.5, 0.9, 0.95, 0.99])
        choice = {"threshold": float(values.quantile(choose.quantile)), "quantile": choose.quantile,
                  "samples": values.numel(),
                  "magnitude_quantiles": {f"p{round(float(p) * 100)}": float(v)
                                          for p, v in zip(probs, values.quantile(probs))}}
        if PartialState().is_main_process:
            path.write_text(json.dumps(choice, indent=2) + "\n")
    with open_dict(cfg):
        OmegaConf.update(cfg, "filter.threshold", choice["threshold"])
