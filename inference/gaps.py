"""The inference-gap decomposition of Cremer, Li & Duvenaud (2018), per datapoint:

    inference gap      log p(x) - L[q]      how far the guide's ELBO is from the likelihood
    approximation gap  log p(x) - L[q*]     what the best member q* of the family cannot close
    amortization gap   L[q*] - L[q]         what the guide loses against the best member

so inference gap = approximation gap + amortization gap, row by row. q is the guide
under study (an encoder, a refined encoder, a trained table) and q* the per-row optimum
of the same family for the same fixed model (:func:`inference.guides.optimize_local`).

Every quantity is a mean over rows with its standard error. The gaps are means of
per-row differences (paired: the same rows, and the same random numbers for q and q*),
so their standard errors are those of the differences, much smaller than those of
the bounds they subtract.

log p(x): exact where the model has ``exact_log_likelihood`` (PPCA), and then the
ELBOs too are exact (``exact_elbo``). Otherwise each bound is estimated from
``n_samples`` importance samples per row: L[q] as the mean of the log weights,
IWAE_K[q] as their log-mean-exp, and log p(x_i) as the larger of the two K-sample
IWAE estimates, with q and with q* as proposal. Each IWAE estimate is a lower bound
of log p(x_i) in expectation; the larger of two is at least as tight, and exceeds
log p(x_i) only by Monte Carlo error (which the standard error over rows includes).
Since IWAE_K[q] >= L[q] draw by draw (Jensen), the inference and approximation gaps
so measured are never negative.

Reliability. An importance-sampled log p(x) is only as good as the tail of its weights:
with heavy-tailed weights the IWAE estimate falls short of log p(x) by more than its
standard error says (measured: PPCA with a poor diagonal encoder on a strongly
correlated posterior, every row's k > 0.7, approximation gap estimated well below its
closed form). So every Estimate here carries ``pareto_k``, the Pareto k summary of the
weights it came from (``inference.diagnostics.ParetoK``), and ``reliable``:

* ``iwae``, ``iwae_star``: the weights of q, of q*; reliable by the summary's rule (at
  most 1% of rows with k > 0.7);
* ``log_likelihood``: each row's k from the proposal whose estimate was taken (q or
  q*); reliable likewise (exact: no k, reliable);
* ``inference_gap``, ``approximation_gap``: log p(x)'s summary and flag;
* ``elbo``, ``elbo_star``: their weights' summary (None when exact), reliable: a mean of
  log weights, whose error the standard error measures whatever the weights' tail;
* ``amortization_gap``: L[q*] - L[q], no log p(x): reliable.

``reliable`` of the whole result: every quantity's flag.

Annealed importance sampling. Given an AIS budget (``ais``), log p(x) is estimated by
AIS (``inference.ais``, Neal 2001) instead when the importance-sampled one is flagged
unreliable (or always, ``ais_when="always"``): each row's estimate from M chains
annealed from q* (the best proposal at hand) to the posterior, a stochastic lower bound
like IWAE but one that tightens with the number of steps rather than with the tail of
q*'s weights. The IS estimate stays beside it (``log_likelihood_is``, with its Pareto
k), with their paired difference (``ais_minus_is``). An AIS estimate has no Pareto k of
its own (a few chains per row are too few for a tail fit); its ``reliable`` flag comes
from ``vouch``, a check of the same AIS on data with a known answer: bidirectional Monte
Carlo on rows simulated from the model (``inference.compare`` runs it; without one the
flag is False). ``log_likelihood_estimator`` names the estimator: "exact", "is" or
"ais".
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from elbolab.inference.ais import Budget, ais_log_likelihood
from elbolab.inference.diagnostics import ParetoK, pareto_k_summary
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import Estimate, importance_estimates
from elbolab.inference.traces import reads_row_indices

QUANTITIES = ("log_likelihood", "elbo", "iwae", "elbo_star", "iwae_star",
              "inference_gap", "approximation_gap", "amortization_gap")
AIS_WHEN = ("unreliable", "always")


def _exact(model, name: str):
    try:
        return getattr(model, name)
    except AttributeError:
        return None


def bounds(model, x: torch.Tensor, rows: torch.Tensor | None, n_samples: int, seed: int = 0) -> dict:
    """Per-row bounds of one guide, float64 (N,) each: ``elbo`` (exact where the model
    has ``exact_elbo``, else the mean of ``n_samples`` log weights), ``iwae`` (the
    ``n_samples``-sample IWAE bound, the log-mean-exp of the same weights); ``k`` the
    Pareto k of each row's weights (N,) and ``pareto_k`` their summary."""
    pareto = ParetoK()
    est = importance_estimates(model, x, n_samples, rows, seed=seed, on_log_weights=pareto)
    out = {"elbo": est["elbo"].values, "iwae": est["log_likelihood"].values, "exact": False,
           "k": pareto.values, "pareto_k": pareto.summary()}
    exact_elbo = _exact(model, "exact_elbo")
    if exact_elbo is not None:
        with torch.no_grad():
            out["elbo"] = exact_elbo(x, rows).double()
        out["exact"] = True
    return out


def _flag(summary: dict | None) -> bool:
    """A summary's verdict; undetermined (too few samples for k) is not reliable."""
    return bool(summary is not None and summary["reliable"])


def decompose(guide, local, x: torch.Tensor, n_samples: int, rows: torch.Tensor | None = None,
              seed: int = 0, *, ais: Budget | None = None, ais_when: str = "unreliable",
              vouch: Callable[[], dict | None] | None = None) -> dict:
    """The decomposition on the rows of x (N, D): ``guide`` is the q under study (a model
    whose guide covers x, ``rows`` its indices where it needs them) and ``local`` the q*
    model (e.g. ``optimize_local(...).model``: its rows are x's, in order). Both share the
    fixed generative model. Returns {quantity: Estimate} for ``QUANTITIES``, each with
    its ``pareto_k`` and ``reliable`` (see the module docstring), and ``exact`` (bool),
    ``n_samples``, ``proposal_star_share`` (rows whose importance-sampled log p(x) came
    from q*; None when exact), ``log_likelihood_estimator`` ("exact", "is" or "ais"),
    ``reliable`` (every quantity's flag).

    ``ais``: an AIS budget; log p(x) is then AIS's from q* when the importance-sampled
    one is unreliable (``ais_when="unreliable"``) or in any case (``"always"``), never
    for an exact model. The result then also holds ``log_likelihood_is`` (the IS
    estimate, with its Pareto k), ``ais_minus_is`` (their paired difference, an
    Estimate), ``ais`` (``AISResult.describe()``) and ``bdmc`` (what ``vouch()``
    returned: a dict whose ``reliable`` is the AIS estimate's flag; None without it)."""
    if ais_when not in AIS_WHEN:
        raise UsageError(f"ais_when must be one of {', '.join(AIS_WHEN)}, got {ais_when!r}")
    n = int(x.shape[0])
    if rows is None and reads_row_indices(guide, x):
        rows = torch.arange(n)  # a table over the rows of x
    a = bounds(guide, x, rows, n_samples, seed)
    s = bounds(local, x, torch.arange(n), n_samples, seed)  # the same seed: common random numbers
    exact_ll = _exact(guide, "exact_log_likelihood")
    share = None
    if exact_ll is not None:
        with torch.no_grad():
            log_px = exact_ll(x).double()
        ll_k, ll_reliable = None, True
    else:
        from_star = s["iwae"] > a["iwae"]
        log_px = torch.where(from_star, s["iwae"], a["iwae"])
        share = float(from_star.double().mean())
        ll_k = pareto_k_summary(np.where(from_star.numpy(), s["k"], a["k"]), n_samples)
        ll_reliable = _flag(ll_k)
    estimator, extra = ("exact" if exact_ll is not None else "is"), {}
    if ais is not None and exact_ll is None and (ais_when == "always" or not ll_reliable):
        r = ais_log_likelihood(local, x, torch.arange(n), seed=seed + 2, **ais.kwargs())  # from q*
        is_est = Estimate.of(log_px).with_reliability(ll_k, ll_reliable)
        log_px = r.log_likelihood.values
        check = vouch() if vouch is not None else None
        ll_k, ll_reliable = None, bool(check is not None and check.get("reliable"))
        estimator = "ais"
        extra = {"log_likelihood_is": is_est, "ais_minus_is": Estimate.of(log_px - is_est.values),
                 "ais": r.describe(), "bdmc": check}
    values = {"log_likelihood": log_px, "elbo": a["elbo"], "iwae": a["iwae"], "elbo_star": s["elbo"],
              "iwae_star": s["iwae"], "inference_gap": log_px - a["elbo"],
              "approximation_gap": log_px - s["elbo"], "amortization_gap": s["elbo"] - a["elbo"]}
    reliability = {"log_likelihood": (ll_k, ll_reliable),
                   "elbo": (None if a["exact"] else a["pareto_k"], True),
                   "iwae": (a["pareto_k"], _flag(a["pareto_k"])),
                   "elbo_star": (None if s["exact"] else s["pareto_k"], True),
                   "iwae_star": (s["pareto_k"], _flag(s["pareto_k"])),
                   "inference_gap": (ll_k, ll_reliable), "approximation_gap": (ll_k, ll_reliable),
                   "amortization_gap": (None, True)}
    out: dict = {k: Estimate.of(v).with_reliability(*reliability[k]) for k, v in values.items()}
    out.update({"exact": exact_ll is not None and a["exact"] and s["exact"], "n_samples": int(n_samples),
                "proposal_star_share": share, "log_likelihood_estimator": estimator, **extra,
                "reliable": all(out[k].reliable for k in QUANTITIES)})
    return out


def to_dict(result: dict) -> dict:
    """``decompose``'s result for JSON: each Estimate as {mean, se, n} with its
    ``pareto_k`` summary and ``reliable`` flag where it has them; log p(x)'s names its
    ``estimator``."""
    out = {k: v.to_dict() if isinstance(v, Estimate) else v for k, v in result.items()}
    if "log_likelihood_estimator" in result:
        out["log_likelihood"]["estimator"] = result["log_likelihood_estimator"]
    return out
