"""The evaluation's detection pass at several batch sizes and thread counts, timed in one process.

Detection is most of a run's evaluation on a CPU (the first 10 sampling steps x 4 generations of
every scored prompt, ``eval.detection``). Each (prompt, generation) pair has its own starting
noise, so the magnitudes must not depend on how many pairs share a forward (``eval.batch_size``);
the time does. Times one seed set of the evaluation's pass over ``--prompts`` world captions for
every ``--threads`` x ``--batch-sizes`` after one untimed warm-up, prints each time and its ratio
to the first, and fails if any magnitude differs from the first configuration's. The thread
counts measure what the demo gains by handing its last run the cores the finished runs freed
(``train/cores.py``).

    python bench/eval_batch.py --batch-sizes 256 128 64 32 --threads 1 2
    python bench/eval_batch.py --model runs/demo_*/unfiltered/model
"""

from __future__ import annotations

import argparse
import time
from importlib.resources import files

import torch

from data.world import WorldConfig, generate_world
from filters.detection import first_steps_magnitudes
from filters.sampling import PromptSeeds
from train.components import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(files("train") / "assets" / "embedded_base"),
                        help="a diffusers model folder (default: the shipped embedded base)")
    parser.add_argument("--prompts", type=int, default=110, help="captions scored (the demo: 10 + 100)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    comps = load_pretrained(args.model).for_inference("cpu")  # as the evaluation loads it
    captions = generate_world(WorldConfig(num_pairs=args.prompts, unstated=("color",))).captions
    first_steps_magnitudes(comps, captions[:8], PromptSeeds(0, 1), 50, 3.0, 1, 8)  # warm-up, untimed
    rows, first, reference = [], None, None
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch_sizes:
            start = time.perf_counter()
            mags = first_steps_magnitudes(comps, captions, PromptSeeds(12345, args.generations), 50, 3.0,
                                          args.steps, batch)
            seconds = time.perf_counter() - start
            reference = mags if reference is None else reference
            first = seconds if first is None else first
            rows.append((threads, batch, seconds, first / seconds, float((mags - reference).abs().max())))
    print(f"{args.prompts} prompts x {args.generations} generations x {args.steps} steps, {args.model}")
    print("| threads | batch | seconds | speed-up over the first | max magnitude difference |")
    print("|---|---|---|---|---|")
    for threads, batch, seconds, ratio, diff in rows:
        print(f"| {threads} | {batch} | {seconds:.1f} | {ratio:.2f}x | {diff:.1e} |")
    if any(diff for *_, diff in rows):
        raise SystemExit("eval_batch: magnitudes depend on the batch size or thread count (last column)")


if __name__ == "__main__":
    main()
