"""Replay a run's logged filter inputs through the robust-z policy (``filter=calibrated_z``) with each drop limit.

A run with ``logging.decisions=true`` logs, per micro-step, every sample's pair, timestep,
magnitude, whether it counted (``valid``) and whether it was kept. Feeding those inputs to a
fresh policy built from the run's ``config.yaml`` replays its decisions: with the limit the run
used they must come out identical, and with the other one the differences are exactly what
switching the limit changes on the same inputs (a real run would diverge after the first one).

    python bench/filter_replay.py runs/NAME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from filters.policy import build_policy


def replay(run_dir: Path, quantile: str) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.filter.quantile = quantile
    records = [json.loads(line) for line in (run_dir / "decisions.jsonl").open()]
    # Pairs never logged are never judged: a table up to the largest logged pair decides the same.
    timesteps = OmegaConf.select(cfg, "model.scheduler.num_train_timesteps", default=1000)
    key = "filter_key" if "filter_key" in records[0] else "pair"  # logs before issue 26 have the plan's pair only
    policy = build_policy(cfg.filter, timesteps, max(max(r[key]) for r in records) + 1)
    differ = samples = 0
    dropped: set[int] = set()
    logged_dropped: set[int] = set()
    for r in records:
        magnitude, t, pairs = torch.tensor(r["magnitude"]), torch.tensor(r["t"]), torch.tensor(r[key])
        order = torch.tensor(r["order"]) if "order" in r else None
        keep = policy.keep(magnitude, t, r["step"] - 1, pairs)
        logged = torch.tensor(r["keep"])
        differ += int((keep != logged).sum())
        samples += keep.numel()
        dropped.update(pairs[~keep].tolist())
        logged_dropped.update(pairs[~logged].tolist())
        policy.observe(magnitude, t, torch.tensor(r["valid"]), pairs, keep, order)
    return {"quantile": quantile, "samples": samples, "decisions_differing_from_log": differ,
            "pairs_dropped": len(dropped), "pairs_dropped_in_log": len(logged_dropped),
            "pairs_dropped_only_here": len(dropped - logged_dropped),
            "pairs_dropped_only_in_log": len(logged_dropped - dropped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    for quantile in ("exact", "histogram"):
        print(json.dumps(replay(args.run_dir, quantile)), flush=True)


if __name__ == "__main__":
    main()
