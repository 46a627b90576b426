"""``memsieve-eval RUN_DIR [--checkpoint step-N] [--out DIR] [KEY=VALUE ...]``: evaluate a saved run again.

Loads the run's saved model (``RUN_DIR/model``: with EMA enabled it holds the averaged weights;
with ``--checkpoint`` the UNet of that accelerate checkpoint, EMA-averaged when the run kept an
EMA), its resolved config and training set, applies the overrides (any ``eval.*`` setting: another
copy or alignment metric, other seeds, steps or guidance) and writes ``summary.json``,
``generations.pt`` and ``grid.png`` to ``--out`` (default: the run directory itself). Saved
generations and detection of the final model are reused when the overrides leave what produced
them unchanged and the weights are the ones they came from, so switching metrics costs no
sampling. The filter statistics, timing and data skip counts of the training run are kept (not
for a checkpoint, which they do not describe).
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file

from data.dataset import build_data
from evaluation.evaluate import evaluate_model, model_fingerprint, say, weights_fingerprint
from evaluation.preflight import check_metrics
from evaluation.report import write_json
from train.components import load_pretrained
from train.summary import TRAINING_KEYS


def run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's saved config with today's eval defaults filled in and ``overrides`` applied.
    Unknown keys are an error, not a silent new setting."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml; expected a memsieve-train run directory")
    saved = OmegaConf.load(path)
    defaults = OmegaConf.load(str(files("configs") / "eval" / "default.yaml"))
    cfg = OmegaConf.merge(saved, {"eval": OmegaConf.merge(defaults, saved.eval), "run_dir": str(run_dir)})
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ValueError(f"bad override in {overrides}: {str(err).splitlines()[0]}; expected KEY=VALUE with "
                         f"KEY an existing setting such as eval.copy.metric") from None
    return cfg


# The files of an accelerate checkpoint that hold the weights evaluated (the optimizer's do not).
CHECKPOINT_WEIGHTS = ("model.safetensors", "custom_checkpoint_0.pkl")


def load_checkpoint_unet(unet, checkpoint: Path, ema: bool) -> None:
    """Put an accelerate checkpoint's UNet weights into ``unet``; its EMA average when ``ema``
    (the loop registers the EMA first, so it is ``custom_checkpoint_0``)."""
    if not checkpoint.is_dir():
        found = sorted(p.name for p in checkpoint.parent.glob("step-*")) if checkpoint.parent.is_dir() else []
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; expected RUN_DIR/checkpoints/step-N"
                                + (f", one of {', '.join(found)}" if found else ""))
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} has no model.safetensors; expected RUN_DIR/checkpoints/step-N")
    unet.load_state_dict(load_file(weights))
    if ema:
        averaged = EMAModel(unet.parameters())
        averaged.load_state_dict(torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False))
        averaged.copy_to(unet.parameters())


def reevaluate(run_dir: Path, overrides: list[str], out: Path | None = None, checkpoint: Path | None = None) -> Path:
    """Evaluate ``run_dir``'s saved model (or ``checkpoint``) per its config plus ``overrides``;
    return the summary path."""
    cfg = run_config(run_dir, overrides)
    check_metrics(cfg, strict=True)  # before loading anything or writing to --out
    model = run_dir / "model"
    if not (model / "unet").is_dir():
        raise FileNotFoundError(f"{model} has no unet/; expected a finished memsieve-train run")
    comps = load_pretrained(str(model), local_files_only=True)
    if checkpoint:
        load_checkpoint_unet(comps.unet, checkpoint, cfg.train.ema.enabled)
        weights = weights_fingerprint([checkpoint / n for n in CHECKPOINT_WEIGHTS if (checkpoint / n).is_file()],
                                      checkpoint)
    else:
        weights = model_fingerprint(model)
    out = out or (run_dir / f"eval_{checkpoint.name}" if checkpoint else run_dir)
    out.mkdir(parents=True, exist_ok=True)  # only once the weights have loaded: a failure leaves no folder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comps.for_inference(device)
    data = build_data(cfg.data)
    old = run_dir / "summary.json"
    previous = json.loads(old.read_text()) if old.exists() and not checkpoint else {}
    summary = evaluate_model(comps, data, cfg, out, weights, reuse=None if checkpoint else run_dir / "generations.pt",
                             previous=previous, strict=True)
    summary.update({k: previous[k] for k in TRAINING_KEYS if k in previous})
    return write_json(out / "summary.json", summary)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="memsieve-eval", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path, help="a memsieve-train run directory")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE settings, e.g. eval.copy.metric=sscd")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="an accelerate checkpoint (RUN_DIR/checkpoints/step-N) to evaluate instead of the model")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default: RUN_DIR, or RUN_DIR/eval_step-N for a checkpoint)")
    args = parser.parse_intermixed_args(argv)  # options anywhere: RUN --out DIR KEY=VALUE as well
    try:
        path = reevaluate(args.run_dir, args.overrides, args.out, args.checkpoint)
    except (ValueError, FileNotFoundError) as err:  # bad input: one line, no traceback
        raise SystemExit(f"memsieve-eval: error: {err}") from None
    summary = json.loads(path.read_text())
    say(f"copy duplicated/other {summary['copy'].get('duplicated')} / {summary['copy'].get('other')}, "
        f"alignment duplicated/other {summary['alignment'].get('duplicated')} / {summary['alignment'].get('other')}")
    print(path)


if __name__ == "__main__":
    main()
