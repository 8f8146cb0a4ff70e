"""Shared test set-up: validation on, fixed seeds, a clean parameter store per test,
and where the real data sets live (tests that need them skip when they are absent).

One torch thread per test process (and per child process it starts), unless
OMP_NUM_THREADS says otherwise: the suite runs as two such processes on two cores
(``make test``: pytest-xdist), where torch's default of one thread per core would
oversubscribe them (a VAE fit took 31 s on one thread and 88 s on two here)."""

import os
import random
import signal
import subprocess
import sys
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; inherited by child processes

import numpy as np
import pyro
import pytest
import torch

from elbolab import models  # noqa: F401  (sets module-local parameters)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
MNIST_DIR = os.path.join(SHARED_DATA, "mnist")
FASHION_DIR = os.path.join(SHARED_DATA, "fashion-mnist")


@pytest.fixture(autouse=True)
def _fresh_state():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    sigint = signal.getsignal(signal.SIGINT), _sigint_state()
    yield
    torch.set_num_threads(threads)
    pyro.clear_param_store()
    # a test (and so a code path of elbolab's) must leave Ctrl-C as it found it: a SIGINT
    # ignored or killing would pass on to every later test's child processes, and to a
    # user's session after the call
    leaked = signal.getsignal(signal.SIGINT), _sigint_state()
    if leaked != sigint:
        signal.signal(signal.SIGINT, sigint[0])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        raise AssertionError(f"the test left SIGINT changed (handler, (blocked, ignored) in the kernel): {sigint!r} "
                             f"-> {leaked!r}")


def _sigint_state() -> tuple[bool, bool]:
    """Whether this thread blocks SIGINT and whether the process ignores it, as the kernel
    sees it (a child process inherits both, whatever Python's own handler says)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
            status = dict(line.split(":", 1) for line in f)
    except OSError:  # (no /proc: not Linux)
        return False, False
    bit = 1 << (signal.SIGINT - 1)
    return bool(int(status["SigBlk"], 16) & bit), bool(int(status["SigIgn"], 16) & bit)


def read_metrics(run_dir) -> dict:
    """A run's metrics.json, checked against the metrics schema (inference/metrics.schema.json)."""
    import json

    from elbolab.inference.metrics import validate

    with open(os.path.join(str(run_dir), "metrics.json")) as f:
        m = json.load(f)
    validate(m)
    return m


def run_script(name: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the program ``elbolab.scripts.NAME`` with ARGS in a process of its own, from the
    repository root; capture its output."""
    return subprocess.run([sys.executable, "-m", f"elbolab.scripts.{name}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_elbolab(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``elbolab ARGS`` (the console command's entry point) in a process of its own."""
    return subprocess.run([sys.executable, "-m", "elbolab.scripts.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def needs_mnist():
    return pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason=f"real MNIST not found at {MNIST_DIR}")
