"""Command-line overrides that Hydra accepts but memsieve must not: new keys under its own settings.

Hydra's hint for a mistyped key (``train.stepz=5``) is to add it with ``+``, and ``+train.stepz=5``
then runs silently with the typo ignored. memsieve's settings are all in its config files, so a
``+KEY=VALUE`` is only meaningful where the config leaves a slot open: under a node that is
``null`` by default, such as ``+data.weighted.fraction=0.1``. Everything else is refused in one line,
as is a setting the config marks ``???`` (``data.path`` of ``data=folder``) left unset.
"""

from __future__ import annotations

import difflib
from importlib.resources import files

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf


def is_config_group(key: str) -> bool:
    """``+experiment=x``-style group selections are Hydra's business, not new settings."""
    return "/" in key or "@" in key or key.startswith("hydra") or files("configs").joinpath(key).is_dir()


def unknown_added_keys(cfg: DictConfig, task_overrides: list[str]) -> list[str]:
    """One message per ``+KEY=VALUE`` that adds a key beside existing settings (a misspelling)."""
    parsed = [o for o in OverridesParser.create().parse_overrides(list(task_overrides))
              if o.is_add() and not is_config_group(o.key_or_group)]
    added = {o.key_or_group for o in parsed}
    problems = []
    for override in parsed:
        key = override.key_or_group
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig):
            continue
        existing = [k for k in parent.keys() if f"{parent_key}.{k}".lstrip(".") not in added]
        if not existing:  # the parent was an open (null) slot: every key in it was added here
            continue
        close = difflib.get_close_matches(name, [str(k) for k in existing], n=1)
        hint = f"did you mean {parent_key + '.' if parent_key else ''}{close[0]}? " if close else ""
        problems.append(f"{override.input_line} adds {key}, which is not a memsieve setting; {hint}"
                        f"set existing settings without '+' (see --help)")
    return problems


def check_overrides(cfg: DictConfig, task_overrides: list[str]) -> None:
    """Refuse misspelled ``+KEY`` overrides and required settings left unset, in one line each."""
    problems = unknown_added_keys(cfg, task_overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        problems.append(f"{', '.join(missing)} must be set: add {' '.join(f'{k}=VALUE' for k in missing)} "
                        f"to the command")
    if problems:
        raise ValueError("; ".join(problems))
