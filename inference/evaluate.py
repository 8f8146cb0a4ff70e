"""Evaluation: per-datapoint ELBO and its terms, importance-sampled log-likelihoods
and active units, as means with standard errors.

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

import contextlib
import ctypes
import ctypes.util
import math
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from elbolab.inference.errors import UsageError
from elbolab.inference.traces import (LogWeights, check_new_rows, guide_posterior, latent_names, model_log_weights,
                                      whole_set_log_weights)

# Default chunk size: particles x rows x data_dim elements of the decoder's output per
# log-weight call (2^22 float32 = 16 MB; a few such tensors live at once).
MAX_ELEMENTS = 2**22
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015: a unit is active if Cov_x(E_q[z_u | x]) > 0.01
# From this many samples (rows x K) on, importance_estimates computes a Bernoulli VAE's
# log-likelihoods with the compiled decoder and likelihood (CompiledLogWeights): compiling
# costs about 7 s per chunk shape (two for K = 5000) and saves about a quarter of the
# time (docs/performance.md), which pays for itself from some 10^7 samples on (the whole
# MNIST test set at K = 5000 is 5 x 10^7).
COMPILE_MIN_SAMPLES = 20_000_000
COMPILE_BACKEND = "inductor"  # torch.compile's backend for it (tests/test_perf.py also checks "eager")


@dataclass
class Estimate:
    """A mean over rows with its standard error. An importance-sampled estimate also
    carries ``pareto_k``, the Pareto k summary of the weights it came from
    (``inference.diagnostics.pareto_k_summary``), and ``reliable``: False when that
    summary says the weights' tail makes the number untrustworthy whatever its standard
    error (or when k could not be determined); None where no weights are involved."""

    mean: float
    se: float
    n: int
    values: torch.Tensor | None = None  # per row
    pareto_k: dict | None = None
    reliable: bool | None = None

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        v = values.detach().double().flatten()
        n = v.numel()
        se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return cls(float(v.mean()), se, n, v)

    def with_reliability(self, pareto_k: dict | None, reliable: bool | None) -> "Estimate":
        """The same estimate carrying a Pareto k summary and a reliability flag."""
        return replace(self, pareto_k=pareto_k, reliable=reliable)

    def to_dict(self) -> dict:
        out = {"mean": self.mean, "se": self.se, "n": self.n}
        if self.pareto_k is not None:
            out["pareto_k"] = self.pareto_k
        if self.reliable is not None:
            out["reliable"] = self.reliable
        return out


def elbo_terms(model, x: torch.Tensor, rows: torch.Tensor | None = None, n_particles: int = 1) -> dict:
    """Per-row Monte Carlo ELBO, reconstruction term E_q log p(x|z) and KL term
    E_q[log q(z|x) - log p(z)], each (B,), from ``n_particles`` vectorized draws.

    ``rows``: the training-row indices of ``x`` (needed by per-datapoint guides);
    None for rows that are a set of their own (validation, test).
    """
    with torch.no_grad():
        lw = model_log_weights(model, x, rows, n_particles)
    return {"elbo": lw.log_w.mean(0), "recon": lw.log_lik.mean(0), "kl": (lw.log_q - lw.log_prior).mean(0)}


def global_latent_sites(model, x: torch.Tensor, rows: torch.Tensor | None = None) -> list[str]:
    """The guide's latent sites outside the data plate, from one trace of the guide (the
    random-number stream is left as it was)."""
    return latent_names(model, x, rows)[1]


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


# ----------------------------------------------------------------------------- importance sampling


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


def chunk_sizes(n_rows: int, n_samples: int, data_dim: int, batch_size: int | None = None,
                particle_chunk: int | None = None, max_elements: int = MAX_ELEMENTS) -> tuple[int, int]:
    """(rows per chunk, particles per chunk) so that one chunk's decoder output,
    particles x rows x data_dim, stays near ``max_elements``."""
    rows = batch_size or max(1, min(n_rows, 100, max_elements // max(1, data_dim)))
    particles = particle_chunk or max(1, min(n_samples, max_elements // max(1, rows * data_dim)))
    return max(1, min(rows, n_rows)), max(1, min(particles, n_samples))


class CompiledLogWeights:
    """The log weights of a chunk of a VAE (``models.vae.VAE`` or its GMVAE, amortized
    guide, Bernoulli likelihood) with the decoder and the likelihood compiled
    (``torch.compile``): the :class:`~elbolab.inference.traces.LogWeights` that
    ``traces.model_log_weights`` makes of the rows x (B, D) and K particles, without
    Pyro's traces::

        z = loc(x) + eps * scale(x),  eps ~ N(0, I) of shape (K, B, k)   (the traced path's draws)
        log_lik = sum_d log sigmoid((2 x_d - 1) f_d(z))                  (K, B), compiled
        log_prior = log p(z),  log_q = log q(z | x)                      (K, B), the model's own

    The compiled function fuses the decoder's activations and the likelihood's
    elementwise passes over the K x B x D logits (eager, each is a pass through memory);
    it is compiled once per chunk shape and kept for the model. The numbers are the
    traced path's up to float round-off (``tests/test_perf.py``); rows that are not
    binary, and models of other kinds, take the traced path."""

    _cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> compiled function

    def __init__(self, model):
        self.model = model

    @staticmethod
    def applies(model) -> bool:
        """Whether the model is of the kind this computes (see the class docstring)."""
        from elbolab.models.vae import VAE

        return isinstance(model, VAE) and model.likelihood == "bernoulli" and bool(model.encoder.amortized)

    def log_lik_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        fn = self._cache.get(self.model)
        if fn is None:
            decoder_output = self.model.decoder_output

            def log_lik(z: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:  # z (K, B, k), sign = 2x - 1 (B, D)
                return F.logsigmoid(decoder_output(z) * sign).sum(-1)  # (K, B)

            fn = self._cache[self.model] = torch.compile(log_lik, dynamic=False, backend=COMPILE_BACKEND)
        return fn

    def __call__(self, x: torch.Tensor, n_particles: int) -> LogWeights:
        q = self.model.guide_dist(x)  # batch (B,), event (k,)
        z = q.rsample((int(n_particles),))  # (K, B, k)
        log_lik = self.log_lik_fn()(z, 2.0 * x - 1.0)
        return LogWeights(log_lik, self.model.prior().log_prob(z), q.log_prob(z), 1.0)


_COMPILE_FAILED: set[type] = set()  # model classes whose compilation failed once (the traced path instead)


def importance_estimates(model, x: torch.Tensor, n_samples: int, rows: torch.Tensor | None = None, *,
                         batch_size: int | None = None, particle_chunk: int | None = None,
                         max_elements: int = MAX_ELEMENTS, seed: int | None = None,
                         on_log_weights: Callable[[int, torch.Tensor], None] | None = None,
                         compiled: bool | None = None) -> dict[str, Estimate]:
    """Importance-sampled log-likelihood per row, and the ELBO and its terms from the
    same draws, each an :class:`Estimate` over the rows of ``x`` (N, D)::

        log_likelihood_i = log (1/K) sum_k w_ik,  w_ik = p(x_i, z_ik) / q(z_ik | x_i),  z_ik ~ q(z | x_i)
        elbo_i = (1/K) sum_k log w_ik,  recon_i = (1/K) sum_k log p(x_i | z_ik),
        kl_i = (1/K) sum_k [log q(z_ik | x_i) - log p(z_ik)]

    The log-likelihood estimate is the IWAE bound with K = ``n_samples``: a lower bound
    of log p(x_i) in expectation, tight as K grows; elbo_i <= log_likelihood_i for every
    row (Jensen, same draws). The rows go in chunks of ``batch_size`` and the particles
    in chunks of ``particle_chunk`` (by default both chosen so that one chunk holds
    about ``max_elements`` decoder outputs), the sum over particles accumulated as a
    streaming logsumexp in float64: memory does not grow with K or N. ``rows``: the
    training-row indices of x (per-datapoint guides need them). ``seed``: draw under a
    fixed seed (the global RNG state is restored afterwards). ``on_log_weights(start,
    log_w)``: called once per row chunk with its log weights (B_chunk, K), float64, rows
    ``start .. start + B_chunk - 1`` of x (e.g. for a Pareto-k diagnostic per row).

    ``compiled``: compute the chunks' log weights with :class:`CompiledLogWeights` (a
    Bernoulli VAE with an amortized guide; the same draws, the same numbers up to float
    round-off); None (the default) does so from ``COMPILE_MIN_SAMPLES`` rows x samples
    on, where compiling pays for itself; other models always take the traced path.

    Not ``pyro.infer.Importance``: it draws one particle at a time (200-500x slower
    here) and sums over the data plate; this draws a chunk of particles as one
    vectorized plate and keeps each row's weights.
    """
    if int(n_samples) != n_samples or n_samples < 1:
        raise UsageError(f"n_samples must be an integer >= 1, got {n_samples}")
    n_samples, n = int(n_samples), int(x.shape[0])
    if n == 0:
        raise UsageError("importance sampling needs at least one row")
    if rows is not None and rows.shape[0] != n:
        raise UsageError(f"rows has {rows.shape[0]} indices for {n} rows of x")
    check_new_rows(model, x, rows)
    b_size, k_size = chunk_sizes(n, n_samples, int(x[0].numel()), batch_size, particle_chunk, max_elements)
    if compiled is None:
        compiled = n * n_samples >= COMPILE_MIN_SAMPLES
    fast = (CompiledLogWeights(model) if compiled and CompiledLogWeights.applies(model)
            and type(model) not in _COMPILE_FAILED else None)
    out = {key: torch.empty(n, dtype=torch.float64) for key in ("log_likelihood", "elbo", "recon", "kl")}
    rng = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with rng, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for start, b in _chunks(n, b_size):
            xb = x[start : start + b]
            rb = None if rows is None else rows[start : start + b]
            lse = torch.full((b,), -math.inf, dtype=torch.float64)
            sums = torch.zeros(3, b, dtype=torch.float64)  # log w, log p(x|z), log q - log p(z)
            kept = [] if on_log_weights is not None else None
            binary = fast is not None and bool(((xb == 0) | (xb == 1)).all())  # (the likelihood's formula needs it)
            for _, kc in _chunks(n_samples, k_size):
                lw = None
                if binary:
                    state = torch.get_rng_state()
                    try:
                        lw = fast(xb, kc)
                    except Exception as e:  # noqa: BLE001 (a compiler missing or failing: the traced path)
                        torch.set_rng_state(state)  # (the traced path draws this chunk's particles)
                        _COMPILE_FAILED.add(type(model))
                        warnings.warn(f"the compiled evaluation failed ({type(e).__name__}: {str(e)[:200]}); "
                                      "using the traced path", RuntimeWarning, stacklevel=2)
                        fast, binary = None, False
                if lw is None:
                    lw = model_log_weights(model, xb, rb, kc)
                log_w = lw.log_w.double()  # (kc, b)
                lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
                sums += torch.stack([log_w.sum(0), lw.log_lik.double().sum(0),
                                     (lw.log_q - lw.log_prior).double().sum(0)])
                if kept is not None:
                    kept.append(log_w.T)
            out["log_likelihood"][start : start + b] = lse - math.log(n_samples)
            out["elbo"][start : start + b], out["recon"][start : start + b], out["kl"][start : start + b] = (
                sums / n_samples)
            if kept is not None:
                on_log_weights(start, torch.cat(kept, 1))  # (b, K)
    return {key: Estimate.of(v) for key, v in out.items()}


def test_log_likelihood(model, x: torch.Tensor, n_samples: int, seed: int, rows: torch.Tensor | None = None, *,
                        pareto=None, on_log_weights: Callable[[int, torch.Tensor], None] | None = None
                        ) -> dict[str, Estimate]:
    """The importance-sampled log-likelihood of the rows x (K = ``n_samples``, drawn under
    ``seed``) with its reliability: :func:`importance_estimates`'s estimates, the
    ``log_likelihood`` one carrying the Pareto k summary of the rows' weights and its
    ``reliable`` flag (``inference.diagnostics``: reliable when at most 1% of rows have
    k > 0.7; False when k is undetermined, K < 21).

    One estimate, one answer: the draws depend on (model, x, K, seed) only. The chunking
    of rows and particles is the default one (a function of x's shape), never the
    caller's, since other chunks draw other random numbers (and so another estimate of
    each row's k). Callers that report the same estimate (a fit's test log-likelihood,
    a later re-evaluation of the run) pass the same seed (:func:`log_likelihood_seed`) and get the
    same numbers and the same k share: the share of rows with k > 0.7 is itself a Monte
    Carlo statistic (each row's k estimate from K = 1000 draws has a spread of about
    0.13 across seeds on a digits VAE, and its share over 270 test rows ranged from
    3.3% to 8.5% over 20 seeds).

    ``pareto``: a ``ParetoK`` to fill (its per-row values, e.g. for a plot; a new one
    otherwise); ``on_log_weights``: a further callback on the same weights (e.g. an
    :class:`IWAELadder`), called before it.
    """
    from elbolab.inference.diagnostics import ParetoK, compose  # diagnostics imports this module

    pareto = ParetoK() if pareto is None else pareto
    est = importance_estimates(model, x, n_samples, rows, seed=int(seed),
                               on_log_weights=compose(on_log_weights, pareto))
    summary = pareto.summary()
    est["log_likelihood"] = est["log_likelihood"].with_reliability(summary, bool(summary["reliable"]))
    return est


test_log_likelihood.__test__ = False  # a library function, not a test, wherever a test module imports it


TEST_SEED_OFFSET = 2  # a run's test log-likelihood draws under its training seed + 2


def log_likelihood_seed(train_seed: int) -> int:
    """The seed of a run's test log-likelihood (:func:`test_log_likelihood`) from its
    training seed: the one seed for that estimate, whoever computes it."""
    return int(train_seed) + TEST_SEED_OFFSET


def importance_log_likelihood(model, x: torch.Tensor, n_samples: int, rows: torch.Tensor | None = None,
                              **kwargs) -> Estimate:
    """log p(x_i) ~= log (1/K) sum_k p(x_i, z_k) / q(z_k | x_i) per row, K = ``n_samples``:
    see :func:`importance_estimates` (same arguments)."""
    return importance_estimates(model, x, n_samples, rows, **kwargs)["log_likelihood"]


def active_units(model, x: torch.Tensor, rows: torch.Tensor | None = None,
                 threshold: float = ACTIVE_UNIT_THRESHOLD, batch_size: int = 1000) -> dict:
    """Burda et al. (2015)'s active units: latent dimension u is active when
    Cov_x(E_q[z_u | x]) > ``threshold`` over the rows of x (population variance of the
    guide's means). Returns the count, the dimension and each unit's variance."""
    with torch.no_grad():
        means = torch.cat([guide_posterior(model, x[s : s + b], None if rows is None else rows[s : s + b]).mean
                           for s, b in _chunks(int(x.shape[0]), batch_size)]).double()  # (N, k)
    var = means.var(0, unbiased=False)
    return {"active_units": int((var > threshold).sum()), "latent_dim": int(var.numel()),
            "threshold": threshold, "variances": [float(v) for v in var]}


# ----------------------------------------------------------------------------- memory

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Ask glibc to keep freed memory instead of returning it to the system after every
    large tensor (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), which speeds up chunked
    evaluations of large K x batch tensors (measured 1.6-2x here). The
    same as setting MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment.
    Process-wide: for scripts to call, not libraries. False where glibc is absent."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mmap_cap = min(threshold, 32 << 20)  # glibc caps the mmap threshold at 32 MB on 64-bit
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_cap)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))


class IWAELadder:
    """A callback for :func:`importance_estimates` that turns each row's K log weights
    into IWAE_m bounds for several m dividing K, from the same draws: the K draws are
    split into K/m groups of m, and the row's IWAE_m is the mean of the groups'
    log-mean-exp (an unbiased estimate of E[IWAE_m], with less noise than one group).
    m = 1 is the ELBO, m = K the K-sample log-likelihood estimate."""

    def __init__(self, n_rows: int, sizes: tuple[int, ...]):
        if not sizes or min(sizes) < 1:
            raise UsageError(f"IWAE group sizes must be positive integers, got {sizes}")
        self.sizes = tuple(sorted(set(int(m) for m in sizes)))
        self.values = {m: torch.full((n_rows,), math.nan, dtype=torch.float64) for m in self.sizes}

    def __call__(self, start: int, log_w: torch.Tensor) -> None:
        b, k = log_w.shape  # (rows, K)
        for m in self.sizes:
            if k % m:
                raise UsageError(f"IWAE group size {m} does not divide the {k} samples")
            groups = log_w.reshape(b, k // m, m)
            self.values[m][start : start + b] = (torch.logsumexp(groups, -1) - math.log(m)).mean(-1)

    def estimates(self) -> dict[int, Estimate]:
        return {m: Estimate.of(v) for m, v in self.values.items()}
