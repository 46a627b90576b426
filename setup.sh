#!/usr/bin/env bash
# Create .venv and install memsieve with its test tools. Safe to rerun.
# torch is pinned to 2.13.0: on these machines pip takes the CPU build that lies on disk;
# elsewhere it takes the PyPI build for your platform (CUDA on Linux GPUs).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
