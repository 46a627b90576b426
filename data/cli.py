"""``memsieve-data``: build duplicated training sets and inspect sources.

    memsieve-data build data=webdataset data.urls=laion/ output=laion_dup data.duplication.num_duplicated=100 ...
    memsieve-data stats data=webdataset data.urls=laion_dup/

Arguments after the command are Hydra overrides of ``configs/build.yaml`` (the ``data`` group is
the training one, so a set is built with the options it will be trained with).
"""

from __future__ import annotations

import argparse
import json
import sys

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException


def stats(cfg: DictConfig) -> dict:
    """What training on ``cfg.data`` would see: pairs, samples, duplicated keys, skips."""
    from data.dataset import build_data

    data = build_data(cfg.data)
    counts = data.manifest.counts
    return {"pairs": len(data.pairs), "samples": len(data.dataset), "mode": data.manifest.mode,
            "sampling": data.manifest.sampling, "duplicated_pairs": len(counts),
            "duplicated_samples": int(sum(counts.values())) if data.manifest.sampling == "copies" else None,
            "skipped": data.skipped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="memsieve-data", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "stats"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/build.yaml")
    args = parser.parse_args(argv)
    try:
        with initialize_config_module("configs", version_base="1.3"):
            overrides = args.overrides if args.command == "build" else [*args.overrides, "output=unused"]
            cfg = compose("build", overrides=overrides)
        if args.command == "build":
            from data.build import materialize

            manifest = materialize(cfg)
            print(json.dumps({"output": cfg.output, "pairs": manifest.num_base, "samples": manifest.num_total,
                              "duplicated_pairs": len(manifest.counts), "mode": manifest.mode}))
        else:
            print(json.dumps(stats(cfg)))
    except (ValueError, FileNotFoundError, FileExistsError, HydraException, OmegaConfBaseException) as err:
        sys.exit(f"memsieve-data: error: {str(err).splitlines()[0]}")


if __name__ == "__main__":
    main()
