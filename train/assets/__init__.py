"""Model files shipped with memsieve, addressed in configs as ``${memsieve_asset:NAME}``.

``embedded_base`` is the embedded world's pretrained base model (the stand-in for Stable
Diffusion's weights that the fine-tuning setting starts from): the component folders a run
writes to ``run_dir/model``, produced by ``memsieve-train experiment=embedded_base``.
Resolving to an absolute path keeps configs valid wherever the package is installed.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).parent


def asset_path(name: str) -> str:
    """The absolute path of shipped asset ``name``; a one-line error naming those that exist."""
    path = ASSETS / name
    if not path.is_dir():
        known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise FileNotFoundError(f"no shipped asset {name!r} in {ASSETS}; expected one of {known}")
    return str(path)


if not OmegaConf.has_resolver("memsieve_asset"):
    OmegaConf.register_new_resolver("memsieve_asset", asset_path)
