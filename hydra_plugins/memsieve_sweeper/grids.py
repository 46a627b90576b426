"""A Hydra sweeper over a union of grids: ``hydra/sweeper=grids``.

Hydra's basic sweeper runs one cartesian product of its parameters. A comparison of methods needs
a different parameter per method (``filter.threshold`` for one, ``data.captions.probability`` for
another) and a different number of values each, which one product cannot express without running
every method at every other method's strengths. This sweeper takes named grids, each a string of
overrides whose comma-separated values span that grid, runs the union of their jobs, and crosses
every job with the ordinary ``params`` and command-line sweeps (``data.duplication.mode=exact,image_only``).
A command-line override of a key a grid also sets wins over the grid's value; a grid set to
``null`` is left out (``hydra.sweeper.grids.rta=null``).
"""

from __future__ import annotations

import shlex

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


def key_of(override: str) -> str:
    """``+data.x=1`` and ``data.x=2`` set the same key, ``data.x``."""
    return override.partition("=")[0].lstrip("+~")


class GridsSweeper(BasicSweeper):
    """Jobs: (each combination of ``params`` and command-line sweeps) x (the union of ``grids``' jobs)."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 grids: dict[str, str | None] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = {name: grid for name, grid in (grids or {}).items() if grid is not None}

    def grid_jobs(self) -> list[list[str]]:
        """Every grid's jobs, grid after grid, in the order the grids are written."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs: list[list[str]] = []
        for name, grid in self.grids.items():
            try:
                overrides = parser.parse_overrides(shlex.split(grid))
            except Exception as err:  # Hydra's parser raises several types; name the grid
                raise ValueError(f"hydra.sweeper.grids.{name}={grid!r} is not a list of Hydra overrides: {err}") \
                    from None
            jobs += BasicSweeper.split_arguments(overrides, None)[0]
        return jobs or [[]]

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        """The basic sweeper's product of ``overrides`` (params, then the command line), each combination
        run with every grid job; a key set both ways takes the combination's value."""
        jobs, grids = [], self.grid_jobs()
        for combination in BasicSweeper.split_arguments(overrides, None)[0]:
            keys = {key_of(o) for o in combination}
            jobs += [[o for o in grid if key_of(o) not in keys] + combination for grid in grids]
        size = max_batch_size or len(jobs)
        return [jobs[i:i + size] for i in range(0, len(jobs), size)]
