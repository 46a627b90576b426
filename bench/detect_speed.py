"""Detection, its speed, and mitigation on a trained run's model, measured in one run.

On the run's embedded world (rebuilt from its ``config.yaml``), every duplicated prompt is
separated from ``--other`` non-duplicated ones:

- detection AUC and TPR at 1% FPR in both of Wen et al.'s settings (first step with one
  generation; first 10 steps with four generations), DDIM 50 steps, guidance 7.5 and ``--guidance``,
  and the spread of the one-generation AUC over ``--seed-spread`` seeds;
- seconds per prompt of batched early-stopped detection (first step, one generation, all
  prompts per forward) against the reference way (the full 50 steps, one prompt at a time), and
  their ratio, timed in this process;
- mitigation: copy similarity and alignment of duplicated and of ``--mitigation-prompts`` other
  prompts, generated (4 seeds, guidance ``--guidance``) without and with mitigation. Generations
  are mitigated when their first-step magnitude exceeds the threshold calibrated at
  ``--flag-fpr`` on the other prompts' first-step scores (``--flag-fpr 0`` mitigates every
  generation above the target, Wen et al.'s rule), down to ``--target``.

    python bench/detect_speed.py runs/demo_*/unfiltered --target 0.3 --flag-fpr 0.1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from data.dataset import build_data
from evaluation.metrics import alignment, copy_similarity, object_region
from filters.detection import calibrate_threshold, detection_metrics, first_steps_magnitudes
from filters.mitigation import Mitigation
from filters.sampling import sample_prompts
from train.components import load_pretrained

SETTINGS = {"first_step_1gen": (1, 1), "first10_4gen": (10, 4)}


def generated_quality(comps, pairs, indices: list[int], seeds: list[int], guidance: float,
                      mitigation: Mitigation | None) -> dict:
    """Mean copy similarity and alignment of the prompts' generations."""
    captions = [pairs.captions[i] for i in indices]
    latents, _ = sample_prompts(comps, captions, seeds, 50, guidance, 256, mitigation=mitigation)
    images = comps.decode_latents(latents.flatten(0, 1)).view(*latents.shape[:2], *latents.shape[2:])
    refs = pairs.images_at(indices).float() / 255
    copy = [copy_similarity(images[p], refs[p], object_region(c, refs[p])) for p, c in enumerate(captions)]
    align = [alignment(images[p], c) for p, c in enumerate(captions)]
    return {"copy": float(torch.stack(copy).mean()), "alignment": float(torch.stack(align).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished memsieve run directory (config.yaml, model/)")
    parser.add_argument("--other", type=int, default=200, help="non-duplicated prompts scored")
    parser.add_argument("--reference-prompts", type=int, default=8, help="prompts timed the reference way")
    parser.add_argument("--mitigation-prompts", type=int, default=40, help="non-duplicated prompts generated")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance of the mitigation generations "
                        "and of a second detection (the demo evaluates at 3)")
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--flag-fpr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--skip-mitigation", action="store_true", help="detection and speed only")
    parser.add_argument("--seed-spread", type=int, default=10,
                        help="first-step AUC of one generation for each of this many seeds (all prompts share a seed)")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = build_data(OmegaConf.load(f"{args.run}/config.yaml").data)
    comps = load_pretrained(f"{args.run}/model")
    comps.unet.eval()
    pairs, keys = data.pairs, data.pairs.keys
    dup = [i for i, k in enumerate(keys) if data.manifest.is_duplicated(k)]
    rest = [i for i, k in enumerate(keys) if not data.manifest.is_duplicated(k)]
    other = sorted(np.random.default_rng(args.seed).choice(rest, size=args.other, replace=False).tolist())
    captions = [pairs.captions[i] for i in dup + other]
    labels = np.array([1] * len(dup) + [0] * len(other))
    seeds = [args.seed + j for j in range(4)]
    out: dict = {"run": args.run, "prompts": {"duplicated": len(dup), "other": len(other)}}

    out["detection"] = {}
    for guidance in dict.fromkeys([7.5, args.guidance]):
        magnitudes = first_steps_magnitudes(comps, captions, seeds, 50, guidance, 10, 1024)
        out["detection"][f"guidance_{guidance}"] = {
            name: detection_metrics(magnitudes[:, :g, :k].mean(dim=(1, 2)).numpy(), labels)
            for name, (k, g) in SETTINGS.items()}

    spread = first_steps_magnitudes(comps, captions, [args.seed + j for j in range(args.seed_spread)], 50, 7.5, 1,
                                    4096)[:, :, 0]
    aucs = [detection_metrics(spread[:, j].numpy(), labels)["auc"] for j in range(args.seed_spread)]
    out["detection"]["first_step_1gen_by_seed"] = {"auc": aucs, "mean": float(np.mean(aucs)),
                                                   "min": min(aucs), "max": max(aucs)}

    start = time.perf_counter()
    first_steps_magnitudes(comps, captions, seeds[:1], 50, 7.5, 1, 1024)
    batched = (time.perf_counter() - start) / len(captions)
    start = time.perf_counter()
    for caption in captions[: args.reference_prompts]:
        sample_prompts(comps, [caption], seeds[:1], 50, 7.5, 1)
    reference = (time.perf_counter() - start) / args.reference_prompts
    out["speed"] = {"batched_seconds_per_prompt": batched, "reference_seconds_per_prompt": reference,
                    "ratio": reference / batched, "threads": torch.get_num_threads()}

    if args.skip_mitigation:
        print(json.dumps(out, indent=2))
        return
    first = magnitudes[len(dup):, :, 0].flatten().numpy()  # every generation's first-step magnitude, other prompts
    flag = calibrate_threshold(first, args.flag_fpr) if args.flag_fpr > 0 else None
    mitigation = Mitigation(args.target, threshold=flag)
    shown = other[: args.mitigation_prompts]
    out["mitigation"] = {"target": args.target, "threshold": flag, "flag_fpr": args.flag_fpr,
                         "guidance": args.guidance, "other_prompts": len(shown)}
    for name, indices in (("duplicated", dup), ("other", shown)):
        plain = generated_quality(comps, pairs, indices, seeds, args.guidance, None)
        mitigated = generated_quality(comps, pairs, indices, seeds, args.guidance, mitigation)
        out["mitigation"][name] = {"plain": plain, "mitigated": mitigated,
                                   "copy_change": mitigated["copy"] / plain["copy"] - 1,
                                   "alignment_change": mitigated["alignment"] / plain["alignment"] - 1}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
