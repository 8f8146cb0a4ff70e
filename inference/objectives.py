"""Objectives, chosen by name and built here only; and the per-datapoint log weights
log w_ik = log p(x_i, z_ik) - log q(z_ik | x_i) that the importance-weighted ones
(and the evaluation) are made of.

Every objective is a callable ``objective(model, guide, x) -> loss``: a scalar,
differentiable surrogate whose value is the negative bound summed over the whole
training set (Pyro's convention: the mini-batch scaled by N/B through the data plate,
which the caller's ``inference.traces.batch`` makes a subsample). Divide by N for nats
per datapoint.

Names:

* ``elbo``: Pyro's ``Trace_ELBO`` (Monte Carlo KL), K vectorized particles averaged;
* ``elbo-analytic``: Pyro's ``TraceMeanField_ELBO`` (analytic KL where the pair of
  families has one registered, Monte Carlo otherwise), except that a point-mass guide
  site (an automatic guide's Delta with its log-Jacobian) is scored by Monte Carlo,
  whose log q keeps the log-Jacobian that Pyro's KL(Delta || p) leaves out;
* ``iwae``: -(N/B) sum_i logmeanexp_k log w_ik (Burda et al. 2015);
* ``renyi``: -(N/B) sum_i 1/(1-alpha) logmeanexp_k (1-alpha) log w_ik (Li & Turner
  2016), computed stably near alpha = 1 (``renyi_bound``); alpha = 0 is IWAE, alpha -> 1
  the ELBO (alpha = 1 itself is refused). A lower bound on log p(x) for alpha >= 0, an
  UPPER one for alpha < 0 (as K grows): ``Objective.describe()["bound"]`` says which;
* ``iwae-dreg``: the IWAE value with doubly reparameterized gradients for the guide
  (Tucker et al. 2018): the guide's gradient is sum_k wnorm_k^2 d log w_k / d z_k
  dz_k / d phi instead of the high-variance score-carrying one.

Pyro's own ``RenyiELBO`` is not used: under a subsampled plate it applies the
plate's scale inside its logsumexp (checked with pyro-ppl 1.9.2), which is not the
IWAE bound on mini-batches.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled, torch_item
from pyro.util import warn_if_nan
from pyro.poutine.util import prune_subsample_sites

from elbolab.inference.errors import UsageError
from elbolab.inference.traces import (DATA_PLATE, LogWeights, as_trace, batch, is_latent, vectorizes, is_scored,
                                      log_weights, logmeanexp, site_log_prob, trace_pair)

OBJECTIVES = ("elbo", "elbo-analytic", "iwae", "renyi", "iwae-dreg")


# ------------------------------------------------------------------------- objectives


class Objective:
    """``objective(model, guide, x) -> loss`` (scalar; whole-data-set nats)."""

    name = "objective"
    vectorize = True  # particles as a vectorized plate (False: one at a time; set by ``loss`` from the model)

    def __init__(self, n_particles: int = 1, max_plate_nesting: int = 1, plate: str = DATA_PLATE):
        self.n_particles, self.max_plate_nesting, self.plate = n_particles, max_plate_nesting, plate

    def __call__(self, model, guide, x) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of a workbench model (``models.protocol.Model``) on the rows x at
        positions ``rows`` of its training set (a mini-batch scaled to it; None: x is a
        set of its own)."""
        self.vectorize = vectorizes(model)
        with batch(model, x, rows):
            return self(model.model, model.guide, x)

    def describe(self) -> dict:
        """The objective's name, particles, and ``bound``: whether its value is a "lower" or
        an "upper" bound on log p(x) (in expectation; see ``renyi_bound_side``)."""
        return {"objective": self.name, "n_particles": self.n_particles, "bound": "lower"}


def delta_site(fn) -> bool:
    """Whether a guide site's distribution is a point mass: a ``Delta``, possibly wrapped
    in ``Independent``, ``MaskedDistribution`` or ``ExpandedDistribution``. Pyro's
    automatic guides (AutoNormal, AutoMultivariateNormal, ...) sample every model site
    as Delta(theta, log_density) with theta = T(u) the image of an unconstrained draw
    u ~ q(u) and log_density = -log|det dtheta/du|, so that Delta.log_prob(theta) is the
    change of variables' share of log q(theta)."""
    while isinstance(fn, (torch.distributions.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


class ScaledTerms:
    """A sum over sites of scale_s * (+-) t_s.sum() (t_s a site's log densities or KL
    terms, scale_s its Pyro scale), added up per distinct scale: the terms that share a
    scale (every site in a mini-batch's data plate has N/B) are summed and multiplied by
    it once. The site-by-site sum's value up to float round-off with fewer tensor
    operations (each a few microseconds forward and as much again backward)."""

    def __init__(self):
        self.groups: dict = {}  # a float scale (or a tensor scale's id) -> [scale, added, subtracted]

    def add(self, t, scale, subtract: bool = False) -> None:
        key = float(scale) if isinstance(scale, (int, float)) else id(scale)
        group = self.groups.setdefault(key, [scale, [], []])
        group[2 if subtract else 1].append(t.sum() if torch.is_tensor(t) else t)

    def total(self):
        out = None
        for scale, added, subtracted in self.groups.values():
            s = _chain_sum(added)
            if subtracted:
                s = -_chain_sum(subtracted) if s is None else s - _chain_sum(subtracted)
            if not (isinstance(scale, (int, float)) and scale == 1):
                s = s * scale
            out = s if out is None else out + s
        return 0.0 if out is None else out


def _chain_sum(values: list):
    """values[0] + values[1] + ... (None for none)."""
    out = None
    for v in values:
        out = v if out is None else out + v
    return out


class PyroELBO(Objective):
    """Pyro's Trace_ELBO / TraceMeanField_ELBO with vectorized particles.

    ``elbo``: per particle, sum log p over the model's sites minus sum log q over the
    guide's. ``elbo-analytic``: observed sites as log p; each latent z by -KL(q(z) || p(z))
    where torch has the pair's closed form, else by Monte Carlo, log p(z) - log q(z);
    the guide's auxiliary sites by -log q.

    A guide site that is a point mass (:func:`delta_site`: an automatic guide's
    Delta(theta, log_density)) is always scored by Monte Carlo, log p(theta) - log_density.
    Pyro's TraceMeanField_ELBO (pyro-ppl 1.9.2) takes Pyro's registered KL for it,
    KL(Delta(theta) || p) = -log p(theta), which leaves out log_density: the term
    -E_q log|det dtheta/du| is then missing from the bound (2.5 nats on a Bayesian
    Gaussian's mean-field guide), and training on it is biased. With the Monte Carlo
    term the two objectives have the same expectation.

    With Pyro's validation on, the traces are Pyro's own (``ELBO._get_traces``, with all
    its checks: model and guide sites matching, shapes, the mean-field condition) and
    ``elbo`` is Pyro's loss; ``elbo-analytic`` scores those checked traces with the
    terms above, after Pyro's check that every guide site is reparameterized. With
    validation off (the training driver's steps after the first) the loss is computed
    from one trace of the guide and the model replayed on it, without the work Pyro does
    for every estimator (log densities the estimator does not use, score parts of
    reparameterized sites, pruned trace copies, a float per site): same draws, same
    value and gradient to float round-off (``tests/test_perf.py``), about 0.3 ms a step
    less. A guide with a site that is not reparameterized or is enumerated gets Pyro's
    own per-particle loss on those traces (TraceMeanField_ELBO refuses such a guide
    under validation).
    """

    def __init__(self, name: str, n_particles: int = 1, max_plate_nesting: int = 1, plate: str = DATA_PLATE):
        super().__init__(n_particles, max_plate_nesting, plate)
        self.name = name
        self.analytic = name == "elbo-analytic"
        cls = pyro.infer.TraceMeanField_ELBO if self.analytic else pyro.infer.Trace_ELBO
        self.elbo = cls(num_particles=n_particles, vectorize_particles=n_particles > 1,
                        max_plate_nesting=max_plate_nesting)
        self.sequential = None  # the same estimator drawing its particles one at a time

    def __call__(self, model, guide, x) -> torch.Tensor:
        if not self.vectorize and self.n_particles > 1:  # the particles one at a time, as Pyro loops
            if self.sequential is None:
                self.sequential = type(self.elbo)(num_particles=self.n_particles, vectorize_particles=False,
                                                  max_plate_nesting=self.max_plate_nesting)
            if not self.analytic:
                return self.sequential.differentiable_loss(model, guide, x)
            return self.checked_analytic_loss(model, guide, x, self.sequential)
        if not is_validation_enabled():
            return self.lean_loss(model, guide, x)
        if not self.analytic:
            return self.elbo.differentiable_loss(model, guide, x)
        return self.checked_analytic_loss(model, guide, x, self.elbo)

    def checked_analytic_loss(self, model, guide, x, elbo) -> torch.Tensor:
        """``elbo-analytic`` on the traces Pyro's estimator ``elbo`` makes and checks (one
        vectorized pair for K > 1, or one pair per particle)."""
        loss = 0.0
        for model_tr, guide_tr in elbo._get_traces(model, guide, (x,), {}):
            for site in guide_tr.nodes.values():
                if is_scored(site):
                    check_fully_reparametrized(site)  # Pyro's own refusal, as in its estimator
            loss = loss - self.mean_field_elbo(model_tr, guide_tr) / self.n_particles
        warn_if_nan(loss, "loss")
        return loss

    def lean_loss(self, model, guide, x) -> torch.Tensor:
        """The loss of ``differentiable_loss`` without Pyro's per-estimator overhead."""
        K = self.n_particles
        # Pyro's vectorized particles (K > 1): the same plate dim, so the same draws
        guide_tr, model_tr = trace_pair(model, guide, (x,), K, self.max_plate_nesting, vectorize=K > 1)
        guide_sites = [s for s in guide_tr.nodes.values() if is_scored(s)]
        if any(not s["fn"].has_rsample or s["infer"].get("enumerate") for s in guide_sites):
            return self._pyro_particle_loss(model_tr, guide_tr)  # score-function terms: Pyro's estimator
        if not self.analytic:  # Trace_ELBO: sum log p over the model's sites, minus sum log q over the guide's
            terms = ScaledTerms()
            for site in model_tr.nodes.values():
                if is_scored(site):
                    terms.add(site_log_prob(site), site["scale"])
            for site in guide_sites:
                terms.add(site_log_prob(site), site["scale"], subtract=True)
            elbo = terms.total()
        else:
            elbo = self.mean_field_elbo(model_tr, guide_tr)
            if elbo is None:  # a model latent without a guide site: Pyro says what is wrong
                return self._pyro_particle_loss(model_tr, guide_tr)
        return -elbo if K == 1 else -elbo / K

    @staticmethod
    def mean_field_elbo(model_tr, guide_tr) -> torch.Tensor | None:
        """The ``elbo-analytic`` bound of one trace pair, summed over its particles, rows
        (scaled) and sites (see the class docstring); None when a model latent has no
        guide site."""
        guide_sites = {n: s for n, s in guide_tr.nodes.items() if is_scored(s)}
        terms = ScaledTerms()
        for name, site in model_tr.nodes.items():
            if not is_scored(site):
                continue
            if site["is_observed"]:
                terms.add(site_log_prob(site), site["scale"])
                continue
            q = guide_sites.pop(name, None)
            if q is None:
                return None
            if delta_site(q["fn"]):  # log p(theta) - log_density: Pyro's KL leaves out the latter
                terms.add(site_log_prob(site), site["scale"])
                terms.add(site_log_prob(q), q["scale"], subtract=True)
                continue
            try:
                kl = torch.distributions.kl_divergence(q["fn"], site["fn"])
            except NotImplementedError:  # Monte Carlo instead, as Pyro does
                terms.add(site_log_prob(site), site["scale"])
                terms.add(site_log_prob(q), q["scale"], subtract=True)
                continue
            if not torch.is_tensor(kl):  # (a constant KL, e.g. 0: the same for every row)
                kl = kl * q["fn"].batch_shape.numel()
            elif q["mask"] is not None:  # a masked-out row has no KL (as scale_and_mask)
                kl = torch.where(torch.as_tensor(q["mask"], device=kl.device), kl, kl.new_zeros(()))
            terms.add(kl, q["scale"], subtract=True)
        for q in guide_sites.values():  # the guide's auxiliary sites (none in the model)
            terms.add(site_log_prob(q), q["scale"], subtract=True)
        return terms.total()

    def _pyro_particle_loss(self, model_tr, guide_tr) -> torch.Tensor:
        """Pyro's own loss (value, and the surrogate's gradient) from these traces."""
        model_tr, guide_tr = prune_subsample_sites(as_trace(model_tr)), prune_subsample_sites(as_trace(guide_tr))
        model_tr.compute_log_prob()
        guide_tr.compute_score_parts()
        loss, surrogate = self.elbo._differentiable_loss_particle(model_tr, guide_tr)
        loss, surrogate = loss / self.n_particles, surrogate / self.n_particles
        return loss + (surrogate - torch_item(surrogate))


class IWAE(Objective):
    name = "iwae"

    def bound(self, lw: LogWeights) -> torch.Tensor:
        return logmeanexp(lw.log_w, 0)  # (B,)

    def __call__(self, model, guide, x) -> torch.Tensor:
        lw = log_weights(model, guide, x, self.n_particles, self.max_plate_nesting, self.plate,
                         vectorize=self.vectorize)
        return -lw.scale * self.bound(lw).sum()


class UpperBoundWarning(UserWarning):
    """An objective whose value is not a lower bound on log p(x) is being trained on."""


def renyi_bound(log_w: torch.Tensor, alpha: float, dim: int = 0) -> torch.Tensor:
    """The Renyi bound of K log weights along ``dim`` (Li & Turner 2016)::

        L_alpha = 1/(1 - alpha) log (1/K) sum_k w_k^(1 - alpha)

    computed stably for every alpha != 1, in float64 (returned in log_w's dtype). With
    c_k = log w_k - mean_k log w_k and e = 1 - alpha,

        L_alpha = mean_k log w_k + log((1/K) sum_k exp(e c_k)) / e,

    and where |e c_k| <= 1 for every k the second term is log1p(mean_k expm1(e c_k)) / e,
    which keeps its relative precision as e -> 0 (its limit is the ELBO, mean_k log w_k,
    and its first-order term e/2 Var_k(log w_k)). The direct formula cancels: in float32
    its error is about 1e-7 |log w| / |e| nats (0.25 nats at e = 1e-6 on a VAE's
    weights), and float64 alone only moves that to 1e-16 |log w| / |e|.
    """
    e = 1.0 - float(alpha)
    if e == 0.0:
        raise UsageError("alpha 1 is not a Renyi bound (its limit is the ELBO: use the objective elbo)")
    lw = log_w.double()
    mean = lw.mean(dim, keepdim=True)
    s = e * (lw - mean)
    small = s.abs().amax(dim) <= 1.0  # rows where expm1 cannot overflow and log1p is the precise form
    near = torch.log1p(torch.expm1(s.clamp(-1.0, 1.0)).mean(dim))  # clamped: finite (and unused) elsewhere
    far = torch.logsumexp(s, dim) - math.log(s.shape[dim])
    return (mean.squeeze(dim) + torch.where(small, near, far) / e).to(log_w.dtype)


def renyi_bound_side(alpha: float, n_particles: int) -> tuple[str, str]:
    """("lower" | "upper", why) for the K-sample Renyi objective L_{alpha,K} against log p(x).

    Li & Turner (2016): L_alpha = log p(x) - D_alpha(q || p(z | x)) with D_alpha >= 0
    for alpha > 0 and <= 0 for alpha < 0; and for alpha <= 1 the K-sample estimate's
    expectation rises with K from the ELBO (K = 1) to L_alpha."""
    if n_particles == 1:
        return "lower", "one particle: the estimate is log w itself, the ELBO's"
    if alpha > 1:
        return "lower", ("alpha > 1: a power mean of w with a negative exponent is below the geometric mean, so "
                         "L_{alpha,K} <= mean_k log w_k draw by draw: below the ELBO, itself below log p(x)")
    if alpha >= 0:
        return "lower", ("0 <= alpha < 1: E[L_{alpha,K}] <= L_alpha <= log p(x) (Jensen; D_alpha >= 0), "
                         "rising in K")
    return "upper", ("alpha < 0: L_alpha >= log p(x) (D_alpha <= 0), and E[L_{alpha,K}] rises with K from the "
                     "ELBO (K = 1) to L_alpha: above log p(x) once K is large enough (how large depends on q), so "
                     "maximizing it can overshoot the likelihood")


_WARNED_UPPER: set[float] = set()


class Renyi(IWAE):
    """The Renyi objective of Li & Turner (2016): per row, :func:`renyi_bound` of the K
    log weights. alpha = 0 is IWAE; alpha -> 1 the ELBO; 0 < alpha < 1 a lower bound on
    log p(x) between the two; alpha > 1 a lower bound below the ELBO; alpha < 0 NOT a
    lower bound: L_alpha >= log p(x), and the K-sample estimate exceeds log p(x) once K is
    large enough (measured on PPCA: +0.095 nats at alpha = -1, K = 5). ``describe()``
    says which (``bound``)."""

    name = "renyi"

    def __init__(self, alpha: float, n_particles: int = 1, max_plate_nesting: int = 1, plate: str = DATA_PLATE):
        super().__init__(n_particles, max_plate_nesting, plate)
        self.alpha = float(alpha)

    def bound(self, lw: LogWeights) -> torch.Tensor:
        return renyi_bound(lw.log_w, self.alpha, 0)

    def describe(self) -> dict:
        side, why = renyi_bound_side(self.alpha, self.n_particles)
        return {**super().describe(), "alpha": self.alpha, "bound": side, "bound_reason": why}


class IWAEDReG(IWAE):
    name = "iwae-dreg"

    def __call__(self, model, guide, x) -> torch.Tensor:
        if not self.vectorize:
            raise UsageError("iwae-dreg reweights the gradients of vectorized particles; this model draws its "
                             "particles one at a time (use iwae)")
        lw = log_weights(model, guide, x, self.n_particles, self.max_plate_nesting, self.plate, detach_q_params=True)
        log_w = lw.log_w
        if torch.is_grad_enabled():
            wnorm = torch.softmax(log_w.detach(), 0)  # (K, B), normalized importance weights
            for site in lw.guide_trace.nodes.values():
                if is_latent(site) and site["value"].requires_grad:
                    event = site["value"].dim() - 2
                    w = wnorm.reshape(wnorm.shape + (1,) * event)
                    site["value"].register_hook(lambda g, w=w: g * w)
        return -lw.scale * logmeanexp(log_w, 0).sum()


def build_objective(name: str, n_particles: int = 1, alpha: float | None = None,
                    max_plate_nesting: int = 1, plate: str = DATA_PLATE, for_training: bool = False) -> Objective:
    """The one place an objective is made from its name. ``for_training``: the objective
    is about to be maximized; one whose ``describe()["bound"]`` is "upper" (Renyi with
    alpha < 0) then warns (``UpperBoundWarning``, once per alpha in a process): maximizing
    it does not maximize a lower bound on the likelihood."""
    if name not in OBJECTIVES:
        raise UsageError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if int(n_particles) != n_particles or n_particles < 1:
        raise UsageError(f"n_particles must be an integer >= 1, got {n_particles}")
    n_particles = int(n_particles)
    if name == "renyi":
        alpha = 0.5 if alpha is None else float(alpha)
        if not math.isfinite(alpha):
            raise UsageError(f"alpha must be a finite number, got {alpha}")
        if alpha == 1.0:
            raise UsageError("alpha 1 is not a Renyi bound (its limit is the ELBO: use the objective elbo)")
        objective = Renyi(alpha, n_particles, max_plate_nesting, plate)
        side, why = renyi_bound_side(alpha, n_particles)
        if for_training and side == "upper" and alpha not in _WARNED_UPPER:
            _WARNED_UPPER.add(alpha)
            warnings.warn(f"--objective renyi --alpha {alpha:g} is an UPPER bound on log p(x), not a lower "
                          f"one ({why})", UpperBoundWarning, stacklevel=2)
        return objective
    if alpha is not None:
        raise UsageError(f"alpha applies to the objective renyi only, not {name}")
    if name in ("elbo", "elbo-analytic"):
        return PyroELBO(name, n_particles, max_plate_nesting, plate)
    return (IWAEDReG if name == "iwae-dreg" else IWAE)(n_particles, max_plate_nesting, plate)
