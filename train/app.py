"""``memsieve-train`` (also ``python -m train``): the Hydra app around :func:`train.loop.train`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from train.loop import train
from train.relaunch import relaunch, wants_relaunch


def run(cfg: DictConfig) -> dict | None:
    """Train, then evaluate on the main process; return the summary there."""
    from evaluation.evaluate import evaluate

    result = train(cfg, cfg.run_dir)
    summary = evaluate(result, cfg) if cfg.eval.enabled else None
    result.accelerator.end_training()  # closes the W&B run after evaluation has logged to it
    return summary


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        if wants_relaunch(cfg):
            relaunch(cfg)
        else:
            run(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad config or input: one line, no traceback
        raise SystemExit(f"memsieve-train: error: {err}") from None


if __name__ == "__main__":
    main()
