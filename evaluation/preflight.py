"""The evaluation's metrics checked before any work: weights that are named but absent fail at once.

Without it ``memsieve-train`` learned of a mistyped SSCD path only after training, and
``memsieve-eval`` after loading the model (leaving a half-written output folder). Checked here,
cheaply (files exist, a CLIP config loads, the data is the embedded world for the embedded
metrics): a metric whose weights are given but cannot be found stops the run in one line; a
metric that cannot run for want of weights or world is, in ``memsieve-train``, announced in
one line at the start and reported as unavailable in ``summary.json`` (``memsieve-eval``, which
runs only to measure, refuses it).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from data.dataset import renders_embedded_world
from data.world import WORLD_MARKER
from train.model_source import goes_online, hub_error, looks_like_path

COPY_METRICS = ("embedded", "sscd")
ALIGNMENT_METRICS = ("embedded", "clip")


def clip_problem(model: str, local_files_only: bool) -> str | None:
    """Why the CLIP checkpoint ``model`` cannot be loaded (its config is read, not its weights)."""
    path = Path(model).expanduser()
    if not path.exists() and looks_like_path(model):
        return f"CLIP model eval.alignment.clip.model={model} does not exist; give a CLIP folder or hub id"
    from transformers import AutoConfig

    online = goes_online(model, local_files_only)
    try:
        AutoConfig.from_pretrained(str(path) if path.exists() else model, local_files_only=not online)
    except (OSError, ValueError) as err:
        if path.exists():
            return f"eval.alignment.clip.model={model} is not a CLIP checkpoint in transformers' format ({err})"
        return str(hub_error(model, local_files_only, err, "eval.alignment.clip.model",
                             "eval.alignment.clip.local_files_only", online))
    return None


def metric_problems(cfg: DictConfig) -> list[tuple[str, str, bool]]:
    """``(metric, why it cannot run, whether it was asked for by name)`` for copy and alignment."""
    ec, embedded = cfg.eval, renders_embedded_world(cfg.data)
    world_note = f"the embedded world or files of it (marked by {WORLD_MARKER} beside them)"
    out = []
    copy, align = ec["copy"], ec.alignment
    if copy.metric not in COPY_METRICS:
        raise ValueError(f"eval.copy.metric={copy.metric!r}; expected one of {', '.join(COPY_METRICS)}")
    if align.metric not in ALIGNMENT_METRICS:
        raise ValueError(f"eval.alignment.metric={align.metric!r}; expected one of {', '.join(ALIGNMENT_METRICS)}")
    if copy.metric == "embedded" and not embedded:
        out.append(("copy", f"eval.copy.metric=embedded needs {world_note}; use eval.copy.metric=sscd", False))
    if copy.metric == "sscd":
        if not copy.sscd.weights:
            out.append(("copy", "eval.copy.metric=sscd needs eval.copy.sscd.weights (a TorchScript file such as "
                                "sscd_disc_large.torchscript.pt); none given", False))
        elif not Path(copy.sscd.weights).expanduser().is_file():
            out.append(("copy", f"SSCD weights not found at eval.copy.sscd.weights={copy.sscd.weights}", True))
    if align.metric == "embedded" and not embedded:
        out.append(("alignment", f"eval.alignment.metric=embedded needs {world_note}; use "
                                 "eval.alignment.metric=clip", False))
    if align.metric == "clip":
        if not align.clip.model:
            out.append(("alignment", "eval.alignment.metric=clip needs eval.alignment.clip.model (a CLIP folder or "
                                     "hub id); none given", False))
        else:
            why = clip_problem(align.clip.model, align.clip.local_files_only)
            if why:
                out.append(("alignment", why, True))
    return out


def check_metrics(cfg: DictConfig, strict: bool, say=print) -> None:
    """Fail in one line on named but missing weights (on any missing metric when ``strict``);
    otherwise ``say`` which metrics will not be measured."""
    problems = metric_problems(cfg)
    fatal = [why for _, why, named in problems if named or strict]
    if fatal:
        raise FileNotFoundError("; ".join(fatal))
    for name, why, _ in problems:
        say(f"{name} will not be measured: {why}")
