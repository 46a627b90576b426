"""Weights & Biases, offline unless the user is logged in, plus local JSONL that is always written."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from omegaconf import DictConfig


def wandb_mode(setting: str) -> str:
    """``auto`` means online only when credentials exist (env or ``wandb login``), else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text() else "offline"


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B id, made at its first start and kept in ``wandb/run_id``, so a resumed
    run continues the same W&B run (offline: its later folders carry the same id and sync into it)."""
    path = run_dir / "wandb" / "run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own id format: 8 lowercase alphanumerics
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


def wandb_init_kwargs(cfg: DictConfig, run_dir: Path, name: str) -> dict:
    return {"wandb": {"mode": wandb_mode(cfg.mode), "dir": str(run_dir), "name": name,
                      "entity": cfg.get("entity"), "group": cfg.get("group"),
                      "id": wandb_run_id(run_dir), "resume": "allow"}}


class JsonlLog:
    """Append-only metrics file; one JSON object per logged step."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Forget records past ``step``: a resumed run rewrites what the killed one logged after it."""
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
