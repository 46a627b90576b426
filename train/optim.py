"""The optimizer: AdamW, or bitsandbytes' 8-bit AdamW when asked for and installed.

bitsandbytes is optional (it needs CUDA and is not a dependency): asking for it without it
installed is a one-line error, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig

OPTIMIZERS = ("adamw", "adamw_8bit")


def build_optimizer(params: Iterable[torch.nn.Parameter], tc: DictConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` with ``train.lr``, ``train.weight_decay``, ``train.adam_betas``, ``train.adam_epsilon``."""
    kwargs = {"lr": tc.lr, "weight_decay": tc.weight_decay, "betas": tuple(tc.adam_betas), "eps": tc.adam_epsilon}
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if tc.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("train.optimizer=adamw_8bit needs bitsandbytes, which is not installed "
                             "(pip install bitsandbytes, on a CUDA machine); or use train.optimizer=adamw") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ValueError(f"train.optimizer={tc.optimizer!r}; expected one of {OPTIMIZERS}")
