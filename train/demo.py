"""``memsieve-demo``: the main job. Unfiltered and filtered runs, same seed, side by side.

Each run is a real ``memsieve-train`` process with the demo's experiment preset. By default that
is Wen et al.'s setting in the embedded world (``experiment=embedded_finetune``): every run
fine-tunes the shipped converged base model on the default world with its duplicates, at a
small learning rate and without caption dropout, as SD v1.4 was fine-tuned. The runs
(``demo.runs``) are the unfiltered one, the paper's fixed threshold (chosen once from the base
model's magnitudes, ``filter.choose``) and memsieve's calibrated filter. ``experiment=embedded``
trains them from scratch instead (the earlier demo). On a CPU-only machine the runs go at once,
the cores split between them (one thread each on two cores: measured in BENCHMARKS.md as the
fastest way there), and the last run still going takes the cores the others free
(:mod:`train.cores`); with a GPU they run one after the other.
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
from train.cores import ENV, hand_freed_cores, usable_cores
from train.overrides import check_overrides


def key_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def run_overrides(task: list[str], experiment: str | None, own: list[str], takes_user_filter: bool) -> list[str]:
    """One run's overrides: the demo's experiment preset, the user's settings, the run's own
    (``demo.runs.NAME``), then, for the runs ``demo.user_filter_runs`` names, the user's
    ``filter=...`` and ``filter.*`` overrides (the other runs ignore those)."""
    others = [o for o in task if not key_of(o).startswith(("filter", "demo", "hydra", "experiment"))]
    preset = [f"experiment={experiment}"] if experiment else []
    user_filter = [o for o in task if key_of(o).startswith("filter")] if takes_user_filter else []
    return [*preset, *others, *own, *user_filter]


def launch(name: str, overrides: list[str], run_dir: Path, threads: int | None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **{ENV: "1"})
    log = (run_dir / "train.log").open("w")
    cmd = [sys.executable, "-m", "train", *overrides, f"run_dir={run_dir}", "logging.progress=false"]
    print(f"[memsieve-demo] {name}: {' '.join(cmd[2:])}  (log: {run_dir / 'train.log'})", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def stage(proc: subprocess.Popen, run_dir: Path, total: int) -> str:
    """Where one run is: its training step, its evaluation (after the last step), or done."""
    if proc.poll() is not None:
        return "done"
    step = last_step(run_dir)
    return "evaluating" if step >= total else f"step {step}/{total}"


def wait_all(procs: dict[str, subprocess.Popen], dirs: dict[str, Path], total: int, every: float,
             lend_cores: bool = False) -> None:
    """Wait for every run, printing their progress now and then; with ``lend_cores``, the last run
    still going gets the cores the finished ones freed. Fail naming the run that failed."""
    quiet = bool(os.environ.get("CI"))
    handed, printed = False, time.monotonic()
    while running := [name for name, proc in procs.items() if proc.poll() is None]:
        if lend_cores and not handed and len(running) == 1:
            handed = hand_freed_cores(procs[running[0]])
            if handed:
                print(f"[memsieve-demo] {running[0]} signalled to take the cores the finished runs freed", flush=True)
        time.sleep(min(every, 1.0))
        if not quiet and time.monotonic() - printed >= every:
            printed = time.monotonic()
            print("[memsieve-demo] " + ", ".join(f"{v} {stage(p, dirs[v], total)}" for v, p in procs.items()),
                  flush=True)
    for name, proc in procs.items():
        if proc.returncode != 0:
            log = dirs[name] / "train.log"
            lines = log.read_text().strip().splitlines() or [""]
            raise SystemExit(f"[memsieve-demo] the {name} run failed (exit {proc.returncode}): {lines[-1]} "
                             f"(full log: {log})")


@hydra.main(config_path="pkg://configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    task = list(HydraConfig.get().overrides.task)
    try:  # demo.runs is the user's to extend: +demo.runs.NAME=[overrides] adds a run
        check_overrides(cfg, [o for o in task if not o.startswith("+demo.runs.")])
    except ValueError as err:
        raise SystemExit(f"memsieve-demo: error: {err}") from None
    choices = HydraConfig.get().runtime.choices
    runs = {name: list(own) for name, own in cfg.demo.runs.items()}
    dirs = {name: out / name for name in runs}
    parallel = cfg.demo.parallel if cfg.demo.parallel != "auto" else not torch.cuda.is_available()
    threads = max(1, usable_cores() // len(runs)) if parallel else None
    procs = {}
    for name, own in runs.items():
        procs[name] = launch(name, run_overrides(task, choices.get("experiment"), own,
                                                 name in cfg.demo.user_filter_runs), dirs[name], threads)
        if not parallel:
            wait_all({name: procs[name]}, dirs, cfg.train.steps, cfg.demo.progress_every)
    wait_all(procs, dirs, cfg.train.steps, cfg.demo.progress_every,
             lend_cores=bool(threads) and threads < usable_cores())
    summaries = {name: json.loads((dirs[name] / "summary.json").read_text()) for name in runs}
    path = write_comparison(out, summaries, list(dirs.values()), cfg.logging.wandb)
    print(f"[memsieve-demo] comparison ({out / 'comparison.md'}):\n" + (out / "comparison.md").read_text(), flush=True)
    print(f"[memsieve-demo] what the magnitude caused ({out / 'attribution.md'}):\n"
          + (out / "attribution.md").read_text(), flush=True)
    print(path)


if __name__ == "__main__":
    main()
