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
demo sets :data:`ENV`, and a run relaunched under ``accelerate launch`` keeps its ranks out of it);
nothing else sends a process ``SIGURG`` unless it owns a socket's out-of-band data. That a change
of thread count leaves every figure as it was is measured at the embedded world's size only:
PyTorch splits large reductions by thread count.
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


def take_every_core(*_) -> None:
    """The signal's handler. Python runs it between two bytecodes of the main thread, wherever the
    run is, so it must never raise there: a torch that cannot change its threads keeps them."""
    try:
        torch.set_num_threads(usable_cores())
    except Exception:  # noqa: BLE001 - speed only; the run must go on
        pass


def take_freed_cores_on_signal() -> None:
    """In a run the demo started: on the demo's signal, compute on every core from then on."""
    if SIGNAL is not None and os.environ.get(ENV) == "1":
        signal.signal(SIGNAL, take_every_core)
        signal.siginterrupt(SIGNAL, False)  # system calls under way resume instead of failing with EINTR


def hand_freed_cores(proc: subprocess.Popen) -> bool:
    """Tell a still-running run to take every core; False where the platform cannot."""
    if SIGNAL is None or proc.poll() is not None:
        return False
    proc.send_signal(SIGNAL)
    return True
