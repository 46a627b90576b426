"""Atomic, resumable checkpoints through accelerate's ``save_state``.

A checkpoint is written to ``step-N.tmp`` and renamed to ``step-N`` only when complete, so a
crash or kill mid-write leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from accelerate import Accelerator

PREFIX = "step-"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep_last: int | None) -> Path:
    """Save every registered state at ``step``; prune to the newest ``keep_last``."""
    final, tmp = root / f"{PREFIX}{step}", root / f"{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep_last:
            for old in checkpoint_dirs(root)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(setting: str | None, root: Path) -> Path | None:
    """``auto``: the latest checkpoint if any; a path: that checkpoint (must exist); null: none."""
    if setting in (None, "", "never"):
        return None
    if setting == "auto":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(setting)
    if not path.is_dir() or not path.name.startswith(PREFIX):
        raise FileNotFoundError(f"train.resume={setting} is not a checkpoint folder (expected .../{PREFIX}N)")
    return path
