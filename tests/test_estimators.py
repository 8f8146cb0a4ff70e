"""Estimator defects found by an outside audit, each pinned by a test that fails on the
code before its fix.

* ``elbo-analytic`` scores a point-mass guide site (an automatic guide's
  Delta(theta, log_density)) by Monte Carlo: for every model and guide the command
  line accepts, ``elbo`` and ``elbo-analytic`` have the same expectation (a z-test over
  paired replicates); Pyro's own TraceMeanField_ELBO drops the Delta's
  log_density and misses by 2.5 nats on the Bayesian Gaussian.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from elbolab import models
from pyro import poutine

from elbolab.inference.objectives import build_objective, delta_site
from elbolab.inference.traces import batch
from elbolab.models import datasources as loaders
from elbolab.models import gaussian, ppca, vae


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small tensors: threads only contend (the conftest restores the count)


# ----------------------------------------------------------------------------- elbo-analytic

N_ROWS = 30  # rows of the data set each objective is evaluated on (a set of its own: scale 1)


def _cases():
    """Every model x guide the command line accepts (the Bayesian Gaussian x every prior)."""
    out = []
    for guide in ppca.GUIDES:
        out.append(("ppca", {"latent_dim": 2, "guide": guide}))
    for prior in gaussian.PRIORS:
        for guide in gaussian.GUIDES:
            # prior_scale 0.5: prior mean precision 4, so that the automatic guides start
            # away from u = log(precision) = 0, where a log-Jacobian would vanish
            out.append(("gaussian", {"prior": prior, "guide": guide, "prior_scale": 0.5}))
    for name in ("vae", "gmvae"):
        for guide in vae.GUIDES:
            extra = {"n_components": 4} if name == "gmvae" else {}
            out.append((name, {"latent_dim": 3, "hidden": [16], "guide": guide, **extra}))
    return out


CASES = _cases()


def _data(name: str, prior: str | None) -> torch.Tensor:
    if name in ("vae", "gmvae"):
        return loaders.load_dataset("digits", binarize="threshold").train[:N_ROWS]
    g = torch.Generator().manual_seed(11)
    d = 1 if prior == "normal-gamma" else (3 if name == "ppca" else 2)
    # correlated rows with an offset, so that the Gaussian's posterior is not the prior
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.3, 0.2, 0.5]])[:d, :d]
    return torch.randn(N_ROWS, d, generator=g) @ mix.T + 1.5


def replicate_losses(m, x, objective: str, n_particles: int, seeds) -> torch.Tensor:
    """The loss (whole-set nats, x a set of its own) of independent replicates, float64."""
    obj = build_objective(objective, n_particles, max_plate_nesting=m.max_plate_nesting)
    out = []
    with torch.no_grad():
        for s in seeds:
            torch.manual_seed(s)
            out.append(float(obj.loss(m, x)))
    return torch.tensor(out, dtype=torch.float64)


def _case_id(case):
    name, cfg = case
    return "-".join([name] + [cfg[k] for k in ("prior", "guide") if k in cfg])


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "lean"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_elbo_and_elbo_analytic_agree_in_expectation(case, validate):
    name, cfg = case
    x = _data(name, cfg.get("prior"))
    torch.manual_seed(0)
    m = models.build_model(name, cfg, x.shape[1], N_ROWS)
    R, K = 12, 400  # replicates of K vectorized particles each
    pyro.enable_validation(validate)
    try:
        # paired: the same seed for both, so both score the same draws of the guide
        mc = replicate_losses(m, x, "elbo", K, range(R))
        analytic = replicate_losses(m, x, "elbo-analytic", K, range(R))
    finally:
        pyro.enable_validation(True)
    d = analytic - mc
    diff, se = float(d.mean()), float(d.std() / math.sqrt(R))
    # Both estimate -E_q[log p(x, z) - log q(z)] (the whole set's negative ELBO), so the
    # paired difference has mean zero. 6 standard errors: with R = 12 replicates the
    # statistic is t with 11 degrees of freedom, P(|t| > 6) = 9e-5 per case, 3e-3 over the
    # 34 cases. The floor, 2e-5 x |loss|, is float32 round-off (a few ulps of sums of
    # 400 x 30 terms) for guides where both objectives score every site alike (every
    # site a Delta: d is then 0 up to round-off and its se too).
    tol = max(6.0 * se, 2e-5 * abs(float(mc.mean())))
    print(f"{_case_id(case)}: elbo-analytic - elbo = {diff:+.4f} (se {se:.4f}, loss {float(mc.mean()):.1f})")
    assert abs(diff) <= tol, (diff, se)


def test_pyros_mean_field_elbo_drops_the_delta_log_density():
    """The mechanism, pinned: on the same draws, Pyro 1.9.2's TraceMeanField_ELBO loss
    is ours minus the Delta sites' log_density (log q's change-of-variables
    share) that its KL(Delta || p) = -log p(theta) leaves out."""
    x = _data("gaussian", "normal-wishart").double()
    torch.manual_seed(0)
    m = models.build_model("gaussian", {"guide": "mean-field", "prior_scale": 0.5}, x.shape[1], N_ROWS).double()
    K = 50
    with torch.no_grad():
        torch.manual_seed(3)
        ours = float(build_objective("elbo-analytic", K).loss(m, x))
        torch.manual_seed(3)
        pyro_elbo = pyro.infer.TraceMeanField_ELBO(num_particles=K, vectorize_particles=True, max_plate_nesting=1)
        with batch(m, x):
            theirs = float(pyro_elbo.differentiable_loss(m.model, m.guide, x))
        torch.manual_seed(3)
        with batch(m, x), pyro.plate("particles", K, dim=-2):
            tr = poutine.trace(m.guide).get_trace(x)
    log_density = sum(float(s["fn"].log_density.sum()) for s in tr.nodes.values()
                      if s["type"] == "sample" and delta_site(s["fn"])) / K
    print(f"Delta log_density per particle: {log_density:.3f}")
    assert abs(log_density) > 1.0  # the term is not negligible here (measured -2.47)
    # float64, the same draws: equal up to round-off
    assert theirs == pytest.approx(ours - log_density, rel=1e-10, abs=1e-9)
