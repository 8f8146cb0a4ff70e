"""Guides for any model whose one local latent (event dim 1) sits in its data plate:
per-datapoint tables, semi-amortized refinement, and the test-time local optimum q*.

Amortization, one network q_phi(z|x) shared by every datapoint, against classic
variational inference, one set of parameters phi_i per datapoint. These make the
contrast measurable for any model with one local latent site (a model's guide is read
by tracing it; no model names):

* :class:`PerDatapointGuide`: q(z_i) = N(loc_i, diag scale_i^2) (or N(loc_i, L_i L_i^T)
  with ``full=True``), a table indexed by the batch rows' positions in the training set
  (``models.common``'s tables), trained jointly with the model by SVI, optionally
  initialized from the model's own guide;
* :class:`SemiAmortizedGuide`: the model's guide refined by S gradient steps on each
  row's ELBO (Kim et al. 2018), inside ``guide(x)``, so the training driver is
  unchanged;
* :func:`optimize_local`: q*, for a fixed model, a Gaussian per row optimized until its
  running loss stops improving (the protocol of Cremer, Li & Duvenaud 2018), every row
  in one table and one batched loss.

Each wraps the model (``self.base``) and is itself a model of the workbench's contract
(``model(x)``, ``guide(x)``, ``n_data``, ``data_dim``, ``data_plate``,
``max_plate_nesting``), with the closed forms the model has (``exact_log_likelihood``;
``exact_elbo`` when the model has ``exact_elbo_of``). So ``inference.train.fit``
trains it and ``inference.evaluate`` evaluates it like any model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from elbolab.inference.errors import UsageError
from elbolab.inference.traces import batch_rows, guide_posterior, is_scored, local_site, per_row
from elbolab.models.common import PerDatapointMultivariateNormal, PerDatapointNormal

MAX_ELEMENTS = 2**22  # particles x rows x data_dim per chunk of a local-optimization step (16 MB float32)


# ----------------------------------------------------------------------------- the local latent


def local_latent(model) -> tuple[str, int, int]:
    """(name, event size k, plate dim) of the model's one local latent, checked from one
    trace of its guide on two rows of zeros: the guide must sample exactly one latent
    site, inside the data plate, with one event dimension. UsageError otherwise."""
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    x = torch.zeros(2, model.data_dim, dtype=param.dtype if param is not None else torch.get_default_dtype())
    site = local_site(model, x, torch.arange(2) if model.n_data >= 2 else None)
    dim = next(f.dim for f in site["cond_indep_stack"] if f.name == model.data_plate)
    return site["name"], int(site["fn"].event_shape[0]), int(dim)


def local_latent_dim(model) -> int:
    """The event size k of the model's one local latent (see :func:`local_latent`)."""
    return local_latent(model)[1]


def local_elbo(model, x: torch.Tensor, q: dist.Distribution, n_particles: int = 1, site: str = "z") -> torch.Tensor:
    """Each row's ELBO under q(z_i), E_q[log p(x_i, z)] + H[q_i], (B,): ``n_particles``
    reparameterized draws z ~ q (P, B, k) of the latent ``site`` replayed through
    ``model.model`` (x a set of its own, so no scaling) and the entropy of q in closed
    form, or, where q has none (a flow), -(1/P) sum_p log q(z_p) from the same draws.
    Differentiable in q's parameters (and the model's). Its sites stay hidden from
    any enclosing trace, so a guide may call it while an objective traces the guide."""
    z = q.rsample((n_particles,))  # (P, B, k)
    P, B = int(n_particles), int(x.shape[0])
    with poutine.block():
        tr = poutine.trace(poutine.condition(model.model, data={site: z})).get_trace(x)
    log_p = x.new_zeros(P, B)
    for s in tr.nodes.values():
        if not is_scored(s):
            continue
        if not s["is_observed"]:
            raise UsageError(f"the model samples {s['name']!r} besides {site!r}: a local ELBO needs every "
                             "latent of the model in the guide")
        log_p = log_p + per_row(s, P, B, model.data_plate)
    try:
        entropy = q.entropy()  # (B,)
    except NotImplementedError:  # e.g. a flow: the Monte Carlo estimate -mean_p log q(z_p) from the same draws
        entropy = -q.log_prob(z).mean(0)
    return log_p.mean(0) + entropy  # (B,)


def loc_and_scale(q: dist.Distribution, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc (B, k), scale) of a Gaussian q(z): scale (B, k) for a diagonal family, the
    lower-triangular (B, k, k) for a full one (from a diagonal q: diag(scale))."""
    if isinstance(q, torch.distributions.Independent) and isinstance(q.base_dist, torch.distributions.Normal):
        loc, scale = q.base_dist.loc, q.base_dist.scale  # (B, k)
        return (loc, torch.diag_embed(scale)) if full else (loc, scale)
    if isinstance(q, torch.distributions.MultivariateNormal):
        loc = q.loc  # (B, k)
        if full:
            return loc, q.scale_tril.expand(loc.shape + loc.shape[-1:])
        return loc, torch.diagonal(q.covariance_matrix, dim1=-2, dim2=-1).sqrt().expand_as(loc)
    raise UsageError(f"a guide's q(z|x) must be a diagonal Normal or a MultivariateNormal, not {type(q).__name__}")


# ----------------------------------------------------------------------------- guides


class LocalGuide(PyroModule):
    """A model with the guide of its local latent replaced; subclasses define ``guide_dist``.

    ``n_data``: the rows the guide covers (a table's rows; by default the model's
    training rows). A batch of them is scaled to ``n_data`` rows; a table over rows
    that are a set of their own (test rows for q*) covers and scales to those.
    """

    def __init__(self, model, n_data: int | None = None):
        super().__init__()
        self.site, self.latent_dim, self.plate_dim = local_latent(model)
        self.base = model
        self.data_plate = model.data_plate
        self.max_plate_nesting = model.max_plate_nesting
        self.n_data = int(model.n_data if n_data is None else n_data)
        self.data_dim = int(model.data_dim)

    def model(self, x: torch.Tensor) -> None:
        return self.base.model(x)

    def guide(self, x: torch.Tensor) -> None:
        q = self.guide_dist(x, batch_rows(x))  # before the plate: a refinement may open plates of its own
        with pyro.plate(self.data_plate, x.shape[0], dim=self.plate_dim):
            pyro.sample(self.site, q)  # (..., B, k)

    def guide_dist(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> dist.Distribution:
        raise NotImplementedError

    @property
    def exact_log_likelihood(self):
        """The model's exact log p(x_i) per row, where it has one (AttributeError otherwise)."""
        return self.base.exact_log_likelihood

    @property
    def exact_elbo(self):
        """``exact_elbo(x, rows)``: each row's ELBO under this guide in closed form, where the
        model has ``exact_elbo_of`` (AttributeError otherwise)."""
        elbo_of = self.base.exact_elbo_of
        return lambda x, rows=None: elbo_of(x, self.guide_dist(x, rows))

    @property
    def exact_elbo_of(self):
        return self.base.exact_elbo_of


class PerDatapointGuide(LocalGuide):
    """q(z_i) = N(loc_i, diag scale_i^2), or N(loc_i, L_i L_i^T) with ``full``: one row of a
    table per datapoint (``n_rows``: the model's training rows by default). It cannot infer
    a row it has no entry for."""

    def __init__(self, model, full: bool = False, n_rows: int | None = None, init_scale: float = 0.1):
        super().__init__(model, n_rows)
        n = self.n_data
        self.full = bool(full)
        table = (PerDatapointMultivariateNormal if full else PerDatapointNormal)(n, self.latent_dim, init_scale)
        param = next(iter(model.parameters()), None)
        self.table = table.to(param.dtype) if param is not None else table
        self.n_rows = n

    def guide_dist(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> dist.Distribution:
        return self.table.dist(torch.arange(x.shape[0]) if rows is None else rows)  # batch (B,), event (k,)

    @torch.no_grad()
    def initialize(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Every row's loc (n_rows, k) and scale: (n_rows, k) diagonal, or (n_rows, k, k)
        lower-triangular with ``full``."""
        dtype = next(self.table.parameters()).dtype
        self.table.initialize(loc.to(dtype), scale.to(dtype))

    @torch.no_grad()
    def initialize_from(self, source, x: torch.Tensor, rows: torch.Tensor | None = None,
                        batch_size: int = 1000) -> None:
        """Set row j of the table to ``source.guide_dist`` of row j of x (n_rows, D), e.g. an
        encoder's output; ``rows``: x's training-row indices, where the source needs them."""
        if x.shape[0] != self.n_rows:
            raise ValueError(f"the table has {self.n_rows} rows; x has {x.shape[0]}")
        locs, scales = [], []
        for s in range(0, x.shape[0], batch_size):
            q = guide_posterior(source, x[s: s + batch_size], None if rows is None else rows[s: s + batch_size])
            loc, scale = loc_and_scale(q, self.full)
            locs.append(loc.detach())
            scales.append(scale.detach())
        self.initialize(torch.cat(locs), torch.cat(scales))


class SemiAmortizedGuide(LocalGuide):
    """Semi-amortized inference (Kim et al. 2018): the model's guide gives (loc_0, scale_0)
    for a mini-batch and S gradient-ascent steps on each row's ELBO refine them,

        lambda_{s+1} = lambda_s + step_size * grad_lambda ELBO_i(lambda_s),  lambda = (loc, log scale),

    each ELBO from ``n_particles`` reparameterized draws and the closed-form entropy
    (:func:`local_elbo`); "z" is then drawn from N(loc_S, diag scale_S^2). With
    ``natural`` (the default) the gradient is preconditioned by the inverse Fisher
    information of q in these coordinates, diag(scale^2, 1/2): a natural-gradient step,
    which makes the step size free of the posterior's scale (for a Gaussian posterior,
    once q's variance matches it, a step of 1 is Newton's step; plain steps diverge once
    step_size exceeds 2 / the posterior precision, e.g. PPCA on the digits). The
    refinement runs inside ``guide_dist`` (with gradients on even under ``no_grad``),
    so the training driver's step is unchanged.

    ``differentiable=True`` (SA-VAE): the objective is differentiated through the S
    steps (second derivatives through the decoder), so the encoder gets the gradient of
    the refined ELBO with respect to its output and the decoder the total derivative.
    ``differentiable=False``: the first-order variant; the steps are taken on detached
    parameters and the refinement's Jacobian d lambda_S / d lambda_0 is taken as the
    identity (lambda_0 + stop_gradient(lambda_S - lambda_0)): the encoder gets the
    gradient at lambda_S, no second derivatives.

    ``max_step`` bounds each row's step in the Fisher metric of q, sqrt(sum dloc^2 /
    scale^2 + 2 sum dlog_scale^2) (so KL between successive q's stays below about
    max_step^2 / 2 nats); longer steps are shortened to it. The inner gradients come from
    a few draws and are noisy: without the bound, a large draw early in training can
    throw a scale to 0 or infinity (seen on MNIST with an untrained decoder, and on PPCA
    with large steps).
    """

    def __init__(self, model, steps: int = 5, step_size: float = 0.1, n_particles: int = 1,
                 differentiable: bool = True, natural: bool = True, max_step: float | None = 1.0):
        super().__init__(model)
        if int(steps) != steps or steps < 0:
            raise UsageError(f"semi-amortized steps must be an integer >= 0, got {steps}")
        if not (step_size > 0 and math.isfinite(step_size)):
            raise UsageError(f"semi-amortized step size must be a positive number, got {step_size}")
        if int(n_particles) != n_particles or n_particles < 1:
            raise UsageError(f"semi-amortized n_particles must be an integer >= 1, got {n_particles}")
        if max_step is not None and not (max_step > 0 and math.isfinite(max_step)):
            raise UsageError(f"semi-amortized max_step must be a positive number, got {max_step}")
        self.steps, self.step_size, self.n_particles = int(steps), float(step_size), int(n_particles)
        self.differentiable, self.natural, self.max_step = bool(differentiable), bool(natural), max_step

    def guide_dist(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> dist.Distribution:
        q0 = guide_posterior(self.base, x, rows, grad=torch.is_grad_enabled())
        loc, scale = loc_and_scale(q0, full=False)  # (B, k) each
        loc, scale = self.refine(x, loc, scale)
        return dist.Normal(loc, scale).to_event(1)  # batch (B,), event (k,)

    def refine(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc_S, scale_S) after the S steps from (loc, scale), each (B, k)."""
        if self.steps == 0:
            return loc, scale
        outer = torch.is_grad_enabled()
        through = outer and self.differentiable
        log_scale = scale.log()
        lam = [loc, log_scale] if through else [loc.detach().requires_grad_(), log_scale.detach().requires_grad_()]
        with torch.enable_grad():
            for _ in range(self.steps):
                q = dist.Normal(lam[0], lam[1].exp()).to_event(1)
                elbo = local_elbo(self.base, x, q, self.n_particles, self.site).sum()  # rows are independent: one sum
                grads = torch.autograd.grad(elbo, lam, create_graph=through)
                if self.natural:  # the inverse Fisher of N(loc, diag e^{2 log scale}) in (loc, log scale)
                    grads = [grads[0] * (2 * lam[1]).exp(), grads[1] / 2]
                step = [self.step_size * g for g in grads]
                if self.max_step is not None:  # the step's length in the Fisher metric of q, per row
                    length = ((step[0].pow(2) * (-2 * lam[1]).exp()).sum(-1, keepdim=True)
                              + 2 * step[1].pow(2).sum(-1, keepdim=True)).clamp_min(1e-24).sqrt()  # (B, 1)
                    step = [d * (self.max_step / (length + 1e-12)).clamp(max=1.0) for d in step]
                lam = [p + d for p, d in zip(lam, step)]
                if not through:
                    lam = [t.detach().requires_grad_() for t in lam]
        if through:
            return lam[0], lam[1].exp()
        loc_s, log_scale_s = lam[0].detach(), lam[1].detach()
        if outer:  # first-order: the value lambda_S, the gradient passed to lambda_0 unchanged
            return loc + (loc_s - loc.detach()), (log_scale + (log_scale_s - log_scale.detach())).exp()
        return loc_s, log_scale_s.exp()


# ----------------------------------------------------------------------------- q*: local optimization


@dataclass
class LocalFit:
    """The result of :func:`optimize_local`: ``model`` is the q* guide (a
    :class:`PerDatapointGuide` over the rows of x, a set of their own, or another family's
    per-row table, e.g. a flow's) on the fixed model."""

    model: LocalGuide
    steps: int  # steps of the run (the last row's)
    row_steps: torch.Tensor  # (N,) the step at which each row stopped
    converged: float  # share of rows that met the stopping rule (the others stopped at max_steps)
    seconds: float
    history: list[float] = field(default_factory=list)  # per window: mean window loss of the rows still running
    settings: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """Numbers for metrics.json."""
        n = self.model.n_rows
        return {"steps": self.steps, "row_steps_mean": float(self.row_steps.double().mean()),
                "row_steps_max": int(self.row_steps.max()), "converged": self.converged, "seconds": self.seconds,
                "seconds_per_row": self.seconds / max(1, n), "n_rows": n,
                "full": self.model.full if isinstance(self.model, PerDatapointGuide) else None, **self.settings}


def materialize(model, x: torch.Tensor, rows: torch.Tensor | None = None, full: bool | None = None,
                batch_size: int = 1000) -> PerDatapointGuide:
    """The model's guide for the rows of x, written into a table (a :class:`PerDatapointGuide`
    over those rows, a set of their own): a fixed q to evaluate, whatever produced it
    (an encoder, a refinement, a trained table). ``full``: the table's family (default:
    the guide's own)."""
    if full is None:
        probe = guide_posterior(model, x[:1], None if rows is None else rows[:1])
        full = isinstance(probe, torch.distributions.MultivariateNormal)
    table = PerDatapointGuide(model, full=full, n_rows=int(x.shape[0]))
    table.initialize_from(model, x, rows, batch_size)
    return table


class RowAdam:
    """Adam (Kingma & Ba 2015, torch's defaults) over tables whose first dimension is the
    row, with a learning rate per row: ``lr`` (N,). A row whose rate is 0 stays where it is."""

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            lr = self.lr.to(p.dtype).view((-1,) + (1,) * (p.dim() - 1))  # (N, 1, ...)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + self.eps))


def optimize_local(model, x: torch.Tensor, rows: torch.Tensor | None = None, *,
                   init: str | PerDatapointGuide = "guide",
                   full: bool | None = None, n_particles: int = 50, lr: float = 1e-3, decay: float = 1.0,
                   window: int = 100, patience: int = 10, max_steps: int = 20_000, seed: int = 0,
                   max_elements: int = MAX_ELEMENTS) -> LocalFit:
    """q*: for the fixed ``model``, one Gaussian per row of x (N, D), optimized by Adam on
    the summed negative ELBO of the rows (:func:`local_elbo`, ``n_particles`` draws per
    row, vectorized; the rows in chunks of about ``max_elements`` decoder outputs whose
    gradients add up): one table, one batched loss, no loop over rows.

    The rows are independent given the model and Adam's update is elementwise, so one
    optimizer over the table takes, for every row, the step it would take alone: the
    batched run is the per-row protocol run for all rows at once.

    Stopping, per row (the protocol of Cremer, Li & Duvenaud 2018: Adam, rate 1e-3, 50
    draws, windows of 100 steps, patience 10): every ``window`` steps each row's mean
    loss over the window is compared with its best window so far; a row stops once
    ``patience`` + 1 windows in a row fail to improve on it. Rows converge at different
    speeds, so each stops on its own: its rate drops to 0 (its q* is the table row at
    that step) and later steps compute the loss of the remaining rows only (the batch
    shrinks). The run ends when every row has stopped or after ``max_steps``. The
    model's parameters never move (only the table's gradients are computed).

    ``decay``: each window that fails to improve also multiplies the row's rate by this
    factor (1, the default, keeps Cremer et al.'s constant rate; below 1 the noise of a
    constant rate, which keeps a row a step size away from its optimum, shrinks as the
    row converges).

    ``init``: "guide" starts each row at the model's own q(z|x_i) (``rows``: x's
    training-row indices where the guide needs them); "standard" at N(0, I), as Cremer
    et al.; a :class:`PerDatapointGuide` over the rows of x (e.g. ``materialize``'s) at
    its rows (a copy: it is left as it was). ``full``: the family (default: the guide's
    own for "guide" and a table, diagonal for "standard"). The caller's random-number
    stream is left as it was.
    """
    start = init if isinstance(init, PerDatapointGuide) else None
    if start is None and init not in ("guide", "standard"):
        raise UsageError(f"local optimization init must be 'guide', 'standard' or a table, got {init!r}")
    if start is not None and start.n_rows != int(x.shape[0]):
        raise ValueError(f"the starting table has {start.n_rows} rows; x has {x.shape[0]}")
    check_local_settings(int(x.shape[0]), n_particles, lr, decay, window, patience, max_steps)
    n = int(x.shape[0])
    settings = {"init": "table" if start is not None else init, "lr": lr, "decay": decay, "n_particles": int(n_particles),
                "window": int(window), "patience": int(patience), "max_steps": int(max_steps)}
    t0 = time.perf_counter()
    if start is not None:
        q_star = PerDatapointGuide(model, full=start.full, n_rows=n)
        q_star.table.load_state_dict(start.table.state_dict())  # a copy of its rows
    elif init == "guide":
        q_star = materialize(model, x, rows, full)
    else:
        q_star = PerDatapointGuide(model, full=bool(full), n_rows=n)
        k = q_star.latent_dim
        loc = x.new_zeros(n, k)
        q_star.initialize(loc, torch.eye(k, dtype=x.dtype).expand(n, k, k) if q_star.full else loc + 1.0)
    # the unconstrained table: loc and scale (or scale_tril)
    return fit_rows(q_star, x, list(q_star.table.parameters()), n_particles=n_particles, lr=lr, decay=decay,
                    window=window, patience=patience, max_steps=max_steps, seed=seed, max_elements=max_elements,
                    settings=settings, started=t0)


def check_local_settings(n_rows, n_particles, lr, decay, window, patience, max_steps) -> None:
    """UsageError unless the settings of a local optimization (:func:`fit_rows`) are usable."""
    if n_rows == 0:
        raise UsageError("local optimization needs at least one row")
    for name, v in (("n_particles", n_particles), ("window", window), ("patience", patience),
                    ("max_steps", max_steps)):
        if int(v) != v or v < (0 if name == "patience" else 1):
            raise UsageError(f"local optimization {name} must be a positive integer, got {v}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"local optimization lr must be a positive number, got {lr}")
    if not 0 < decay <= 1:
        raise UsageError(f"local optimization decay must be in (0, 1], got {decay}")


def fit_rows(q_star: LocalGuide, x: torch.Tensor, params: list[torch.Tensor], *, n_particles: int, lr: float,
             decay: float, window: int, patience: int, max_steps: int, seed: int, max_elements: int = MAX_ELEMENTS,
             settings: dict | None = None, started: float | None = None) -> LocalFit:
    """The loop of :func:`optimize_local` for any per-row guide: ``q_star`` a guide over
    the rows of x (N, D), a set of their own, whose ``params`` (the only tensors moved)
    each have the row as their first dimension (N, ...). Adam with a rate per row on the
    summed negative ELBO of the rows still running, stopped row by row (see
    :func:`optimize_local`). ``started``: the clock at which the caller began (for
    ``LocalFit.seconds``). The caller's random-number stream is left as it was."""
    n = int(x.shape[0])
    check_local_settings(n, n_particles, lr, decay, window, patience, max_steps)
    t0 = time.perf_counter() if started is None else started
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rates = torch.full((n,), float(lr), dtype=torch.float64)
        opt = RowAdam(params, rates)
        chunk = max(1, min(n, max_elements // max(1, int(n_particles) * int(x[0].numel()))))
        best = torch.full((n,), math.inf, dtype=torch.float64)
        failed = torch.zeros(n, dtype=torch.long)
        window_sum = torch.zeros(n, dtype=torch.float64)
        row_steps = torch.full((n,), int(max_steps), dtype=torch.long)
        active = torch.arange(n)  # rows still running
        history: list[float] = []
        step = 0
        while step < max_steps and active.numel():
            step += 1
            for p in params:
                p.grad = None
            for s in range(0, active.numel(), chunk):
                ids = active[s: s + chunk]
                xb = x[ids]
                elbo = local_elbo(q_star, xb, q_star.guide_dist(xb, ids), n_particles, q_star.site)  # (b,)
                (-elbo.sum()).backward(inputs=params)
                window_sum[ids] -= elbo.detach().double()
            opt.step()
            if step % window == 0:
                mean = window_sum[active] / window
                improved = mean < best[active]
                best[active] = torch.where(improved, mean, best[active])
                failed[active] = torch.where(improved, 0, failed[active] + 1)
                rates[active] = torch.where(improved, rates[active], rates[active] * decay)
                window_sum.zero_()
                history.append(float(mean.mean()))
                done = active[failed[active] > patience]
                rates[done] = 0.0
                row_steps[done] = step
                active = active[failed[active] <= patience]
    for p in params:
        p.grad = None
    return LocalFit(q_star, step, row_steps, float((failed > patience).double().mean()),
                    time.perf_counter() - t0, history, dict(settings or {}))
