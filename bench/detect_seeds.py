"""Detection figures a model owner can trust, on a trained run's model, over several seed sets.

On the run's world (rebuilt from its ``config.yaml``), every duplicated prompt is separated from
``--other`` non-duplicated ones (all of them by default) in both of Wen et al.'s settings (first
step x 1 generation; first 10 steps x 4 generations; DDIM 50 steps, guidance ``--guidance``),
each prompt from starting noises of its own (``filters.sampling.PromptSeeds``), for ``--seed-sets``
independent sets of noises. Per setting it prints, as mean ± standard deviation over the sets
(:func:`filters.detection.seed_set_figures`): AUC; TPR at 1% FPR (strict ``fpr < 0.01``) with the
number of negatives; the held-out FPR of the threshold calibrated at 1% on a seeded half of the
non-memorized prompts (measured on the other half; the in-sample rate beside it); and the FDR
achieved, TPR and count flagged by Benjamini-Hochberg at each ``--fdr`` level on empirical
p-values against the calibration half. The full figures, per-set lists included, go to ``--out``.

    python bench/detect_seeds.py runs/demo_X/unfiltered
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from data.dataset import build_data
from filters.detection import first_steps_magnitudes, seed_set_figures
from filters.sampling import PromptSeeds
from train.components import load_pretrained

SETTINGS = {"first_step_1gen": (1, 1), "first10_4gen": (10, 4)}


def pm(figures: dict, name: str) -> str:
    std = figures[f"{name}_std"]
    return f"{figures[name]:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished memsieve run directory (config.yaml, model/)")
    parser.add_argument("--other", type=int, default=None, help="non-duplicated prompts scored (default: all)")
    parser.add_argument("--seed-sets", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=7.5, help="Wen et al.'s 7.5 (the first step ignores it)")
    parser.add_argument("--fdr", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="BH levels; the first is "
                        "the headline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: RUN/detect_seeds.json)")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = build_data(OmegaConf.load(f"{args.run}/config.yaml").data)
    comps = load_pretrained(f"{args.run}/model").for_inference("cuda" if torch.cuda.is_available() else "cpu")
    keys = data.pairs.keys
    dup = [i for i, k in enumerate(keys) if data.manifest.is_duplicated(k)]
    rest = [i for i, k in enumerate(keys) if not data.manifest.is_duplicated(k)]
    count = len(rest) if args.other is None else min(args.other, len(rest))
    other = sorted(np.random.default_rng(args.seed).choice(rest, size=count, replace=False).tolist())
    captions = [data.pairs.captions[i] for i in dup + other]
    labels = np.array([1] * len(dup) + [0] * len(other))
    steps, generations = (max(v[i] for v in SETTINGS.values()) for i in (0, 1))

    start = time.perf_counter()
    sets = [first_steps_magnitudes(comps, captions, PromptSeeds(args.seed + k * len(captions), generations), 50,
                                   args.guidance, steps, args.batch_size) for k in range(args.seed_sets)]
    seconds = time.perf_counter() - start
    out: dict = {"run": args.run, "model": str(Path(args.run) / "model"), "guidance": args.guidance,
                 "seed": args.seed, "prompts": {"duplicated": len(dup), "other": len(other)},
                 "seconds": seconds, "settings": {}}
    print(f"{args.run}: {len(dup)} duplicated vs {len(other)} other prompts, {args.seed_sets} seed sets, "
          f"guidance {args.guidance:g}, {seconds:.0f} s of sampling")
    for name, (k, g) in SETTINGS.items():
        scores = np.stack([m[:, :g, :k].mean(dim=(1, 2)).numpy() for m in sets])
        by_q = {q: seed_set_figures(scores, labels, 0.01, q, args.seed) for q in args.fdr}
        figures = by_q[args.fdr[0]]
        out["settings"][name] = {**figures, "by_fdr": {str(q): {key: f[key] for key in f if key.startswith("fdr")}
                                                       for q, f in by_q.items()}}
        print(f"\n{name} (first {k} step(s) x {g} generation(s)), mean ± std over {args.seed_sets} seed sets")
        print(f"  AUC {pm(figures, 'auc')}   TPR@1%FPR {pm(figures, 'tpr_at_1pct_fpr')} "
              f"({figures['negatives']} negatives, {figures['positives']} positives)")
        print(f"  held-out FPR {pm(figures, 'heldout_fpr')} of the 1% threshold ({figures['calibration_prompts']} "
              f"calibration / {figures['test_prompts']} test prompts; in-sample {pm(figures, 'in_sample_fpr')}), "
              f"TPR {pm(figures, 'heldout_tpr')}")
        for q, f in by_q.items():
            print(f"  BH at q={q:g}: FDR achieved {pm(f, 'fdr')}, TPR {pm(f, 'fdr_tpr')}, flagged "
                  f"{pm(f, 'fdr_flagged')} (at least {f['fdr_min_flagged']} when any)")
        if "warning" in figures:
            print(f"  warning: {figures['warning']}")
    path = args.out or Path(args.run) / "detect_seeds.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\n{path}")


if __name__ == "__main__":
    main()
