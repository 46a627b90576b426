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
from train.demo import wait_all

pytestmark = [pytest.mark.skipif(SIGNAL is None, reason="no SIGURG on this platform: runs keep their threads"),
              pytest.mark.skipif(usable_cores() < 2, reason="one core: nothing to hand over")]

# A demo run in miniature: slow to start (the demo's first signal arrives while it imports), then
# listening, as memsieve-train does (train/app.py), until it has more than one thread or 60 s pass.
LAST = """
import sys, time
from pathlib import Path
import torch
from train.cores import take_freed_cores_on_signal
time.sleep(1.0)
take_freed_cores_on_signal()
Path(sys.argv[1]).write_text(str(torch.get_num_threads()))
deadline = time.monotonic() + 60
while torch.get_num_threads() == 1 and time.monotonic() < deadline:
    time.sleep(0.05)
print(torch.get_num_threads(), flush=True)
"""
# A run that finishes once the last one listens.
FIRST = """
import sys, time
from pathlib import Path
while not Path(sys.argv[1]).exists():
    time.sleep(0.05)
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
        signal.raise_signal(SIGNAL)  # to this thread; its handler has run when the call returns
        assert torch.get_num_threads() == usable_cores()
    finally:
        signal.signal(SIGNAL, before_handler)
        torch.set_num_threads(before_threads)


def test_the_demo_hands_the_last_run_every_core_and_an_early_signal_kills_nothing(tmp_path):
    listening = tmp_path / "listening"
    env = {**os.environ, ENV: "1", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "last.out").open("w") as out:
        procs = {"last": subprocess.Popen([sys.executable, "-c", LAST, str(listening)], cwd=ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT)}
        try:
            assert hand_freed_cores(procs["last"])  # sent while it imports: ignored by default, not a kill
            procs["first"] = subprocess.Popen([sys.executable, "-c", FIRST, str(listening)])
            wait_all(procs, {name: tmp_path / name for name in procs}, total=1, every=30, lend_cores=True)
        finally:
            for proc in procs.values():
                proc.kill()
    assert listening.read_text() == "1"  # it listened with the one thread the demo gave it
    assert (tmp_path / "last.out").read_text().split() == [str(usable_cores())]
    assert not hand_freed_cores(procs["last"])  # a finished run is left alone
