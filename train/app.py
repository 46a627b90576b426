"""``memsieve-train`` (also ``python -m train``): the Hydra app around :func:`train.loop.train`."""

from __future__ import annotations

import sys

import hydra
from accelerate import PartialState
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train.cores import take_freed_cores_on_signal
from train.loop import train
from train.overrides import check_overrides
from train.relaunch import relaunch, wants_relaunch


def run(cfg: DictConfig) -> dict | None:
    """Train, then evaluate on the main process; return the summary there (the training half
    alone when evaluation is off)."""
    from evaluation.evaluate import evaluate
    from evaluation.preflight import check_metrics
    from train.summary import write_training_summary

    if cfg.eval.enabled:  # before any work: a wrong weights path fails now, in one line
        check_metrics(cfg, strict=False, say=lambda line: PartialState().print(f"[memsieve-train] {line}"))
    result = train(cfg, cfg.run_dir)
    summary = write_training_summary(result, cfg) if PartialState().is_main_process else None
    if cfg.eval.enabled:
        summary = evaluate(result, cfg)
    result.accelerator.end_training()  # closes the W&B run after evaluation has logged to it
    return summary


def result_lines(summary: dict, cfg: DictConfig) -> list[str]:
    """What a finished run prints before its directory: filter, timing, and the evaluation's headline."""
    f, dropped = summary["filter"], summary["filter"]["dropped_fraction"]
    lines = [f"{cfg.train.steps} steps, {summary['timing']['seconds_per_step']:.3f} s/step; filter {f['kind']} "
             f"dropped {dropped['duplicated']:.1%} of duplicated and {dropped['other']:.1%} of other samples"]
    if summary["data"]["skipped"]:
        lines.append(f"skipped samples: {summary['data']['skipped']}")
    if "detection" not in summary:
        lines.append("not evaluated (eval.enabled=false): memsieve-eval RUN_DIR evaluates it")
        return lines
    for name in ("copy", "alignment"):
        block = summary[name]
        lines.append(f"{name} not measured: {block['unavailable']}" if "unavailable" in block else
                     f"{name} duplicated {block['duplicated']:.3f}, other {block['other']:.3f}")
    lines.append(f"detection AUC {summary['detection']['auc']:.3f}, TPR at 1% FPR "
                 f"{summary['detection']['tpr_at_1pct_fpr']:.3f}")
    return lines


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        check_overrides(cfg, list(HydraConfig.get().overrides.task))
        if wants_relaunch(cfg):
            relaunch(cfg)  # the relaunched main process prints the results
            return
        take_freed_cores_on_signal()  # a demo run: the demo hands it the cores finished runs free
        summary = run(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad config or input: one line, no traceback
        raise SystemExit(f"memsieve-train: error: {err}") from None
    if summary is not None:
        print("\n".join(f"[memsieve-train] {line}" for line in result_lines(summary, cfg)))
        print(cfg.run_dir, flush=True)


def with_run_dir_as_output(argv: list[str]) -> list[str]:
    """``run_dir=X`` also makes X Hydra's output folder (its ``.hydra/`` record and log go there),
    so a run with its own directory leaves no stray ``runs/<time>/`` behind."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    multirun = any(a in ("-m", "--multirun") for a in argv)  # sweeps use hydra.sweep.dir
    if given and not multirun and not any(a.startswith("hydra.run.dir=") for a in argv):
        return [*argv, f"hydra.run.dir={given[-1]}"]
    return argv


def main() -> None:
    sys.argv = [sys.argv[0], *with_run_dir_as_output(sys.argv[1:])]
    hydra_main()


if __name__ == "__main__":
    main()
