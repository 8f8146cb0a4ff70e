"""Evaluation: per-datapoint ELBO and its terms, as means with standard errors.

Every number is per datapoint in nats. An :class:`Estimate` carries the mean over
the rows of a set, its standard error (over rows: the spread of the per-row values
divided by sqrt(n), which includes the Monte Carlo noise of each row's estimate),
and the per-row values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inference.objectives import log_weights


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


def elbo_estimate(model, x: torch.Tensor, rows: torch.Tensor | None = None, n_particles: int = 1,
                  batch_size: int = 1000) -> dict[str, Estimate]:
    """``elbo_terms`` over a whole set in batches: {"elbo", "recon", "kl"} -> Estimate."""
    parts: dict[str, list[torch.Tensor]] = {"elbo": [], "recon": [], "kl": []}
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        terms = elbo_terms(model, x[sl], None if rows is None else rows[sl], n_particles)
        for k in parts:
            parts[k].append(terms[k])
    return {k: Estimate.of(torch.cat(v)) for k, v in parts.items()}
