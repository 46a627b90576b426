"""Loader throughput against training consumption, measured in one run.

Writes ``--samples`` world renders of ``--source-size`` pixels as JPEG webdataset shards (as
img2dataset stores LAION at its default 256), then times decoded, transformed batches (shorter
side resized to ``--resolution``, random crop and flip) from the indexed and the stream loader
with 0 and 2 DataLoader workers, the embedded model's training steps at the same batch size
(``filter=none``, magnitude logged, the loop's default), and the start-up index pass. Prints
one JSON line per measurement and the ratios loader / training. Goal: >= 3x, so data never limits training. On a shared
machine training slows far more than decoding (it wants every core), so the loader is also
compared with a reference step time (``--reference-step-s``, BENCHMARKS.md's CPU figure for a
step with the magnitude logged).

    python bench/loader.py --samples 2048 --batches 40 --train-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

SHARD = 256


def compose_train(overrides: list[str]):
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def loader_rate(cfg, batch: int, batches: int, workers: int) -> float:
    """Samples per second over ``batches`` batches after one warm-up batch (worker start-up excluded)."""
    from data.dataset import build_data

    data = build_data(cfg.data)
    it = data.batches(batch, seed=0, rank=0, world_size=1, num_workers=workers)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def index_rate(cfg, samples: int) -> float:
    """Samples per second of the start-up pass that indexes and validates the source."""
    from data.dataset import build_data

    start = time.perf_counter()
    build_data(cfg.data)
    return samples / (time.perf_counter() - start)


def training_rate(batch: int, steps: int, run_dir: str) -> float:
    """Samples per second the embedded model consumes (first step not timed, as in the loop)."""
    from train.loop import train

    cfg = compose_train([f"train.steps={steps}", f"train.batch_size={batch}", "eval.enabled=false",
                         "train.checkpoint_every=0", "logging.wandb.enabled=false", "logging.progress=false",
                         f"logging.every={steps}", f"run_dir={run_dir}"])
    return batch / train(cfg, run_dir).seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--reference-step-s", type=float, default=0.207,
                        help="seconds per embedded training step to compare with as well (0.163 x 1.27 on 2 cores)")
    args = parser.parse_args()
    os.environ.setdefault("CI", "1")  # no progress bars in the timed loops
    from data.samples import world, write_shards

    with tempfile.TemporaryDirectory() as tmp:
        for shard in range(0, args.samples, SHARD):  # one world per shard: a 2048-image world would take GBs
            write_shards(world(min(SHARD, args.samples - shard), args.source_size, seed=shard // SHARD),
                         Path(tmp) / "shards", shard_size=SHARD, start_shard=shard // SHARD)
        train_rate = training_rate(args.batch, args.train_steps, str(Path(tmp) / "run"))
        reference = args.batch / args.reference_step_s
        print(json.dumps({"what": "training", "samples_per_s": round(train_rate, 1),
                          "reference_samples_per_s": round(reference, 1)}), flush=True)
        for access in ("indexed", "stream"):
            cfg = compose_train(["data=webdataset", f"data.urls={Path(tmp) / 'shards'}", f"data.access={access}",
                                 f"data.resolution={args.resolution}", "data.center_crop=false",
                                 "data.random_flip=true", "run_dir=unused"])
            if access == "indexed":
                print(json.dumps({"what": "index pass (read + validate every image, once per run start)",
                                  "samples_per_s": round(index_rate(cfg, args.samples), 1)}), flush=True)
            for workers in (0, 2):
                rate = loader_rate(cfg, args.batch, args.batches, workers)
                print(json.dumps({"what": "loader", "access": access, "workers": workers,
                                  "source_size": args.source_size, "resolution": args.resolution,
                                  "samples_per_s": round(rate, 1), "ratio_to_training": round(rate / train_rate, 2),
                                  "ratio_to_reference": round(rate / reference, 2)}),
                      flush=True)


if __name__ == "__main__":
    main()
