"""A Pyro user's model and guide, with the data they are fit to, as a workbench model.

Users write a model and a guide for ``SVI.step(*args, **kwargs)``: plain functions or
``PyroModule``s, ``pyro.param`` / ``pyro.module`` or ``AutoGuide``s, the observed rows
inside ``pyro.plate(plate, ...)``. :class:`UserModel` makes such a pair a
``models.protocol.Model`` without asking anything more of it:

* the plate's size N is read from one run of the model on the user's arguments (it
  stops as soon as the plate is built);
* every tensor argument (positional or keyword) whose first dimension is N is data: a
  row of the data set is the concatenation of those arguments' rows, flattened, so the
  workbench sees one matrix (N, D) and mini-batches it like any other; the model and
  the guide get their arguments back, cut to the batch's rows, in their own shapes and
  dtypes. The other arguments are passed unchanged to every call;
* parameters: the user's ``nn.Module``s (a ``PyroModule``, an ``AutoGuide``, the
  module a bound method belongs to) are submodules, and the parameters the pair takes
  from Pyro's parameter store are made ``nn.Parameter``s held here *and* left in the
  store: the optimizer trains the user's own tensors, so after a fit the user's guide
  holds the trained values, as after ``SVI.step``.

An ``AutoGuide`` over local latents builds its parameters for the plate's full size at
its first call: :meth:`UserModel.prepare` runs it once on every row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from elbolab.inference.errors import UsageError
from elbolab.inference.traces import DATA_PLATE, batch, plate_nesting, trace_pair
from elbolab.models.protocol import StaticSteps


class _PlateFound(Exception):
    def __init__(self, size: int):
        self.size = size


class _StopAtPlate(Messenger):
    def __init__(self, plate: str):
        super().__init__()
        self.plate = plate

    def _pyro_sample(self, msg) -> None:
        if msg["name"] == self.plate and isinstance(msg["fn"], _Subsample):
            raise _PlateFound(int(msg["fn"].size))


def plate_size(fn: Callable, args: tuple, kwargs: dict, plate: str = DATA_PLATE) -> int:
    """The declared size of ``fn``'s plate named ``plate`` on these arguments (the run stops
    as soon as the plate is built). UsageError if ``fn`` builds no such plate."""
    try:
        with poutine.block(), torch.no_grad(), torch.random.fork_rng(), _StopAtPlate(plate):
            fn(*args, **kwargs)
    except _PlateFound as found:
        return found.size
    raise UsageError(f"the model builds no pyro.plate({plate!r}, ...): the workbench needs the observed rows inside "
                     f"a plate (its name is the plate argument, {plate!r} by default)")


@dataclass(frozen=True)
class Column:
    """Where a data argument goes: ``key`` (position or keyword), its shape after the row
    dimension and its dtype; its columns in a packed row are ``start:stop``."""

    key: int | str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    stop: int


def _module_of(fn) -> torch.nn.Module | None:
    if isinstance(fn, torch.nn.Module):
        return fn
    if inspect.ismethod(fn) and isinstance(fn.__self__, torch.nn.Module):
        return fn.__self__
    return None


class UserModel(torch.nn.Module):
    """``model`` and ``guide`` (as for ``SVI.step(*args, **kwargs)``) with the data ``args``
    / ``kwargs`` they are fit to: a workbench model over the packed rows of that data.

    ``plate``: the name of the plate over the data's rows. ``rows`` (N, D), the packed
    data, is what the workbench trains on (:meth:`pack` packs other data of the same
    layout, e.g. held-out rows)."""

    def __init__(self, model: Callable, guide: Callable, args: tuple = (), kwargs: dict | None = None,
                 plate: str = DATA_PLATE):
        super().__init__()
        kwargs = dict(kwargs or {})
        for name, fn in (("model", model), ("guide", guide)):
            if not callable(fn):
                raise UsageError(f"{name} must be callable (a function or a PyroModule), got {type(fn).__name__}")
        if not isinstance(plate, str) or not plate:
            raise UsageError(f"plate must be a plate's name, got {plate!r}")
        self.user_model, self.user_guide = model, guide
        self.data_plate = plate
        self.model_modules = torch.nn.ModuleList()
        for fn in (model, guide):
            mod = _module_of(fn)
            if mod is not None and not any(mod is m for m in self.model_modules):
                self.model_modules.append(mod)
        self.store_params = torch.nn.ParameterDict()
        self.n_data = plate_size(model, args, kwargs, plate)
        _subsampling_plates(guide, plate, self.n_data)
        n = self.n_data
        data = [(i, a) for i, a in enumerate(args)] + list(kwargs.items())
        columns, start = [], 0
        for key, v in data:
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
                width = int(v[0].numel()) if n else int(torch.Size(v.shape[1:]).numel())
                columns.append(Column(key, tuple(v.shape[1:]), v.dtype, start, start + width))
                start += width
        if not columns:
            raise UsageError(f"no argument of the model has {n} rows (the size of pyro.plate({plate!r})): "
                             "pass the observed data as tensors whose first dimension is the plate's")
        self.columns = tuple(columns)
        self.data_dim = start
        self.constants = {key: v for key, v in data if not any(c.key == key for c in columns)}
        self.n_args = len(args)
        self.dtype = torch.float64 if any(_needs_float64(v) for k, v in data if any(c.key == k for c in columns)) \
            else torch.get_default_dtype()
        self.rows = self.pack(*args, **kwargs)
        self.max_plate_nesting = 1
        self.sequential_particles = False  # measured by prepare()
        # the user's declaration that the loss repeats its tensor operations from step to
        # step (models.protocol.StaticSteps): ``static_steps = True`` on the model
        self.static_steps = isinstance(model, StaticSteps) and model.static_steps is True

    # -- packing ---------------------------------------------------------------------

    def pack(self, *args, **kwargs) -> torch.Tensor:
        """The rows (M, D) of data with this model's layout: the same arguments, the data
        ones with M rows each (the others are this model's own and are not read)."""
        parts = []
        m = None
        for c in self.columns:
            v = args[c.key] if isinstance(c.key, int) and c.key < len(args) else kwargs.get(c.key) \
                if isinstance(c.key, str) else None
            if not isinstance(v, torch.Tensor):
                raise UsageError(f"argument {c.key!r} must be a tensor of rows shaped (M, {', '.join(map(str, c.shape))})"
                                 .replace(", )", ")"))
            if tuple(v.shape[1:]) != c.shape:
                raise UsageError(f"argument {c.key!r} has rows of shape {tuple(v.shape[1:])}; the model was fit to "
                                 f"rows of shape {c.shape}")
            if m is None:
                m = int(v.shape[0])
            elif int(v.shape[0]) != m:
                raise UsageError(f"the data arguments have different numbers of rows ({m} and {v.shape[0]})")
            parts.append(v.reshape(m, -1).to(self.dtype))
        return torch.cat(parts, 1)

    def unpack(self, x: torch.Tensor) -> tuple[tuple, dict]:
        """The model's arguments for the rows x (B, D): the data cut to these rows, in their
        own shapes and dtypes, and the other arguments as given."""
        b = int(x.shape[0])
        values: dict[int | str, Any] = dict(self.constants)
        for c in self.columns:
            v = x[:, c.start:c.stop].reshape((b,) + c.shape)
            if c.dtype == torch.bool:
                v = v > 0.5
            elif not c.dtype.is_floating_point:
                v = v.round().to(c.dtype)
            elif v.dtype != c.dtype:
                v = v.to(c.dtype)
            values[c.key] = v
        args = tuple(values[i] for i in range(self.n_args))
        kwargs = {k: v for k, v in values.items() if isinstance(k, str)}
        return args, kwargs

    # -- the contract ----------------------------------------------------------------

    def model(self, x: torch.Tensor):
        args, kwargs = self.unpack(x)
        return self.user_model(*args, **kwargs)

    def guide(self, x: torch.Tensor):
        args, kwargs = self.unpack(x)
        return self.user_guide(*args, **kwargs)

    @torch.no_grad()
    def prepare(self) -> None:
        """Run the guide and the model once on every row: an ``AutoGuide`` builds its
        parameters (for the plate's full size), the plate nesting is read, and the
        parameters the pair takes from Pyro's parameter store are held here."""
        x = self.rows
        with poutine.block(), torch.random.fork_rng(), batch(self, x):
            guide_tr = poutine.trace(self.guide).get_trace(x)
            model_tr = poutine.trace(poutine.replay(self.model, trace=guide_tr)).get_trace(x)
        self.max_plate_nesting = max(1, plate_nesting(guide_tr, model_tr))
        self.sequential_particles = not self._vectorizes()
        own = {id(p) for p in self.model_modules.parameters()}
        store = pyro.get_param_store()
        for tr in (guide_tr, model_tr):
            for name, site in tr.nodes.items():
                if site["type"] != "param" or name not in store:
                    continue
                unconstrained = store._params[name]
                if id(unconstrained) in own or _key(name) in self.store_params:
                    continue
                if not isinstance(unconstrained, torch.nn.Parameter):  # held here and left in the store
                    param = torch.nn.Parameter(unconstrained.detach())
                    store._params[name] = param
                    store._param_to_name.pop(unconstrained, None)
                    store._param_to_name[param] = name
                    unconstrained = param
                self.store_params[_key(name)] = unconstrained


    def _vectorizes(self) -> bool:
        """Whether the model and guide run under a vectorized particles plate (Pyro users'
        models often do not: ``X @ w`` with w a latent vector); measured on two rows."""
        x = self.rows[:2]
        try:
            with poutine.block(), torch.no_grad(), torch.random.fork_rng(), batch(self, x):
                trace_pair(self.model, self.guide, (x,), 2, self.max_plate_nesting)
        except (RuntimeError, ValueError, IndexError):
            return False
        return True


class _FullPlate:
    """An ``AutoGuide``'s ``create_plates``: the data plate at its full size, with no
    subsample size of its own, so that a mini-batch's indices (set by the workbench)
    subsample the guide's per-row parameters."""

    def __init__(self, plate: str, size: int):
        self.plate, self.size = plate, size

    def __call__(self, *args, **kwargs):
        return pyro.plate(self.plate, self.size)


def _subsampling_plates(guide, plate: str, size: int) -> None:
    """An ``AutoGuide`` made without ``create_plates`` builds its plates at the size of its
    first call and cannot be subsampled (Pyro's convention: the user passes
    ``create_plates`` for that); give it the data plate at its full size."""
    from pyro.infer.autoguide import AutoGuide

    if isinstance(guide, AutoGuide) and guide.create_plates is None and guide.master is None:
        guide.create_plates = _FullPlate(plate, size)


def _key(name: str) -> str:
    """A parameter-store name as a module attribute name (no dots)."""
    return name.replace(".", "$")


def _needs_float64(v: torch.Tensor) -> bool:
    """Whether a data argument's values survive float32 only in float64."""
    if v.dtype == torch.float64:
        return True
    if v.dtype.is_floating_point or v.dtype == torch.bool or v.numel() == 0:
        return False
    return bool(v.abs().max() >= 2**24)  # integers past float32's exact range
