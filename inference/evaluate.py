"""Evaluation: per-datapoint ELBO and its terms, as means with standard errors.

Every number is per datapoint in nats. An :class:`Estimate` carries the mean over
the rows of a set, its standard error (over rows: the spread of the per-row values
divided by sqrt(n), which includes the Monte Carlo noise of each row's estimate),
and the per-row values.

Models whose guide samples latents outside plate("data") (global latents, e.g. the
Bayesian Gaussian's mean and precision) have no per-row ELBO: for them the estimate
is of the whole set's ELBO, log p(X, theta) - log q(theta) per draw theta ~ q,
divided by the number of rows; its standard error is over the ``n_particles``
independent draws (``Estimate.n`` is then the number of draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from inference.objectives import DATA_PLATE, PARTICLES_PLATE, log_weights


@dataclass
class Estimate:
    mean: float
    se: float
    n: int
    values: torch.Tensor | None = None  # per row

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        v = values.detach().double().flatten()
        n = v.numel()
        se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return cls(float(v.mean()), se, n, v)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "se": self.se, "n": self.n}


def elbo_terms(model, x: torch.Tensor, rows: torch.Tensor | None = None, n_particles: int = 1) -> dict:
    """Per-row Monte Carlo ELBO, reconstruction term E_q log p(x|z) and KL term
    E_q[log q(z|x) - log p(z)], each (B,), from ``n_particles`` vectorized draws.

    ``rows``: the training-row indices of ``x`` (needed by per-datapoint guides);
    None for rows that are a set of their own (validation, test).
    """
    with torch.no_grad():
        lw = log_weights(model.model, model.guide, x, rows, n_particles, getattr(model, "max_plate_nesting", 1))
    return {"elbo": lw.log_w.mean(0), "recon": lw.log_lik.mean(0), "kl": (lw.log_q - lw.log_prior).mean(0)}


def global_latent_sites(model, x: torch.Tensor, rows: torch.Tensor | None = None) -> list[str]:
    """The guide's latent sites outside plate("data"), from one trace of the guide (the
    random-number stream is left as it was)."""
    with torch.no_grad(), torch.random.fork_rng():
        tr = poutine.trace(model.guide).get_trace(x, rows)
    return [name for name, site in tr.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
            and not any(f.name == DATA_PLATE for f in site["cond_indep_stack"])]


def _per_particle(site, K: int, nesting: int) -> torch.Tensor:
    """A site's log density summed over everything but the particles plate, scaled (K,)."""
    lp = site["fn"].log_prob(site["value"])
    mask = site["mask"]
    if mask is not None:
        lp = lp * mask if isinstance(mask, torch.Tensor) else lp * float(bool(mask))
    lp = lp.reshape((1,) * max(0, nesting + 1 - lp.dim()) + tuple(lp.shape))
    lp = lp.movedim(lp.dim() - nesting - 1, 0)
    return lp.reshape(lp.shape[0], -1).sum(-1).expand(K) * site["scale"]


def whole_set_log_weights(model, x: torch.Tensor, rows: torch.Tensor | None, n_particles: int,
                          chunk: int = 100) -> dict[str, torch.Tensor]:
    """log p(X | theta_k), log p(theta_k) and log q(theta_k) of the whole set X (the rows
    of x, scaled by the data plate to the set they subsample), for K independent
    draws theta_k ~ q, vectorized in chunks: each (K,)."""
    nesting = getattr(model, "max_plate_nesting", 1)
    out: dict[str, list[torch.Tensor]] = {"log_lik": [], "log_prior": [], "log_q": []}
    size = x.shape[0]
    with torch.no_grad():
        for start in range(0, n_particles, chunk):
            K = min(chunk, n_particles - start)
            with pyro.plate(PARTICLES_PLATE, K, dim=-(nesting + 1)):
                guide_tr = poutine.trace(model.guide).get_trace(x, rows)
                model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x, rows)
            terms = {k: x.new_zeros(K, dtype=torch.float64) for k in out}
            for site in guide_tr.nodes.values():
                if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
                    terms["log_q"] = terms["log_q"] + _per_particle(site, K, nesting)
            for site in model_tr.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                key = "log_lik" if site["is_observed"] else "log_prior"
                terms[key] = terms[key] + _per_particle(site, K, nesting)
                if site["is_observed"]:
                    size = x.shape[0] * float(site["scale"])
            for k in out:
                out[k].append(terms[k])
    result = {k: torch.cat(v) for k, v in out.items()}
    result["n_rows"] = torch.tensor(float(size))  # the size of the set the totals are of
    return result


def whole_set_elbo_estimate(model, x: torch.Tensor, rows: torch.Tensor | None = None,
                            n_particles: int = 100) -> dict[str, Estimate]:
    """The ELBO of the whole set, its expected log-likelihood and its KL(q || prior), per
    datapoint, each with the standard error over the ``n_particles`` draws."""
    lw = whole_set_log_weights(model, x, rows, n_particles)
    n = float(lw["n_rows"])
    return {"elbo": Estimate.of((lw["log_lik"] + lw["log_prior"] - lw["log_q"]) / n),
            "recon": Estimate.of(lw["log_lik"] / n), "kl": Estimate.of((lw["log_q"] - lw["log_prior"]) / n)}


def elbo_estimate(model, x: torch.Tensor, rows: torch.Tensor | None = None, n_particles: int = 1,
                  batch_size: int = 1000) -> dict[str, Estimate]:
    """``elbo_terms`` over a whole set in batches: {"elbo", "recon", "kl"} -> Estimate
    (for a model with global latents, ``whole_set_elbo_estimate``)."""
    probe = slice(0, min(batch_size, x.shape[0]))
    if global_latent_sites(model, x[probe], None if rows is None else rows[probe]):
        return whole_set_elbo_estimate(model, x, rows, n_particles)
    parts: dict[str, list[torch.Tensor]] = {"elbo": [], "recon": [], "kl": []}
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        terms = elbo_terms(model, x[sl], None if rows is None else rows[sl], n_particles)
        for k in parts:
            parts[k].append(terms[k])
    return {k: Estimate.of(torch.cat(v)) for k, v in parts.items()}
