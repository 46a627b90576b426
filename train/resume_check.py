"""A resumed run must be the run it resumes: settings are compared with the run's ``config.yaml``.

Resuming with another filter, seed, dataset, duplication or model would silently mix two
experiments under one name (``config.yaml`` and ``memsieve-compare`` would still describe the
first). Such settings are refused in one line that lists them. Settings that do not change what
is trained are allowed: more steps (when the learning-rate schedule does not depend on the total),
logging, evaluation, validation images, checkpoint cadence, how the job is launched. Every resume
is appended to ``resumes.jsonl`` in the run directory with the settings it changed, and
``config.yaml`` then holds the settings the run continues with.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Settings a resume may change: how the run is observed, evaluated, checkpointed or launched.
SAFE_PREFIXES = ("logging.", "eval.", "validation.", "launch.", "train.checkpoint_every",
                 "train.checkpoints_total_limit", "train.resume", "train.gradient_checkpointing", "train.attention",
                 "model.local_files_only")
# Schedules whose learning rate at a step does not depend on train.steps.
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")
SHOWN = 6


def flat(tree: object, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` to ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, object] = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def differences(saved: DictConfig, current: DictConfig) -> dict[str, tuple[object, object]]:
    """Every setting whose value differs (unresolved, so ``seed`` shows as itself, not as each
    interpolation of it); ``run_dir`` is where the run is, not what it is."""
    a = flat(OmegaConf.to_container(saved, resolve=False))
    b = flat(OmegaConf.to_container(current, resolve=False))
    missing = "absent"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys())
            if k != "run_dir" and a.get(k, missing) != b.get(k, missing)}


def is_safe(key: str, cfg: DictConfig, streamed: bool) -> bool:
    if key == "filter.threshold" and cfg.filter.get("choose") and cfg.filter.choose.get("quantile") is not None:
        return True  # config.yaml holds the number filter.choose picked; the resume reads it back
    if key == "train.steps":
        return cfg.train.lr_scheduler in STEP_FREE_SCHEDULES
    if key == "train.num_workers":
        return not streamed  # a stream's order depends on its workers; indexed data does not
    return key.startswith(SAFE_PREFIXES)


def streamed(cfg: DictConfig) -> bool:
    if cfg.data.source == "embedded":
        return False
    from data.dataset import access

    return access(cfg.data) == "stream"


def check_resume(cfg: DictConfig, checkpoint: Path, step: int) -> dict[str, tuple[object, object]]:
    """The allowed changes of a resume from ``checkpoint`` (at ``step``); a one-line ``ValueError``
    naming the others. The run's settings are its ``config.yaml`` (``RUN/checkpoints/step-N``)."""
    saved_path = checkpoint.parent.parent / "config.yaml"
    if not saved_path.is_file():
        return {}
    changed = differences(OmegaConf.load(saved_path), cfg)
    stream = streamed(cfg)
    refused = {k: v for k, v in changed.items() if not is_safe(k, cfg, stream)}
    if "train.steps" in changed and cfg.train.steps <= step:
        refused["train.steps"] = changed["train.steps"]
    if refused:
        order = sorted(refused, key=lambda k: (k.count("."), not k.endswith((".kind", ".source")), k))
        shown = [f"{k} ({refused[k][0]} -> {refused[k][1]})" for k in order[:SHOWN]]
        more = f" and {len(refused) - SHOWN} more" if len(refused) > SHOWN else ""
        steps_note = (f"; train.steps can grow only with lr_scheduler {' or '.join(STEP_FREE_SCHEDULES)} and past "
                      f"step {step}") if "train.steps" in refused else ""
        raise ValueError(f"cannot resume {checkpoint} with settings that change the run: {', '.join(shown)}{more}"
                         f"{steps_note}; resume with the run's own settings ({saved_path}) or start a new run_dir")
    return changed


def record_resume(run_dir: Path, checkpoint: Path, step: int, changed: dict[str, tuple[object, object]],
                  processes: int) -> None:
    """Append this resume to ``run_dir/resumes.jsonl``."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(checkpoint), "step": step,
             "processes": processes, "changed": {k: {"was": a, "now": b} for k, (a, b) in changed.items()}}
    with (run_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
