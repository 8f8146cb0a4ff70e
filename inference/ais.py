"""Annealed importance sampling (Neal 2001) of each row's log p(x_i), and bidirectional
Monte Carlo (Grosse, Ghahramani & Adams 2015; Wu, Burda, Salakhutdinov & Grosse 2017),
for any workbench model whose one local latent (event dim 1) sits in its data plate.

The path
--------
For a row x_i, a geometric path of unnormalized densities of its latent z from a
normalized base pi_0(z) to the posterior's unnormalized density p(x_i, z)::

    gamma_beta(z) = pi_0(z)^(1 - beta) p(x_i, z)^beta,   0 = beta_0 < beta_1 < ... < beta_T = 1,

with pi_0 the guide's q(z | x_i) (``init="guide"``) or the prior p(z) (``init="prior"``;
then gamma_beta(z) = p(z) p(x_i | z)^beta). log p(x_i, z) is the model traced with
``poutine.condition(model.model, data={site: z})`` inside ``traces.batch`` (every
scored site must lie in the data plate), M chains per row as an outermost vectorized
plate: shapes (M, B, k) for z, (M, B) per chain and row.

Forward AIS
-----------
z_0 ~ pi_0; for t = 1..T the log weight gains (beta_t - beta_{t-1}) [log p(x_i, z_{t-1}) -
log pi_0(z_{t-1})] = log gamma_t(z_{t-1}) - log gamma_{t-1}(z_{t-1}), then (for t < T) z_t
is drawn by an HMC transition that leaves gamma_t invariant. E[w] = p(x_i), so
log (1/M) sum_m w_m is a stochastic lower bound of log p(x_i) (Jensen), tight as T grows.
T = 1 is importance sampling with M draws from pi_0.

Reverse AIS (the upper bound of BDMC)
-------------------------------------
The same path run backwards from an exact posterior draw z_T ~ p(z | x_i): its weight w'
has E[w'] = 1 / p(x_i), so -log (1/M) sum_m w'_m is a stochastic upper bound of log p(x_i).
An exact posterior draw exists for data simulated from the model itself (z ~ p(z),
x ~ p(x | z)): :func:`bdmc` brackets log p(x) on such data, and the gap between the two
bounds bounds the error of either (on the simulated data).

Transitions
-----------
Hamiltonian Monte Carlo with an identity mass matrix: momentum p ~ N(0, I), ``leapfrog``
steps of size epsilon_i (one per row, shared by its chains), a Metropolis accept per
chain. After each transition each row's step size moves towards the target acceptance
rate, log epsilon_i += ``adapt_rate`` (mean accept probability - ``target_acceptance``),
as Wu et al. (2017) adapt it during the run (to 0.65).

The accept probabilities that steer epsilon come from ``pilot_chains`` extra chains per
row whose weights are not used. AIS's weights are unbiased (E[w] = p(x)) when the
transitions are fixed in advance; a step size steered by the estimating chains' own
acceptances depends on their states, and that selection biases the weights: measured
on PPCA from a near-exact guide (T = 30, 16 chains; 6 runs of 50 rows), +0.0063 +- 0.0023
nats above the exact log p(x) when the 16 chains steered themselves, -0.0010 +- 0.0025
with 4 pilot chains. Steered by pilots, the step sizes are independent of the estimating
chains, each of which runs AIS with transitions fixed independently of it: unbiased.
``adapt_rate=0`` keeps epsilon at ``step_size`` (no pilot chains are run). Reverse AIS
starts every chain, pilots too, at the one posterior draw of a row, so steering by pilots
would tie the step sizes to the start; :func:`bdmc` gives the reverse run the forward
run's step sizes instead, transition for transition (fixed independently of the start).

Schedules
---------
``"linear"``: beta_t = t / T. ``"sigmoid"`` (Grosse et al. 2015):
beta~_t = sigmoid(delta (2t/T - 1)), beta_t = (beta~_t - beta~_0) / (beta~_T - beta~_0),
delta = 4: small steps at both ends, where the densities change fastest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyro
import torch
from pyro import poutine

from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import Estimate
from elbolab.inference.traces import (batch, check_new_rows, guide_posterior, is_scored, local_site, logmeanexp,
                                      particles, per_row)

MAX_ELEMENTS = 2**21  # chains x rows x data_dim decoder outputs per chunk of rows (with gradients: a few copies live)
SCHEDULES = ("sigmoid", "linear")
INITS = ("guide", "prior")
SIGMOID_DELTA = 4.0  # Grosse et al. 2015's sigmoid schedule
MIN_STEP, MAX_STEP = 1e-6, 10.0  # bounds of an adapted step size (a runaway adaptation stays finite)


# ----------------------------------------------------------------------------- schedules


def schedule(kind: str | Sequence[float] | torch.Tensor, steps: int, delta: float = SIGMOID_DELTA) -> torch.Tensor:
    """beta_0 = 0 < beta_1 < ... < beta_T = 1 (T + 1,), float64, T = ``steps``: "linear",
    "sigmoid" (see the module docstring), or the betas themselves (increasing, from 0 to 1)."""
    if not isinstance(kind, str):
        betas = torch.as_tensor(kind, dtype=torch.float64).flatten()
        if betas.numel() < 2 or float(betas[0]) != 0.0 or float(betas[-1]) != 1.0 or bool((betas.diff() <= 0).any()):
            raise UsageError("schedule: explicit betas must increase strictly from 0 to 1")
        return betas
    if int(steps) != steps or steps < 1:
        raise UsageError(f"AIS steps must be an integer >= 1, got {steps}")
    t = torch.arange(int(steps) + 1, dtype=torch.float64) / int(steps)
    if kind == "linear":
        return t
    if kind == "sigmoid":
        s = torch.sigmoid(delta * (2 * t - 1))
        betas = (s - s[0]) / (s[-1] - s[0])
        betas[0], betas[-1] = 0.0, 1.0  # exactly, not to round-off
        return betas
    raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)} or a sequence of betas, got {kind!r}")


# ----------------------------------------------------------------------------- densities on the path


def model_latent(model, x: torch.Tensor) -> str:
    """The name of the model's one latent site, from one trace of ``model.model`` on the
    first row of x: it must be the only unobserved site, inside the data plate, with one
    event dimension (UsageError otherwise)."""
    return local_site(model, x[:1], program="model")["name"]


@dataclass
class PathPoint:
    """The path's two log densities at z (M, B, k) and their gradients in z:
    ``log_base`` = log pi_0(z), ``log_joint`` = log p(x, z), each (M, B); ``grad_base``,
    ``grad_joint`` (M, B, k). log gamma_beta = log_base + beta (log_joint - log_base)."""

    log_base: torch.Tensor
    log_joint: torch.Tensor
    grad_base: torch.Tensor
    grad_joint: torch.Tensor

    def log_density(self, beta: float) -> torch.Tensor:
        return self.log_base + beta * (self.log_joint - self.log_base)

    def grad(self, beta: float) -> torch.Tensor:
        return self.grad_base + beta * (self.grad_joint - self.grad_base)


class Path:
    """The geometric path of one chunk of rows x (B, D): ``point(z)`` evaluates both ends at
    z (M, B, k). ``base``: q(z | x) (batch (B,), event (k,)), or None for the prior."""

    def __init__(self, model, x: torch.Tensor, rows: torch.Tensor | None, site: str, base=None):
        self.model, self.x, self.rows, self.site, self.base = model, x, rows, site, base

    def log_parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(z), log p(x | z)) per chain and row (M, B), unscaled, differentiable in z."""
        M, B = int(z.shape[0]), int(self.x.shape[0])
        m = self.model
        with poutine.block(), batch(m, self.x, self.rows), particles(M, m.max_plate_nesting):
            tr = poutine.trace(poutine.condition(m.model, data={self.site: z})).get_trace(self.x)
        log_prior, log_lik = z.new_zeros(M, B), z.new_zeros(M, B)
        for s in tr.nodes.values():
            if not is_scored(s):
                continue
            lp = per_row(s, M, B, m.data_plate)
            if s["is_observed"] and s["name"] != self.site:  # (conditioned, the latent is "observed" too)
                log_lik = log_lik + lp
            elif s["name"] == self.site:
                log_prior = log_prior + lp
            else:
                raise UsageError(f"the model samples {s['name']!r} besides {self.site!r}: AIS anneals one local latent")
        return log_prior, log_lik

    def point(self, z: torch.Tensor) -> PathPoint:
        """Both log densities at z (M, B, k) and their gradients in z (never the model's)."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_prior, log_lik = self.log_parts(z)
            log_joint = log_prior + log_lik
            log_base = log_prior if self.base is None else self.base.log_prob(z)
            grad_joint, = torch.autograd.grad(log_joint.sum(), z, retain_graph=True)  # rows and chains independent
            grad_base, = torch.autograd.grad(log_base.sum(), z)
        return PathPoint(log_base.detach(), log_joint.detach(), grad_base, grad_joint)

    def sample_base(self, M: int) -> torch.Tensor:
        """M draws z ~ pi_0 per row (M, B, k)."""
        if self.base is not None:
            return self.base.sample((M,))
        m = self.model
        with poutine.block(), torch.no_grad(), batch(m, self.x, self.rows), particles(M, m.max_plate_nesting):
            tr = poutine.trace(m.model).get_trace(self.x)
        return tr.nodes[self.site]["value"].detach()  # (M, B, k)


# ----------------------------------------------------------------------------- HMC


class HMC:
    """HMC transitions for the chains of B rows, one step size per row (B,): adapted to a
    target acceptance rate from the pilot chains, those after the first ``chains`` (see
    the module docstring), or, with ``fixed`` (B, transitions), set in advance (column j
    for the j-th transition)."""

    def __init__(self, path: Path, n_rows: int, chains: int, leapfrog: int, step_size: float,
                 target_acceptance: float, adapt_rate: float, dtype: torch.dtype, fixed: torch.Tensor | None = None):
        self.path, self.leapfrog, self.target, self.rate = path, int(leapfrog), target_acceptance, adapt_rate
        self.chains = int(chains)  # the estimating chains come first; any after them are pilots that steer epsilon
        self.log_step = torch.full((n_rows,), math.log(step_size), dtype=torch.float64)
        self.fixed = fixed
        self.dtype = dtype
        self.accept_sum = torch.zeros(n_rows, dtype=torch.float64)
        self.used: list[torch.Tensor] = []  # the step size of each transition (B,)
        self.transitions = 0

    def transition(self, z: torch.Tensor, pt: PathPoint, beta: float) -> tuple[torch.Tensor, PathPoint]:
        """One HMC transition of every chain for gamma_beta from z (M, B, k) with its
        ``PathPoint``; returns the new z and its PathPoint."""
        if self.fixed is not None:
            self.log_step = self.fixed[:, self.transitions].double().log()
        self.used.append(self.log_step.exp())
        eps = self.log_step.exp().to(self.dtype).view(1, -1, 1)  # (1, B, 1)
        p0 = torch.randn_like(z)
        zn, p, ptn = z, p0 + 0.5 * eps * pt.grad(beta), pt  # half step of the momentum (grad log gamma = -grad U)
        for l in range(self.leapfrog):
            zn = zn + eps * p
            ptn = self.path.point(zn)
            p = p + (eps if l < self.leapfrog - 1 else 0.5 * eps) * ptn.grad(beta)
        # log acceptance ratio: -H(new) + H(old), H = -log gamma + |p|^2 / 2
        log_ratio = ((ptn.log_density(beta) - 0.5 * p.pow(2).sum(-1))
                     - (pt.log_density(beta) - 0.5 * p0.pow(2).sum(-1))).double()  # (M, B)
        log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -math.inf))
        accept_prob = log_ratio.clamp(max=0.0).exp()  # (M, B)
        accept = torch.rand_like(accept_prob) < accept_prob
        keep = accept.to(z.dtype).unsqueeze(-1)
        z_new = keep * zn + (1 - keep) * z
        a, b = accept, accept.unsqueeze(-1)
        pt_new = PathPoint(torch.where(a, ptn.log_base, pt.log_base), torch.where(a, ptn.log_joint, pt.log_joint),
                           torch.where(b, ptn.grad_base, pt.grad_base), torch.where(b, ptn.grad_joint, pt.grad_joint))
        self.accept_sum += accept_prob[: self.chains].mean(0)  # (B,) over the estimating chains
        self.transitions += 1
        if self.rate and self.fixed is None:
            pilot = accept_prob[self.chains:].mean(0)  # (B,) the row's pilot chains' mean accept probability
            self.log_step = (self.log_step + self.rate * (pilot - self.target)).clamp(math.log(MIN_STEP),
                                                                                      math.log(MAX_STEP))
        return z_new.detach(), pt_new

    @property
    def step_sizes(self) -> torch.Tensor:
        """The step size of every transition so far (B, transitions), float64."""
        return torch.stack(self.used, 1) if self.used else self.log_step.new_zeros(self.log_step.shape[0], 0)

    @property
    def acceptance(self) -> torch.Tensor:
        """Each row's mean accept probability over the transitions so far (B,)."""
        return self.accept_sum / max(1, self.transitions)


def anneal(path: Path, z: torch.Tensor, betas: torch.Tensor, hmc: HMC) -> torch.Tensor:
    """The AIS log weights (M, B), float64, of chains started at z (M, B, k) along
    ``betas`` (forward: 0 -> 1 from draws of pi_0; reverse: 1 -> 0 from posterior draws):
    sum_t (beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log pi_0(z_{t-1})], an HMC transition
    for gamma_{beta_t} after each increment but the last."""
    pt = path.point(z)  # under Pyro's validation when it is on; the later evaluations without its checks
    log_w = torch.zeros(z.shape[:2], dtype=torch.float64)
    n = betas.numel()
    with pyro.validation_enabled(False):
        for t in range(1, n):
            log_w += float(betas[t] - betas[t - 1]) * (pt.log_joint - pt.log_base).double()
            if t < n - 1:
                z, pt = hmc.transition(z, pt, float(betas[t]))
    return log_w


# ----------------------------------------------------------------------------- results


def log_mean_exp_se(log_w: torch.Tensor) -> torch.Tensor:
    """The delta-method standard error of log (1/M) sum_m w_m over the last axis (..., M):
    sd(w) / (sqrt(M) mean(w)), from weights scaled by their maximum (no overflow). It
    takes the sample sd of the weights at face value, so a heavy right tail the M draws
    have not seen is missing from it."""
    w = (log_w - log_w.max(-1, keepdim=True).values).exp()
    M = log_w.shape[-1]
    if M < 2:
        return torch.full(log_w.shape[:-1], math.nan, dtype=log_w.dtype)
    return w.std(-1, unbiased=True) / (math.sqrt(M) * w.mean(-1))


@dataclass
class AISResult:
    """Forward (a lower bound) or reverse (an upper bound) AIS on N rows with M chains.

    ``log_likelihood``: the per-row estimates (forward: log mean_m w_m; reverse:
    -log mean_m w'_m) as an :class:`Estimate` over rows (mean, its standard error over
    rows); ``log_weights`` (N, M) float64; ``chain_sd`` (N,) the sd of each row's log
    weights over its chains; ``mc_se`` (N,) the delta-method standard error of each row's
    estimate over chains (:func:`log_mean_exp_se`); ``ess`` (N,) (sum w)^2 / sum w^2;
    ``acceptance`` (N,) mean HMC accept probability of the estimating chains;
    ``step_sizes`` (N, T - 1) float32, each transition's step size in the order of
    increasing beta (a reverse run's are stored in that order too)."""

    log_likelihood: Estimate
    log_weights: torch.Tensor
    chain_sd: torch.Tensor
    mc_se: torch.Tensor
    ess: torch.Tensor
    acceptance: torch.Tensor
    step_sizes: torch.Tensor
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def mc_se_of_mean(self) -> float:
        """The Monte Carlo (over chains) standard error of the mean over rows:
        sqrt(sum_i mc_se_i^2) / N."""
        return float(self.mc_se.pow(2).sum().sqrt() / self.mc_se.numel())

    def describe(self) -> dict:
        """Numbers for metrics.json."""
        final = self.step_sizes[:, -1] if self.step_sizes.shape[1] else torch.full((1,), math.nan)
        return {"log_likelihood": self.log_likelihood.to_dict(), "mc_se_of_mean": self.mc_se_of_mean,
                "chain_sd_mean": float(self.chain_sd.mean()), "ess_mean": float(self.ess.mean()),
                "acceptance_mean": float(self.acceptance.mean()), "final_step_size_median": float(final.median()),
                "seconds": self.seconds, **self.settings}


def _check(steps, chains, leapfrog, step_size, target_acceptance, adapt_rate, pilot_chains, init) -> None:
    for name, v in (("steps", steps), ("chains", chains), ("leapfrog", leapfrog), ("pilot_chains", pilot_chains)):
        if int(v) != v or v < 1:
            raise UsageError(f"AIS {name} must be an integer >= 1, got {v}")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise UsageError(f"AIS step_size must be a positive number, got {step_size}")
    if not 0 < target_acceptance < 1:
        raise UsageError(f"AIS target_acceptance must be in (0, 1), got {target_acceptance}")
    if not (adapt_rate >= 0 and math.isfinite(adapt_rate)):
        raise UsageError(f"AIS adapt_rate must be a number >= 0, got {adapt_rate}")
    if init not in INITS:
        raise UsageError(f"AIS init must be one of {', '.join(INITS)}, got {init!r}")


@dataclass(frozen=True)
class Budget:
    """What one AIS estimate costs: ``steps`` (T) increments of beta, ``chains`` (M) chains
    per row, ``leapfrog`` (L) leapfrog steps per HMC transition; about T L evaluations of
    the model with gradients for M (+ pilots) chains per row. The other settings of
    :func:`ais_log_likelihood` keep their defaults. Checked on construction."""

    steps: int = 200
    chains: int = 16
    leapfrog: int = 5

    def __post_init__(self):
        for name in ("steps", "chains", "leapfrog"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise UsageError(f"AIS {name} must be an integer >= 1, got {v}")

    def kwargs(self) -> dict:
        """The budget as keyword arguments of :func:`ais_log_likelihood` and :func:`bdmc`."""
        return {"steps": int(self.steps), "chains": int(self.chains), "leapfrog": int(self.leapfrog)}

    def label(self) -> str:
        """'T = 50, M = 8, L = 5' for a table."""
        return f"T = {self.steps}, M = {self.chains}, L = {self.leapfrog}"


def _run(model, x: torch.Tensor, rows: torch.Tensor | None, z_start: torch.Tensor | None,
         step_sizes: torch.Tensor | None, *, steps: int, chains: int, leapfrog: int, schedule_kind, init: str,
         step_size: float, target_acceptance: float, adapt_rate: float, pilot_chains: int, seed: int,
         max_elements: int) -> AISResult:
    """Forward AIS (``z_start`` None) or reverse AIS from the posterior draws ``z_start``
    (N, k); ``step_sizes`` (N, T - 1): each transition's step size, fixed in advance."""
    _check(steps, chains, leapfrog, step_size, target_acceptance, adapt_rate, pilot_chains, init)
    n = int(x.shape[0])
    if n == 0:
        raise UsageError("AIS needs at least one row")
    if rows is not None and int(rows.shape[0]) != n:
        raise UsageError(f"rows has {rows.shape[0]} indices for {n} rows of x")
    if z_start is not None and int(z_start.shape[0]) != n:
        raise UsageError(f"z has {z_start.shape[0]} rows for {n} rows of x")
    betas = schedule(schedule_kind, steps)
    n_transitions = betas.numel() - 2
    if step_sizes is not None and (tuple(step_sizes.shape) != (n, n_transitions) or not bool((step_sizes > 0).all())):
        raise UsageError(f"step_sizes must be positive, one per row and transition ({n}, {n_transitions}); got "
                         f"{tuple(step_sizes.shape)}")
    reverse = z_start is not None
    site = model_latent(model, x)
    if init == "guide":
        check_new_rows(model, x, rows)
    M = int(chains)
    P = int(pilot_chains) if adapt_rate and step_sizes is None else 0
    chunk = max(1, min(n, max_elements // max(1, (M + P) * int(x[0].numel()))))
    log_w = torch.empty(n, M, dtype=torch.float64)
    acceptance = torch.empty(n, dtype=torch.float64)
    used = torch.empty(n, n_transitions, dtype=torch.float32)
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for s in range(0, n, chunk):
            xb = x[s: s + chunk]
            rb = None if rows is None else rows[s: s + chunk]
            base = guide_posterior(model, xb, rb) if init == "guide" else None
            if base is not None and tuple(base.batch_shape) != (int(xb.shape[0]),):
                raise UsageError(f"the guide's q(z|x) has batch shape {tuple(base.batch_shape)}, not (rows,)")
            path = Path(model, xb, rb, site, base)
            fixed = None if step_sizes is None else step_sizes[s: s + chunk]
            if reverse:
                z0 = z_start[s: s + chunk].to(xb.dtype).unsqueeze(0).expand(M + P, -1, -1).clone()
                bs, fixed = betas.flip(0), None if fixed is None else fixed.flip(1)
            else:
                z0 = path.sample_base(M + P)
                bs = betas
            hmc = HMC(path, int(xb.shape[0]), M, leapfrog, step_size, target_acceptance, adapt_rate, z0.dtype, fixed)
            lw = anneal(path, z0, bs, hmc)  # (M + P, b): the pilots' weights are dropped
            log_w[s: s + chunk] = lw[:M].T
            acceptance[s: s + chunk] = hmc.acceptance
            used[s: s + chunk] = (hmc.step_sizes.flip(1) if reverse else hmc.step_sizes).float()
    seconds = time.perf_counter() - t0
    lme = logmeanexp(log_w, 1)
    ess = torch.exp(2 * torch.logsumexp(log_w, 1) - torch.logsumexp(2 * log_w, 1))
    settings = {"direction": "reverse" if reverse else "forward", "steps": int(betas.numel() - 1), "chains": M,
                "leapfrog": int(leapfrog), "schedule": schedule_kind if isinstance(schedule_kind, str) else "explicit",
                "init": init, "step_size": "given" if step_sizes is not None else float(step_size),
                "target_acceptance": float(target_acceptance), "adapt_rate": float(adapt_rate) if P else 0.0,
                "pilot_chains": P, "seed": int(seed), "n_rows": n}
    return AISResult(Estimate.of(-lme if reverse else lme), log_w, log_w.std(1) if M > 1 else torch.zeros(n),
                     log_mean_exp_se(log_w), ess, acceptance, used, seconds, settings)


def ais_log_likelihood(model, x: torch.Tensor, rows: torch.Tensor | None = None, *, steps: int = 200,
                       chains: int = 16, leapfrog: int = 5, schedule: str | Sequence[float] = "sigmoid",
                       init: str = "guide", step_size: float = 0.1, target_acceptance: float = 0.65,
                       adapt_rate: float = 0.5, pilot_chains: int = 4, seed: int = 0,
                       max_elements: int = MAX_ELEMENTS) -> AISResult:
    """Forward AIS of log p(x_i) for each row of x (N, D), ``chains`` (M) chains per row,
    ``steps`` (T) increments of beta on the ``schedule``, ``leapfrog`` (L) leapfrog steps
    per HMC transition from ``step_size``, adapted per row to ``target_acceptance`` by
    ``pilot_chains`` extra chains (``adapt_rate`` 0: fixed), from the guide's q(z | x_i) or
    the prior (``init``). Each row's estimate log (1/M) sum_m w_m is a stochastic lower
    bound of log p(x_i). Rows go in chunks of about ``max_elements`` / ((M + pilots) D)
    (memory does not grow with N); ``rows``: x's positions in the training set where the
    guide needs them. The caller's random-number stream is left as it was. Cost: about
    T L model evaluations with gradients of (M + pilots) chains per row."""
    return _run(model, x, rows, None, None, steps=steps, chains=chains, leapfrog=leapfrog, schedule_kind=schedule,
                init=init, step_size=step_size, target_acceptance=target_acceptance, adapt_rate=adapt_rate,
                pilot_chains=pilot_chains, seed=seed, max_elements=max_elements)


def reverse_ais(model, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor | None = None, *,
                step_sizes: torch.Tensor | None = None, steps: int = 200, chains: int = 16, leapfrog: int = 5,
                schedule: str | Sequence[float] = "sigmoid", init: str = "guide", step_size: float = 0.1,
                target_acceptance: float = 0.65, adapt_rate: float = 0.5, pilot_chains: int = 4, seed: int = 0,
                max_elements: int = MAX_ELEMENTS) -> AISResult:
    """Reverse AIS: the path of :func:`ais_log_likelihood` run from beta = 1 to 0, every
    chain of row i started at z_i (N, k), an exact draw of p(z | x_i). Each row's
    -log (1/M) sum_m w'_m is a stochastic upper bound of log p(x_i) (E[w'] = 1 / p(x_i))
    when z_i is an exact posterior draw; otherwise it bounds nothing.

    ``step_sizes`` (N, T - 1): the transitions' step sizes in the order of increasing
    beta, e.g. a forward run's ``AISResult.step_sizes`` on the same rows (what
    :func:`bdmc` passes): fixed independently of z_i, they keep the bound exact. Without
    them the step sizes adapt as forward, but the pilot chains start at z_i too, so the
    step sizes depend on the start: a small bias of the kind the pilots avoid forward."""
    return _run(model, x, rows, z, step_sizes, steps=steps, chains=chains, leapfrog=leapfrog,
                schedule_kind=schedule, init=init, step_size=step_size, target_acceptance=target_acceptance,
                adapt_rate=adapt_rate, pilot_chains=pilot_chains, seed=seed, max_elements=max_elements)


# ----------------------------------------------------------------------------- BDMC


def simulate(model, n_rows: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, D), z (n, k)): n rows drawn from the model, z_i ~ p(z), x_i ~ p(x | z_i), by
    tracing ``model.model`` on n rows of zeros with its observation released
    (``poutine.uncondition``). Each z_i is an exact draw of p(z | x_i). The model must
    observe one site holding the whole row (n, D) and sample one local latent."""
    if int(n_rows) != n_rows or n_rows < 1:
        raise UsageError(f"simulate n_rows must be an integer >= 1, got {n_rows}")
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    x0 = torch.zeros(int(n_rows), int(model.data_dim), dtype=dtype)
    site = model_latent(model, x0)
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        with poutine.block(), torch.no_grad(), batch(model, x0):
            tr = poutine.trace(poutine.uncondition(model.model)).get_trace(x0)
    observed = [s for s in tr.nodes.values() if s["type"] == "sample" and s["infer"].get("was_observed")]
    if len(observed) != 1 or tuple(observed[0]["value"].shape) != tuple(x0.shape):
        shapes = ", ".join(f"{s['name']} {tuple(s['value'].shape)}" for s in observed) or "none"
        raise UsageError(f"simulate needs one observed site holding the rows ({tuple(x0.shape)}); the model "
                         f"observes {shapes}")
    return observed[0]["value"].detach(), tr.nodes[site]["value"].detach()


@dataclass
class BDMCResult:
    """Bidirectional Monte Carlo on rows simulated from the model: ``x`` (N, D) and the
    exact posterior draws ``z`` (N, k) they came from; ``forward`` (lower bound) and
    ``reverse`` (upper bound) AIS; ``lower``, ``upper`` and ``gap`` = upper - lower per
    row (paired) as Estimates over rows."""

    x: torch.Tensor
    z: torch.Tensor
    forward: AISResult
    reverse: AISResult

    @property
    def lower(self) -> Estimate:
        return self.forward.log_likelihood

    @property
    def upper(self) -> Estimate:
        return self.reverse.log_likelihood

    @property
    def gap(self) -> Estimate:
        return Estimate.of(self.upper.values - self.lower.values)

    def describe(self) -> dict:
        return {"lower": self.lower.to_dict(), "upper": self.upper.to_dict(), "gap": self.gap.to_dict(),
                "forward": self.forward.describe(), "reverse": self.reverse.describe()}


def bdmc(model, n_rows: int, *, steps: int = 200, chains: int = 16, leapfrog: int = 5,
         schedule: str | Sequence[float] = "sigmoid", init: str = "prior", step_size: float = 0.1,
         target_acceptance: float = 0.65, adapt_rate: float = 0.5, pilot_chains: int = 4, seed: int = 0,
         max_elements: int = MAX_ELEMENTS, proposal: Callable[[torch.Tensor], object] | None = None) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al. 2015): ``n_rows`` rows simulated from the
    model (:func:`simulate`), forward AIS on them (a stochastic lower bound of each log
    p(x_i)) and reverse AIS from the z_i they were drawn with (a stochastic upper bound).
    The true log p(x_i) lies between the two in expectation; their gap bounds either's
    error on data like the model's own. Same settings for both directions (``init``:
    the path's base, the prior by default: the guide may not know simulated rows); the
    reverse run takes the forward run's adapted step sizes, transition for transition.

    ``proposal``: a function of the simulated rows x (N, D) returning a model with the
    same generative part whose guide covers those rows as rows 0..N-1 (e.g. a per-row
    optimum fitted to them, ``inference.guides.optimize_local(model, x).model``); both
    directions then start from that guide (``init`` must be "guide"), so the gap
    measures the AIS one would run from such a guide on real rows. It is called under
    the seed ``seed + 3``; the caller's random-number stream is left as it was."""
    if proposal is not None and init != "guide":
        raise UsageError(f"a BDMC proposal is the path's base: init must be 'guide', got {init!r}")
    x, z = simulate(model, n_rows, seed)
    rows = None
    if proposal is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed + 3)
            model = proposal(x)
        rows = torch.arange(int(x.shape[0]))
    kw = dict(steps=steps, chains=chains, leapfrog=leapfrog, schedule=schedule, init=init, step_size=step_size,
              target_acceptance=target_acceptance, adapt_rate=adapt_rate, pilot_chains=pilot_chains,
              max_elements=max_elements)
    fwd = ais_log_likelihood(model, x, rows, seed=seed + 1, **kw)
    rev = reverse_ais(model, x, z, rows, step_sizes=fwd.step_sizes, seed=seed + 2, **kw)
    return BDMCResult(x, z, fwd, rev)
