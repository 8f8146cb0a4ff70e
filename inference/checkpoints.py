"""Checkpoints: written atomically (temporary file, fsync, rename), read with
``torch.load(weights_only=True)`` from a regular file of bounded size (so that a
checkpoint cannot run code, block or exhaust memory), and checked part by part against
the model and training configuration they are loaded into before anything uses them;
the per-step history beside them.

A training checkpoint (what ``inference.train.fit`` writes, Lightning's format) holds:

* ``state_dict``: the model's tensors, ``model.NAME`` -> tensor of the model's shape
  and dtype, finite;
* ``global_step`` (optimizer steps done) and ``epoch`` (epochs begun and ended) with
  Lightning's loop counters (``loops``), which must agree with them;
* ``optimizer_states``: one per optimizer (Adam; and SparseAdam over per-datapoint
  tables with ``sparse_rows``), one parameter group each, its hyperparameters those
  the run's configuration gives, its per-parameter state (step count, first and
  second moments) shaped like the parameters it belongs to and finite;
* ``lr_schedulers`` (one LambdaLR per optimizer with ``lr_final``, else none) and
  ``callbacks`` (ModelCheckpoint, EarlyStopping with ``patience``);
* ``elbolab``: the RNG states (torch's as a uint8 tensor of the generator's size,
  per rank too; Python's ``random`` as (version, 625 ints, None or a float)), the
  history (global_step rows of step 1.., epoch, loss, seconds), the validations
  (rows of step, ELBO, standard error) and the training seconds.

A weights-only checkpoint (``elbolab.fit``'s ``Run.save``) holds ``state_dict`` and
``global_step``. :func:`check_checkpoint` refuses, with one line naming the file and
the field, anything else.
"""

from __future__ import annotations

import csv
import math
import os
import random
from typing import Any

import torch

from elbolab.inference.errors import UsageError
from elbolab.inference.files import atomic_write
from elbolab.models.resources import GiB, check_memory, open_regular

CHECKPOINT = "checkpoint.ckpt"
HISTORY = "history.csv"
MAX_CHECKPOINT_BYTES = 64 * GiB
MAX_COUNT = 2**53  # step, epoch and loop counters: exact in a float64 history
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through ``atomic_write``: the old checkpoint or the new one, never a partial file."""
    with atomic_write(path, binary=True) as f:
        torch.save(obj, f)


def load_checkpoint(path: str) -> Any:
    """Load a checkpoint with ``weights_only=True`` (no code runs) from a regular file
    (never a FIFO or a device) that fits in memory; errors are UsageErrors."""
    if not os.path.lexists(path):
        raise UsageError(f"{path}: no checkpoint there")
    with open_regular(path, MAX_CHECKPOINT_BYTES, "checkpoint") as f:
        check_memory(2 * os.fstat(f.fileno()).st_size, f"{path}: loading it")
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{path}: refused to load the checkpoint ({first[:200]})") from None


TRAINING_KEYS = ("state_dict", "global_step", "epoch", "loops", "callbacks", "optimizer_states", "lr_schedulers",
                 "elbolab", LIGHTNING_VERSION_KEY)
WEIGHTS_KEYS = ("state_dict", "global_step")
EXTRA_KEYS = ("torch_rng", "python_rng", "history", "validations", "seconds")  # the "elbolab" entry's
EXTRA_OPTIONAL_KEYS = ("torch_rng_ranks",)  # each process's generator state: older checkpoints lack it


class _Checker:
    """Checks of one loaded checkpoint; every refusal names the file and the field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, what: str):
        raise UsageError(f"{self.path}: {where}: {what}")

    def kind(self, where: str, value, kind, what: str):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is no count
            self.fail(where, f"must be {what}, got {_describe(value)}")
        return value

    def integer(self, where: str, value, low: int = 0, high: int = MAX_COUNT) -> int:
        self.kind(where, value, int, "an integer")
        if not low <= value <= high:
            self.fail(where, f"must be in [{low}, {high}], got {value}")
        return value

    def number(self, where: str, value, low: float = -math.inf, high: float = math.inf) -> float:
        self.kind(where, value, (int, float), "a number")
        if not (math.isfinite(value) and low <= value <= high):
            self.fail(where, f"must be a finite number in [{low:g}, {high:g}], got {value!r}")
        return float(value)

    def tensor(self, where: str, value, dtype=None, shape=None, finite: bool = False) -> torch.Tensor:
        self.kind(where, value, torch.Tensor, "a tensor")
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            self.fail(where, f"must be a dense CPU tensor, got layout {value.layout} on {value.device}")
        if dtype is not None and value.dtype != dtype:
            self.fail(where, f"must be a {dtype} tensor, got {value.dtype}")
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.fail(where, f"must have shape {tuple(shape)}, got {tuple(value.shape)}")
        if finite and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            self.fail(where, "holds non-finite values")
        return value

    def keys(self, where: str, d, required, allowed=None) -> dict:
        self.kind(where, d, dict, "a dict")
        missing = [k for k in required if k not in d]
        if missing:
            self.fail(where, f"no {', '.join(map(str, missing))}")
        allowed = set(required) | set(allowed or ())
        unknown = sorted(map(repr, set(d) - allowed))
        if unknown:
            self.fail(where, f"unknown entries {', '.join(unknown)[:120]}")
        return d


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def check_checkpoint(path: str, model: torch.nn.Module, config=None, training: bool = True) -> dict:
    """Load ``path`` (weights only) and check every part of it (see the module docstring)
    against ``model`` and the run's TrainConfig ``config`` (None: the parts that need
    it are checked for their structure only). ``training``: the checkpoint is to be
    resumed from, so it must be a training checkpoint; otherwise (evaluating a run) a
    weights-only one is also accepted, and the parts a training one holds are checked
    all the same. Returns the checkpoint; UsageError naming the file and the field if
    any part is not what it must be."""
    ck = load_checkpoint(path)
    c = _Checker(path)
    if not isinstance(ck, dict):
        raise UsageError(f"{path}: not a checkpoint of this program (a {type(ck).__name__}, not a dict)")
    full = training or any(k in ck for k in TRAINING_KEYS if k not in WEIGHTS_KEYS)
    missing = [k for k in (TRAINING_KEYS if full else WEIGHTS_KEYS) if k not in ck]
    if missing:
        raise UsageError(f"{path}: not a checkpoint of this program (no {', '.join(missing)})")
    unknown = sorted(map(repr, set(ck) - set(TRAINING_KEYS)))
    if unknown:
        raise UsageError(f"{path}: not a checkpoint of this program (unknown entries {', '.join(unknown)[:120]})")
    _check_state_dict(c, ck["state_dict"], model)
    step = c.integer("global_step", ck["global_step"])
    if not full:
        return ck
    epoch = c.integer("epoch", ck["epoch"], 0, max(step, 1))  # each epoch ended takes at least one step
    _check_version(c, ck[LIGHTNING_VERSION_KEY])
    _check_loops(c, ck["loops"], step, epoch)
    params = [p for p in model.parameters()]
    _check_optimizers(c, ck["optimizer_states"], params, model, config, step)
    _check_schedulers(c, ck["lr_schedulers"], len(ck["optimizer_states"]), config, step)
    _check_callbacks(c, ck["callbacks"], config, epoch)
    _check_extras(c, ck["elbolab"], step, epoch)
    return ck


def _check_state_dict(c: _Checker, state, model: torch.nn.Module) -> None:
    c.kind("state_dict", state, dict, "a dict of tensors")
    want = {"model." + k: v for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    if set(want) != set(have) or any(have[k] != tuple(v.shape) for k, v in want.items()):
        diff = sorted(map(str, set(want) ^ set(have))) or sorted(k for k in want if have[k] != tuple(want[k].shape))
        raise UsageError(f"{c.path}: its parameters do not match the model ({', '.join(diff[:3])}"
                         f"{', ...' if len(diff) > 3 else ''})")
    for k, v in want.items():
        c.tensor(f"state_dict[{k}]", state[k], v.dtype, v.shape, finite=True)


def _check_version(c: _Checker, text) -> None:
    import lightning
    from packaging.version import InvalidVersion, Version

    c.kind(LIGHTNING_VERSION_KEY, text, str, "a version string")
    try:
        v = Version(text)
    except InvalidVersion:
        c.fail(LIGHTNING_VERSION_KEY, f"not a version: {text[:40]!r}")
    mine = Version(lightning.__version__)
    if v.major != mine.major or v > mine:
        c.fail(LIGHTNING_VERSION_KEY, f"{text} is not a Lightning version {mine.major}.x up to this one ({mine})")


def _structure(obj):
    """The shape of a nested dict: its keys, and the type of every leaf."""
    if isinstance(obj, dict):
        return {k: _structure(v) for k, v in obj.items()}
    return type(obj)


_LOOPS_SKELETON: dict | None = None


def _loops_skeleton() -> dict:
    """The loop-state layout this Lightning writes (from a Trainer that runs nothing)."""
    global _LOOPS_SKELETON
    if _LOOPS_SKELETON is None:
        import warnings

        import lightning.pytorch as pl

        from elbolab.inference.train_config import quiet_lightning

        with warnings.catch_warnings(), quiet_lightning():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False)
        _LOOPS_SKELETON = _structure(trainer._checkpoint_connector._get_loops_state_dict())
    return _LOOPS_SKELETON


PROGRESS_ORDER = ("ready", "started", "processed", "completed")  # each counter at most the one before


def _check_loops(c: _Checker, loops, step: int, epoch: int) -> None:
    c.kind("loops", loops, dict, "a dict")
    if _structure(loops) != _loops_skeleton():
        c.fail("loops", "not the loop state this Lightning writes (entries or types differ)")

    def walk(where: str, d: dict) -> None:
        for k, v in d.items():
            at = f"{where}.{k}"
            if isinstance(v, dict):
                walk(at, v)
            elif isinstance(v, int) and not isinstance(v, bool):
                c.integer(at, v)
        counters = [d[k] for k in PROGRESS_ORDER if k in d]
        if any(a < b for a, b in zip(counters, counters[1:])):
            c.fail(where, f"counters {', '.join(k for k in PROGRESS_ORDER if k in d)} must not increase: {counters}")

    walk("loops", loops)
    fit_loop = loops["fit_loop"]
    agree = {
        "loops.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed":
            (fit_loop["epoch_loop.manual_optimization.optim_step_progress"]["total"]["completed"], step),
        "loops.fit_loop.epoch_progress.current.completed": (fit_loop["epoch_progress"]["current"]["completed"], epoch),
    }
    # Lightning's batches: one per optimizer step, or fewer where the driver takes several
    # steps in one Lightning batch
    c.integer("loops.fit_loop.epoch_loop.state_dict._batches_that_stepped",
              fit_loop["epoch_loop.state_dict"].get("_batches_that_stepped", 0), 0, step)
    for where, (have, want) in agree.items():
        if have != want:
            c.fail(where, f"{have}, but the checkpoint's {'epoch' if 'epoch_progress' in where else 'global_step'} "
                          f"is {want}")


def _row_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of per-datapoint tables (modules with a ``sparse`` flag), which
    ``sparse_rows`` gives an optimizer of their own."""
    return [p for m in model.modules() if isinstance(getattr(m, "sparse", None), bool)
            for p in m.parameters(recurse=False)]


def _check_optimizers(c: _Checker, states, params, model, config, step: int) -> None:
    c.kind("optimizer_states", states, list, "a list")
    sparse = bool(getattr(config, "sparse_rows", False))
    rows = {id(p) for p in _row_parameters(model)} if sparse else set()
    groups = [[p for p in params if id(p) not in rows]] + ([[p for p in params if id(p) in rows]] if rows else [])
    if len(states) != len(groups):
        c.fail("optimizer_states", f"{len(states)} optimizers, expected {len(groups)}")
    from elbolab.inference.lightning_module import adam

    lr = getattr(config, "lr", None)
    for i, (state, group_params) in enumerate(zip(states, groups)):
        where = f"optimizer_states[{i}]"
        c.keys(where, state, ("state", "param_groups"))
        pg = c.kind(f"{where}.param_groups", state["param_groups"], list, "a list")
        if len(pg) != 1:
            c.fail(f"{where}.param_groups", f"{len(pg)} parameter groups, expected 1")
        g = c.kind(f"{where}.param_groups[0]", pg[0], dict, "a dict")
        fresh = (adam(group_params, lr=lr or 1e-3) if i == 0 else
                 torch.optim.SparseAdam(group_params, lr=lr or 1e-3)).state_dict()["param_groups"][0]
        has_schedule = getattr(config, "lr_final", None) is not None
        c.keys(f"{where}.param_groups[0]", g, list(fresh), ("initial_lr",) if has_schedule or config is None else ())
        ids = g["params"]
        if not (isinstance(ids, list) and ids == list(range(len(group_params)))):
            c.fail(f"{where}.param_groups[0].params", f"must be the indices 0..{len(group_params) - 1} of the "
                                                      f"model's {len(group_params)} parameters, got {str(ids)[:60]}")
        for key, value in fresh.items():
            if key in ("params", "lr"):
                continue
            if not (type(g[key]) is type(value) and g[key] == value):
                c.fail(f"{where}.param_groups[0].{key}", f"must be {value!r} (how this run's optimizer is built), "
                                                         f"got {_describe(g[key])}")
        _check_lr(c, f"{where}.param_groups[0]", g, config)
        st = c.kind(f"{where}.state", state["state"], dict, "a dict")
        for j, entry in st.items():
            at = f"{where}.state[{j!r}]"
            if not (isinstance(j, int) and not isinstance(j, bool) and 0 <= j < len(group_params)):
                c.fail(f"{where}.state", f"entry {j!r} is no parameter of the group")
            p = group_params[j]
            c.keys(at, entry, ("step", "exp_avg", "exp_avg_sq"))
            count = entry["step"]
            if isinstance(count, torch.Tensor):
                count = c.tensor(f"{at}.step", count, torch.float32, (), finite=True).item()
            count = c.number(f"{at}.step", count, 0, step)
            if count != int(count):
                c.fail(f"{at}.step", f"must be a whole number of steps, got {count}")
            c.tensor(f"{at}.exp_avg", entry["exp_avg"], p.dtype, p.shape, finite=True)
            sq = c.tensor(f"{at}.exp_avg_sq", entry["exp_avg_sq"], p.dtype, p.shape, finite=True)
            if bool((sq < 0).any()):
                c.fail(f"{at}.exp_avg_sq", "holds negative values (a mean of squares)")


def _check_lr(c: _Checker, where: str, g: dict, config) -> None:
    lr = c.number(f"{where}.lr", g["lr"], 0.0)
    if lr <= 0:
        c.fail(f"{where}.lr", f"must be positive, got {lr}")
    if config is None:
        return
    if config.lr_final is None:
        if lr != config.lr:
            c.fail(f"{where}.lr", f"{lr} is not the run's lr {config.lr}")
        return
    if "initial_lr" in g and g["initial_lr"] != config.lr:
        c.fail(f"{where}.initial_lr", f"{g['initial_lr']!r} is not the run's lr {config.lr}")
    low, high = sorted((config.lr, config.lr_final))
    if not low * (1 - 1e-9) <= lr <= high * (1 + 1e-9):  # the decay lr -> lr_final, float round-off aside
        c.fail(f"{where}.lr", f"{lr} is outside the run's schedule from {config.lr} to {config.lr_final}")


def _check_schedulers(c: _Checker, scheds, n_optimizers: int, config, step: int) -> None:
    c.kind("lr_schedulers", scheds, list, "a list")
    want = n_optimizers if getattr(config, "lr_final", None) is not None else 0 if config is not None else len(scheds)
    if len(scheds) != want:
        c.fail("lr_schedulers", f"{len(scheds)} schedulers, expected {want}")
    for i, s in enumerate(scheds):
        where = f"lr_schedulers[{i}]"
        c.keys(where, s, ("base_lrs", "last_epoch", "_step_count", "_get_lr_called_within_step", "_last_lr",
                          "lr_lambdas"), ("_is_initial", "verbose"))
        if not (isinstance(s["base_lrs"], list) and len(s["base_lrs"]) == 1
                and (config is None or s["base_lrs"][0] == config.lr)):
            c.fail(f"{where}.base_lrs", f"must be [the run's lr], got {str(s['base_lrs'])[:60]}")
        c.integer(f"{where}.last_epoch", s["last_epoch"], 0, step)
        c.integer(f"{where}._step_count", s["_step_count"], 0, step + 1)
        for key in ("_get_lr_called_within_step", "_is_initial", "verbose"):
            if key in s:
                c.kind(f"{where}.{key}", s[key], bool, "true or false")
        if not (isinstance(s["_last_lr"], list) and len(s["_last_lr"]) == 1):
            c.fail(f"{where}._last_lr", f"must be a list of one rate, got {str(s['_last_lr'])[:60]}")
        c.number(f"{where}._last_lr[0]", s["_last_lr"][0], 0.0)
        if s["lr_lambdas"] != [None]:
            c.fail(f"{where}.lr_lambdas", f"must be [None], got {str(s['lr_lambdas'])[:60]}")


def _check_callbacks(c: _Checker, callbacks, config, epoch: int) -> None:
    c.kind("callbacks", callbacks, dict, "a dict")
    for key, state in callbacks.items():
        where = f"callbacks[{str(key)[:40]!r}]"
        if not isinstance(key, str):
            c.fail("callbacks", f"a state key must be a string, got {_describe(key)}")
        if key.startswith("ModelCheckpoint"):
            c.keys(where, state, ("monitor", "best_model_score", "best_model_path", "current_score", "dirpath",
                                  "best_k_models", "kth_best_model_path", "kth_value", "last_model_path"))
            if state["monitor"] is not None:
                c.fail(f"{where}.monitor", f"must be None (this program monitors nothing), got {state['monitor']!r}")
            for name in ("best_model_path", "kth_best_model_path", "last_model_path", "dirpath"):
                c.kind(f"{where}.{name}", state[name], str, "a string")
            # the checkpoint's own file or nothing: Lightning deletes an earlier "best" file it names
            for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if state[name] and os.path.basename(state[name]) != CHECKPOINT:
                    c.fail(f"{where}.{name}", f"must name a {CHECKPOINT}, got {state[name][:80]!r}")
            models = c.kind(f"{where}.best_k_models", state["best_k_models"], dict, "a dict")
            if any(not isinstance(k, str) or os.path.basename(k) != CHECKPOINT for k in models):
                c.fail(f"{where}.best_k_models", f"must name {CHECKPOINT} files only")
            for name in ("best_model_score", "current_score"):
                if state[name] is not None:
                    c.tensor(f"{where}.{name}", state[name], shape=())
            c.tensor(f"{where}.kth_value", state["kth_value"], shape=())
        elif key.startswith("EarlyStopping"):
            from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

            if config is not None and config.patience is None:
                c.fail(where, "an early-stopping state, but the run has no patience")
            c.keys(where, state, ("wait_count", "stopped_epoch", "best_score", "patience"),
                   ("stopping_reason", "stopping_reason_message"))
            patience = c.integer(f"{where}.patience", state["patience"], 1)
            if config is not None and patience != config.patience:
                c.fail(f"{where}.patience", f"{patience} is not the run's patience {config.patience}")
            c.integer(f"{where}.wait_count", state["wait_count"], 0, patience)
            c.integer(f"{where}.stopped_epoch", state["stopped_epoch"], 0, epoch)
            best = c.tensor(f"{where}.best_score", state["best_score"], shape=())
            if not best.is_floating_point() or bool(torch.isnan(best)):
                c.fail(f"{where}.best_score", f"must be a number (or -inf before any), got {best}")
            if "stopping_reason" in state:
                reason = c.integer(f"{where}.stopping_reason", state["stopping_reason"], 0, 2**31)
                if reason not in {r.value for r in EarlyStoppingReason}:
                    c.fail(f"{where}.stopping_reason", f"no such reason: {reason}")
            msg = state.get("stopping_reason_message")
            if msg is not None:
                c.kind(f"{where}.stopping_reason_message", msg, str, "a string or None")
        else:
            c.fail("callbacks", f"the state of an unknown callback {key[:60]!r}")


def _check_extras(c: _Checker, extra, step: int, epoch: int) -> None:
    c.keys("elbolab", extra, EXTRA_KEYS, EXTRA_OPTIONAL_KEYS)
    size = torch.get_rng_state().shape
    state = c.tensor("elbolab.torch_rng", extra["torch_rng"], torch.uint8, size)
    _check_torch_rng(c, "elbolab.torch_rng", state)
    if "torch_rng_ranks" in extra:
        ranks = c.tensor("elbolab.torch_rng_ranks", extra["torch_rng_ranks"], torch.uint8)
        if ranks.dim() != 2 or ranks.shape[1] != size[0] or not 1 <= ranks.shape[0] <= 2**16:
            c.fail("elbolab.torch_rng_ranks", f"must have shape (ranks, {size[0]}), got {tuple(ranks.shape)}")
        if not torch.equal(ranks[0], state):
            c.fail("elbolab.torch_rng_ranks", "its row of rank 0 is not torch_rng")
        for r in range(1, ranks.shape[0]):
            _check_torch_rng(c, f"elbolab.torch_rng_ranks[{r}]", ranks[r])
    _check_python_rng(c, extra["python_rng"])
    history = c.tensor("elbolab.history", extra["history"], torch.float64, (step, 4), finite=True)
    if not torch.equal(history[:, 0], torch.arange(1, step + 1, dtype=torch.float64)):
        c.fail("elbolab.history", f"its step column must be 1..{step}")
    epochs = history[:, 1]
    if bool(((epochs < 0) | (epochs > epoch) | (epochs != epochs.round())).any()) or \
            bool((epochs[1:] < epochs[:-1]).any()):
        c.fail("elbolab.history", f"its epoch column must be whole numbers rising from 0 to at most {epoch}")
    if bool((history[:, 3] < 0).any()):
        c.fail("elbolab.history", "its seconds column holds negative values")
    vals = c.tensor("elbolab.validations", extra["validations"], torch.float64)
    if vals.dim() != 2 or vals.shape[1] != 3:
        c.fail("elbolab.validations", f"must have shape (validations, 3), got {tuple(vals.shape)}")
    at = vals[:, 0]
    if not bool(torch.isfinite(at).all()) or bool(((at < 0) | (at > step) | (at != at.round())).any()):
        c.fail("elbolab.validations", f"its step column must be whole numbers in [0, {step}]")
    c.number("elbolab.seconds", extra["seconds"], 0.0)


def _check_torch_rng(c: _Checker, where: str, state: torch.Tensor) -> None:
    """torch's own check of a generator state (it refuses an invalid Mersenne Twister state)."""
    try:
        torch.Generator().set_state(state.clone())
    except (RuntimeError, ValueError) as e:
        c.fail(where, f"not a torch generator state ({str(e).strip()[:80]})")


def _check_python_rng(c: _Checker, state) -> None:
    where = "elbolab.python_rng"
    ok = (isinstance(state, tuple) and len(state) == 3 and state[0] == 3 and isinstance(state[1], tuple)
          and len(state[1]) == 625 and all(isinstance(v, int) and not isinstance(v, bool) for v in state[1])
          and (state[2] is None or isinstance(state[2], float)))
    if not ok:
        c.fail(where, "must be Python's random state (3, a tuple of 625 integers, None or a float)")
    try:
        random.Random().setstate(state)
    except (ValueError, TypeError, OverflowError) as e:
        c.fail(where, f"not a state of Python's random ({str(e).strip()[:80]})")


def for_lightning(ck: dict) -> dict:
    """The checked checkpoint as Lightning is to restore it: ModelCheckpoint's own state
    left out (this program keeps one fixed file, and Lightning would delete the file
    an earlier "best" path names)."""
    out = dict(ck)
    out["callbacks"] = {k: v for k, v in ck["callbacks"].items() if not k.startswith("ModelCheckpoint")}
    return out


def checkpoint_io(preloaded: dict | None = None):
    """Lightning's checkpoint plugin: atomic writes; reads go through :func:`load_checkpoint`,
    or return ``preloaded`` ({path: checkpoint}, already checked) for its path."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    given = {os.path.abspath(p): ck for p, ck in (preloaded or {}).items()}

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            atomic_torch_save(checkpoint, str(path))

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            ck = given.get(os.path.abspath(str(path)))
            return ck if ck is not None else load_checkpoint(str(path))

    return AtomicCheckpointIO()


def history_to_tensor(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([[r["step"], r["epoch"], r["loss"], r["seconds"]] for r in rows],
                        dtype=torch.float64).reshape(-1, 4)


def history_from_tensor(t: torch.Tensor) -> list[dict]:
    return [{"step": int(s), "epoch": int(e), "loss": float(l), "seconds": float(sec)}
            for s, e, l, sec in t.tolist()]



def write_history(rows: list[dict], validations: list[dict], path: str) -> None:
    """history.csv: one row per step, nats per datapoint, higher is better: the training
    bound (the objective's value on the step's mini-batch, scaled to the data set), and the
    validation ELBO with its standard error where measured."""
    val_at = {v["step"]: v for v in validations}
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "train_bound", "seconds", "val_elbo", "val_elbo_se"])
        for r in rows:
            v = val_at.get(r["step"])
            w.writerow([r["step"], r["epoch"], f"{-r['loss']:.6f}", f"{r['seconds']:.4f}",
                        "" if v is None else f"{v['val_elbo']:.6f}",
                        "" if v is None else f"{v['val_elbo_se']:.6f}"])

