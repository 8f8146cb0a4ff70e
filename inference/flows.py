"""Flow guides: q(z|x) an inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen,
Sutskever & Welling 2016) on top of a Gaussian, amortized or per datapoint.

An IAF step maps z to z' = loc(z) + exp(log_scale(z)) * z, coordinate by coordinate, where
loc_j and log_scale_j depend only on the coordinates before j in the step's order (a
masked network, MADE: Germain, Gregor, Murray & Larochelle 2015). Its Jacobian is
triangular with diagonal exp(log_scale), so for z_0 ~ q_0 and z_L = f_L(...f_1(z_0))::

    log q(z_L) = log q_0(z_0) - sum_l sum_j log_scale_lj(z_{l-1}),

known at the draw in one pass per step. Density at any other point needs the inverse,
k sequential passes per step (k the latent dimension). Successive steps alternate the
order (identity, reversed).

* :class:`IAFGuide`: amortized. q_0 is the model's own guide q(z|x) (its Gaussian
  encoder), followed by ``layers`` of Pyro's ``ConditionalAffineAutoregressive`` whose
  ``ConditionalAutoRegressiveNN`` reads a context: the encoder's (loc, log scale) or x.
  The last layer of each network starts at zero, so the guide starts as the encoder.
  Trained with the model by ``inference.train.fit`` under every objective
  (``iwae-dreg`` through :meth:`FlowDistribution.with_detached_parameters`).
* :class:`PerDatapointFlowGuide`: one flow per row: a diagonal Gaussian q_0 and
  ``layers`` masked affine autoregressive steps, every weight a table with the row as its
  first dimension (N, ...), applied to a batch of rows as one batched product
  (:class:`RowFlow`). :func:`optimize_local_flow` optimizes it for a fixed model (q* of
  the flow family for the gap decomposition of Cremer, Li & Duvenaud 2018, who optimize
  a flow per datapoint), with the loop of ``inference.guides.optimize_local``.

Neither has a closed-form entropy or ELBO: ``inference.guides.local_elbo`` uses the Monte
Carlo -log q of its draws, and the closed-form ``exact_elbo`` of a model (PPCA) does not
apply (these guides raise AttributeError for it, so ``inference.gaps`` estimates).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.distributions import constraints

from elbolab.inference.errors import UsageError
from elbolab.inference.guides import (MAX_ELEMENTS, LocalFit, LocalGuide, PerDatapointGuide, check_local_settings,
                                      fit_rows, loc_and_scale, materialize)
from elbolab.inference.traces import detach_distribution, guide_posterior

CONTEXTS = ("encoder", "x")


def _check_layers(layers, hidden) -> tuple[int, tuple[int, ...]]:
    if int(layers) != layers or layers < 1:
        raise UsageError(f"flow layers must be an integer >= 1, got {layers}")
    hidden = (int(hidden),) if isinstance(hidden, (int, float)) else tuple(int(h) for h in hidden)
    if not hidden or min(hidden) < 1:
        raise UsageError(f"flow hidden must be positive layer sizes, got {hidden}")
    return int(layers), hidden


class _NoClosedForm:
    """A flow's ELBO has no closed form: hide the model's Gaussian ``exact_elbo``."""

    @property
    def exact_elbo(self):
        raise AttributeError("a flow guide's ELBO has no closed form")

    @property
    def exact_elbo_of(self):
        raise AttributeError("a flow guide's ELBO has no closed form")


# ----------------------------------------------------------------------------- amortized: Pyro's IAF


class FlowDistribution(dist.TransformedDistribution):
    """A ``TransformedDistribution`` that can also give itself with every parameter
    detached (:meth:`with_detached_parameters`: the same density as a function of z, no
    gradient to the guide's parameters), what ``iwae-dreg``'s log q needs."""

    def __init__(self, base_distribution, transforms, detached: Callable[[], dist.Distribution] | None = None,
                 validate_args=None):
        super().__init__(base_distribution, transforms, validate_args=validate_args)
        self._detached = detached

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FlowDistribution, _instance)
        new = super().expand(batch_shape, _instance=new)
        if self._detached is not None:
            new._detached = lambda: self.with_detached_parameters().expand(batch_shape)
        else:
            new._detached = None
        return new

    def with_detached_parameters(self) -> dist.Distribution:
        if self._detached is None:
            raise UsageError("this flow cannot detach its parameters")
        return self._detached()


class IAFGuide(_NoClosedForm, LocalGuide):
    """q(z|x) = the model's guide q_0(z|x) (batch (B,), event (k,)) pushed through
    ``layers`` IAF steps (Pyro's ``ConditionalAffineAutoregressive``, hidden sizes
    ``hidden``), each conditioned on a context: ``"encoder"`` the (loc, log scale) of q_0
    (2k values; the diagonal of a full covariance), ``"x"`` the row itself (D values).
    The context keeps its gradient: the encoder learns what the flow reads. The flows'
    output layers start at zero (each step the identity), so q starts as q_0."""

    def __init__(self, model, layers: int = 2, hidden=(32,), context: str = "encoder"):
        super().__init__(model)
        layers, hidden = _check_layers(layers, hidden)
        if context not in CONTEXTS:
            raise UsageError(f"IAF context must be one of {', '.join(CONTEXTS)}, got {context!r}")
        if min(hidden) < self.latent_dim:
            raise UsageError(f"IAF hidden sizes {hidden} must be at least the latent dimension {self.latent_dim}")
        self.context, self.layers, self.hidden = context, layers, hidden
        k = self.latent_dim
        c = 2 * k if context == "encoder" else self.data_dim
        flows = []
        for i in range(layers):
            order = torch.arange(k) if i % 2 == 0 else torch.arange(k).flip(0)
            arn = ConditionalAutoRegressiveNN(k, c, list(hidden), permutation=order)
            nn.init.zeros_(arn.layers[-1].weight)  # (loc, log scale) = 0: the identity
            nn.init.zeros_(arn.layers[-1].bias)
            flows.append(ConditionalAffineAutoregressive(arn))
        param = next(iter(model.parameters()), None)
        self.flows = nn.ModuleList(flows).to(param.dtype if param is not None else torch.get_default_dtype())

    def context_of(self, x: torch.Tensor, q0: dist.Distribution) -> torch.Tensor:
        """The flows' context (B, c)."""
        if self.context == "x":
            return x
        loc, scale = loc_and_scale(q0, full=False)
        return torch.cat([loc, scale.log()], -1)

    def guide_dist(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> dist.Distribution:
        q0 = guide_posterior(self.base, x, rows, grad=torch.is_grad_enabled())
        ctx = self.context_of(x, q0)

        def detached() -> dist.Distribution:
            frozen = copy.deepcopy(self.flows).requires_grad_(False)  # today's values, cut from the parameters
            return FlowDistribution(detach_distribution(q0), [f.condition(ctx.detach()) for f in frozen])

        return FlowDistribution(q0, [f.condition(ctx) for f in self.flows], detached)  # batch (B,), event (k,)


# ----------------------------------------------------------------------------- per datapoint: batched MADE


def made_masks(k: int, hidden: int, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MADE masks for k inputs in ``order`` (order[0] first) through ``hidden`` units to 2k
    outputs (loc, log scale): (input -> hidden (hidden, k), hidden -> output (2k, hidden)),
    0/1. Output j sees hidden unit h only if h's degree is below j's position, and h sees
    input i only if i's position is at most h's degree, so output j depends on the
    inputs before j only. With k = 1 nothing is seen (a per-row affine map)."""
    degree_in = torch.empty(k, dtype=torch.long)
    degree_in[order] = torch.arange(1, k + 1)
    degree_h = torch.arange(hidden) % (k - 1) + 1 if k > 1 else torch.zeros(hidden, dtype=torch.long)
    mask_in = (degree_h[:, None] >= degree_in[None, :]).double()
    mask_out = (degree_in.repeat(2)[:, None] > degree_h[None, :]).double()
    return mask_in, mask_out


class RowFlow(TorchDistribution):
    """Per-row flows for B rows: z_0 = loc + scale * eps (eps ~ N(0, I)), then for each step
    l: z <- m_l(z) + exp(s_l(z)) * z, (m_l, s_l) = W2_l act(W1_l z + b1_l) + b2_l with
    masked per-row weights W1_l (B, H, k), b1_l (B, H), W2_l (B, 2k, H), b2_l (B, 2k).
    ``loc``, ``scale`` (B, k). Batch (..., B) (expandable on the left), event (k,).

    ``rsample`` keeps its last draw and log q; ``log_prob`` of that very tensor returns
    it, of any other value inverts the steps (k passes each)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, steps: list[tuple[torch.Tensor, ...]],
                 masks: list[tuple[torch.Tensor, torch.Tensor]], orders: list[torch.Tensor], batch_shape=None):
        B, k = loc.shape
        self.loc, self.scale, self.steps, self.masks, self.orders = loc, scale, steps, masks, orders
        batch_shape = torch.Size((B,) if batch_shape is None else batch_shape)
        if not batch_shape or batch_shape[-1] != B:
            raise UsageError(f"a RowFlow of {B} rows cannot have batch shape {tuple(batch_shape)}")
        super().__init__(batch_shape, torch.Size((k,)), validate_args=False)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def expand(self, batch_shape, _instance=None):
        return RowFlow(self.loc, self.scale, self.steps, self.masks, self.orders, batch_shape)

    def with_detached_parameters(self) -> "RowFlow":
        return RowFlow(self.loc.detach(), self.scale.detach(), [tuple(t.detach() for t in s) for s in self.steps],
                       self.masks, self.orders, self.batch_shape)

    def _shift_log_scale(self, z: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, s) of step i at z (..., B, k), each (..., B, k)."""
        w1, b1, w2, b2 = self.steps[i]
        mask_in, mask_out = self.masks[i]
        k = z.shape[-1]
        h = F.elu(torch.einsum("...bk,bhk->...bh", z, w1 * mask_in) + b1)
        out = torch.einsum("...bh,boh->...bo", h, w2 * mask_out) + b2
        return out[..., :k], out[..., k:]

    def _base(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + self.scale * eps
        log_q = self._base().log_prob(z)
        for i in range(len(self.steps)):
            m, s = self._shift_log_scale(z, i)
            z = m + s.exp() * z
            log_q = log_q - s.sum(-1)
        self._last = (z, log_q)
        return z

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._last is not None and value is self._last[0]:
            return self._last[1]
        y, log_det = value, 0.0
        for i in reversed(range(len(self.steps))):
            x = torch.zeros_like(y)
            for j in self.orders[i].tolist():  # coordinate j needs those before it only
                m, s = self._shift_log_scale(x, i)
                x = torch.where(torch.arange(y.shape[-1]) == j, (y - m) * torch.exp(-s), x)
            _, s = self._shift_log_scale(x, i)
            log_det = log_det + s.sum(-1)
            y = x
        return self._base().log_prob(y) - log_det


class PerDatapointFlowGuide(_NoClosedForm, LocalGuide):
    """q(z_i) a flow per row (:class:`RowFlow`): a diagonal Gaussian (loc_i, scale_i) and
    ``layers`` masked autoregressive affine steps of ``hidden`` units, every parameter a
    table over ``n_rows`` rows (the model's training rows by default). The output layers
    start at zero (q_i starts Gaussian); the first layers at N(0, 1/k) weights, the same
    for every row (seeded by ``seed``)."""

    def __init__(self, model, n_rows: int | None = None, layers: int = 2, hidden: int = 16, seed: int = 0):
        super().__init__(model, n_rows)
        layers, (hidden,) = _check_layers(layers, (hidden,))
        n, k = self.n_data, self.latent_dim
        self.n_rows, self.n_layers, self.hidden = n, layers, hidden
        param = next(iter(model.parameters()), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        g = torch.Generator().manual_seed(seed)
        self.loc = nn.Parameter(torch.zeros(n, k, dtype=dtype))
        self.log_scale = nn.Parameter(torch.zeros(n, k, dtype=dtype))
        self.w1, self.b1, self.w2, self.b2 = (nn.ParameterList() for _ in range(4))
        for i in range(layers):
            order = torch.arange(k) if i % 2 == 0 else torch.arange(k).flip(0)
            mask_in, mask_out = made_masks(k, hidden, order)
            self.register_buffer(f"order_{i}", order)
            self.register_buffer(f"mask_in_{i}", mask_in.to(dtype))
            self.register_buffer(f"mask_out_{i}", mask_out.to(dtype))
            w1 = torch.randn(hidden, k, generator=g, dtype=torch.float64).to(dtype) / math.sqrt(k)
            self.w1.append(nn.Parameter(w1.expand(n, hidden, k).clone()))
            self.b1.append(nn.Parameter(torch.zeros(n, hidden, dtype=dtype)))
            self.w2.append(nn.Parameter(torch.zeros(n, 2 * k, hidden, dtype=dtype)))
            self.b2.append(nn.Parameter(torch.zeros(n, 2 * k, dtype=dtype)))

    def row_parameters(self) -> list[torch.Tensor]:
        """The tables (each (n_rows, ...)): the only parameters of q; the model's are not among them."""
        return [self.loc, self.log_scale, *self.w1, *self.b1, *self.w2, *self.b2]

    def guide_dist(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> RowFlow:
        idx = torch.arange(x.shape[0]) if rows is None else rows
        if idx.numel() and int(idx.max()) >= self.n_rows:
            raise ValueError(f"row index {int(idx.max())} of a flow table of {self.n_rows} rows: a per-datapoint "
                             "guide cannot infer rows it was not trained on")
        steps = [(self.w1[i][idx], self.b1[i][idx], self.w2[i][idx], self.b2[i][idx]) for i in range(self.n_layers)]
        masks = [(getattr(self, f"mask_in_{i}"), getattr(self, f"mask_out_{i}")) for i in range(self.n_layers)]
        orders = [getattr(self, f"order_{i}") for i in range(self.n_layers)]
        return RowFlow(self.loc[idx], self.log_scale[idx].exp(), steps, masks, orders)  # batch (B,), event (k,)

    @torch.no_grad()
    def initialize_from(self, table: PerDatapointGuide) -> None:
        """q_0 of every row from a Gaussian table over the same rows (its loc and the
        diagonal of its scale); the steps back to the identity."""
        if table.n_rows != self.n_rows:
            raise ValueError(f"the starting table has {table.n_rows} rows; the flow has {self.n_rows}")
        loc, scale = loc_and_scale(table.table.dist(torch.arange(self.n_rows)), full=False)
        self.loc.copy_(loc)
        self.log_scale.copy_(scale.log())
        for w2, b2 in zip(self.w2, self.b2):
            w2.zero_()
            b2.zero_()


def optimize_local_flow(model, x: torch.Tensor, rows: torch.Tensor | None = None, *,
                        init: str | PerDatapointGuide = "guide", layers: int = 2, hidden: int = 16,
                        n_particles: int = 50, lr: float = 1e-3, decay: float = 1.0, window: int = 100,
                        patience: int = 10, max_steps: int = 20_000, seed: int = 0,
                        max_elements: int = MAX_ELEMENTS) -> LocalFit:
    """q* of the flow family: for the fixed ``model``, one :class:`PerDatapointFlowGuide` row
    per row of x (N, D), optimized by the loop of ``inference.guides.optimize_local`` (Adam
    with a rate per row on the summed negative ELBO, ``n_particles`` draws per row, the
    stopping rule of Cremer et al. 2018 per row; see there). The ELBO's entropy term is
    the Monte Carlo -log q of the draws.

    ``init``: "guide" starts q_0 of each row at the model's own q(z|x_i) (diagonal;
    ``rows``: x's training-row indices where the guide needs them); a Gaussian
    :class:`PerDatapointGuide` over the rows of x (e.g. the Gaussian family's q*) at its
    rows. Either way the steps start at the identity, so q* of the flow starts where
    that Gaussian is and its ELBO can only rise above it (the flow family contains the
    diagonal Gaussians). The caller's random-number stream is left as it was."""
    n = int(x.shape[0])
    check_local_settings(n, n_particles, lr, decay, window, patience, max_steps)
    start = init if isinstance(init, PerDatapointGuide) else None
    if start is None and init != "guide":
        raise UsageError(f"flow local optimization init must be 'guide' or a Gaussian table, got {init!r}")
    t0 = time.perf_counter()
    table = start if start is not None else materialize(model, x, rows, full=False)
    q_star = PerDatapointFlowGuide(model, n_rows=n, layers=layers, hidden=hidden, seed=seed)
    q_star.initialize_from(table)
    settings = {"family": "flow", "layers": q_star.n_layers, "hidden": q_star.hidden,
                "init": "table" if start is not None else init, "lr": lr, "decay": decay,
                "n_particles": int(n_particles), "window": int(window), "patience": int(patience),
                "max_steps": int(max_steps)}
    return fit_rows(q_star, x, q_star.row_parameters(), n_particles=n_particles, lr=lr, decay=decay, window=window,
                    patience=patience, max_steps=max_steps, seed=seed, max_elements=max_elements, settings=settings,
                    started=t0)
