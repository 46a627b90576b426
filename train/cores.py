"""The cores that finished demo runs leave idle go to the last run still going.

``memsieve-demo`` runs its fine-tunes at once on a CPU-only machine, the cores split between them
(one thread each on two cores). They finish training together, but the unfiltered run evaluates
longest (its 10-step x 4-generation detection) and would do most of it on one thread beside idle
cores (BENCHMARKS.md). So the demo signals the last run still going, and a run the demo started
takes every core then: ``torch.set_num_threads`` between two operations changes nothing but speed
(bench/eval_batch.py: magnitudes equal to the last bit).

The signal is ``SIGURG``, whose default action is to ignore it: a run that has not installed its
handler yet (still importing) or has had it removed (Python restores default handlers while it
exits) lets it pass instead of dying, as it would of ``SIGUSR1``. Only the demo's runs listen (the
demo sets :data:`ENV`); nothing else sends a process ``SIGURG`` unless it owns a socket's
out-of-band data.
"""

from __future__ import annotations

import os
import signal
import subprocess

import torch

ENV = "MEMSIEVE_TAKE_FREED_CORES"
SIGNAL = getattr(signal, "SIGURG", None)  # absent on Windows: there runs keep their threads


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def take_freed_cores_on_signal() -> None:
    """In a run the demo started: on the demo's signal, compute on every core from then on."""
    if SIGNAL is not None and os.environ.get(ENV):
        signal.signal(SIGNAL, lambda *_: torch.set_num_threads(usable_cores()))


def hand_freed_cores(proc: subprocess.Popen) -> bool:
    """Tell a still-running run to take every core; False where the platform cannot."""
    if SIGNAL is None or proc.poll() is not None:
        return False
    proc.send_signal(SIGNAL)
    return True
