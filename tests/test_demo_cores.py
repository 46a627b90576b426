"""The demo's last run takes the cores finished runs freed (train/cores.py): real signals, real
processes, real thread counts."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from train.cores import ENV, SIGNAL, hand_freed_cores, take_freed_cores_on_signal, usable_cores

pytestmark = [pytest.mark.skipif(SIGNAL is None, reason="no SIGURG on this platform: runs keep their threads"),
              pytest.mark.skipif(usable_cores() < 2, reason="one core: nothing to hand over")]

CHILD = f"""
import os, sys, time
import torch
from train.cores import take_freed_cores_on_signal
time.sleep(1.0)                      # still starting: the demo's first signal arrives now
os.environ[{ENV!r}] = "1"
take_freed_cores_on_signal()
print("listening", torch.get_num_threads(), flush=True)
deadline = time.monotonic() + 60
while torch.get_num_threads() == 1 and time.monotonic() < deadline:
    time.sleep(0.05)
print("threads", torch.get_num_threads(), flush=True)
"""


def test_a_demo_run_takes_every_core_on_the_signal_and_others_ignore_it(monkeypatch):
    before_handler, before_threads = signal.getsignal(SIGNAL), torch.get_num_threads()
    try:
        monkeypatch.delenv(ENV, raising=False)
        take_freed_cores_on_signal()  # not a demo run: it does not listen
        assert signal.getsignal(SIGNAL) == before_handler
        monkeypatch.setenv(ENV, "1")
        torch.set_num_threads(1)
        take_freed_cores_on_signal()
        os.kill(os.getpid(), SIGNAL)  # Python runs the handler before the next line
        assert torch.get_num_threads() == usable_cores()
    finally:
        signal.signal(SIGNAL, before_handler)
        torch.set_num_threads(before_threads)


def test_a_signal_before_the_run_listens_is_dropped_and_a_later_one_hands_it_the_cores():
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert hand_freed_cores(child)  # sent while the child imports: ignored by default, not a kill
    assert child.stdout.readline().split() == ["listening", "1"]
    assert hand_freed_cores(child)
    assert child.stdout.readline().split() == ["threads", str(usable_cores())]
    assert child.wait(timeout=60) == 0
    assert not hand_freed_cores(child)  # a finished run is left alone
