"""Pieces the model families share: Config JSON round trip, MLPs, Gaussian guides, and
the observation distributions of the decoders (Bernoulli, continuous Bernoulli, Gaussian
with a shared scale), each fast when its parameters carry a particles dimension the
observation lacks.

Nothing here imports ``inference``; nothing here owns an optimizer or a loop.
"""

from __future__ import annotations

import contextlib
import contextvars
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


# What the caller of ``checked_rows`` said of the rows (None outside): per thread and
# per asynchronous context, as the statement holds only for the caller's own run
_CHECKED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("elbolab_checked_rows", default=None)


@contextlib.contextmanager
def checked_rows(binary: bool):
    """Inside, the rows a model is run on have been checked by the caller (the training
    driver, once for the whole training set): their positions lie in the training set,
    and with ``binary`` their values are 0 or 1. The per-batch checks that would read
    those facts back from the tensors are skipped: each costs a host synchronization, and
    a value read into Python keeps a step's operations from being recorded and replayed
    (``inference.replay``). What is computed is the same: the checks only choose the
    formula or refuse."""
    token = _CHECKED.set(bool(binary))
    try:
        yield
    finally:
        _CHECKED.reset(token)


def known_binary() -> bool:
    """Whether the caller has checked that the observed rows are 0 or 1 (``checked_rows``)."""
    return _CHECKED.get() is True


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
        if not known_binary() and not bool(torch.all((value == 0) | (value == 1))):  # (the small observation)
            return value * logits - F.softplus(logits)
        lp = F.logsigmoid(logits * (2.0 * value - 1.0))  # (..., D)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))


# Below this |logit| the continuous Bernoulli's functions of the logits use their Taylor
# series (each to the term whose successor is below 1e-15 there: float64 round-off); at
# and above it the closed forms, whose cancellation costs a few ulps of |log 0.1| at most.
CB_TAYLOR = 0.1


def _log_sinhc_half(a: torch.Tensor) -> torch.Tensor:
    """h(a) = log(sinh(a/2) / (a/2)) for a = |logit| >= 0, elementwise, same shape.

    h(a) = a/2 + log((1 - e^-a) / a) (exact; no overflow for any finite a), and for
    a < ``CB_TAYLOR`` its series a^2/24 - a^4/2880 + a^6/181440 - a^8/9676800 (the
    closed form would take the difference of two logs of size |log a|). The closed form
    is evaluated at max(a, CB_TAYLOR) so that neither branch makes an infinite or NaN
    gradient.
    """
    safe = a.clamp_min(CB_TAYLOR)
    closed = 0.5 * safe + torch.log(-torch.expm1(-safe) / safe)
    a2 = a * a
    series = a2 * (1.0 / 24 + a2 * (-1.0 / 2880 + a2 * (1.0 / 181440 + a2 * (-1.0 / 9676800))))
    return torch.where(a < CB_TAYLOR, series, closed)


def cb_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), lambda =
    sigmoid(logits), elementwise (same shape as ``logits``).

    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) (and 2 at lambda = 1/2). With
    1 - 2 lambda = -tanh(l/2) and artanh(1 - 2 lambda) = -l/2 this is l coth(l/2), even
    in l, so with a = |l|

        log C = log1p(e^-a) - log((1 - e^-a) / a)      (a >= ``CB_TAYLOR``)
              = log 2 + a^2/12 - 7 a^4/1440 + 31 a^6/90720 - 127 a^8/4838400   (below)

    finite and accurate for any finite logit: log C ~ log a for large a, with nothing of
    size a cancelling (log C(1e4) = log 1e4 to float32's precision in float32).
    """
    a = logits.abs()
    safe = a.clamp_min(CB_TAYLOR)  # the closed form never sees a small a (no NaN gradient either)
    closed = torch.log1p(torch.exp(-safe)) - torch.log(-torch.expm1(-safe) / safe)
    a2 = a * a
    series = math.log(2.0) + a2 * (1.0 / 12 + a2 * (-7.0 / 1440 + a2 * (31.0 / 90720 + a2 * (-127.0 / 4838400))))
    return torch.where(a < CB_TAYLOR, series, closed)


class ContinuousBernoulliLogits(dist.TorchDistribution):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) on [0, 1], elementwise,
    parameterized by logits l = log(lambda / (1 - lambda)); batch shape = logits' shape.

    p(x | lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x). Since x l - softplus(l) =
    x log lambda + (1 - x) log(1 - lambda) and softplus(l) + log C(lambda) = l/2 + h(|l|)
    with h(a) = log(sinh(a/2) / (a/2)) (``cb_log_normalizer``),

        log p(x | l) = (x - 1/2) l - h(|l|):

    one product with the observation and one even function of the logits, finite for
    every finite logit. With logits (K, B, D) and x (B, D) (vectorized particles) x is
    broadcast in that one product only: about 3 times faster than torch's
    ``ContinuousBernoulli`` (measured 90-97 against 250-340 ms on 53 x 100 x 784 values,
    one thread), which also clamps lambda to [eps, 1 - eps]: its log density is off by
    3e-5 nats at |l| = 30 in float64, by 0.004 at |l| = 16 and 0.23 at 20 in float32.

    Mean: E[x] = 1 / (1 - e^-l) - 1 / l (its series 1/2 + l/12 - l^3/720 + l^5/30240 -
    l^7/1209600 for |l| < ``CB_TAYLOR``); the variance is dE[x]/dl (an exponential family
    in l). Draws by the inverse CDF, x = log1p(u (e^l - 1)) / l for u ~ U(0, 1), written
    for l < 0 and mirrored (x(l, u) = 1 - x(-l, 1 - u)) for l > 0, so nothing overflows;
    they are reparameterized (``rsample``).
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ContinuousBernoulliLogits, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape)
        super(ContinuousBernoulliLogits, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        l = self.logits
        safe = torch.where(l.abs() < CB_TAYLOR, torch.full_like(l, CB_TAYLOR), l)
        closed = -1.0 / torch.expm1(-safe) - 1.0 / safe
        l2 = l * l
        series = 0.5 + l * (1.0 / 12 + l2 * (-1.0 / 720 + l2 * (1.0 / 30240 + l2 * (-1.0 / 1209600))))
        return torch.where(l.abs() < CB_TAYLOR, series, closed)

    def log_normalizer(self) -> torch.Tensor:
        """log C(lambda), batch shape."""
        return cb_log_normalizer(self.logits)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        l = self.logits
        lp = (value - 0.5) * l - _log_sinhc_half(l.abs())  # broadcast shape of value and logits
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """The quantile function at u in [0, 1] (broadcast with the batch shape)."""
        l = self.logits
        neg = l < 0
        a = l.abs().clamp_min(1e-30)  # at l = 0 exactly the limit is x = u (below)
        v = torch.where(neg, u, 1.0 - u)  # the mirrored draw for l > 0
        y = torch.log1p(v * torch.expm1(-a)) / (-a)  # the quantile at -a: in [0, 1]
        x = torch.where(neg, y, 1.0 - y)
        return torch.where(l == 0, u.expand_as(x), x)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)
        return self.icdf(u).clamp(0.0, 1.0)


class SharedScaleNormal(dist.TorchDistribution):
    """N(loc, diag(scale^2)) over the last dimension of ``loc`` (..., D), with one
    ``scale`` for every batch member: a scalar () (isotropic, scale^2 I) or one per
    feature (D,). Batch shape loc.shape[:-1], event shape (D,).

        log p(x) = -1/2 sum_d ((x_d - loc_d) / scale_d)^2 - sum_d log scale_d - D/2 log(2 pi)

    The log-determinant term is computed once from the (D,) or () scale and not over the
    batch: with loc (K, B, D) and x (B, D) (vectorized particles) the log density makes
    one pass of three elementwise operations and a sum over the broadcast shape, about
    2.3 times faster than ``Normal(loc, scale).to_event(1)`` (measured 20 against 47 ms
    on 53 x 100 x 784 values, one thread, scale () or (D,)).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        if loc.dim() < 1 or scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != loc.shape[-1]):
            raise ValueError(f"expected loc (..., D) and scale () or (D,); got {tuple(loc.shape)}, "
                             f"{tuple(scale.shape)}")
        self.loc, self.scale = loc, scale
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SharedScaleNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.scale = self.scale
        super(SharedScaleNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.pow(2).expand(self.loc.shape)

    def half_log_det(self) -> torch.Tensor:
        """(1/2) log det diag(scale^2) = sum_d log scale_d: ()."""
        D = self.event_shape[0]
        return self.scale.log().sum() if self.scale.dim() else D * self.scale.log()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        D = self.event_shape[0]
        quad = ((value - self.loc) / self.scale).square().sum(-1)  # broadcast batch shape
        lp = -0.5 * quad - self.half_log_det() - 0.5 * D * math.log(2 * math.pi)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale


DATA_PLATE = "data"


def data_plate(x: torch.Tensor):
    """``pyro.plate("data", len(x))`` over the rows of x (dim -1). Its indices are the rows'
    positions in the training set when the workbench runs a mini-batch (it conditions
    them), 0..B-1 otherwise: what per-datapoint tables are indexed by."""
    return pyro.plate(DATA_PLATE, x.shape[0], dim=-1)


def _check_rows(rows: torch.Tensor, n_data: int) -> torch.Tensor:
    if _CHECKED.get() is not None:  # the training driver's rows: positions in the training set
        return rows
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
