"""Run a Hydra job under ``accelerate launch``: the bridge from Hydra sweeps to multi-process runs.

With ``launch.accelerate_config`` set, ``memsieve-train`` does not train in its own process: it
starts ``accelerate launch --config_file FILE -m train`` with the job's own overrides and
output directory, and waits. Every Hydra launcher therefore gets multi-GPU jobs for free: the
basic launcher runs a multirun's jobs one after another on this machine, and the submitit
launcher (``hydra/launcher=submitit_slurm``) runs each job as a SLURM task that then starts its
accelerate processes on the allocated node.
"""

from __future__ import annotations

import os
import subprocess
import sys

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train.cores import ENV as CORES_ENV

MARKER = "MEMSIEVE_UNDER_ACCELERATE"  # set for the relaunched processes so they train instead of relaunching


def wants_relaunch(cfg: DictConfig) -> bool:
    return bool(cfg.launch.accelerate_config) and not os.environ.get(MARKER)


def relaunch_command(cfg: DictConfig, task_overrides: list[str], output_dir: str) -> list[str]:
    """``accelerate launch`` over this job: its overrides minus ``launch.*``, in its output directory."""
    lc = cfg.launch
    if not os.path.isfile(lc.accelerate_config):
        raise FileNotFoundError(f"launch.accelerate_config={lc.accelerate_config} does not exist; "
                                "expected an accelerate config file such as configs/accelerate/multi_gpu.yml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(lc.accelerate_config)]
    if lc.num_processes:
        cmd += ["--num_processes", str(lc.num_processes)]
    kept = [o for o in task_overrides if not o.lstrip("+~").startswith(("launch.", "hydra."))]
    return [*cmd, *lc.extra_args, "-m", "train", *kept, f"hydra.run.dir={output_dir}"]


def relaunch(cfg: DictConfig) -> None:
    """Run this job under accelerate and fail as it fails."""
    hc = HydraConfig.get()
    cmd = relaunch_command(cfg, list(hc.overrides.task), hc.runtime.output_dir)
    # The demo hands freed cores to this launcher, not to its ranks (train/cores.py).
    env = {key: value for key, value in os.environ.items() if key != CORES_ENV}
    code = subprocess.run(cmd, env={**env, MARKER: "1"}).returncode
    if code:
        raise ValueError(f"accelerate launch exited with status {code}: {' '.join(cmd)}")
