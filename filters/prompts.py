"""Prompt sets for detection: plain text (one prompt per line) or JSONL with a ``caption`` field.

JSONL is the format of Webster's 500 memorized Stable Diffusion prompts (``caption``, ``index``,
``url`` per line); any other ``.jsonl``/``.json`` file with a ``caption`` field per line works too.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: str | Path) -> list[str]:
    """Every prompt of ``path`` in order; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; give a text file (one prompt per line) or JSONL")
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if path.suffix in (".jsonl", ".json"):
        prompts = []
        for n, line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not JSON ({err.msg}); expected an object with a 'caption'") from None
            if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
                raise ValueError(f"{path}:{n} has no string 'caption' field; expected one object with one per line")
            prompts.append(record["caption"])
    else:
        prompts = [line.strip() for _, line in lines]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts
