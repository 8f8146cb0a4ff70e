"""Pieces the model families share: Config JSON round trip, MLPs, Gaussian guides.

Nothing here imports ``inference``; nothing here owns an optimizer or a loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Sequence, TypeVar

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints, transform_to

from elbolab.models.errors import ConfigError

C = TypeVar("C")

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def param(default, help: str, **metadata):
    """A Config field with its help text (and e.g. ``choices``): a Config is declared once,
    and the command line's flags and their help are generated from its fields."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def field_types(cls) -> dict[str, Any]:
    """Each field of a Config dataclass and its type (annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _accepts(kind, value) -> bool:
    """Whether a JSON value is of the annotated type: int (not bool, not 2.0), float (any
    finite number, ints included), str, bool, tuple[int, ...] (a list or tuple of ints),
    and X | None."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(_accepts(k, value) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if typing.get_origin(kind) is tuple:
        (item, *_), = [typing.get_args(kind)]
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    return True


def describe_type(kind) -> str:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return " or ".join(describe_type(k) for k in typing.get_args(kind))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(kind, "a list of integers" if typing.get_origin(kind) is tuple else str(kind))


def config_to_dict(config) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """Build a frozen Config from a dict (e.g. parsed JSON): unknown keys and values of the
    wrong type (``latent_dim: 2.0``, ``hidden: "x"``) are ConfigErrors naming the field;
    the Config's own checks then see well-typed values."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__} must be an object of fields, got {type(d).__name__}")
    kinds = field_types(cls)
    unknown = sorted(set(d) - set(kinds))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    kw = {}
    for k, v in d.items():
        if not _accepts(kinds[k], v):
            raise ConfigError(f"{k} must be {describe_type(kinds[k])}, got {json.dumps(v, default=str)[:60]}")
        kw[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def config_to_json(config) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)


def config_from_json(cls: type[C], text: str) -> C:
    return config_from_dict(cls, json.loads(text))


def mlp(sizes: Sequence[int], activation: str = "relu", final_activation: bool = False) -> nn.Sequential:
    """Linear layers through ``sizes`` with ``activation`` between them."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class BernoulliLogits(dist.Bernoulli):
    """``Bernoulli(logits=...)`` with a faster ``log_prob`` when the logits carry more
    dimensions than the observation (vectorized particles: logits (K, B, D), x (B, D)).

    For x in {0, 1}, log p(x | l) = log sigmoid((2x - 1) l): one product and one
    ``logsigmoid`` over the logits, each exact (sigmoid's argument carries the sign,
    so nothing cancels). torch's ``binary_cross_entropy_with_logits`` broadcasts the
    observation to the logits' shape and makes several passes: about twice the time
    on the 53 x 100 x 784 logits of an importance-sampled evaluation chunk (measured
    26 against 13 ms, one thread). Without such a broadcast (one particle) torch's
    kernel is as fast and the binary check would cost more than it saves, so
    ``dist.Bernoulli``'s formula is used; likewise for values outside {0, 1} (outside
    the support, refused when validation is on), which get x l - softplus(l).
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.logits
        if logits.numel() <= value.numel():
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        if not bool(torch.all((value == 0) | (value == 1))):  # a pass over the (small) observation
            return value * logits - F.softplus(logits)
        lp = F.logsigmoid(logits * (2.0 * value - 1.0))  # (..., D)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))


DATA_PLATE = "data"


def data_plate(x: torch.Tensor):
    """``pyro.plate("data", len(x))`` over the rows of x (dim -1). Its indices are the rows'
    positions in the training set when the workbench runs a mini-batch (it conditions
    them), 0..B-1 otherwise: what per-datapoint tables are indexed by."""
    return pyro.plate(DATA_PLATE, x.shape[0], dim=-1)


def _check_rows(rows: torch.Tensor, n_data: int) -> torch.Tensor:
    if rows.numel() and int(rows.max()) >= n_data:
        raise ValueError(f"row index {int(rows.max())} of a table of {n_data} rows: a per-datapoint guide "
                         "cannot infer rows it was not trained on")
    return rows


class PerDatapointNormal(PyroModule):
    """q(z_i) = N(loc_i, diag scale_i^2), one (loc, scale) per training row.

    A table of ``n_data`` x ``latent_dim`` locations and scales, indexed by the
    subsampled plate's row indices; it cannot infer a row it has not seen.

    A mini-batch reads only its B rows of the unconstrained table and transforms
    those (O(B), not O(n_data), per step). With ``sparse = True`` (what
    ``nn.Embedding(sparse=True)`` means) the gradient of the table is a sparse
    tensor holding those B rows, so a trainer can update and communicate only them;
    with the default ``False`` it is the usual dense tensor.
    """

    amortized = False
    sparse = False

    def __init__(self, n_data: int, latent_dim: int, init_scale: float = 0.1):
        super().__init__()
        self.n_data, self.latent_dim = n_data, latent_dim
        self.loc = PyroParam(torch.zeros(n_data, latent_dim))
        self.scale = PyroParam(torch.full((n_data, latent_dim), init_scale), constraint=constraints.positive)

    def dist(self, rows: torch.Tensor) -> dist.Distribution:
        """q(z_i) of the training rows ``rows`` (B,): batch (B,), event (latent_dim,)."""
        idx = _check_rows(rows, self.n_data)
        loc = self._rows("loc", idx, constraints.real)  # (B, latent_dim)
        scale = self._rows("scale", idx, constraints.positive)  # (B, latent_dim)
        return dist.Normal(loc, scale).to_event(1)  # (B,) x (latent_dim,)

    def _rows(self, name: str, idx: torch.Tensor, constraint) -> torch.Tensor:
        """The rows ``idx`` of the PyroParam ``name``, read from its unconstrained
        table and transformed as PyroParam transforms the whole table."""
        raw = getattr(self, name + "_unconstrained")  # (n_data, latent_dim)
        rows = torch.nn.functional.embedding(idx, raw, sparse=self.sparse)  # (B, latent_dim)
        return transform_to(constraint)(rows)

    @torch.no_grad()
    def initialize(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Set every row's loc and scale, e.g. from an encoder's output."""
        self.loc = loc.detach().clone()
        self.scale = scale.detach().clone()


class PerDatapointMultivariateNormal(PyroModule):
    """q(z_i) = N(loc_i, L_i L_i^T), one loc (latent_dim,) and one lower-triangular
    scale (latent_dim, latent_dim) per training row: the per-datapoint guide with a
    full covariance (its family holds any Gaussian posterior, row by row)."""

    amortized = False

    def __init__(self, n_data: int, latent_dim: int, init_scale: float = 0.1):
        super().__init__()
        self.n_data, self.latent_dim = n_data, latent_dim
        self.loc = PyroParam(torch.zeros(n_data, latent_dim))
        eye = torch.eye(latent_dim).expand(n_data, latent_dim, latent_dim)
        self.scale_tril = PyroParam(init_scale * eye, constraint=constraints.lower_cholesky)

    def dist(self, rows: torch.Tensor) -> dist.Distribution:
        """q(z_i) of the training rows ``rows`` (B,): batch (B,), event (latent_dim,)."""
        idx = _check_rows(rows, self.n_data)
        # only the batch's rows are read and transformed (not the whole n_data x k x k table)
        loc = self.loc_unconstrained[idx]  # (B, latent_dim); constraint real: stored as is
        scale_tril = transform_to(constraints.lower_cholesky)(self.scale_tril_unconstrained[idx])  # (B, k, k)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)  # (B,) x (latent_dim,)

    @torch.no_grad()
    def initialize(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        """Set every row's loc (n_data, k) and scale_tril ((n_data, k, k) or one (k, k) for all)."""
        self.loc = loc.detach().clone()
        self.scale_tril = scale_tril.detach().expand(self.n_data, self.latent_dim, self.latent_dim).clone()
