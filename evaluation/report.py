"""Figures and files: grids of training image plus generations, and run comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def save_grid(path: Path, rows: list[tuple[str, torch.Tensor, torch.Tensor]]) -> Path:
    """One row per prompt: its training image, then its generations; titled by caption."""
    cols = 1 + max(len(g) for _, _, g in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.45 * len(rows)), squeeze=False)
    for r, (label, train_img, gens) in enumerate(rows):
        for c, img in enumerate([train_img, *gens]):
            ax = axes[r][c]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(label, fontsize=6, loc="left")
                ax.set_ylabel("train", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1}}`` to ``{"a/b": 1}`` for trackers and tables."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=2))
    return path
