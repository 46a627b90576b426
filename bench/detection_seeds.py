"""Detection AUC of a finished run over several noise seeds: mean and spread.

One generation's first-step magnitude depends on its starting noise, so a single seed's AUC is
a noisy figure. This scores the run's duplicated prompts against the same other prompts as its
evaluation (``eval.detection``), for ``--sets`` disjoint seed sets: Wen et al.'s first-step,
one-generation setting on seeds ``eval.seed + i`` and the first-10-steps, 4-generation setting
on seeds ``eval.seed + 4i .. 4i+3``, one early-stopped sampling pass for all of them. Prints
one JSON line with every set's AUC and their mean and standard deviation.

    python bench/detection_seeds.py runs/demo_X/unfiltered --sets 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from data.dataset import build_data
from evaluation.evaluate import choose_prompts
from evaluation.reeval import run_config
from filters.detection import detection_metrics, first_steps_magnitudes
from train.components import load_pretrained


def seed_set_aucs(run_dir: Path, sets: int) -> dict:
    cfg, _ = run_config(run_dir, [])
    ec = cfg.eval
    comps = load_pretrained(str(run_dir / "model"), local_files_only=True).for_inference("cpu")
    data = build_data(cfg.data)
    dup, other = choose_prompts(data, ec.detection.num_other_prompts, ec.seed + 1)
    labels = np.array([1] * len(dup) + [0] * len(other))
    captions = [data.pairs.captions[i] for i in dup + other]
    seeds = [ec.seed + j for j in range(4 * sets)]
    mags = first_steps_magnitudes(comps, captions, seeds, ec.num_inference_steps, ec.guidance_scale, 10,
                                  ec.batch_size)
    first = [detection_metrics(mags[:, i, 0].numpy(), labels)["auc"] for i in range(sets)]
    four = [detection_metrics(mags[:, 4 * i: 4 * i + 4, :10].mean(dim=(1, 2)).numpy(), labels)["auc"]
            for i in range(sets)]
    summary = lambda v: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)),  # noqa: E731
                         "values": [round(x, 4) for x in v]}
    return {"run": str(run_dir), "prompts": {"duplicated": len(dup), "other": len(other)},
            "first_step_1gen": summary(first), "first10_4gen": summary(four)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--sets", type=int, default=5, help="disjoint seed sets")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for run in args.runs:
        print(json.dumps(seed_set_aucs(run, args.sets)), flush=True)


if __name__ == "__main__":
    main()
