"""Runs: the typed run spec (its JSON round trip, every field checked), the run
directory, fitting a spec into a directory, and reading a finished run back.

A run directory holds ``config.json`` (the :class:`RunSpec`: everything needed to
rebuild the run), ``checkpoint.ckpt``, ``history.csv``, ``metrics.json`` and figures.
The programs (``elbolab fit``, ``evaluate``, ``diagnose``, ...) and the Python API
(``elbolab.fit``, ``elbolab.load_run``) both go through here.

Models: a built-in family by name (``ppca``, ``gaussian``, ``vae``, ``gmvae``), or a
user's model by reference, ``path/to/file.py:NAME`` or ``package.module:NAME``, where
NAME is

* an object with ``model(x)`` and ``guide(x)`` methods (e.g. a ``PyroModule``), or a
  class or factory making one (called with ``data_dim=`` and ``n_data=`` where its
  signature takes them, with no arguments otherwise); or
* a model function ``model(x)``, its guide given separately: a reference of the same
  kind, or an automatic guide (:data:`AUTOGUIDES`) built from the model.

x is the data matrix (N, D); the model observes its rows inside ``pyro.plate(plate,
len(x))`` (``plate``: "data" by default).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import importlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from elbolab import models
from elbolab.inference import distributed
from elbolab.inference.checkpoints import CHECKPOINT, HISTORY, check_checkpoint, load_checkpoint
from elbolab.inference.diagnostics import ParetoK
from elbolab.inference.errors import Interrupted, UsageError
from elbolab.inference.evaluate import (IWAELadder, active_units, elbo_estimate, elbo_terms, global_latent_sites,
                                        log_likelihood_seed, test_log_likelihood)
from elbolab.inference.files import TMP_PREFIX, remove_temporaries, save_json
from elbolab.inference.loggers import LOG_DIR
from elbolab.inference.traces import DATA_PLATE, infers_new_rows, latent_names, split_rows, training_rows
from elbolab.inference.train import check_objective_for_model, fit
from elbolab.inference.train_config import MAX_TENSOR_ELEMENTS, TrainConfig, check_config_for_data, rows_per_batch
from elbolab.inference.usermodel import UserModel
from elbolab.inference.convergence import verdict
from elbolab.inference.metrics import SCHEMA_VERSION, UNITS, exact, from_estimate, quantity
from elbolab.inference.objectives import build_objective
from elbolab.models.protocol import ClosedForms, InitializesFromData
from elbolab.models.resources import check_memory, open_regular
from elbolab.models.datasources import (BINARIZE, DATASETS, DataSplits, check_binary, check_unit_interval,
                                        load_dataset)

CONFIG = "config.json"
METRICS = "metrics.json"
EVALUATION = "evaluation.json"  # what elbolab evaluate writes
ARGUMENTS = "arguments.pt"  # the data arguments of a model fit from Python (elbolab.fit)
PYTHON = "<python>"  # the model of a run fit from Python: load_run needs it (and its guide) again
FROM_PYTHON = "arguments"  # the data of such a run: the arguments given to elbolab.fit
LOCK = ".lock"
MAX_CONFIG_BYTES = 1 << 24  # a config.json is a few kB; 16 MiB is refused unread
# the files elbolab writes into a fit's run directory: fit (and elbolab.fit), evaluate
# (--out defaulting to the run), diagnose (likewise), sample --out RUN_DIR, the reproduce
# scripts' ais.json; these are an old run's when --overwrite replaces it, anything else is
# the user's and is refused. Figures (.png) by suffix: only elbolab draws into a run.
RUN_FILES = frozenset({CONFIG, METRICS, EVALUATION, ARGUMENTS, CHECKPOINT, HISTORY, "ais.json",
                       "diagnostics.json", "diagnostics.nc", "summary.csv", "summary.md",
                       "samples.json", "samples.npz"})
RUN_FIGURE_SUFFIX = ".png"
RUN_REFERENCE_POSTERIORS = ("diagnostics_", ".nc")  # diagnose's diagnostics_exact.nc, diagnostics_nuts.nc
N_SAMPLES = 1000  # default importance samples per row for the test log-likelihood
EVAL_PARTICLES = 10  # default draws per row for the reported ELBO
# automatic guides a model function can be given by name
AUTOGUIDES = {
    "auto-normal": "AutoNormal",
    "auto-diagonal-normal": "AutoDiagonalNormal",
    "auto-mvn": "AutoMultivariateNormal",
    "auto-lowrank-mvn": "AutoLowRankMultivariateNormal",
    "auto-delta": "AutoDelta",
}


# ----------------------------------------------------------------------------- field checks


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}.get(
        t, getattr(t, "__name__", str(t)))


def check_value(where: str, name: str, value, kind, *, none: bool = False, low=None, high=None,
                choices=None, low_open: bool = False):
    """``value`` if it is of ``kind`` (int: an integer, not a bool or 2.0; float: any finite
    number) within [low, high] (``low_open``: (low, high]) and among ``choices``; None
    when ``none`` allows it. UsageError naming ``where`` and ``name`` otherwise."""
    if value is None:
        if none:
            return None
        raise UsageError(f"{where}: {name} is missing (null)")
    ok = (isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) if kind is float
          else isinstance(value, kind))
    if not ok:
        raise UsageError(f"{where}: {name} must be {_type_name(kind)}, got {json.dumps(value)[:60]}")
    if choices is not None and value not in choices:
        raise UsageError(f"{where}: {name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise UsageError(f"{where}: {name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise UsageError(f"{where}: {name} must be <= {high}, got {value!r}")
    return value


def _only(where: str, d, allowed) -> dict:
    if not isinstance(d, dict):
        raise UsageError(f"{where}: must be an object, got {json.dumps(d)[:60]}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return d


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class DataSpec:
    """Which data a run uses and how it is prepared."""

    dataset: str = "digits"
    data_path: str | None = None
    data_dir: str | None = None
    binarize: str = "none"
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # of a user's matrix without test_path
    test_path: str | None = None  # a user's own test rows
    labels_path: str | None = None  # class labels of data_path's rows
    test_labels_path: str | None = None  # ... and of test_path's

    @classmethod
    def from_dict(cls, d: dict, where: str = "data") -> "DataSpec":
        _only(where, d, [f.name for f in dataclasses.fields(cls)])
        path = {k: check_value(where, k, d.get(k), str, none=True)
                for k in ("test_path", "labels_path", "test_labels_path")}
        return cls(
            dataset=check_value(where, "dataset", d.get("dataset", "digits"), str, choices=DATASETS + (FROM_PYTHON,)),
            data_path=check_value(where, "data_path", d.get("data_path"), str, none=True),
            data_dir=check_value(where, "data_dir", d.get("data_dir"), str, none=True),
            binarize=check_value(where, "binarize", d.get("binarize", "none"), str, choices=BINARIZE),
            val_fraction=check_value(where, "val_fraction", d.get("val_fraction", 0.1), float, low=0.0, high=0.99),
            test_fraction=check_value(where, "test_fraction", d.get("test_fraction", 0.1), float, low=0.0, high=0.99),
            **path,
        )

    def load(self, likelihood: str | None = None) -> DataSplits:
        """The data, checked for a model with this likelihood ("bernoulli" needs 0/1 values,
        or grey levels in [0, 1] under dynamic binarization)."""
        if self.dataset == FROM_PYTHON:
            raise UsageError("the data of a run fit from Python are its arguments, saved in its directory")
        data = load_dataset(self.dataset, data_dir=self.data_dir, data_path=self.data_path, binarize=self.binarize,
                            val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                            test_path=self.test_path, labels_path=self.labels_path,
                            test_labels_path=self.test_labels_path)
        if likelihood == "bernoulli":
            (check_unit_interval if data.binarize == "dynamic" else check_binary)(data.train, data.source)
        elif likelihood == "continuous-bernoulli":
            for rows in (data.train, data.val, data.test):
                check_unit_interval(rows, data.source, "continuous-Bernoulli")
        return data


def resolve_binarize(binarize: str, dataset: str, data_path: str | None, likelihood: str | None) -> str:
    """``auto``: threshold 0.5 for the digits and dynamic binarization for MNIST-style sets
    under a Bernoulli likelihood, none otherwise (and for a user's own matrix)."""
    if binarize != "auto":
        return binarize
    if likelihood != "bernoulli" or data_path is not None:
        return "none"
    return "threshold" if dataset == "digits" else "dynamic"


@dataclass(frozen=True)
class EvalSpec:
    """How a fit is evaluated: draws per row for the ELBO, importance samples per row."""

    eval_particles: int = EVAL_PARTICLES
    n_samples: int = N_SAMPLES

    @classmethod
    def from_dict(cls, d: dict, where: str = "eval") -> "EvalSpec":
        _only(where, d, [f.name for f in dataclasses.fields(cls)])
        return cls(check_value(where, "eval_particles", d.get("eval_particles", EVAL_PARTICLES), int, low=1,
                               high=MAX_TENSOR_ELEMENTS),
                   check_value(where, "n_samples", d.get("n_samples", N_SAMPLES), int, low=1, high=10**9))


def is_reference(name: str) -> bool:
    """Whether a model name is a reference to a user's object (``FILE.py:NAME``, ``module:NAME``)
    or a model fit from Python (:data:`PYTHON`)."""
    return ":" in name or name == PYTHON


@dataclass(frozen=True)
class RunSpec:
    """Everything needed to rebuild a run: the model (a built-in family and its Config
    fields, or a user's model by reference with its guide and plate), how it was trained,
    its data and how it is evaluated. ``to_dict`` / ``from_dict`` are its JSON form
    (``config.json``); ``from_dict`` checks every field."""

    model: str
    model_config: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataSpec = field(default_factory=DataSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    @property
    def builtin(self) -> bool:
        return not is_reference(self.model)

    def likelihood(self) -> str | None:
        """The observation model of a built-in model (its Config's ``likelihood`` where it
        has that field, else its class's), None for a user's."""
        if not self.builtin:
            return None
        return self.model_config.get("likelihood", models.REGISTRY[self.model][1].likelihood)

    def to_dict(self) -> dict:
        return {"model": self.model, "model_config": dict(self.model_config), "train": self.train.to_dict(),
                "data": dataclasses.asdict(self.data), "eval": dataclasses.asdict(self.eval)}

    @classmethod
    def from_dict(cls, d, where: str = CONFIG) -> "RunSpec":
        _only(where, d, ("model", "model_config", "train", "data", "eval", "data_info"))
        for key in ("model", "model_config", "train", "data", "eval"):
            if key not in d:
                raise UsageError(f"{where}: no {key!r} entry (not an elbolab run config)")
        name = check_value(where, "model", d["model"], str)
        if not is_reference(name) and name not in models.REGISTRY:
            raise UsageError(f"{where}: model must be one of {', '.join(models.model_names())} or FILE.py:NAME, "
                             f"got {name!r}")
        config = _only(f"{where}: model_config", d["model_config"],
                       [f.name for f in dataclasses.fields(models.config_class(name))] if not is_reference(name)
                       else ("guide", "plate"))
        if is_reference(name):
            check_value(where, "model_config.guide", config.get("guide"), str, none=True)
            check_value(where, "model_config.plate", config.get("plate", DATA_PLATE), str)
        else:
            try:
                models.make_config(name, config)
            except UsageError as e:
                raise UsageError(f"{where}: model_config: {e}") from None
        try:
            train = TrainConfig.from_dict(_only(f"{where}: train", d["train"],
                                                [f.name for f in dataclasses.fields(TrainConfig)]))
        except UsageError as e:
            raise UsageError(f"{where}: train: {e}") from None
        except (TypeError, ValueError) as e:
            raise UsageError(f"{where}: train: {str(e).splitlines()[0][:160]}") from None
        return cls(name, dict(config), train, DataSpec.from_dict(d["data"], f"{where}: data"),
                   EvalSpec.from_dict(d["eval"], f"{where}: eval"))

    @classmethod
    def read(cls, run_dir: str) -> "RunSpec":
        """The spec in ``run_dir/config.json``, checked."""
        if not os.path.isdir(run_dir):
            raise UsageError(f"{run_dir}: no such run directory")
        path = os.path.join(run_dir, CONFIG)
        if not os.path.lexists(path):
            raise UsageError(f"{run_dir}: no {CONFIG} there (not a run directory)")
        try:
            with open_regular(path, MAX_CONFIG_BYTES, CONFIG) as f:  # never a FIFO or a device
                d = json.loads(f.read().decode("utf-8"))
        except UsageError:
            raise
        except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 decoding errors are ValueErrors
            raise UsageError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return cls.from_dict(d, path)


# ----------------------------------------------------------------------------- user models


def load_object(reference: str, what: str = "model"):
    """The object ``NAME`` of ``path/to/file.py:NAME`` (the file run as a module of its own)
    or of ``package.module:NAME`` (imported). UsageError for a reference that does not
    resolve (the file's own errors are reported in one line)."""
    target, _, name = reference.rpartition(":")
    if not target or not name:
        raise UsageError(f"{what} {reference!r}: expected FILE.py:NAME or module:NAME")
    try:
        if target.endswith(".py") or os.sep in target:
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise UsageError(f"{what} {reference}: no such file {target}")
            module_name = f"elbolab_user_{abs(hash(path)):x}"
            module = sys.modules.get(module_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
        else:
            module = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as e:  # the user's file: a syntax error, an import it lacks, anything it raises
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{what} {reference}: cannot load it ({type(e).__name__}: {first[:160]})") from None
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what} {reference}: {target} has no {name!r}")
        obj = getattr(obj, part)
    return obj


def _instantiate(obj, data_dim: int, n_data: int):
    """An instance from a class or factory: called with data_dim= and n_data= where it takes
    them (by name), with no arguments otherwise."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {k: v for k, v in (("data_dim", data_dim), ("n_data", n_data)) if k in params}
    return obj(**kwargs)


def autoguide(name: str, model: Callable):
    """An automatic guide of ``model`` by its name in :data:`AUTOGUIDES`."""
    from pyro.infer import autoguide as ag

    if name not in AUTOGUIDES:
        raise UsageError(f"unknown automatic guide {name!r}; choose one of {', '.join(AUTOGUIDES)} or give "
                         "FILE.py:NAME")
    return getattr(ag, AUTOGUIDES[name])(model)


def user_model(reference: str, guide: str | None, plate: str, x: torch.Tensor) -> UserModel:
    """A user's model (see the module docstring) over the rows of x, prepared."""
    obj = load_object(reference)
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "model") and guide is None):
        obj = _instantiate(obj, int(x.shape[1]), int(x.shape[0]))
    if hasattr(obj, "model") and hasattr(obj, "guide") and callable(obj.model) and callable(obj.guide):
        if guide is not None:
            raise UsageError(f"{reference} has its own guide; a guide is given for a model function only")
        model_fn, guide_fn = obj.model, obj.guide
    elif callable(obj):
        if guide is None:
            raise UsageError(f"{reference} is a model function: give its guide ({', '.join(AUTOGUIDES)} or "
                             "FILE.py:NAME)")
        model_fn = obj
        guide_fn = autoguide(guide, obj) if guide in AUTOGUIDES else load_object(guide, "guide")
        if isinstance(guide_fn, type):
            guide_fn = _instantiate(guide_fn, int(x.shape[1]), int(x.shape[0]))
    else:
        raise UsageError(f"{reference}: expected a model function, or an object with model and guide "
                         f"methods (or a class making one), got {type(obj).__name__}")
    m = UserModel(model_fn, guide_fn, (x,), plate=plate)
    m.prepare()
    return m


def build_model(spec: RunSpec, data: DataSplits):
    """The run's model for its data: a built-in family, or a user's model over the rows."""
    if spec.builtin:
        return models.build_model(spec.model, spec.model_config, data.data_dim, data.n_train)
    return user_model(spec.model, spec.model_config.get("guide"), spec.model_config.get("plate", DATA_PLATE),
                      data.train)


# ----------------------------------------------------------------------------- the run directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def is_run_file(name: str) -> bool:
    """Whether a file named ``name`` in a run directory is one elbolab writes there."""
    prefix, suffix = RUN_REFERENCE_POSTERIORS
    return (name in RUN_FILES or name.startswith(TMP_PREFIX) or name.endswith(RUN_FIGURE_SUFFIX)
            or (name.startswith(prefix) and name.endswith(suffix)))


class RunDir:
    """An output directory: refused if it holds files (unless ``overwrite`` or ``resume``);
    locked while a run writes it (a second writer is refused).

    The lock is ``DIR/.lock`` holding the writer's pid, with an exclusive ``flock`` on it
    for the run's lifetime: the kernel drops the flock when the process dies (SIGKILL
    included), so a dead run's lock is taken over; a live one's never is. The emptiness
    check is repeated once the lock is held (a run that finished in between is not
    overwritten), and ``.tmp-*`` files a killed writer left are removed then.

    ``rank``: this process's global rank in a multi-process (DDP) run. Only rank 0
    checks, creates and locks the directory; the other ranks write nothing and leave it
    alone (they are started by rank 0's run or beside it, so the lock rank 0 holds is
    theirs too).

    ``replace_run``: the directory is to hold one run (``fit``): with ``overwrite`` the
    old run's files are removed once the lock is held, before anything is written, so
    that nothing of it (a picture another model made, an evaluation) stays beside the
    new run. Only what elbolab writes is removed (:func:`is_run_file`, and the logger's
    ``lightning_logs`` directory, whole): a directory that also holds other entries (other
    subdirectories, symbolic links, files elbolab does not write) is refused, not emptied."""

    def __init__(self, path: str, overwrite: bool = False, resume: bool = False, rank: int = 0,
                 refusal: str = "pass overwrite=True to replace what it holds", replace_run: bool = False,
                 inputs: tuple = ()):
        self.path, self.overwrite, self.resume, self.rank = path, overwrite, resume, rank
        self.refusal = refusal  # what the caller's user can do about a non-empty directory
        self.replace_run = replace_run and overwrite and not resume
        self.inputs = {os.path.realpath(p) for p in inputs if p}  # files the run reads: never removed
        self._locked = False
        self._fd: int | None = None

    def old_run_files(self) -> list[str]:
        """The entries an overwrite removes (all but the lock): files elbolab writes
        (:func:`is_run_file`) and the logger's directory. UsageError if another entry is
        there, or one of the run's own inputs (its data)."""
        if not os.path.isdir(self.path):
            return []
        names = sorted(f for f in os.listdir(self.path) if f != LOCK)
        for name in names:
            p = self.file(name)
            if name == LOG_DIR and os.path.isdir(p) and not os.path.islink(p):
                # the Lightning logger's directory (--logger csv / tensorboard), removed whole
                inside = os.path.realpath(p) + os.sep
                if any(i.startswith(inside) for i in self.inputs):
                    raise UsageError(f"{self.path}: {name} holds a file this run reads; overwriting would remove "
                                     "it: move it, or choose another directory")
                continue
            if os.path.realpath(p) in self.inputs:
                raise UsageError(f"{self.path}: holds {name}, which this run reads; overwriting would remove it: "
                                 "move it, or choose another directory")
            if os.path.islink(p) or not os.path.isfile(p) or not is_run_file(name):
                raise UsageError(f"{self.path}: holds {name}, which no elbolab run writes; overwriting replaces a "
                                 "run's files only: remove it, or choose another directory")
        return names

    def check(self) -> None:
        """Refuse before any work starts; creates nothing."""
        if self.rank != 0:
            return
        p = self.path
        if os.path.exists(p) and not os.path.isdir(p):
            raise UsageError(f"{p}: exists and is not a directory")
        if self.resume:
            if not os.path.isdir(p):
                raise UsageError(f"{p}: no such run directory")
            return
        if os.path.isdir(p) and [f for f in os.listdir(p) if f != LOCK] and not self.overwrite:
            raise UsageError(f"{p}: the directory is not empty; {self.refusal}")
        if self.replace_run:
            self.old_run_files()
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent) and not os.access(os.path.dirname(parent) or "/", os.W_OK):
            raise UsageError(f"{p}: cannot create it here")

    def __enter__(self) -> "RunDir":
        if self.rank != 0:
            return self
        self.check()
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UsageError(f"{self.path}: cannot create it ({e.strerror})") from None
        self._lock()
        try:
            self.check()  # again, under the lock: another run may have finished here meanwhile
        except BaseException:
            self._unlock()
            raise
        remove_temporaries(self.path)
        if self.replace_run:
            for name in self.old_run_files():
                p = self.file(name)
                if name == LOG_DIR and os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
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
                raise UsageError(f"{self.path}: cannot create its lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise UsageError(f"{self.path}: another run (pid {pid or '?'}) is writing this directory")
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
                raise UsageError(f"{self.path}: another run (pid {pid}) is writing this directory "
                                 f"(remove {lock} if it is not)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._fd, self._locked = fd, True
            return
        raise UsageError(f"{self.path}: cannot take the directory's lock")

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


# ----------------------------------------------------------------------------- reading a run back


@dataclass
class LoadedRun:
    """A finished run read back: its directory, spec, data and model at the checkpoint's
    parameters (in eval mode), and the checkpoint's step."""

    path: str
    spec: RunSpec
    data: DataSplits
    model: torch.nn.Module
    step: int


STATE_PREFIX = "model."  # the Lightning module holds the model as its attribute ``model``


def load_state(model: torch.nn.Module, run_dir: str, config: TrainConfig | None = None) -> int:
    """Load ``run_dir``'s checkpoint into ``model`` (after a warm-up pass built any lazy
    parameters), every part of it checked first (against ``config``, the run's training
    configuration, where given); returns the checkpoint's step."""
    ckpt = check_checkpoint(os.path.join(run_dir, CHECKPOINT), model, config, training=False)
    own = {k[len(STATE_PREFIX):]: v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(own, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{run_dir}/{CHECKPOINT}: does not fit the model in {CONFIG} ({first[:200]})") from None
    return ckpt["global_step"]


def read_run(run_dir: str, model=None, guide=None) -> LoadedRun:
    """The run in ``run_dir``: its spec, its data (loaded as the run loaded it) and its
    model with the checkpoint's parameters, in eval mode. A run fit from Python
    (``elbolab.fit``) needs its ``model`` and ``guide`` again; its data arguments were
    saved with it."""
    spec = RunSpec.read(run_dir)
    if spec.data.dataset == FROM_PYTHON:
        arguments = load_checkpoint(os.path.join(run_dir, ARGUMENTS))
        if not isinstance(arguments, dict) or not isinstance(arguments.get("args"), list) \
                or not isinstance(arguments.get("kwargs"), dict):
            raise UsageError(f"{run_dir}/{ARGUMENTS}: not the data arguments of a run")
    if spec.model == PYTHON:
        if model is None or guide is None:
            raise UsageError(f"{run_dir}: a run fit from Python; give its model and guide to load it")
        wm = UserModel(model, guide, tuple(arguments["args"]), arguments["kwargs"],
                       spec.model_config.get("plate", DATA_PLATE))
        wm.prepare()
        empty = wm.rows[:0]
        data = DataSplits("data", wm.rows, empty, empty, source="arguments")
        step = load_state(wm, run_dir, spec.train)
        wm.eval()
        return LoadedRun(run_dir, spec, data, wm, step)
    if model is not None or guide is not None:
        raise UsageError(f"{run_dir}: its model is {spec.model}, rebuilt from its config.json; give no model")
    if spec.data.dataset == FROM_PYTHON:  # a built-in model fit from Python: its rows were saved
        rows = arguments["args"][0] if len(arguments["args"]) == 1 else None
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
            raise UsageError(f"{run_dir}/{ARGUMENTS}: not the rows of a built-in model's run")
        data = DataSplits("data", rows, rows[:0], rows[:0], source="arguments")
    else:
        data = spec.data.load(spec.likelihood())
    model = build_model(spec, data)
    with torch.no_grad():  # a warm-up pass creates any lazily built parameters
        model.guide(data.train[:1])
    step = load_state(model, run_dir, spec.train)
    model.eval()
    return LoadedRun(run_dir, spec, data, model, step)


# ----------------------------------------------------------------------------- fitting a spec


def check_spec_for_data(spec: RunSpec, data: DataSplits) -> None:
    """The checks that need the spec and the data both (before any work)."""
    check_config_for_data(spec.train, data)
    k = spec.eval.eval_particles
    if k * data.data_dim > MAX_TENSOR_ELEMENTS:
        raise UsageError(f"eval_particles {k} x {data.data_dim} data dimensions is more than the "
                         f"{MAX_TENSOR_ELEMENTS:.3g} values allowed in one tensor; lower it")
    check_memory_for_fit(spec, data)


# A training step holds, per particle and row, a handful of tensors as wide as the
# widest layer (values, log densities, their gradients): this many, to be safe.
ACTIVATION_COPIES = 8
TRAINING_COPIES = 4  # each parameter, its gradient and Adam's two moments


def fit_memory(spec: RunSpec, data: DataSplits) -> tuple[int, int, int] | None:
    """(bytes, parameter and buffer values, widest layer) a fit of a built-in model
    needs, estimated from the shapes alone before anything is allocated: the model is
    built on PyTorch's "meta" device (shapes, no storage), its parameters and buffers
    are counted ``TRAINING_COPIES`` times, and a step's activations as
    ``ACTIVATION_COPIES`` float32 tensors of n_particles x batch rows x the widest layer
    (the largest dimension of a parameter that is not a count of training rows, at
    least the data dimension).
    None for a user's model (its code is not run twice)."""
    if not spec.builtin:
        return None
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            meta = models.build_model(spec.model, spec.model_config, data.data_dim, data.n_train)
    except UsageError:
        raise
    except Exception:  # a model that cannot be built without storage: no estimate
        return None
    tensors = list(meta.parameters()) + list(meta.buffers())
    n_params = sum(t.numel() for t in tensors)
    state = TRAINING_COPIES * sum(t.numel() * t.element_size() for t in tensors)
    width = max([data.data_dim] + [int(d) for t in tensors for d in t.shape if d != data.n_train])
    batch = min(spec.train.batch_size, data.n_train)
    step = ACTIVATION_COPIES * spec.train.n_particles * batch * width * 4
    return state + step, n_params, width


def check_memory_for_fit(spec: RunSpec, data: DataSplits) -> None:
    """Refuse a fit whose estimated memory (:func:`fit_memory`) is more than is available."""
    need = fit_memory(spec, data)
    if need is not None:
        batch = min(spec.train.batch_size, data.n_train)
        check_memory(need[0], f"{spec.model} with {need[1]:,} parameter and buffer values (x{TRAINING_COPIES} "
                              f"while training) and steps of {spec.train.n_particles} x {batch} x {need[2]} values")


def budget_run(spec: RunSpec, checkpoint: dict) -> RunSpec:
    """The spec of a resumed run with the budget it actually runs: a budget already spent
    (``epochs`` or ``steps`` below what the checkpoint has done) trains nothing, and the
    run's record keeps what was done, not the smaller number asked for."""
    t = spec.train
    if t.steps is not None:
        done = max(t.steps, int(checkpoint["global_step"]))
        train = t if done == t.steps else dataclasses.replace(t, steps=done)
    else:
        done = max(t.epochs, int(checkpoint["epoch"]))
        train = t if done == t.epochs else dataclasses.replace(t, epochs=done)
    return spec if train is t else dataclasses.replace(spec, train=train)


def _interrupted(run_dir: "RunDir") -> Interrupted:
    """What a Ctrl-C during a fit leaves: the run directory and its last checkpoint."""
    path = run_dir.file(CHECKPOINT)
    if not os.path.isfile(path):
        return Interrupted(run_dir.path if os.path.isfile(run_dir.file(CONFIG)) else None)
    try:
        step = load_checkpoint(path).get("global_step")
    except (UsageError, AttributeError):
        step = None
    return Interrupted(run_dir.path, path, step if isinstance(step, int) else None)


def fit_run(spec: RunSpec, out: str, overwrite: bool = False, resume: bool = False,
            refusal: str = "pass overwrite=True to replace its run or resume=True to continue it",
            data: DataSplits | None = None) -> dict:
    """Fit ``spec`` into the run directory ``out`` (refused if it holds a run, unless
    ``overwrite``, which first removes the old run's files; ``resume`` continues the run
    there from its last checkpoint) and return its metrics. Everything is checked
    before anything is written: the launcher's environment, the data, the memory the
    fit needs, the model, the directory and (on resume) every part of the checkpoint.
    A fresh run of a model that takes starting values from the data
    (``models.protocol.InitializesFromData``) gets them from its training rows.
    ``data``: the spec's data, if already loaded. Ctrl-C raises :class:`Interrupted`
    naming the checkpoint to resume from."""
    train = spec.train
    # under DDP every process runs this; only (global) rank 0 locks and writes the directory
    distributed.check_local_processes(train.devices, train.accelerator)
    rank = distributed.launch_rank(train.devices, train.num_nodes)
    data = spec.data.load(spec.likelihood()) if data is None else data
    check_spec_for_data(spec, data)
    torch.manual_seed(train.seed)
    model = build_model(spec, data)
    # a run killed before its first checkpoint resumes from the start: nothing was saved
    # (a checkpoint that is there but no regular file is refused by check_checkpoint below)
    from_checkpoint = resume and os.path.lexists(os.path.join(out, CHECKPOINT))
    if not from_checkpoint and isinstance(model, InitializesFromData):
        model.initialize_from_data(data.train)
    check_objective_for_model(model, data, train)
    run_dir = RunDir(out, overwrite=overwrite, resume=resume, rank=rank, refusal=refusal, replace_run=True,
                     inputs=(spec.data.data_path,))
    run_dir.check()
    checkpoint = None
    if from_checkpoint:  # refused before anything is written
        checkpoint = check_checkpoint(run_dir.file(CHECKPOINT), model, train)
        spec = budget_run(spec, checkpoint)
        train = spec.train
    with run_dir:
        try:
            if run_dir.rank == 0:
                save_json({**spec.to_dict(), "data_info": data.describe()}, run_dir.file(CONFIG))
            t0 = time.perf_counter()
            result = fit(model, data, train, out_dir=out, resume=from_checkpoint, checkpoint=checkpoint)
            pareto = ParetoK()  # the Pareto k of each test row's importance weights (if any are drawn)
            metrics = evaluate_run(model, data, spec, result, pareto=pareto)  # every rank takes part
            metrics["wall_seconds"] = time.perf_counter() - t0
            metrics["world_size"], metrics["rank_param_diff"] = result.world_size, result.rank_param_diff
            if distributed.rank_and_world()[0] != 0:
                return metrics
            save_json(metrics, run_dir.file(METRICS))
            write_figures(model, data, spec, result, metrics, pareto, out)
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise _interrupted(run_dir) from None
    return metrics


def write_figures(model, data: DataSplits, spec: RunSpec, result, metrics: dict, pareto, out: str) -> None:
    """A fit's figures: the loss curve, the model's pictures, the Pareto k of the test rows."""
    from elbolab.inference.plots import loss_curve, model_pictures

    label = f"{spec.model} / {spec.train.objective}"
    ref = metrics.get("quantities", {}).get("mle_log_likelihood", {}).get("value")
    loss_curve(result.history, result.validations, os.path.join(out, "loss_curve.png"),
               title=f"{label} on {data.name}", reference=ref,
               reference_label="closed-form max log-likelihood" if ref is not None else "")
    model_pictures(model, data, out, name=label, seed=spec.train.seed)
    if pareto is not None and pareto.n:
        from elbolab.inference.diagnostic_plots import pareto_k_plot

        pareto_k_plot(pareto.values, os.path.join(out, "pareto_k.png"),
                      f"{label} on {data.name}: Pareto k of each test row's importance weights", pareto.n_samples)


def evaluate_run(model, data: DataSplits, spec: RunSpec, result, pareto: ParetoK | None = None) -> dict:
    """The run's ``metrics.json`` (``inference.metrics``): the ELBO and its terms per
    datapoint on each split, a model's closed forms, the importance-sampled test
    log-likelihood, and the convergence verdict of the fit, every number in the one shape."""
    k = spec.eval.eval_particles
    seed = spec.train.seed
    model.eval()
    splits = {"train": training_rows(data)}  # a dynamic binarization's training rows at its one fixed draw
    new_rows = infers_new_rows(model, data.train)
    if new_rows:
        splits.update({"val": (data.val, None), "test": (data.test, None)})
    objective = build_objective(spec.train.objective, spec.train.n_particles, spec.train.alpha).describe()
    final = None if not result.history else float(-result.final_loss)
    metrics: dict = {
        "schema": SCHEMA_VERSION, "units": UNITS, "model": spec.model, "config": spec.to_dict(),
        "data": data.describe(),
        "run": {"steps": int(result.steps), "epochs": int(result.epochs), "seconds": float(result.seconds),
                "stopped_early": bool(result.stopped_early), "objective": objective,
                "final_train_bound": final, "convergence": verdict(result.history)},
        "quantities": {}, "diagnostics": {}, "closed_forms": {},
    }
    q = metrics["quantities"]
    global_latents = bool(global_latent_sites(model, data.train[:2], torch.arange(min(2, data.n_train))))
    for i, (name, (x, rows)) in enumerate(splits.items()):
        if x.shape[0] == 0:
            continue
        if global_latents:  # no per-row ELBO: the whole set's, over k draws of the globals
            torch.manual_seed(distributed.chunk_seed(seed + 1, i))
            est = elbo_estimate(model, x, rows, n_particles=k)
        else:  # rows split over the processes (if several); each chunk of rows has its own seed
            est = distributed.estimate_rows(lambda xb, rb: elbo_terms(model, xb, rb, k), x, rows,
                                            chunk_size=rows_per_batch(k, data.data_dim),
                                            seed=distributed.chunk_seed(seed + 1, i))
        n = int(x.shape[0])
        q[f"{name}_elbo"] = from_estimate(est["elbo"], method="monte-carlo", K=k, bound="lower", n=n)
        q[f"{name}_recon"] = from_estimate(est["recon"], method="monte-carlo", K=k, bound="estimate", n=n)
        q[f"{name}_kl"] = from_estimate(est["kl"], method="monte-carlo", K=k, bound="estimate", better="lower", n=n)
    if isinstance(model, ClosedForms):
        for key, value in model.closed_form_metrics(data).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                split = key.split("_")[0]
                n = {"train": data.n_train, "mle": data.n_train, "val": data.val.shape[0],
                     "test": data.test.shape[0]}.get(split, data.n_train)
                q[key] = exact(value, int(n), better="lower" if "_kl" in key else "higher")
            else:
                metrics["closed_forms"][key] = value
    if "train_log_evidence" in q and "train_elbo" in q:
        # an exact log evidence log p(X) (global latents): its gap to the ELBO is KL(q || p(theta | X))
        elbo = q["train_elbo"]
        q["train_kl_to_posterior"] = quantity(q["train_log_evidence"]["value"] - elbo["value"], elbo["se"],
                                              data.n_train, method="monte-carlo", K=k, bound="estimate",
                                              better="lower")
    if new_rows and not global_latents and data.test.shape[0]:
        test = test_likelihood_metrics(model, data.test, spec.eval.n_samples, seed=log_likelihood_seed(seed),
                                       pareto=pareto)
        q["test_importance_log_likelihood"] = test.pop("log_likelihood")
        q.setdefault("test_log_likelihood", q["test_importance_log_likelihood"])
        metrics["diagnostics"].update(test)
    return metrics


def distance_to_closed_form(metrics: dict) -> str | None:
    """The fit against its closed form, where the model has one: PPCA's training
    log-likelihood against the closed-form maximum, the Bayesian Gaussian's guide's KL to
    the exact posterior (nats per datapoint)."""
    q = metrics.get("quantities", {})
    if "mle_log_likelihood" in q and "train_log_likelihood" in q:
        gap = q["mle_log_likelihood"]["value"] - q["train_log_likelihood"]["value"]
        return f"{gap:.4f} nats per datapoint below the closed-form maximum log-likelihood"
    if "guide_kl_to_posterior_exact" in q:
        return f"KL(q || exact posterior) {q['guide_kl_to_posterior_exact']['value']:.4f} nats per datapoint"
    if "train_kl_to_posterior" in q:
        kl = q["train_kl_to_posterior"]
        return f"KL(q || exact posterior) {kl['value']:.4f} ± {kl['se']:.4f} nats per datapoint"
    return None


def test_likelihood_metrics(model, x, n_samples: int, seed: int, pareto: ParetoK | None = None) -> dict:
    """The importance-sampled test log-likelihood (K = n_samples, a quantity with its
    Pareto k share and reliability) under ``log_likelihood``; from the same draws the ELBO,
    its reconstruction and KL terms and the IWAE_m bounds for m = 1, 10, 100, ...
    dividing K (``test_importance``), the Pareto k summary (``test_pareto_k``, also left in
    ``pareto`` when given), and the active units."""
    sizes = tuple(m for m in (10**i for i in range(7)) if m <= n_samples and n_samples % m == 0)
    ladder = IWAELadder(int(x.shape[0]), sizes)
    pareto = ParetoK() if pareto is None else pareto
    est = test_log_likelihood(model, x, n_samples, seed, pareto=pareto, on_log_weights=ladder)
    out = {"log_likelihood": from_estimate(est["log_likelihood"], method="importance", K=n_samples, bound="lower"),
           "test_importance": {
               "elbo": from_estimate(est["elbo"], method="importance", K=n_samples, bound="lower"),
               "recon": from_estimate(est["recon"], method="importance", K=n_samples, bound="estimate"),
               "kl": from_estimate(est["kl"], method="importance", K=n_samples, bound="estimate", better="lower"),
               "iwae": {str(m): from_estimate(e, method="importance", K=m, bound="lower")
                        for m, e in ladder.estimates().items()}},
           "test_pareto_k": pareto.summary()}
    if len(latent_names(model, x[:1])[0]) == 1:
        au = active_units(model, x)
        out["test_active_units"] = {k: au[k] for k in ("active_units", "latent_dim", "threshold")}
    return out


# ----------------------------------------------------------------------------- re-evaluating a run


ESTIMATORS = ("is", "ais")  # of a run's log-likelihood: importance sampling, annealed importance sampling


def evaluate_split(run: LoadedRun, split: str = "test", n_samples: int = 5000, seed: int | None = None,
                   max_rows: int | None = None, per_row: bool = False, pareto: ParetoK | None = None,
                   estimator: str = "is", ais=None) -> dict:
    """The log-likelihood of a run's ``split`` rows and the ELBO and its terms (under
    ``quantities``, in ``inference.metrics``'s shape), and the active units: the record
    ``elbolab evaluate`` writes, naming its ``estimator``. ``seed``: of the draws
    (default: the run's own test-set seed, so that the test estimate is the one its fit
    reported); ``per_row`` adds each row's estimate (for paired comparisons of runs on
    the same rows).

    ``estimator="is"``: importance sampling with the guide as proposal, K = ``n_samples``
    per row, with the Pareto k of each row's weights (``pareto_k``; ``pareto``: a ParetoK
    to fill); the ELBO and its terms from the same draws.

    ``estimator="ais"``: annealed importance sampling from the guide (``inference.ais``;
    ``ais``: an ``ais.Budget``, T steps, M chains, L leapfrog steps; its defaults
    without one): each row's log (1/M) sum_m w_m, a stochastic lower bound of log p(x_i);
    the quantity (method "ais", K = M) carries its standard error over rows, and the
    record's ``ais`` the budget, the Monte Carlo standard error of the mean over the
    chains (``mc_se_of_mean``: sqrt(sum_i mc_se_i^2) / N, the delta method per row) and
    the chains' statistics (acceptance rate, effective sample size, step sizes). The
    ELBO and its terms then come from the run's ``eval_particles`` draws per row.
    ``n_samples`` is not used."""
    from elbolab.inference.ais import Budget, ais_log_likelihood

    if estimator not in ESTIMATORS:
        raise UsageError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    data, model = run.data, run.model
    seed = log_likelihood_seed(run.spec.train.seed) if seed is None else int(seed)
    hint = " (a run fit from Python keeps only its training rows: evaluate the train split, or new rows " \
           "with Run.evaluate)" if run.spec.data.dataset == FROM_PYTHON else ""
    rows_of = split_rows(model, data, split, where=run.path, verb="evaluate", empty_hint=hint)
    x, rows = rows_of.x, rows_of.rows
    if max_rows is not None:
        x = x[:max_rows]
        rows = None if rows is None else rows[:max_rows]
    t0 = time.perf_counter()
    out = {"schema": SCHEMA_VERSION, "run": os.path.abspath(run.path), "model": run.spec.model,
           "checkpoint_step": run.step, "split": split, "n_rows": int(x.shape[0]), "estimator": estimator,
           "seed": seed, "units": UNITS}
    if estimator == "is":
        pareto = ParetoK() if pareto is None else pareto
        est = test_log_likelihood(model, x, n_samples, seed, rows, pareto=pareto)
        method, K = "importance", n_samples
        ll = from_estimate(est["log_likelihood"], method=method, K=K, bound="lower")
        out.update({"n_samples": n_samples, "pareto_k": pareto.summary()})
    else:
        budget = Budget() if ais is None else ais
        r = ais_log_likelihood(model, x, rows, seed=seed, **budget.kwargs())
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            est = {"log_likelihood": r.log_likelihood,
                   **elbo_estimate(model, x, rows, n_particles=run.spec.eval.eval_particles)}
        method, K = "monte-carlo", run.spec.eval.eval_particles
        ll = from_estimate(r.log_likelihood, method="ais", K=budget.chains, bound="lower")
        out["ais"] = {k: v for k, v in r.describe().items() if k != "log_likelihood"}
    out["quantities"] = {
        "log_likelihood": ll,
        "elbo": from_estimate(est["elbo"], method=method, K=K, bound="lower"),
        "recon": from_estimate(est["recon"], method=method, K=K, bound="estimate"),
        "kl": from_estimate(est["kl"], method=method, K=K, bound="estimate", better="lower")}
    out["seconds"] = time.perf_counter() - t0
    if len(latent_names(model, x[:1], None if rows is None else rows[:1])[0]) == 1:
        out["active_units"] = active_units(model, x, rows)
    if per_row:
        out["log_likelihood_per_row"] = [float(v) for v in est["log_likelihood"].values]
    return out
