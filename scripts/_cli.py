"""What every script shares: one-line errors with exit status 2, the data and
training flags, and the run directory (refuse to clobber, lock against a second
writer)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import functools
import os
import sys
from typing import Any, Callable

from elbolab.inference.errors import NonFiniteError, UsageError
from elbolab.inference.files import remove_temporaries
from elbolab.models.datasources import BINARIZE, DATASETS, DataSplits, check_binary, check_unit_interval, load_dataset
from elbolab.models.common import ConfigError

EXIT_USAGE = 2
EXIT_FAILURE = 1
LOCK = ".lock"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def parser(prog: str, description: str, epilog: str = "") -> ArgumentParser:
    return ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


def guarded(prog: str) -> Callable:
    """Run a script's main and return its exit status, never a traceback for these:

    * user errors (a flag, a file, a value; argparse's own) -> one line, exit 2;
    * a non-finite loss -> one line, exit 1 (the last good checkpoint is kept);
    * a system fault (``OSError``: a full disk, a vanished directory; out of
      memory) -> one line naming the file, exit 1 (what was saved stays saved).
    """

    def deco(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None, **hooks) -> int:  # hooks: for a caller in-process
            try:
                return int(main(argv, **hooks) or 0)
            except SystemExit as e:  # argparse: --help (0) or a usage error (2, its line already printed)
                return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_USAGE
            except (UsageError, ConfigError) as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return EXIT_USAGE
            except NonFiniteError as e:
                print(f"{prog}: error: {e} (the last checkpoint is the last good state)", file=sys.stderr)
                return EXIT_FAILURE
            except OSError as e:
                where = f"{e.filename}: " if e.filename else ""
                print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
                return EXIT_FAILURE
            except MemoryError:
                print(f"{prog}: error: out of memory", file=sys.stderr)
                return EXIT_FAILURE
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return wrapper

    return deco


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


# ----------------------------------------------------------------------------- data


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="built-in digits (8x8, scikit-learn), or MNIST / Fashion-MNIST IDX files in --data-dir")
    g.add_argument("--data", metavar="PATH", default=None,
                   help="your own matrix (.npy, .npz or .csv, one row per datapoint); wins over --dataset")
    g.add_argument("--data-dir", metavar="DIR", default=None,
                   help="directory holding train-images-idx3-ubyte[.gz] and the other IDX files")
    g.add_argument("--binarize", default="auto", choices=("auto",) + BINARIZE,
                   help="auto: threshold 0.5 for the digits, dynamic for MNIST-style sets under a Bernoulli "
                        "decoder; none otherwise")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training rows (MNIST-style sets, --data) held out for validation; "
                        "the digits split is fixed (1257/270/270)")


def resolve_binarize(binarize: str, dataset: str, data_path: str | None, likelihood: str) -> str:
    if binarize != "auto":
        return binarize
    if likelihood != "bernoulli" or data_path is not None:
        return "none"
    return "threshold" if dataset == "digits" else "dynamic"


def data_spec(args: argparse.Namespace, likelihood: str) -> dict[str, Any]:
    return {
        "dataset": args.dataset, "data_path": args.data, "data_dir": args.data_dir,
        "binarize": resolve_binarize(args.binarize, args.dataset, args.data, likelihood),
        "val_fraction": args.val_fraction,
    }


def load_data(spec: dict[str, Any], likelihood: str) -> DataSplits:
    """Load and check the data for a model with this likelihood ("bernoulli"/"gaussian")."""
    data = load_dataset(spec["dataset"], data_dir=spec.get("data_dir"), data_path=spec.get("data_path"),
                        binarize=spec["binarize"], val_fraction=spec.get("val_fraction", 0.1))
    if likelihood == "bernoulli":
        src = data.source
        if data.binarize == "dynamic":
            check_unit_interval(data.train, src)
        else:
            check_binary(data.train, src)
    return data


# ----------------------------------------------------------------------------- training


def add_train_args(p: argparse.ArgumentParser, epochs: int = 10) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--objective", default="elbo",
                   choices=("elbo", "elbo-analytic", "iwae", "renyi", "iwae-dreg"),
                   help="the bound to maximize")
    g.add_argument("--n-particles", type=positive_int, default=1,
                   help="samples K per datapoint (vectorized) in the objective")
    g.add_argument("--alpha", type=float, default=None, help="Renyi alpha (--objective renyi; default 0.5)")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the training rows")
    g.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (wins over --epochs)")
    g.add_argument("--batch-size", type=positive_int, default=100, help="rows per mini-batch")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--lr-final", type=positive_float, default=None,
                   help="decay the rate exponentially to this value over the run")
    g.add_argument("--clip-norm", type=positive_float, default=None, help="clip the gradient norm to this value")
    g.add_argument("--val-every", type=positive_int, default=None,
                   help="validation ELBO every this many steps (default: every epoch)")
    g.add_argument("--patience", type=positive_int, default=None,
                   help="stop after this many validations without improvement")
    g.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="epochs between checkpoints (default: about every 100 steps, and at the end)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    d = p.add_argument_group("distributed (passed to Lightning)")
    d.add_argument("--devices", type=positive_int, default=1, help="processes (or GPUs) per node")
    d.add_argument("--num-nodes", type=positive_int, default=1, help="machines")
    d.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    d.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto")
    d.add_argument("--sparse-rows", action="store_true",
                   help="update per-datapoint tables by SparseAdam: a step moves only its batch's rows (and their "
                        "Adam moments), O(batch) instead of O(N) work; default: dense Adam over the whole table")


def train_values(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "objective": args.objective, "n_particles": args.n_particles, "alpha": args.alpha, "lr": args.lr,
        "lr_final": args.lr_final, "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
        "clip_norm": args.clip_norm, "val_every": args.val_every, "patience": args.patience,
        "seed": args.seed, "checkpoint_every": args.checkpoint_every, "threads": args.threads, "progress": args.progress, "devices": args.devices,
        "num_nodes": args.num_nodes, "strategy": args.strategy, "accelerator": args.accelerator,
        "sparse_rows": args.sparse_rows,
    }


# ----------------------------------------------------------------------------- run directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class RunDir:
    """An output directory: refused if it holds files (unless --overwrite or
    --resume); locked while a run writes it (a second writer is refused).

    The lock is ``DIR/.lock`` holding the writer's pid, with an exclusive
    ``flock`` on it for the run's lifetime: the kernel drops the flock when the
    process dies (SIGKILL included), so a dead run's lock is taken over; a live
    one's never is. The emptiness check is repeated once the lock is held (a run
    that finished in between is not overwritten), and ``.tmp-*`` files a killed
    writer left are removed then.

    ``rank``: this process's global rank in a multi-process (DDP) run. Only rank 0
    checks, creates and locks the directory; the other ranks write nothing and
    leave it alone (they are started by rank 0's run or beside it, so the lock
    rank 0 holds is theirs too)."""

    def __init__(self, path: str, overwrite: bool = False, resume: bool = False, rank: int = 0):
        self.path, self.overwrite, self.resume, self.rank = path, overwrite, resume, rank
        self._locked = False
        self._fd: int | None = None

    def check(self) -> None:
        """Refuse before any work starts; creates nothing."""
        if self.rank != 0:
            return
        p = self.path
        if os.path.exists(p) and not os.path.isdir(p):
            raise UsageError(f"--out {p}: exists and is not a directory")
        if self.resume:
            if not os.path.isdir(p):
                raise UsageError(f"--resume {p}: no such run directory")
            return
        if os.path.isdir(p) and [f for f in os.listdir(p) if f != LOCK] and not self.overwrite:
            raise UsageError(f"--out {p}: the directory is not empty; pass --overwrite to replace its run "
                             "or --resume to continue it")
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent) and not os.access(os.path.dirname(parent) or "/", os.W_OK):
            raise UsageError(f"--out {p}: cannot create it here")

    def __enter__(self) -> "RunDir":
        if self.rank != 0:
            return self
        self.check()
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {self.path}: cannot create it ({e.strerror})") from None
        self._lock()
        try:
            self.check()  # again, under the lock: another run may have finished here meanwhile
        except BaseException:
            self._unlock()
            raise
        remove_temporaries(self.path)
        atexit.register(self._unlock)
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _lock(self) -> None:
        import fcntl

        lock = self.file(LOCK)
        for _ in range(5):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as e:
                raise UsageError(f"--out {self.path}: cannot create its lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise UsageError(f"--out {self.path}: another run (pid {pid or '?'}) is writing this directory")
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed the file as we opened it: take the new one
                os.close(fd)
                continue
            pid = _read_pid(fd)
            if pid and pid != os.getpid() and _pid_alive(pid):
                # no flock held, yet its pid lives: a writer that does not flock; be safe
                os.close(fd)
                raise UsageError(f"--out {self.path}: another run (pid {pid}) is writing this directory "
                                 f"(remove {lock} if it is not)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._fd, self._locked = fd, True
            return
        raise UsageError(f"--out {self.path}: cannot take the directory's lock")

    def _unlock(self) -> None:
        if self._locked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file(LOCK))
            os.close(self._fd)  # drops the flock, after the file is gone
            self._fd, self._locked = None, False


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def add_out_args(p: argparse.ArgumentParser, default: str | None = None, resume: bool = False) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=default, required=default is None and not resume,
                   help="run directory: metrics.json, pictures and (for fits) the checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    if resume:
        g.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the run in DIR from its last checkpoint (its own config.json is used)")
