"""Shared fixtures: tiny Stable-Diffusion-architecture components built from the real configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from data.world import VOCABULARY
from train.components import build_components

ROOT = Path(__file__).resolve().parents[1]
# Keep subprocess runs quiet and offline, as CI is.
ENV = {**os.environ, "CI": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# A run small enough for tests: tiny world, few steps, cheap evaluation.
MICRO = [
    "data.world.num_pairs=40", "data.duplication.num_duplicated=4", "data.duplication.copies=5",
    "train.batch_size=8", "logging.every=2", "train.checkpoint_every=0",
    "eval.num_seeds=2", "eval.num_inference_steps=4", "eval.grid_prompts=2",
    "eval.detection.settings.first10_4gen.steps=2", "eval.detection.settings.first10_4gen.generations=2",
    "logging.wandb.mode=offline",
]


def compose_train(overrides: list[str]):
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture
def tiny_components():
    cfg = compose_train(["run_dir=unused"])
    torch.manual_seed(0)
    return build_components(cfg.model, list(VOCABULARY))


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console entry point as a user would (``env`` adds variables); fail with its output on a non-zero exit."""
    proc = subprocess.run(args, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def python_cli(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """A complete toy-size SD pipeline folder (see :mod:`tests.tiny_sd`), written once per session."""
    from tests.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipeline")
