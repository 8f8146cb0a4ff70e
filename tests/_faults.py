"""Child processes for tests/test_reliability.py: bodies that the tests kill with SIGKILL.

They run in a multiprocessing *forkserver* that has imported this module (and with
it torch, Pyro, Lightning and the scripts) once: each child is a fork of that
server, so it starts in milliseconds instead of the seconds a fresh interpreter
takes, and the server itself never runs a torch operation (forking after one is
unsafe). The module is imported by the server, not collected by pytest.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import lightning.pytorch  # noqa: F401  (preloaded for the children)
import sklearn.datasets  # noqa: F401
import torch

from elbolab.inference.checkpoints import atomic_torch_save, load_checkpoint
from elbolab.scripts import cli, evaluate as evaluate_script, fit as fit_script  # noqa: F401  (preloaded for the children)

PAYLOAD = 1 << 18  # float32 values per checkpoint in the write loop (1 MiB)
PAUSE_POINTS = ("mkstemp", "fsync", "replace", "renamed")


IMPORTED_BY = os.getpid()  # in a child: the server's pid if the server preloaded this module
HERE = os.path.dirname(os.path.abspath(__file__))


def forkserver() -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started now (it imports in the background).
    Python 3.11's server ignores the parent's sys.path, so PYTHONPATH carries it."""
    import multiprocessing.forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE)] + ([old] if old else []))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return ctx


def report_preloaded(conn) -> None:
    conn.send(IMPORTED_BY != os.getpid())


def _quiet(log: str | None) -> None:
    """stdout and stderr of the child to ``log`` (or nowhere)."""
    fd = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_fit(argv: list[str], log: str | None = None) -> None:
    """``scripts.fit.main(argv)``; the exit status is the process's."""
    _quiet(log)
    torch.set_num_threads(1)
    code = fit_script.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(argv: list[str], log: str | None = None, address_space: int | None = None) -> None:
    """``elbolab ARGV`` (the dispatcher, ``scripts.cli.main``); the exit status is the
    process's. ``address_space``: bytes more than the process maps now that it may map
    (``ulimit -v``), for runs that must live under a memory cap."""
    _quiet(log)
    torch.set_num_threads(1)
    if address_space is not None:
        import resource

        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (mapped + address_space, resource.RLIM_INFINITY))
    code = cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def state(n: int) -> dict:
    """The n-th state of the write loop: every value says n (a mixture would show)."""
    return {"n": torch.tensor(n), "payload": torch.full((PAYLOAD,), float(n))}


def write_loop(path: str, conn, pause_at: str | None = None) -> None:
    """Continue from the state on disk (or 0): announce ``n`` on ``conn``, then write
    state n atomically; forever. With ``pause_at`` the first write stops at that
    point of ``atomic_write`` (announcing it) and waits there to be killed."""
    _quiet(None)
    torch.set_num_threads(1)
    n = int(load_checkpoint(path)["n"]) + 1 if os.path.exists(path) else 0
    if pause_at is not None:
        _pause_inside_atomic_write(pause_at, conn)
    while True:
        conn.send(("begin", n))
        atomic_torch_save(state(n), path)
        n += 1


def _pause_inside_atomic_write(point: str, conn) -> None:
    import tempfile

    def hang():
        conn.send(("paused", point))
        while True:
            time.sleep(1)

    if point == "mkstemp":  # the temporary exists, nothing written to it yet
        real = tempfile.mkstemp

        def mkstemp(*a, **kw):
            out = real(*a, **kw)
            hang()
            return out

        tempfile.mkstemp = mkstemp
    elif point == "fsync":  # data written and flushed, not yet on disk for sure
        os.fsync = lambda fd: hang()
    elif point == "replace":  # data on disk, not yet renamed over the old file
        os.replace = lambda src, dst: hang()
    elif point == "renamed":  # renamed, the directory entry not yet fsynced
        real_replace = os.replace

        def replace(src, dst):
            real_replace(src, dst)
            hang()

        os.replace = replace
    else:
        raise ValueError(point)
