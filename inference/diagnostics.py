"""Posterior diagnostics with ArviZ: an ``InferenceData`` for any fitted model/guide
pair, and the Pareto k of every importance-sampled estimate.

Pareto k (PSIS; Vehtari, Simpson, Gelman, Yao & Gabry 2024, ``az.psislw``)
----------------------------------------------------------------------------
For a row x_i and K draws z_k ~ q(z | x_i), the log importance weights are
log w_k = log p(x_i, z_k) - log q(z_k | x_i). PSIS fits a generalized Pareto
distribution to the largest min(K/5, 3 sqrt(K)) weights; its shape k estimates how
heavy the weights' tail is: the weights have finite moments of order < 1/k. Below 0.5
the variance is finite and the estimate converges at the usual rate; between 0.5 and
0.7 it converges slowly but usably; above 0.7 (Vehtari et al.; Yao, Vehtari, Simpson &
Gelman 2018, "Yes, but did it work?") the estimate of log p(x_i) cannot be trusted,
whatever its standard error says. :class:`ParetoK` is a callback for
``inference.evaluate.importance_estimates`` that keeps one k per row (never the
N x K weights).

A closed form to check against: if p(z | x) = N(m, S) and q = N(m, s^2 S) (a guide
narrowed by s < 1), then log w = const + (1 - s^2)/2 u^T u with u ~ N(0, I), so
w = C exp(c chi^2) with c = (1 - s^2)/2 and P(w > t) ~ t^(-1/(2c)) up to a power of
log t: the tail shape is k = 1 - s^2 (finite variance iff s^2 > 1/2). At s = 1 (the
exact posterior) every weight equals p(x_i): a point mass, reported as k = -inf (so is
any row whose log weights agree to ``CONSTANT_RANGE`` = 1e-6 nats, round-off).

A set's log-likelihood estimate (a mean over rows) is marked unreliable here when more
than ``MAX_UNRELIABLE_SHARE`` (1%) of its rows have k > 0.7: a convention of this
project (a few rows' errors move the mean by their share of it), not of the papers;
every summary also gives the share itself, the share above 0.5, the maximum and
quantiles.

InferenceData (``to_inference_data``)
-------------------------------------
The guide's sample sites are discovered by tracing (no model names): sites inside
plate("data") are local (one value per row), the others global. Dimensions are named
and carry coordinates (ArviZ's convention):

* ``row``: the row's index in the data set it comes from (the training-row indices
  when they are given, else 0..B-1 of the set x), with the class ``label`` of each row
  as a second coordinate where the data set has labels;
* ``latent``: the components of a local latent vector (z of PPCA and the VAEs);
* ``feature``: the columns of a data row (observed and replicated data), and the
  dims a model names so (:class:`models.protocol.NamedDims`: the Bayesian Gaussian's
  loc is (feature,), its precision (feature, feature_bis), as PyMC names a matrix's
  second axis);
* any other dim ``{site}_dim_{i}`` (ArviZ's default, the names ``az.from_pyro`` gives).

Groups:

* ``posterior``: C x S draws of every latent site from the guide, dims (chain, draw,
  ...): a global site (chain, draw, its own dims), a local one (chain, draw, row,
  latent). The "chains" are independent sets of draws (VI draws are independent:
  r_eff = 1; two by default, so that the chain-comparing diagnostics run). A model with
  a ``quantities(samples)`` method (the Bayesian Gaussian: loc and precision from its
  Bartlett sites) has those added.
* ``log_likelihood``: log p(x_i | latents) per draw and row of each observed site,
  (chain, draw, row): pointwise, so ``az.loo`` and ``az.waic`` run.
* ``posterior_predictive``: replicated data from ``pyro.infer.Predictive`` on the
  model with its observations released (``poutine.uncondition``), at the same draws
  (chain, draw, row, feature).
* ``replicated_log_likelihood`` (a group of this project's): log p(x_rep_i | latents)
  of each replicated row, (chain, draw, row), the replicated side of the
  log-likelihood check; kept out of ``log_likelihood`` so that ``az.loo`` finds one
  variable there.
* ``observed_data``: the rows (row, feature).
* ``sample_stats``: ``log_joint`` log p(x, latents), ``log_q`` and ``log_weight`` =
  their difference, per draw (global latents: of the whole set, the rows scaled by the
  data plate) or per draw and row (local latents only).

What ``az.loo`` means here
--------------------------
* Global latents (the Bayesian Gaussian): PSIS-LOO of the rows, p(x_i | X_-i), with the
  guide's draws standing in for the posterior's (its k also says where that fails).
* Local latents with point-estimated globals (PPCA, the VAEs): leaving x_i out leaves
  z_i with its prior, so the exact LOO predictive density is the marginal p(x_i) at the
  fitted parameters (which did see x_i). PSIS-LOO estimates it from draws of
  q(z | x_i) with ratios 1 / p(x_i | z): the harmonic-mean estimator of p(x_i), whose
  variance is infinite in general, so expect large k. For PPCA at its exact posterior the
  tail is in closed form: with z = m + u, u ~ N(0, noise_scale^2 M^-1), M = W^T W +
  noise_scale^2 I, log(1 / p(x | z)) grows like u^T W^T W u / (2 noise_scale^2), so the
  ratios have k = lambda / (lambda + noise_scale^2), lambda the largest eigenvalue of
  W^T W: past 0.7 once the signal is 2.3 times the noise. The importance-sampled
  log-likelihood (draws from q, weights p(x, z) / q(z | x), :class:`ParetoK`) is the
  estimator of the same quantity to use; LOO is reported beside it for that contrast.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyro
import torch
from pyro import poutine

from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import MAX_ELEMENTS
from elbolab.inference.files import TMP_PREFIX
from elbolab.models.protocol import DerivedQuantities, ExactPosterior, NamedDims
from elbolab.inference.traces import batch, in_plate, is_latent, is_scored, particles, site_log_prob, vectorizes

K_GOOD = 0.5  # k below: finite variance
K_BAD = 0.7  # k above: unreliable (Vehtari et al. 2024; Yao et al. 2018)
MAX_UNRELIABLE_SHARE = 0.01  # a set's estimate is unreliable when more of its rows exceed K_BAD
# psislw fits the top ceil(min(K/5, 3 sqrt(K))) weights and needs more than 4 of them
MIN_PARETO_SAMPLES = 21
# a row whose log weights all lie within this many nats is a point mass: the estimate is
# exact to that precision whatever the tail of its round-off noise looks like
CONSTANT_RANGE = 1e-6
QUANTILES = (0.5, 0.9, 0.99)


# ----------------------------------------------------------------------------- Pareto k


def pareto_k(log_w) -> np.ndarray:
    """The PSIS Pareto shape k of each row of log weights (..., K) -> (...), float64.

    ``az.psislw`` over the last axis, with two cases it does not handle made explicit:
    a row whose weights are all equal (a point mass, e.g. the exact posterior as the
    proposal: log weights within ``CONSTANT_RANGE`` nats of each other, i.e. equal up to
    round-off, whose own "tail" is meaningless) gets -inf; a row with too few draws for
    the tail fit (K < 21) or a failed fit gets NaN (undetermined), never psislw's +inf."""
    import arviz as az

    lw = np.asarray(log_w.detach().cpu() if isinstance(log_w, torch.Tensor) else log_w, dtype=np.float64)
    if lw.ndim == 0 or lw.shape[-1] < 1:
        raise UsageError("Pareto k needs at least one log weight per row")
    spread = lw.max(-1) - lw.min(-1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if lw.shape[-1] >= MIN_PARETO_SAMPLES:
            _, k = az.psislw(lw, reff=1.0)
            k = np.array(k, dtype=np.float64, ndmin=1).reshape(spread.shape)
        else:
            k = np.full(spread.shape, np.nan)
    k = np.where(np.isfinite(k), k, np.nan)
    return np.where(spread < CONSTANT_RANGE, -np.inf, k)


def pareto_k_summary(k, n_samples: int) -> dict:
    """The numbers a report gives for a set's per-row k: the shares above 0.7 and 0.5,
    the maximum, quantiles, and the reliability flag (see the module docstring).
    ``reliable`` is None when no row's k could be determined (too few samples)."""
    k = np.asarray(k, dtype=np.float64).ravel()
    known = k[~np.isnan(k)]
    n = int(k.size)
    out = {"n_rows": n, "n_samples": int(n_samples), "n_undetermined": int(n - known.size),
           "n_constant_weights": int(np.isneginf(known).sum())}
    if known.size == 0:
        return {**out, "share_above_0.7": None, "share_above_0.5": None, "max": None,
                "quantiles": None, "reliable": None,
                "rule": f"undetermined: Pareto k needs at least {MIN_PARETO_SAMPLES} samples per row"}
    share_bad = float((known > K_BAD).mean())
    return {**out, "share_above_0.7": share_bad, "share_above_0.5": float((known > K_GOOD).mean()),
            "max": float(known.max()),
            # order statistics, not interpolation (which gives -inf - -inf = NaN between constant rows)
            "quantiles": {str(q): float(np.quantile(known, q, method="inverted_cdf")) for q in QUANTILES},
            "reliable": share_bad <= MAX_UNRELIABLE_SHARE,
            "rule": f"reliable when at most {MAX_UNRELIABLE_SHARE:.0%} of rows have k > {K_BAD}"}


def reliability_note(summary: dict | None) -> str:
    """A short label for a table cell: 'k > 0.7: 0.3% of rows (reliable)'."""
    if not summary or summary.get("share_above_0.7") is None:
        return "k undetermined"
    flag = "reliable" if summary["reliable"] else "UNRELIABLE"
    return f"k > 0.7: {100 * summary['share_above_0.7']:.1f}% of rows ({flag})"


class ParetoK:
    """A callback for ``importance_estimates(..., on_log_weights=ParetoK())``: the Pareto
    k of each row's K log weights, computed chunk by chunk (memory O(rows), not O(rows x K))."""

    def __init__(self):
        self._chunks: dict[int, np.ndarray] = {}
        self.n_samples = 0

    def __call__(self, start: int, log_w: torch.Tensor) -> None:
        self.n_samples = int(log_w.shape[-1])
        self._chunks[int(start)] = pareto_k(log_w)

    @property
    def values(self) -> np.ndarray:
        """k per row, in row order (n,)."""
        if not self._chunks:
            return np.empty(0)
        return np.concatenate([self._chunks[s] for s in sorted(self._chunks)])

    @property
    def n(self) -> int:
        return sum(v.size for v in self._chunks.values())

    def summary(self) -> dict:
        return pareto_k_summary(self.values, self.n_samples)


def compose(*callbacks: Callable | None) -> Callable:
    """One ``on_log_weights`` callback calling each of ``callbacks`` (None skipped) in turn."""
    live = [c for c in callbacks if c is not None]

    def call(start: int, log_w: torch.Tensor) -> None:
        for c in live:
            c(start, log_w)

    return call


# ----------------------------------------------------------------------------- the guide's draws


@dataclass
class Draws:
    """n draws of the guide's latent sites for rows x (B, ...) and the model's densities
    there. ``latents``: site -> (n, ...) (global) or (n, B, ...) (local);
    ``log_lik``: observed site -> (n, B), per row; ``observed``: site -> (B, ...);
    ``replicated``: observed site -> (n, B, ...) from pyro's Predictive, and
    ``replicated_log_lik`` its log p(x_rep | latents) (n, B); ``log_joint``, ``log_q``:
    (n,) with global latents (the whole set's, rows scaled by the data plate), else (n, B)
    (``log_q`` is zero for draws that did not come from the guide, e.g. NUTS's)."""

    latents: dict[str, torch.Tensor]
    local: frozenset
    log_lik: dict[str, torch.Tensor]
    observed: dict[str, torch.Tensor]
    replicated: dict[str, torch.Tensor]
    replicated_log_lik: dict[str, torch.Tensor]
    log_joint: torch.Tensor
    log_q: torch.Tensor

    @property
    def has_global(self) -> bool:
        return any(name not in self.local for name in self.latents)


def _site_tensor(site, n: int, b: int, local: bool) -> torch.Tensor:
    """A latent site's value as (n, ...event) (global) or (n, B, ...event) (local)."""
    value = site["value"]
    n_event = len(site["fn"].event_shape)
    event = tuple(value.shape[value.dim() - n_event:]) if n_event else ()
    lead = (n, b) if local else (n,)
    if value.numel() != math.prod(lead) * math.prod(event):
        raise UsageError(f"site {site['name']!r}: cannot read {n} draws of shape {event} from a value of shape "
                         f"{tuple(value.shape)} (only plate('data') and the draws' plate are supported)")
    return value.reshape(lead + event)


def _densities(site, n: int, b: int, local: bool) -> torch.Tensor:
    """A site's log density per draw (n,) (global) or per draw and row (n, B) (local), float64."""
    lp = site_log_prob(site).double()
    lead = (n, b) if local else (n,)
    if lp.numel() != math.prod(lead):
        raise UsageError(f"site {site['name']!r}: log density of shape {tuple(lp.shape)} is not one per "
                         f"{'draw and row' if local else 'draw'}")
    return lp.reshape(lead)


def guide_draws(model, x: torch.Tensor, rows: torch.Tensor | None, n: int, predictive: bool = True) -> Draws:
    """``n`` draws from the guide for the rows x (B, ...), vectorized as one plate, and the
    model's densities at them (see :class:`Draws`). ``rows``: training-row indices of x
    (per-datapoint guides need them); None when x is a set of its own."""
    nesting = model.max_plate_nesting
    b = int(x.shape[0])
    vec = vectorizes(model)
    if not vec and n > 1:  # a model that takes no particles plate: one draw at a time
        return _join_draws([guide_draws(model, x, rows, 1, predictive) for _ in range(n)])
    with torch.no_grad():
        with particles(n, nesting, vectorize=vec), batch(model, x, rows):
            guide_tr = poutine.trace(model.guide).get_trace(x)
        sites = [s for s in guide_tr.nodes.values() if is_latent(s)]
        local = frozenset(s["name"] for s in sites if in_plate(s, model.data_plate))
        if local and len(local) < len(sites):
            raise UsageError("a guide with both global and per-row latents is not supported here")
        latents, log_q = {}, x.new_zeros((n, 1) if local else (n,), dtype=torch.float64)
        for site in sites:
            log_q = log_q + _densities(site, n, b, site["name"] in local)
            if not site["infer"].get("is_auxiliary", False):
                latents[site["name"]] = _site_tensor(site, n, b, site["name"] in local)
        d = model_draws(model, x, rows, latents, local, predictive)
    d.log_q = log_q.expand(n, b) if local else log_q
    return d


def _traced_layout(model, latents: dict, local) -> dict:
    """Draws site -> (n, ...) as the plates lay them out: a global site (n, 1, ...event),
    a local one (n, B, ...event) (so that event dims are never taken for plate dims)."""
    nesting = model.max_plate_nesting
    return {k: v if k in local else v.reshape((v.shape[0],) + (1,) * nesting + tuple(v.shape[1:]))
            for k, v in latents.items()}


def model_draws(model, x: torch.Tensor, rows: torch.Tensor | None, latents: dict, local=frozenset(),
                predictive: bool = True) -> Draws:
    """The model's densities at given draws of its latent sites, site -> (n, ...) (global)
    or (n, B, ...) (``local``): pointwise log-likelihoods, the log joint, and (with
    ``predictive``) replicated data. ``log_q`` is left zero (no guide here)."""
    nesting = model.max_plate_nesting
    n, b = int(next(iter(latents.values())).shape[0]), int(x.shape[0])
    vec = vectorizes(model)
    if not vec and n > 1:  # a model that takes no particles plate: one draw at a time
        return _join_draws([model_draws(model, x, rows, {k: v[i:i + 1] for k, v in latents.items()}, local,
                                        predictive) for i in range(n)])
    has_global = any(k not in local for k in latents)
    values = _traced_layout(model, latents, local) if vec else {k: v[0] for k, v in latents.items()}
    with torch.no_grad():
        with particles(n, nesting, vectorize=vec), batch(model, x, rows):
            model_tr = poutine.trace(poutine.condition(model.model, data=values)).get_trace(x)
        log_lik, observed = {}, {}
        joint = x.new_zeros((n,) if has_global else (n, 1), dtype=torch.float64)
        for name, site in model_tr.nodes.items():
            if not is_scored(site):
                continue
            is_local = in_plate(site, model.data_plate)
            lp = _densities(site, n, b, is_local)
            if site["is_observed"] and name not in values:
                if not is_local:
                    raise UsageError(f"observed site {name!r} is outside plate({model.data_plate!r}): no pointwise "
                                     "log-likelihood")
                log_lik[name], observed[name] = lp, site["value"].detach()
                if has_global:  # the whole set's log-likelihood: the rows scaled by the data plate
                    lp = float(site["scale"]) * lp.sum(-1)
            joint = joint + lp
        replicated, replicated_log_lik = {}, {}
        if predictive:
            replicated, replicated_log_lik = _replicate(model, x, rows, model_tr, values, list(log_lik))
    if not has_global:
        joint = joint.expand(n, b)
    return Draws(dict(latents), frozenset(local), log_lik, observed, replicated, replicated_log_lik, joint,
                 torch.zeros_like(joint))


def _replicate(model, x, rows, model_tr, values: dict, obs_names: list[str]):
    """Replicated data at the same draws, by ``pyro.infer.Predictive`` on the model with
    its observations released, and log p(x_rep | latents) of each row."""
    n, b = int(next(iter(values.values())).shape[0]), int(x.shape[0])
    # Predictive pads a posterior sample (n, *site shape) to the plate nesting by its number
    # of dims: the traced layout keeps a global site's event dims from being taken for plates
    if not vectorizes(model):  # one draw, without a particles plate
        values = {k: v[None] for k, v in values.items()}
    pred = pyro.infer.Predictive(poutine.uncondition(model.model), posterior_samples=values, num_samples=n,
                                 return_sites=obs_names, parallel=vectorizes(model))
    with batch(model, x, rows):
        out = pred(x)
    replicated, rep_log_lik = {}, {}
    for name in obs_names:
        site = model_tr.nodes[name]
        rep = out[name].reshape((n, b) + tuple(site["value"].shape[1:]))
        replicated[name] = rep
        # the observed site's distribution at these draws (batch (n, B)), at the replicates
        rep_log_lik[name] = site["fn"].log_prob(rep).double().reshape(n, b)
    return replicated, rep_log_lik


def _join_draws(parts: list[Draws]) -> Draws:
    """Draws of the same rows made one after another, joined along the draws."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def cat(key: str) -> dict:
        return {k: torch.cat([getattr(p, key)[k] for p in parts]) for k in getattr(first, key)}

    return Draws(cat("latents"), first.local, cat("log_lik"), dict(first.observed), cat("replicated"),
                 cat("replicated_log_lik"), torch.cat([p.log_joint for p in parts]),
                 torch.cat([p.log_q for p in parts]))


def _chunk_rows(x: torch.Tensor, n: int, max_elements: int = MAX_ELEMENTS) -> int:
    """Rows per chunk so that n draws of a chunk's data stay near ``max_elements``."""
    per_row = n * max(1, int(x[0].numel()))
    return max(1, min(int(x.shape[0]), max_elements // per_row))


def _concat_draws(parts: list[Draws]) -> Draws:
    """Draws of consecutive row chunks (local latents only) joined along the rows."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def cat(key: str, dim: int = 1) -> dict:
        return {k: torch.cat([getattr(p, key)[k] for p in parts], dim) for k in getattr(first, key)}

    return Draws(cat("latents"), first.local, cat("log_lik"), cat("observed", 0), cat("replicated"),
                 cat("replicated_log_lik"), torch.cat([p.log_joint for p in parts], 1),
                 torch.cat([p.log_q for p in parts], 1))


def draw_rows(model, x: torch.Tensor, rows: torch.Tensor | None, n: int, predictive: bool = True,
              max_elements: int = MAX_ELEMENTS) -> Draws:
    """:func:`guide_draws` over all rows of x: in chunks of rows when every latent is
    local (memory bounded by ``max_elements`` per chunk), in one piece when there are
    global latents (their draws are shared by all rows)."""
    probe = guide_draws(model, x[:1], None if rows is None else rows[:1], 1, predictive=False)
    if probe.has_global:
        return guide_draws(model, x, rows, n, predictive)
    size = _chunk_rows(x, n, max_elements)
    parts = [guide_draws(model, x[s:s + size], None if rows is None else rows[s:s + size], n, predictive)
             for s in range(0, int(x.shape[0]), size)]
    return _concat_draws(parts)


# ----------------------------------------------------------------------------- InferenceData

ROW, LATENT, FEATURE, LABEL = "row", "latent", "feature", "label"
REPLICATED = "replicated_log_likelihood"  # the group of log p(x_rep_i | latents)
DEFAULT_CHAINS = 2  # sets of draws: the diagnostics that compare chains (R-hat) need two


class _Dims:
    """The dims of one InferenceData's variables (see the module docstring), their sizes
    kept consistent: a name another variable already gives another size falls back to
    ArviZ's default ``{var}_dim_{i}``."""

    def __init__(self, declared: dict | None = None):
        self.declared = dict(declared or {})
        self.sizes: dict[str, int] = {}

    def __call__(self, var: str, shape: tuple, kind: str) -> list[str]:
        """Names for a variable of ``shape`` (without chain and draw): ``kind`` "global"
        (its own dims), "local" (row, latent, ...) or "data" (row, feature, ...)."""
        lead = [ROW] if kind in ("local", "data") else []
        own = tuple(shape[len(lead):])
        declared = self.declared.get(var)
        if kind == "global" and declared is not None and len(declared) == len(own):
            wanted = list(declared)
        elif kind == "global" or not own:
            wanted = [f"{var}_dim_{i}" for i in range(len(own))]
        else:
            wanted = [LATENT if kind == "local" else FEATURE] + [f"{var}_dim_{i}" for i in range(1, len(own))]
        names = []
        for i, (name, size) in enumerate(zip(wanted, own)):
            if self.sizes.setdefault(name, size) != size:
                name = f"{var}_dim_{i}"
                self.sizes.setdefault(name, size)
            names.append(name)
        return lead + names


def _array(t: torch.Tensor, chains: int, data: bool = False) -> np.ndarray:
    """(chains * draws, ...) -> (chains, draws, ...), numpy; 0/1 ``data`` as int8."""
    a = t.detach().cpu().numpy()
    a = a.reshape((chains, a.shape[0] // chains) + a.shape[1:])
    return _compact(a) if data else a


def _compact(a: np.ndarray) -> np.ndarray:
    """Binary data (observed or replicated 0/1 values) as int8: an eighth of float64's size."""
    if a.dtype.kind == "f" and a.size and np.all((a == 0) | (a == 1)):
        return a.astype(np.int8)
    return a


def _row_coords(b: int, row_index=None, labels=None) -> tuple[dict, np.ndarray | None]:
    """The row dimension's coordinate (each row's index in its data set) and its class labels."""
    index = np.arange(b) if row_index is None else np.asarray(row_index).reshape(-1)
    if index.size != b:
        raise UsageError(f"row_index has {index.size} entries for {b} rows")
    labels = None if labels is None else np.asarray(labels).reshape(-1)
    if labels is not None and labels.size != b:
        raise UsageError(f"labels has {labels.size} entries for {b} rows")
    return {ROW: index}, labels


def _label_rows(idata, labels: np.ndarray | None):
    """Each group with a row dim gets the rows' class labels as the coordinate ``label``."""
    if labels is None:
        return idata
    for group in idata.groups():
        ds = getattr(idata, group)
        if ROW in ds.dims:
            setattr(idata, group, ds.assign_coords({LABEL: (ROW, labels)}))
    return idata


def _declared_dims(model) -> dict:
    return dict(model.variable_dims) if isinstance(model, NamedDims) else {}


def to_inference_data(model, x: torch.Tensor, rows: torch.Tensor | None = None, draws: int = 100,
                      chains: int = DEFAULT_CHAINS, seed: int = 0, predictive: bool = True, row_index=None,
                      labels=None, max_elements: int = MAX_ELEMENTS):
    """An ``arviz.InferenceData`` of the fitted guide for the rows x (B, D) (see the module
    docstring): ``chains`` x ``draws`` independent draws, seeded (the global RNG state is
    restored). ``rows``: training-row indices of x (a per-datapoint guide needs them),
    also the row coordinate unless ``row_index`` (B,) gives it; ``labels`` (B,): the
    rows' class labels, a coordinate ``label`` along ``row``."""
    if draws < 1 or chains < 1:
        raise UsageError(f"InferenceData needs draws >= 1 and chains >= 1, got {draws}, {chains}")
    n = draws * chains
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        d = draw_rows(model, x, rows, n, predictive, max_elements)
    if row_index is None and rows is not None:
        row_index = rows.cpu().numpy()
    return draws_to_inference_data(model, d, chains, row_index, labels)


def draws_to_inference_data(model, d: Draws, chains: int, row_index=None, labels=None):
    """:class:`Draws` of ``chains`` x S draws as InferenceData (the module docstring's groups)."""
    import arviz as az

    b = int(next(iter(d.observed.values())).shape[0])
    coords, labels = _row_coords(b, row_index, labels)
    dims_of = _Dims(_declared_dims(model))
    dims: dict[str, list[str]] = {}
    posterior = {}
    for name, v in d.latents.items():
        posterior[name] = _array(v, chains)
        dims[name] = dims_of(name, tuple(v.shape[1:]), "local" if name in d.local else "global")
    quantities = model.quantities if isinstance(model, DerivedQuantities) else None
    derived = []
    if quantities is not None and d.has_global:
        with torch.no_grad():
            extra = quantities({k: v for k, v in d.latents.items() if k not in d.local})
        for name, v in extra.items():
            posterior[name] = _array(v, chains)
            dims[name] = dims_of(name, tuple(v.shape[1:]), "global")
            derived.append(name)
    log_lik, observed, replicated, rep_log_lik = {}, {}, {}, {}
    for name, v in d.log_lik.items():
        log_lik[name] = _array(v, chains)
        observed[name] = _compact(d.observed[name].cpu().numpy())
        dims[name] = dims_of(name, tuple(d.observed[name].shape), "data")
    for name, v in d.replicated.items():
        replicated[name] = _array(v, chains, data=True)
        rep_log_lik[name] = _array(d.replicated_log_lik[name], chains)
    stat_dims = [] if d.has_global else [ROW]
    sample_stats = {"log_joint": _array(d.log_joint, chains), "log_q": _array(d.log_q, chains),
                    "log_weight": _array(d.log_joint - d.log_q, chains)}
    for key in sample_stats:
        dims[key] = stat_dims
    # the log-likelihood groups have the observed site's name but only the row dim
    row_dims = {name: [ROW] for name in log_lik}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata = az.from_dict(posterior=posterior, sample_stats=sample_stats,
                             posterior_predictive=replicated or None, observed_data=observed,
                             coords=coords, dims=dims)
        idata.add_groups(log_likelihood=az.from_dict(posterior=log_lik, coords=coords, dims=row_dims).posterior)
        if rep_log_lik:
            idata.add_groups({REPLICATED: az.from_dict(posterior=rep_log_lik, coords=coords,
                                                       dims=row_dims).posterior})
    idata.attrs["inference"] = "variational (draws from the guide)"
    idata.attrs["local_latents"] = ",".join(sorted(d.local))  # netCDF attributes: strings
    idata.attrs["guide_sites"] = ",".join(d.latents)
    idata.attrs["quantities"] = ",".join(derived)  # the model's quantities(...) of the draws
    return _label_rows(idata, labels)


def samples_to_inference_data(samples: dict[str, torch.Tensor], chains: int, local: set | frozenset = frozenset(),
                              row_index=None, labels=None, inference: str = "", declared: dict | None = None):
    """A posterior-only InferenceData from draws site -> (chains * draws, ...) (local
    sites (chains * draws, B, ...)), with the same dims as :func:`to_inference_data`
    (``declared``: a model's ``variable_dims``)."""
    import arviz as az

    dims_of = _Dims(declared)
    posterior, dims, coords, row_labels = {}, {}, {}, None
    for name, v in samples.items():
        is_local = name in local
        posterior[name] = _array(v, chains)
        dims[name] = dims_of(name, tuple(v.shape[1:]), "local" if is_local else "global")
        if is_local:
            coords, row_labels = _row_coords(int(v.shape[1]), row_index, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata = az.from_dict(posterior=posterior, coords=coords, dims=dims)
    idata.attrs["inference"] = inference
    return _label_rows(idata, row_labels)


def exact_inference_data(model, x: torch.Tensor, draws: int, chains: int = DEFAULT_CHAINS, seed: int = 0,
                         local: set | frozenset = frozenset(), row_index=None, labels=None):
    """Draws from the model's exact posterior (a model with ``exact_posterior_samples(x, n)``)
    as InferenceData, or None for a model without one."""
    if not isinstance(model, ExactPosterior):
        return None
    sampler = model.exact_posterior_samples
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        samples = sampler(x, draws * chains)
    return samples_to_inference_data(samples, chains, local, row_index, labels, "exact posterior (closed form)",
                                      _declared_dims(model))


def mcmc_inference_data(model, result, x: torch.Tensor, rows: torch.Tensor | None = None,
                        predictive: bool = True):
    """InferenceData of a NUTS run of the model on the rows x (``inference.mcmc.run_nuts``
    results, one MCMC object each: their chains joined): the draws with the model's
    ``quantities``, pointwise log-likelihoods and replicated data computed as for the guide
    (the same groups and dims), and ``az.from_pyro``'s sample statistics (divergences,
    tree depth, ...) beside the log joint. (``az.from_pyro``'s own log_likelihood goes
    through ``Predictive``, which pads a global site's event dims as plate dims and fails
    on these models.)"""
    import arviz as az

    results = result if isinstance(result, (list, tuple)) else [result]
    parts = []
    for r in results:
        if getattr(r, "mcmc", None) is None:
            raise UsageError("the NUTS result holds no MCMC object (run it with inference.mcmc.run_nuts)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts.append(az.from_pyro(r.mcmc, log_likelihood=False))
    pyro_data = parts[0] if len(parts) == 1 else az.concat(*parts, dim="chain", reset_dim=True)
    post = pyro_data.posterior
    chains, draws = post.sizes["chain"], post.sizes["draw"]
    flat = {k: torch.as_tensor(post[k].values, dtype=x.dtype).reshape((chains * draws,) + post[k].shape[2:])
            for k in post.data_vars}
    d = model_draws(model, x, rows, flat, frozenset(), predictive)
    idata = draws_to_inference_data(model, d, chains, None if rows is None else rows.cpu().numpy())
    stats = pyro_data.sample_stats.assign_coords(chain=idata.posterior.chain, draw=idata.posterior.draw)
    idata.sample_stats = stats.assign(log_joint=idata.sample_stats["log_joint"])  # (log_q: no guide here)
    idata.attrs["inference"] = "NUTS (pyro MCMC)"
    return idata


# ----------------------------------------------------------------------------- files


def save_netcdf(idata, path: str) -> None:
    """Write InferenceData as netCDF atomically (a temporary beside ``path``, renamed)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".nc", dir=directory)
    os.close(fd)
    try:
        idata.to_netcdf(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_netcdf(path: str):
    import arviz as az

    return az.from_netcdf(path)


# ----------------------------------------------------------------------------- LOO, WAIC, PPC


def loo_waic(idata, var_name: str | None = None, reff: float | None = 1.0) -> dict:
    """``az.loo`` and ``az.waic`` of the log_likelihood group, as plain numbers (elpd and
    its standard error summed over rows, and per row; p_loo, p_waic; loo's Pareto k).
    ``reff`` = 1 for independent draws (VI, exact); None lets ArviZ estimate it (MCMC)."""
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata, pointwise=True, var_name=var_name, reff=reff)
        waic = az.waic(idata, pointwise=True, var_name=var_name)
    k = np.asarray(loo.pareto_k, dtype=np.float64)
    k = np.where(np.isposinf(k), np.nan, k)  # psislw's +inf: too few draws for the tail fit
    n_rows = int(k.size)
    elpd_loo, loo_se, elpd_waic, waic_se = float(loo.elpd_loo), float(loo.se), float(waic.elpd_waic), float(waic.se)
    return {
        "n_rows": n_rows,
        "elpd_loo": elpd_loo, "elpd_loo_se": loo_se, "p_loo": float(loo.p_loo),
        "elpd_loo_per_row": elpd_loo / n_rows, "elpd_loo_se_per_row": loo_se / n_rows,
        "loo_pareto_k": pareto_k_summary(k, int(loo.n_samples)),
        "elpd_waic": elpd_waic, "elpd_waic_se": waic_se, "p_waic": float(waic.p_waic),
        "elpd_waic_per_row": elpd_waic / n_rows, "elpd_waic_se_per_row": waic_se / n_rows,
        "pointwise_loo": np.asarray(loo.loo_i), "pointwise_k": k,
    }


PPC_STATISTICS = {
    "mean": "mean of every entry",
    "sd_of_row_means": "standard deviation over rows of each row's mean",
    "mean_of_column_sd": "mean over columns of each column's standard deviation",
}


def _statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """Test statistics of data (..., B, D): each (...)."""
    x = x.astype(np.float64)
    return {"mean": x.mean((-2, -1)), "sd_of_row_means": x.mean(-1).std(-1),
            "mean_of_column_sd": x.std(-2).mean(-1)}


def _ppp(rep: np.ndarray, obs) -> float:
    """Posterior predictive p-value P(T_rep >= T_obs), ties counted half."""
    rep = np.asarray(rep, dtype=np.float64).ravel()
    obs = np.asarray(obs, dtype=np.float64).ravel()  # one value, or one per draw
    return float((rep > obs).mean() + 0.5 * (rep == obs).mean())


def posterior_predictive_checks(idata, name: str | None = None) -> dict:
    """Posterior predictive p-values of the statistics in ``PPC_STATISTICS`` (replicated
    data against the observed rows) and of the log-likelihood discrepancy
    T(x, latents) = mean_i log p(x_i | latents) (Gelman, Meng & Stern 1996), each P(T_rep
    >= T_obs) over the draws: near 0 or 1 is a misfit, about uniform under the model.
    Also the per-column means of the observed and replicated data (for a plot)."""
    if "posterior_predictive" not in idata.groups():
        raise UsageError("the InferenceData has no posterior_predictive group")
    obs_names = list(idata.observed_data.data_vars)
    name = name or obs_names[0]
    obs = np.asarray(idata.observed_data[name].values)
    rep = np.asarray(idata.posterior_predictive[name].values)  # (chain, draw, B, ...)
    obs2, rep2 = obs.reshape(obs.shape[0], -1), rep.reshape(rep.shape[:3] + (-1,))
    t_obs, t_rep = _statistics(obs2), _statistics(rep2)
    out = {"variable": name, "n_rows": int(obs.shape[0]), "n_draws": int(rep.shape[0] * rep.shape[1]),
           "statistics": {}}
    for key, label in PPC_STATISTICS.items():
        out["statistics"][key] = {"description": label, "observed": float(t_obs[key]),
                                  "replicated_mean": float(t_rep[key].mean()),
                                  "replicated_sd": float(t_rep[key].std()), "p_value": _ppp(t_rep[key], t_obs[key]),
                                  "replicated": t_rep[key].ravel()}
    if REPLICATED in idata.groups() and "log_likelihood" in idata.groups() and name in getattr(idata, REPLICATED):
        ll_obs = np.asarray(idata.log_likelihood[name].values)  # (chain, draw, row)
        ll_rep = np.asarray(getattr(idata, REPLICATED)[name].values)
        t_obs, t_rep = ll_obs.mean(-1), ll_rep.mean(-1)  # (chain, draw)
        out["statistics"]["log_likelihood"] = {
            "description": "mean over rows of log p(x_i | latents), at each draw (a discrepancy)",
            "observed": float(t_obs.mean()), "replicated_mean": float(t_rep.mean()),
            "replicated_sd": float(t_rep.std()), "p_value": _ppp(t_rep, t_obs),
            "replicated": (t_rep - t_obs).ravel(),
            # log p(x_i | latents) of every (draw, row), observed and replicated, pooled alike
            "observed_per_row": ll_obs.ravel(), "replicated_per_row": ll_rep.ravel()}
    out["column_means"] = {"observed": obs2.mean(0), "replicated": rep2.mean(2).reshape(-1, obs2.shape[1])}
    return out


# ----------------------------------------------------------------------------- summaries


@contextlib.contextmanager
def _quiet_arviz(on: bool = True):
    """ArviZ's own logger (an instance it keeps as ``arviz._log``, outside logging's registry)
    held to errors for the duration (``on``)."""
    import logging

    import arviz as az

    logger = getattr(az, "_log", None) or logging.getLogger("arviz")
    level = logger.level
    if on:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def summary_table(posteriors: dict, var_names=None, coords=None):
    """``az.summary`` of several posteriors of the same variables, stacked, with a
    ``posterior`` column naming each: mean, sd and the 94% HDI for all; ESS and R-hat
    (and their Monte Carlo errors) for MCMC (an InferenceData whose ``inference``
    attribute starts with "NUTS"), where they mean something (VI and exact draws are
    independent: ESS = draws, R-hat = 1 by construction). R-hat compares chains: a
    one-chain MCMC run gets ESS without it."""
    import arviz as az
    import pandas as pd

    frames = []
    for label, idata in posteriors.items():
        if idata is None:
            continue
        mcmc = str(idata.attrs.get("inference", "")).startswith("NUTS")
        names = [v for v in (var_names or list(idata.posterior.data_vars)) if v in idata.posterior]
        sel = None
        if coords:
            sel = {k: v for k, v in coords.items() if k in idata.posterior.dims}
        one_chain = idata.posterior.sizes["chain"] < 2
        with warnings.catch_warnings(), _quiet_arviz(mcmc and one_chain):  # (its R-hat shape warning)
            warnings.simplefilter("ignore")
            df = az.summary(idata, var_names=names, kind="all" if mcmc else "stats", round_to="none",
                            coords=sel or None)
        if mcmc and one_chain:
            df = df.drop(columns=[c for c in df.columns if c.startswith("r_hat")])
        df.insert(0, "posterior", label)
        frames.append(df)
    table = pd.concat(frames)
    table.index.name = "variable"
    return table
