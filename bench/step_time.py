"""Step time and peak memory of filtered against plain training steps, measured in one run.

Each configuration trains in its own process (so peak memory is its own) for ``--steps``
steps; the first step is warm-up and not timed. Prints one JSON line per configuration and the
ratios ``filtered / plain``. Presets:

- ``embedded``: the default embedded model on whatever device is present;
- ``sd14``: a UNet of Stable Diffusion v1.4's size (860M parameters: blocks 320/640/1280/1280,
  cross-attention width 768, 77 tokens) with random weights, 64x64 inputs, batch 8, fp16, as
  Wen et al.'s fine-tune; it needs a GPU to finish in reasonable time.
- ``sd14_pipeline``: the real SD path, ``model=sd`` on a pipeline folder: VAE encoding of 512 px
  images, the CLIP text encoder, the UNet, with the ``wen2024`` preset's batch 8, fp16, EMA and
  gradient checkpointing. The folder is ``--pipeline PATH`` (e.g. SD v1.4 itself), else one of SD
  v1.4's size with random weights written for the run (4.3 GB; GPU machines only).
- ``sd_pipeline_tiny``: the same path on the tests' toy pipeline folder (32 px), to check it on a CPU.

Configurations: ``plain`` (no magnitude), ``magnitude_logged``, ``magnitude_quarter`` (logged for a
random quarter of each batch, as the demo's unfiltered run), ``threshold`` (Wen et al.'s
rule, the ``wen2024`` preset's filter), ``filtered`` (calibrated, every sample judged) and
``filtered_quarter`` (calibrated, ``filter.judge_fraction=0.25``); ``--configs`` picks some.

    python bench/step_time.py --preset embedded --steps 60
    python bench/step_time.py --preset sd14_pipeline --steps 60          # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    "embedded": [],
    "sd14": [
        "data.world.resolution=64", "data.world.num_pairs=256", "data.duplication.num_duplicated=8",
        "data.duplication.copies=4", "train.batch_size=8", "train.mixed_precision=fp16",
        "model.text_encoder.hidden_size=768", "model.text_encoder.heads=12", "model.text_encoder.max_length=77",
        "model.unet.layers_per_block=2", "model.unet.block_out_channels=[320,640,1280,1280]",
        "model.unet.down_block_types=[CrossAttnDownBlock2D,CrossAttnDownBlock2D,CrossAttnDownBlock2D,DownBlock2D]",
        "model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D]",
        "model.unet.attention_head_dim=8", "model.unet.norm_num_groups=32",
    ],
}
# The real SD path on a pipeline folder (model.pretrained is added by main()), as experiment=wen2024 trains.
PIPELINE = ["model=sd", "model.local_files_only=true", "data.world.num_pairs=256", "data.duplication.num_duplicated=8",
            "data.duplication.copies=4", "train.batch_size=8", "train.gradient_checkpointing=true",
            "train.ema.enabled=true"]
PRESETS["sd14_pipeline"] = [*PIPELINE, "data.world.resolution=512", "train.mixed_precision=fp16"]
PRESETS["sd_pipeline_tiny"] = [*PIPELINE, "data.world.resolution=32"]
CONFIGS = {
    "plain": ["filter=none", "filter.compute_magnitude=false"],
    "magnitude_logged": ["filter=none"],
    "magnitude_quarter": ["filter=none", "filter.judge_fraction=0.25"],
    "threshold": ["filter=threshold"],
    "filtered": ["filter=calibrated", "filter.min_samples=8"],
    "filtered_quarter": ["filter=calibrated", "filter.min_samples=8", "filter.judge_fraction=0.25"],
}


def pipeline_folder(preset: str, given: str | None, tmp: str) -> str:
    """The pipeline folder a ``*_pipeline*`` preset trains from: ``--pipeline``, or one written now."""
    if given:
        return given
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_sd import SD14, TINY, write_tiny_sd

    if preset == "sd14_pipeline" and not torch.cuda.is_available():
        raise SystemExit("--preset sd14_pipeline writes and trains an SD v1.4-sized pipeline: it needs a GPU "
                         "(or --pipeline PATH); on a CPU use --preset sd_pipeline_tiny")
    if preset == "sd14_pipeline":
        return str(write_tiny_sd(Path(tmp) / "sd14", resolution=512, sizes=SD14))
    return str(write_tiny_sd(Path(tmp) / "tiny", resolution=32, sizes=TINY))


def measure(overrides: list[str]) -> dict:
    """Train in this process; report seconds per step and peak memory."""
    import torch
    from hydra import compose, initialize_config_module

    from train.loop import train

    with initialize_config_module("configs", version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
        cfg = compose("train", overrides=[*overrides, f"run_dir={tmp}"])
        result = train(cfg, tmp)
        params = sum(p.numel() for p in result.components.unet.parameters())
    cuda = torch.cuda.is_available()
    return {
        "seconds_per_step": result.seconds_per_step,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "unet_parameters": params,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def forward_cost(overrides: list[str], repeats: int) -> dict:
    """CPU time of the filter's extra no-grad forward over all / a quarter of a batch, against a
    training step (forward, backward, AdamW) of the preset's UNet, interleaved in one process.

    CPU time of the process, not wall time: on a machine shared with other jobs the waiting is
    left out, so the ratios hold where whole-run step times swing with the load.
    """
    import math

    import torch
    from hydra import compose, initialize_config_module

    from data.world import VOCABULARY
    from train.components import build_components

    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "run_dir=unused"])
    comps = build_components(cfg.model, list(VOCABULARY))
    unet, batch, size = comps.unet, cfg.train.batch_size, cfg.data.resolution
    channels = unet.config.in_channels
    noisy = torch.randn(batch, channels, size, size) if comps.vae is None else \
        torch.randn(batch, channels, size // 8, size // 8)
    t = torch.randint(0, 1000, (batch,))
    cond = comps.encode_text(["a big red circle"] * batch)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    quarter = math.ceil(batch / 4)

    def train_step():
        loss = unet(noisy, t, cond).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def forward(k):
        with torch.no_grad():
            unet(noisy[:k], t[:k], cond[:k])

    work = {"train_step": train_step, "forward_all": lambda: forward(batch),
            "forward_quarter": lambda: forward(quarter)}
    cpu = dict.fromkeys(work, 0.0)
    for repeat in range(repeats + 1):
        for name, fn in work.items():
            start = time.process_time()
            fn()
            if repeat:  # the first round warms up
                cpu[name] += time.process_time() - start
    step = cpu["train_step"]
    return {"batch": batch, "quarter": quarter, "repeats": repeats,
            "cpu_s": {k: round(v / repeats, 4) for k, v in cpu.items()},
            "judge_all_over_plain": round((step + cpu["forward_all"]) / step, 3),
            "judge_quarter_over_plain": round((step + cpu["forward_quarter"]) / step, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                        help="configurations to run (plain is always run: the ratios' base)")
    parser.add_argument("--pipeline", help="pipeline folder for the *_pipeline* presets (default: write one)")
    parser.add_argument("--forward-cost", type=int, metavar="REPEATS",
                        help="instead: CPU time of the extra forward (all / a quarter of the batch) against a "
                             "training step, interleaved REPEATS times in this process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every configuration")
    args = parser.parse_args()
    common = [*PRESETS[args.preset], f"train.steps={args.steps}", "eval.enabled=false", "train.checkpoint_every=0",
              "logging.wandb.enabled=false", "logging.progress=false", f"logging.every={args.steps}", *args.overrides]
    if args.forward_cost:
        print(json.dumps({"preset": args.preset, **forward_cost(common, args.forward_cost)}), flush=True)
        return
    if args.child:
        print("RESULT " + json.dumps(measure([*common, *CONFIGS[args.child]])), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"model.pretrained={pipeline_folder(args.preset, args.pipeline, tmp)}"] \
            if "pipeline" in args.preset else []
        for name in dict.fromkeys(["plain", *args.configs]):
            out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                                  "--child", name, *args.overrides, *extra], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.split("RESULT ", 1)[1])
            print(json.dumps({"config": name, "preset": args.preset, **results[name]}), flush=True)
    base = results["plain"]
    for name in (n for n in results if n != "plain"):
        ratio = results[name]["seconds_per_step"] / base["seconds_per_step"]
        mem_key = "peak_gpu_mib" if base["peak_gpu_mib"] else "peak_rss_mib"
        print(f"{args.preset}: {name}/plain step time {ratio:.3f}x, peak memory "
              f"{results[name][mem_key] / base[mem_key]:.3f}x ({mem_key})", flush=True)


if __name__ == "__main__":
    main()
