"""``memsieve-demo``: the main job. Unfiltered and filtered runs, same seed, side by side.

Each run is a real ``memsieve-train`` process. By default both train from scratch on the
embedded world; with ``demo.pretrain.steps`` > 0 the demo first trains a base model on a
disjoint world without duplicates (the embedded stand-in for SD's pretrained weights) and both
runs fine-tune it, as Wen et al. fine-tuned SD v1.4. On a CPU-only machine the two runs go at
once with half the cores each (measured: 0.36 s per step each, about what one run at a time
with both cores costs per step, but the demo prints one comparison after one wait); with a GPU
they run one after the other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from evaluation.compare import write_comparison
from train.overrides import reject_unknown_added_keys

VARIANTS = ("unfiltered", "filtered")


def key_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def pretrain_overrides(task: list[str], pretrain: DictConfig) -> list[str]:
    """The base run: the user's model, seed and train settings on a disjoint duplicate-free world."""
    kept = [o for o in task if not key_of(o).startswith(("filter", "demo", "hydra", "data", "eval", "train.steps"))]
    return [*kept, *pretrain.overrides, f"train.steps={pretrain.steps}", "filter=none",
            "filter.compute_magnitude=false", "eval.enabled=false"]


def variant_overrides(task: list[str], variant: str, chosen_filter: str, base: Path | None,
                      finetune: list[str] = ()) -> list[str]:
    """One fine-tune's overrides: the unfiltered run ignores every ``filter`` override; with a base
    model, ``model.*`` overrides went into the base run, the fine-tunes load its folder and take
    the ``finetune`` settings (the user's overrides still win)."""
    others = [o for o in task if not key_of(o).startswith(("filter", "demo", "hydra"))]
    if base is not None:
        others = [*finetune, *(o for o in others if not key_of(o).startswith("model")),
                  "model=sd", f"model.pretrained={base}", "model.local_files_only=true"]
    if variant == "unfiltered":
        return [*others, "filter=none"]
    return [*others, f"filter={chosen_filter}", *(o for o in task if key_of(o).startswith("filter."))]


def launch(variant: str, overrides: list[str], run_dir: Path, threads: int | None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = (run_dir / "train.log").open("w")
    cmd = [sys.executable, "-m", "train", *overrides, f"run_dir={run_dir}", "logging.progress=false"]
    print(f"[memsieve-demo] {variant}: {' '.join(cmd[2:])}  (log: {run_dir / 'train.log'})", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_all(procs: dict[str, subprocess.Popen], dirs: dict[str, Path], total: int, every: float) -> None:
    """Wait for every run, printing their steps now and then; fail naming the run that failed."""
    quiet = bool(os.environ.get("CI"))
    while any(p.poll() is None for p in procs.values()):
        time.sleep(every)
        if not quiet:
            print("[memsieve-demo] " + ", ".join(f"{v} step {last_step(dirs[v])}/{total}" for v in procs), flush=True)
    for variant, proc in procs.items():
        if proc.returncode != 0:
            log = dirs[variant] / "train.log"
            lines = log.read_text().strip().splitlines() or [""]
            raise SystemExit(f"[memsieve-demo] the {variant} run failed (exit {proc.returncode}): {lines[-1]} "
                             f"(full log: {log})")


@hydra.main(config_path="pkg://configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    task = list(HydraConfig.get().overrides.task)
    try:
        reject_unknown_added_keys(cfg, task)
    except ValueError as err:
        raise SystemExit(f"memsieve-demo: error: {err}") from None
    dirs = {v: out / v for v in VARIANTS}
    parallel = cfg.demo.parallel if cfg.demo.parallel != "auto" else not torch.cuda.is_available()
    threads = max(1, (os.cpu_count() or 2) // len(VARIANTS)) if parallel else None
    base = None
    if cfg.demo.pretrain.steps:
        pre_dir = out / "pretrain"
        proc = launch("pretrain", pretrain_overrides(task, cfg.demo.pretrain), pre_dir, None)
        wait_all({"pretrain": proc}, {"pretrain": pre_dir}, cfg.demo.pretrain.steps, cfg.demo.progress_every)
        base = pre_dir / "model"
    procs = {}
    for variant in VARIANTS:
        overrides = variant_overrides(task, variant, HydraConfig.get().runtime.choices["filter"], base,
                                      list(cfg.demo.finetune))
        procs[variant] = launch(variant, overrides, dirs[variant], threads)
        if not parallel:
            wait_all({variant: procs[variant]}, dirs, cfg.train.steps, cfg.demo.progress_every)
    wait_all(procs, dirs, cfg.train.steps, cfg.demo.progress_every)
    summaries = {v: json.loads((dirs[v] / "summary.json").read_text()) for v in VARIANTS}
    print(f"[memsieve-demo] comparison ({out / 'comparison.md'}):\n" + write_comparison(
        out, summaries, list(dirs.values()), cfg.logging.wandb).with_name("comparison.md").read_text(), flush=True)
    print(out / "comparison.json")


if __name__ == "__main__":
    main()
