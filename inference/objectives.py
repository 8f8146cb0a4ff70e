"""Objectives, chosen by name and built here only; and the per-datapoint log weights
log w_ik = log p(x_i, z_ik) - log q(z_ik | x_i) that the importance-weighted ones
(and the evaluation) are made of.

Every objective is a callable ``objective(model, guide, x, idx) -> loss``: a scalar,
differentiable surrogate whose value is the negative bound summed over the whole
training set (Pyro's convention: the mini-batch scaled by N/B through the
subsampled ``data`` plate). Divide by N for nats per datapoint.

Names:

* ``elbo``: Pyro's ``Trace_ELBO`` (Monte Carlo KL), K vectorized particles averaged;
* ``elbo-analytic``: Pyro's ``TraceMeanField_ELBO`` (analytic KL where the pair of
  families has one registered, Monte Carlo otherwise);
* ``iwae``: -(N/B) sum_i logmeanexp_k log w_ik (Burda et al. 2015);
* ``renyi``: -(N/B) sum_i 1/(1-alpha) logmeanexp_k (1-alpha) log w_ik (Li & Turner
  2016); alpha = 0 is IWAE, alpha -> 1 the ELBO (alpha = 1 itself is refused);
* ``iwae-dreg``: the IWAE value with doubly reparameterized gradients for the guide
  (Tucker et al. 2018): the guide's gradient is sum_k wnorm_k^2 d log w_k / d z_k
  dz_k / d phi instead of the high-variance score-carrying one.

Pyro's own ``RenyiELBO`` is not used: under a subsampled plate it applies the
plate's scale inside its logsumexp (checked with pyro-ppl 1.9.2), which is not the
IWAE bound on mini-batches.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from inference.errors import UsageError

OBJECTIVES = ("elbo", "elbo-analytic", "iwae", "renyi", "iwae-dreg")
DATA_PLATE = "data"
PARTICLES_PLATE = "particles"


# ------------------------------------------------------------------------- log weights


@dataclass
class LogWeights:
    """Per-particle, per-datapoint log densities, each (K, B), unscaled.

    ``log_lik``: observed sites of the model; ``log_prior``: latent sites of the
    model; ``log_q``: the guide. ``scale`` is the data plate's N/B.
    """

    log_lik: torch.Tensor
    log_prior: torch.Tensor
    log_q: torch.Tensor
    scale: float
    guide_trace: object = None

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q


def _in_data_plate(site) -> bool:
    return any(f.name == DATA_PLATE for f in site["cond_indep_stack"])


def detach_distribution(fn):
    """The same distribution with its parameters detached (for DReG's log q)."""
    if isinstance(fn, (dist.Independent, torch.distributions.Independent)):
        return dist.Independent(detach_distribution(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, torch.distributions.Normal):
        return dist.Normal(fn.loc.detach(), fn.scale.detach())
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    raise UsageError(f"iwae-dreg supports Normal and MultivariateNormal guides, not {type(fn).__name__}")


def log_weights(model: Callable, guide: Callable, x: torch.Tensor, idx: torch.Tensor | None,
                n_particles: int, max_plate_nesting: int = 1, detach_q_params: bool = False) -> LogWeights:
    """Trace the guide with ``n_particles`` vectorized particles (an outermost plate),
    replay the model on its samples, and read every site's log-density per particle
    and datapoint. With ``detach_q_params`` log q is computed with the guide's
    distribution parameters detached (the sample z keeps its path to them)."""
    K, B = int(n_particles), int(x.shape[0])
    with pyro.plate(PARTICLES_PLATE, K, dim=-(max_plate_nesting + 1)):
        guide_tr = poutine.trace(guide).get_trace(x, idx)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, idx)
    zeros = x.new_zeros(K, B)
    log_q, log_prior, log_lik = zeros, zeros, zeros
    scale = 1.0
    for site in guide_tr.nodes.values():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if not site["fn"].has_rsample:
            raise UsageError(f"guide site {site['name']!r} is not reparameterizable; "
                             "importance-weighted objectives need reparameterized guides")
        fn = detach_distribution(site["fn"]) if detach_q_params else None
        log_q = log_q + _local_log_prob(site, K, B, fn)
    for site in model_tr.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = _local_log_prob(site, K, B)
        if site["is_observed"]:
            log_lik = log_lik + lp
            scale = float(site["scale"])
        else:
            log_prior = log_prior + lp
    return LogWeights(log_lik, log_prior, log_q, scale, guide_tr)


def _local_log_prob(site, K: int, B: int, fn=None) -> torch.Tensor:
    if not _in_data_plate(site):
        raise UsageError(
            f"site {site['name']!r} is outside plate('data'); importance weights need every sampled "
            "site to be local to a datapoint (global latents have no per-datapoint weight)"
        )
    fn = site["fn"] if fn is None else fn
    lp = fn.log_prob(site["value"])
    mask = site["mask"]
    if mask is not None:  # where, not a product: a masked-out -inf must give 0, not nan
        lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, lp.new_zeros(()))
    return lp.expand(K, B)


def logmeanexp(a: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


# ------------------------------------------------------------------------- objectives


class Objective:
    """``objective(model, guide, x, idx) -> loss`` (scalar; whole-data-set nats)."""

    name = "objective"

    def __init__(self, n_particles: int = 1, max_plate_nesting: int = 1):
        self.n_particles, self.max_plate_nesting = n_particles, max_plate_nesting

    def __call__(self, model, guide, x, idx=None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"objective": self.name, "n_particles": self.n_particles}


class PyroELBO(Objective):
    """Pyro's Trace_ELBO / TraceMeanField_ELBO with vectorized particles.

    With Pyro's validation on, Pyro computes the loss itself (with all its checks:
    model and guide sites matching, shapes, the mean-field condition). With it off
    (the training driver's steps after the first), the same loss is computed from one
    trace of the guide and the model replayed on it, without the work Pyro does for
    every estimator (log densities the estimator does not use, score parts of
    reparameterized sites, pruned trace copies, a float per site): same draws, same
    value and gradient to float round-off (``tests/test_perf.py``), about 0.3 ms a
    step less. A guide with a site that is not reparameterized or is enumerated gets
    Pyro's own per-particle loss on those traces.
    """

    def __init__(self, name: str, n_particles: int = 1, max_plate_nesting: int = 1):
        super().__init__(n_particles, max_plate_nesting)
        self.name = name
        self.analytic = name == "elbo-analytic"
        cls = pyro.infer.TraceMeanField_ELBO if self.analytic else pyro.infer.Trace_ELBO
        self.elbo = cls(num_particles=n_particles, vectorize_particles=n_particles > 1,
                        max_plate_nesting=max_plate_nesting)

    def __call__(self, model, guide, x, idx=None) -> torch.Tensor:
        if is_validation_enabled():
            return self.elbo.differentiable_loss(model, guide, x, idx)
        return self.lean_loss(model, guide, x, idx)

    def lean_loss(self, model, guide, x, idx=None) -> torch.Tensor:
        """The loss of ``differentiable_loss`` without Pyro's per-estimator overhead."""
        K = self.n_particles
        plate = (pyro.plate("num_particles_vectorized", K, dim=-(self.max_plate_nesting + 1)) if K > 1
                 else contextlib.nullcontext())  # Pyro's vectorized particles: same dim, same draws
        with plate:
            guide_tr = poutine.trace(guide).get_trace(x, idx)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, idx)
        model_sites = [(n, s) for n, s in model_tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
        guide_sites = {n: s for n, s in guide_tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
        if any(not s["fn"].has_rsample or s["infer"].get("enumerate") for s in guide_sites.values()):
            return self._pyro_particle_loss(model_tr, guide_tr)  # score-function terms: Pyro's estimator
        if not self.analytic:  # Trace_ELBO: sum log p over the model's sites, minus sum log q over the guide's
            elbo = sum(_log_prob_sum(s) for _, s in model_sites) - sum(_log_prob_sum(s) for s in guide_sites.values())
            return -elbo / K
        elbo = 0.0  # TraceMeanField_ELBO: the KL of each latent where a closed form is registered
        for name, site in model_sites:
            if site["is_observed"]:
                elbo = elbo + _log_prob_sum(site)
                continue
            q = guide_sites.pop(name, None)
            if q is None:  # a model latent without a guide site: Pyro says what is wrong
                return self._pyro_particle_loss(model_tr, guide_tr)
            try:
                kl = torch.distributions.kl_divergence(q["fn"], site["fn"])
            except NotImplementedError:  # Monte Carlo instead, as Pyro does
                elbo = elbo + _log_prob_sum(site) - _log_prob_sum(q)
                continue
            kl = scale_and_mask(kl, q["scale"], q["mask"])
            elbo = elbo - (kl.sum() if torch.is_tensor(kl) else kl * q["fn"].batch_shape.numel())
        for q in guide_sites.values():  # the guide's auxiliary sites (none in the model)
            elbo = elbo - _log_prob_sum(q)
        return -elbo / K

    def _pyro_particle_loss(self, model_tr, guide_tr) -> torch.Tensor:
        """Pyro's own loss (value, and the surrogate's gradient) from these traces."""
        model_tr, guide_tr = prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)
        model_tr.compute_log_prob()
        guide_tr.compute_score_parts()
        loss, surrogate = self.elbo._differentiable_loss_particle(model_tr, guide_tr)
        loss, surrogate = loss / self.n_particles, surrogate / self.n_particles
        return loss + (surrogate - torch_item(surrogate))


def _log_prob_sum(site) -> torch.Tensor:
    """A sample site's log density, scaled and masked as Pyro does, summed."""
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()


class IWAE(Objective):
    name = "iwae"

    def bound(self, lw: LogWeights) -> torch.Tensor:
        return logmeanexp(lw.log_w, 0)  # (B,)

    def __call__(self, model, guide, x, idx=None) -> torch.Tensor:
        lw = log_weights(model, guide, x, idx, self.n_particles, self.max_plate_nesting)
        return -lw.scale * self.bound(lw).sum()


class Renyi(IWAE):
    name = "renyi"

    def __init__(self, alpha: float, n_particles: int = 1, max_plate_nesting: int = 1):
        super().__init__(n_particles, max_plate_nesting)
        self.alpha = float(alpha)

    def bound(self, lw: LogWeights) -> torch.Tensor:
        one_minus = 1.0 - self.alpha
        return logmeanexp(one_minus * lw.log_w, 0) / one_minus

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha}


class IWAEDReG(IWAE):
    name = "iwae-dreg"

    def __call__(self, model, guide, x, idx=None) -> torch.Tensor:
        lw = log_weights(model, guide, x, idx, self.n_particles, self.max_plate_nesting, detach_q_params=True)
        log_w = lw.log_w
        if torch.is_grad_enabled():
            wnorm = torch.softmax(log_w.detach(), 0)  # (K, B), normalized importance weights
            for site in lw.guide_trace.nodes.values():
                if (site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
                        and site["value"].requires_grad):
                    event = site["value"].dim() - 2
                    w = wnorm.reshape(wnorm.shape + (1,) * event)
                    site["value"].register_hook(lambda g, w=w: g * w)
        return -lw.scale * logmeanexp(log_w, 0).sum()


def build_objective(name: str, n_particles: int = 1, alpha: float | None = None,
                    max_plate_nesting: int = 1) -> Objective:
    """The one place an objective is made from its name."""
    if name not in OBJECTIVES:
        raise UsageError(f"unknown --objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if int(n_particles) != n_particles or n_particles < 1:
        raise UsageError(f"--n-particles must be an integer >= 1, got {n_particles}")
    n_particles = int(n_particles)
    if name == "renyi":
        alpha = 0.5 if alpha is None else float(alpha)
        if not math.isfinite(alpha):
            raise UsageError(f"--alpha must be a finite number, got {alpha}")
        if alpha == 1.0:
            raise UsageError("--alpha 1 is not a Renyi bound (its limit is the ELBO: use --objective elbo)")
        return Renyi(alpha, n_particles, max_plate_nesting)
    if alpha is not None:
        raise UsageError(f"--alpha applies to --objective renyi only, not {name}")
    if name in ("elbo", "elbo-analytic"):
        return PyroELBO(name, n_particles, max_plate_nesting)
    return (IWAEDReG if name == "iwae-dreg" else IWAE)(n_particles, max_plate_nesting)
