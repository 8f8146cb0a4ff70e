"""Probabilistic PCA (Tipping & Bishop 1999), with its closed forms.

Generative story, for each row x_i (i = 1..N) of a data matrix X (N, d)::

    z_i ~ N(0, I_k)                                  z: (B, k)
    x_i | z_i ~ N(W z_i + loc, noise_scale^2 I_d)    x: (B, d)

so that x_i ~ N(loc, C) with C = W W^T + noise_scale^2 I_d (d, d) and the exact
posterior is p(z_i | x_i) = N(M^-1 W^T (x_i - loc), noise_scale^2 M^-1) with
M = W^T W + noise_scale^2 I_k (k, k).

Parameters: ``W`` (d, k), ``loc`` (d,), ``noise_scale`` > 0 (sigma), in the data's units;
held as ``unit_W``, ``unit_loc``, ``unit_noise_scale`` in the units of the standardized
data (x - data_loc) / data_scale (W = data_scale unit_W, loc = data_loc + data_scale
unit_loc, noise_scale = data_scale unit_noise_scale), where ``data_loc`` (d,) and
``data_scale`` (a scalar, so the noise stays isotropic) are the training data's mean and
spread (``initialize_from_data``; 0 and 1 before). The likelihood of a + s x under
(a + s W', ...) is that of x under W' less d log s per row, so its gradient with respect
to the unit parameters, and hence Adam's path, is the same for any location and scale
of the data.

Guides (``PPCAConfig.guide``):

* ``amortized-full``: q(z|x) = N(A (x - loc) + b, L L^T) with one lower-triangular
  L for all rows; its family contains the exact posterior (whose covariance does
  not depend on x): A = M^-1 W^T, b = 0, L L^T = noise_scale^2 M^-1;
* ``amortized-diag``: q(z|x) = N(A (x - loc) + b, diag(s^2)), the mean-field
  family; its best member has the exact posterior mean and variances
  1 / diag(Sigma^-1) (``best_mean_field``).

The amortized encoders read x centred at the model's current ``loc`` (detached, so
the guide's gradient never moves the model) and divided by ``data_scale``: the same affine family as A x + b,
but the regression of z on x is far better conditioned. Measured on the digits
(k = 10, full batch, 1,000 steps of Adam decaying 0.03 -> 1e-4): centred, the fit
ends 0.0004 nats per datapoint below the closed-form maximum log-likelihood with
KL(q || p(z|x)) = 0.0016; reading raw x, 0.34 nats below with KL = 0.21.

Per-datapoint guides:

* ``per-datapoint``: one (loc_i, scale_i) per training row, diagonal;
* ``per-datapoint-full``: one (loc_i, L_i) per training row, L_i lower-triangular:
  like ``amortized-full`` its family holds the exact posterior of every row.

Closed forms (float64, module-level so they work on any W, loc, noise_scale):
``principal_directions``, ``mle``, ``log_marginal``, ``posterior``, ``gaussian_elbo``, ``gaussian_moments``, ``kl_gaussians``,
``best_mean_field``, ``principal_angles``, ``em``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints

from elbolab.models.common import (DATA_PLATE, ConfigError, PerDatapointMultivariateNormal, PerDatapointNormal,
                                   data_plate, param)

GUIDES = ("amortized-full", "amortized-diag", "per-datapoint", "per-datapoint-full")


@dataclass(frozen=True)
class PPCAConfig:
    latent_dim: int = param(2, "latent dimension k")
    guide: str = param("amortized-full", "guide family", choices=GUIDES)
    init_scale: float = param(0.1, "scale of the random initial W and of the guides' initial spread")

    def __post_init__(self):
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.guide not in GUIDES:
            raise ConfigError(f"guide for ppca must be one of {', '.join(GUIDES)}, got {self.guide!r}")
        if not self.init_scale > 0:
            raise ConfigError(f"init_scale must be > 0, got {self.init_scale}")


class LinearGaussianEncoder(PyroModule):
    """q(z|u) = N(A u + b, L L^T) (full) or N(A u + b, diag(s^2)) (diagonal) of its
    input u (B, d); the covariance is shared by all rows."""

    amortized = True

    def __init__(self, data_dim: int, latent_dim: int, full: bool, init_scale: float):
        super().__init__()
        self.full = full
        self.linear = nn.Linear(data_dim, latent_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if full:
            self.scale_tril = PyroParam(init_scale * torch.eye(latent_dim), constraint=constraints.lower_cholesky)
        else:
            self.scale = PyroParam(torch.full((latent_dim,), init_scale), constraint=constraints.positive)

    def dist(self, x: torch.Tensor) -> dist.Distribution:
        loc = self.linear(x)  # (B, k)
        if self.full:
            return dist.MultivariateNormal(loc, scale_tril=self.scale_tril)  # batch (B,), event (k,)
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(1)


class PPCA(PyroModule):
    """The PPCA model and its guide; ``model(x)`` / ``guide(x)`` take x (B, d)."""

    likelihood = "gaussian"
    max_plate_nesting = 1
    data_plate = DATA_PLATE
    static_steps = True  # (models.protocol.StaticSteps)

    def __init__(self, config: PPCAConfig, data_dim: int, n_data: int):
        super().__init__()
        if config.latent_dim > data_dim:
            raise ConfigError(f"latent_dim {config.latent_dim} is larger than the data dimension {data_dim}")
        self.config, self.data_dim, self.n_data = config, data_dim, n_data
        self.latent_dim = k = config.latent_dim
        # the data's location and scale (set by initialize_from_data; 0 and 1 until then): the
        # parameters below are in the units of (x - data_loc) / data_scale, see the module docstring
        self.register_buffer("data_loc", torch.zeros(data_dim))
        self.register_buffer("data_scale", torch.ones(()))
        self.unit_W = PyroParam(config.init_scale * torch.randn(data_dim, k))
        self.unit_loc = PyroParam(torch.zeros(data_dim))
        self.unit_noise_scale = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        if config.guide == "per-datapoint":
            self.encoder = PerDatapointNormal(n_data, k, config.init_scale)
        elif config.guide == "per-datapoint-full":
            self.encoder = PerDatapointMultivariateNormal(n_data, k, config.init_scale)
        else:
            self.encoder = LinearGaussianEncoder(data_dim, k, config.guide == "amortized-full", config.init_scale)

    # -- the parameters in the data's units ----------------------------------------

    @property
    def W(self) -> torch.Tensor:
        """The loadings (d, k), in the data's units."""
        return self.data_scale * self.unit_W

    @property
    def loc(self) -> torch.Tensor:
        """The mean (d,), in the data's units."""
        return self.data_loc + self.data_scale * self.unit_loc

    @property
    def noise_scale(self) -> torch.Tensor:
        """The noise's scale (), in the data's units."""
        return self.data_scale * self.unit_noise_scale

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Take the data's location (the column means) and scale (the root mean variance
        over columns) as the units of the parameters, and start from loc at the mean, the
        noise at the whole spread and W along the data's k principal directions at the
        data's spread along each (``principal_directions``: W is PCA's, the limit of no
        noise, so C = W W^T + noise_scale^2 I starts too wide by the noise; SVI still has
        to find the noise level, and W's lengths with it). Then the guide is set to its
        family's best member at these parameters.

        Why the units: Adam's steps are of a fixed size in the parameters' units, so a fit
        in these units is the same for data a + s x as for x (up to float round-off);
        without them, data with offsets of 10 and component scales of 3 ended 2-6 nats
        per datapoint short of the closed form after 1000 full-batch steps (rate 0.05
        decaying to 0.001), and offsets of 100 and scales of 30 about 100 nats short.
        Why the directions: from random directions (columns of length 1/2) the same
        rows reached the closed form within 0.02 nats, but rows whose components'
        scales span 1 to 10 with per-column noise from 0.1 to 3 were still 0.3 nats
        short and rising after 2000 full-batch steps (12 columns, k = 3, 800 rows).
        Why the lengths: started at half the spread along each direction, the MNIST
        grey levels (k = 20, 2000 steps of 2000 rows) ended 0.08 nats short at a rate
        of 0.05 decaying to 1e-4 and 0.03 at 0.01, the largest components' lengths
        still 12-17% short; the loss is flat along them (its curvature in a column's
        length is about 2 / its variance) and their gradients are the noisiest, so Adam
        lengthens them slowly. From the full spread, at 0.005 decaying to 1e-4, the
        same run ended 0.006 nats short (one thread, 170 s)."""
        mean = x.double().mean(0)
        spread = (x.double() - mean).pow(2).mean().sqrt()
        scale = float(spread) if float(spread) > 0 else 1.0
        dtype = self.unit_W.dtype
        self.data_loc = mean.to(dtype)
        self.data_scale = torch.tensor(scale, dtype=dtype)
        k = self.latent_dim
        directions, variances = principal_directions((x.double() - mean) / scale, k)
        self.unit_W = (directions * variances.clamp_min(0.0).sqrt()).to(dtype)
        self.unit_loc = torch.zeros(self.data_dim, dtype=dtype)
        self.unit_noise_scale = torch.tensor(1.0, dtype=dtype)
        self.set_guide_optimal(x)

    def model(self, x: torch.Tensor) -> None:
        W, loc, noise_scale = self.W, self.loc, self.noise_scale  # (d, k), (d,), ()
        with data_plate(x):
            prior = dist.Normal(x.new_zeros(()), 1.0).expand([self.latent_dim]).to_event(1)
            z = pyro.sample("z", prior)  # (..., B, k)
            pyro.sample("x", dist.Normal(z @ W.T + loc, noise_scale).to_event(1), obs=x)  # (..., B, d)

    def guide(self, x: torch.Tensor) -> None:
        with data_plate(x) as rows:
            pyro.sample("z", self.guide_dist(x, rows))

    def guide_dist(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> dist.Distribution:
        """q(z | x): batch (B,), event (k,); ``rows``: the rows' positions in the training
        set (per-datapoint guides read them; default 0..B-1)."""
        if self.encoder.amortized:
            return self.encoder.dist(self.encoder_input(x))
        return self.encoder.dist(torch.arange(x.shape[0]) if rows is None else rows)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """x centred at the model's loc and divided by the data's scale, detached (see the
        module docstring)."""
        return (x - self.loc.detach()) / self.data_scale

    # -- closed forms at the current parameters ----------------------------------

    def params64(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, loc, noise_scale) detached, float64."""
        with torch.no_grad():
            return self.W.detach().double(), self.loc.detach().double(), self.noise_scale.detach().double()

    @torch.no_grad()
    def set_parameters(self, W: torch.Tensor, loc: torch.Tensor, noise_scale) -> None:
        """Set the generative parameters, in the data's units (e.g. to the closed-form maximum)."""
        dtype = self.unit_W.dtype
        s = self.data_scale.double()
        self.unit_W = (torch.as_tensor(W).double() / s).to(dtype)
        self.unit_loc = ((torch.as_tensor(loc).double() - self.data_loc.double()) / s).to(dtype)
        self.unit_noise_scale = (torch.as_tensor(noise_scale).double() / s).to(dtype)

    @torch.no_grad()
    def set_guide_optimal(self, x: torch.Tensor | None = None) -> None:
        """Set the guide to the best member of its family at the current parameters:
        the exact posterior (full-covariance guides) or the best diagonal Gaussian
        (``best_mean_field``). Per-datapoint guides need the training rows ``x``."""
        W, loc, noise_scale = self.params64()
        M = W.T @ W + noise_scale**2 * torch.eye(self.latent_dim, dtype=W.dtype)
        gain = torch.linalg.solve(M, W.T)  # (k, d): the posterior mean is gain (x - loc)
        cov = noise_scale**2 * torch.linalg.inv(M)  # (k, k)
        full = isinstance(self.encoder, PerDatapointMultivariateNormal) or getattr(self.encoder, "full", False)
        if not full:
            cov = best_mean_field(cov)
        dtype = self.unit_W.dtype
        if self.encoder.amortized:  # it reads (x - loc) / data_scale
            self.encoder.linear.weight.copy_(gain * self.data_scale.double())
            self.encoder.linear.bias.zero_()
            if full:
                self.encoder.scale_tril = torch.linalg.cholesky(cov).to(dtype)
            else:
                self.encoder.scale = torch.diagonal(cov).sqrt().to(dtype)
            return
        if x is None:
            raise ValueError("a per-datapoint guide is set from the training rows x")
        q_loc = ((x.double() - loc) @ gain.T).to(dtype)  # (N, k)
        if full:
            self.encoder.initialize(q_loc, torch.linalg.cholesky(cov).to(dtype))
        else:
            self.encoder.initialize(q_loc, torch.diagonal(cov).sqrt().to(dtype).expand_as(q_loc))

    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_i) per row (N,), float64."""
        return log_marginal(x, *self.params64())

    def guide_moments(self, x: torch.Tensor, rows: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's q(z_i) = N(loc_i, cov_i): loc (B, k) and cov (B, k, k) or one
        shared (k, k), float64."""
        with torch.no_grad():
            return gaussian_moments(self.guide_dist(x, rows))

    def exact_elbo(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The ELBO of each row under the current guide, in closed form (B,), float64."""
        return gaussian_elbo(x, *self.params64(), *self.guide_moments(x, rows))

    def exact_elbo_of(self, x: torch.Tensor, q: dist.Distribution) -> torch.Tensor:
        """The ELBO of each row under any Gaussian q(z_i) (batch (B,), event (k,), e.g.
        another guide's), in closed form at the current parameters (B,), float64."""
        with torch.no_grad():
            return gaussian_elbo(x, *self.params64(), *gaussian_moments(q))

    def exact_kl(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """KL(q(z_i) || p(z_i | x_i)) of each row under the current guide (B,), float64."""
        q_loc, q_cov = self.guide_moments(x, rows)
        p_loc, p_cov = self.exact_posterior(x)
        return kl_gaussians(q_loc, q_cov, p_loc, p_cov)

    def closed_form_metrics(self, data) -> dict:
        """Exact log-likelihoods per datapoint at the fitted parameters, the
        closed-form maximum on the same training rows, and the guide's exact ELBO and
        KL to the exact posterior (their sum is the log-likelihood), nats per datapoint."""
        out = {"train_log_likelihood": float(self.exact_log_likelihood(data.train).mean())}
        rows = torch.arange(data.n_train)
        out["train_exact_elbo"] = float(self.exact_elbo(data.train, rows).mean())
        out["train_exact_kl"] = float(self.exact_kl(data.train, rows).mean())
        if data.val.shape[0]:
            out["val_log_likelihood"] = float(self.exact_log_likelihood(data.val).mean())
        if data.test.shape[0]:
            out["test_log_likelihood"] = float(self.exact_log_likelihood(data.test).mean())
        if self.latent_dim < self.data_dim:
            W, loc, noise_scale = mle(data.train, self.latent_dim)
            out["mle_log_likelihood"] = float(log_marginal(data.train, W, loc, noise_scale).mean())
        return out

    def exact_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_i | x_i) = N(loc_i, cov): loc (N, k) and the shared cov (k, k), float64."""
        return posterior(x, *self.params64())

    def exact_posterior_samples(self, x: torch.Tensor, n_samples: int) -> dict:
        """n draws of each row's z from its exact posterior: {"z": (S, N, k)}, float64."""
        loc, cov = self.exact_posterior(x)
        eps = torch.randn((n_samples,) + tuple(loc.shape), dtype=loc.dtype)  # (S, N, k)
        return {"z": loc + eps @ torch.linalg.cholesky(cov).T}


# ------------------------------------------------------------------------------ closed forms


def sample_covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), the 1/N sample covariance (d, d)), float64."""
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    return mean, xc.T @ xc / x.shape[0]


def principal_directions(x: torch.Tensor, k: int, exact_up_to: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """The k leading eigenvectors U (d, k) of the 1/N covariance of the centred rows x
    (N, d) and their eigenvalues (k,), largest first, each vector's largest entry made
    positive (a deterministic sign). Exact (``eigh`` of the d x d covariance) up to
    d = ``exact_up_to`` columns; beyond, a randomized range finder (Halko, Martinsson &
    Tropp 2011) with k + 10 columns and 4 power iterations, torch's ``svd_lowrank``."""
    n, d = x.shape
    if d <= exact_up_to:
        evals, evecs = torch.linalg.eigh(x.T @ x / n)
        evals, U = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    else:
        U, sv, _ = torch.svd_lowrank(x.T, q=min(k + 10, d, n), niter=4)
        evals, U = sv[:k] ** 2 / n, U[:, :k]
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
    return (U * sign).contiguous(), evals


def mle(x: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tipping & Bishop's maximum-likelihood (W, loc, noise_scale), float64.

    loc = data mean; noise_scale^2 = mean of the d - k smallest eigenvalues of the
    1/N sample covariance; W = U_k (Lambda_k - noise_scale^2 I)^(1/2) (the rotation
    R = I of the family of solutions W R).

    With more dimensions than rows (d > N) the covariance (d, d) is never formed: its
    nonzero eigenvalues are s_i^2 / N and its leading eigenvectors the right singular
    vectors of the centred rows X_c = U S V^T (N, d), the other d - N eigenvalues are
    zero, and the d - k smallest sum to tr(cov) - sum_{i<k} s_i^2 / N with
    tr(cov) = ||X_c||_F^2 / N: O(N^2 d) time and O(N d) memory.
    """
    n, d = x.shape
    if not 1 <= latent_dim < d:
        raise ConfigError(f"the closed-form PPCA needs 1 <= latent_dim < d = {d}, got {latent_dim}")
    if d > n:
        x = x.double()
        mean = x.mean(0)
        xc = x - mean
        _, sv, vh = torch.linalg.svd(xc, full_matrices=False)  # sv (r,), vh (r, d), r = min(N, d), descending
        evals = sv**2 / n
        top = evals[:latent_dim]
        noise_var = ((xc**2).sum() / n - top.sum()) / (d - latent_dim)
        noise_var = noise_var.clamp_min(1e-12)
        W = torch.zeros(d, latent_dim, dtype=x.dtype)
        r = top.shape[0]  # k may exceed the rank: the rest of W is zero (eigenvalue 0 <= noise)
        W[:, :r] = vh[:r].T * (top - noise_var).clamp_min(0.0).sqrt()
        return W, mean, noise_var.sqrt()
    mean, cov = sample_covariance(x)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    noise_var = evals[latent_dim:].mean().clamp_min(1e-12)
    W = evecs[:, :latent_dim] * (evals[:latent_dim] - noise_var).clamp_min(0.0).sqrt()
    return W, mean, noise_var.sqrt()


def marginal_covariance(W: torch.Tensor, noise_scale: torch.Tensor) -> torch.Tensor:
    return W @ W.T + noise_scale**2 * torch.eye(W.shape[0], dtype=W.dtype)


def log_marginal(x: torch.Tensor, W: torch.Tensor, loc: torch.Tensor, noise_scale: torch.Tensor) -> torch.Tensor:
    """log N(x_i; loc, C) per row (N,), float64, C = W W^T + noise_scale^2 I_d (d, d), without
    forming C: with M = W^T W + noise_scale^2 I_k (k, k) = L L^T, the determinant lemma gives
    log|C| = (d - k) log noise_scale^2 + log|M| and the Woodbury identity C^-1 = (I - W M^-1
    W^T) / noise_scale^2, so for r = x_i - loc the quadratic form is (|r|^2 - |L^-1 W^T
    r|^2) / noise_scale^2. O(N d k + k^3) time and O(N d + d k) memory where the dense
    form takes O(d^3) and O(d^2) (80 GB at d = 100000)."""
    W, loc, noise_var = W.double(), loc.double(), torch.as_tensor(noise_scale).double() ** 2
    d, k = W.shape
    L = torch.linalg.cholesky(W.T @ W + noise_var * torch.eye(k, dtype=W.dtype))  # (k, k)
    r = x.double() - loc  # (N, d)
    u = torch.linalg.solve_triangular(L, (r @ W).T, upper=False)  # (k, N): L^-1 W^T r
    quad = ((r**2).sum(-1) - (u**2).sum(0)) / noise_var
    logdet = (d - k) * torch.log(noise_var) + 2 * torch.log(torch.diagonal(L)).sum()
    return -0.5 * (d * math.log(2 * math.pi) + logdet + quad)


def mean_log_marginal(cov: torch.Tensor, W: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
    """The mean over rows of log N(x_i; mean, C), C = W W^T + noise_var I, from the rows'
    1/N sample covariance ``cov`` about their mean alone: -(d log 2 pi + log|C| +
    tr(C^-1 cov)) / 2, with |C| = noise_var^(d-k) |M| and C^-1 = (I - W M^-1 W^T) /
    noise_var (M = W^T W + noise_var I). O(d^2 k) instead of O(N d^2) a call."""
    cov, W, noise_var = cov.double(), W.double(), torch.as_tensor(noise_var).double()
    d, k = W.shape
    M = W.T @ W + noise_var * torch.eye(k, dtype=W.dtype)
    L = torch.linalg.cholesky(M)
    logdet = (d - k) * torch.log(noise_var) + 2 * torch.log(torch.diagonal(L)).sum()
    trace = (torch.trace(cov) - torch.trace(torch.cholesky_solve(W.T @ cov @ W, L))) / noise_var
    return -0.5 * (d * math.log(2 * math.pi) + logdet + trace)


def posterior(x: torch.Tensor, W: torch.Tensor, loc: torch.Tensor, noise_scale: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact p(z_i | x_i): means (N, k) and the shared covariance noise_scale^2 M^-1 (k, k)."""
    W, loc, noise_var = W.double(), loc.double(), torch.as_tensor(noise_scale).double() ** 2
    M = W.T @ W + noise_var * torch.eye(W.shape[1], dtype=W.dtype)
    Minv = torch.linalg.inv(M)
    return (x.double() - loc) @ W @ Minv.T, noise_var * Minv


def gaussian_elbo(x: torch.Tensor, W: torch.Tensor, loc: torch.Tensor, noise_scale: torch.Tensor,
                  q_loc: torch.Tensor, q_cov: torch.Tensor) -> torch.Tensor:
    """The exact ELBO per row for q(z_i) = N(q_loc_i, q_cov) (q_cov (k, k) or (N, k, k))."""
    x, W, loc, q_loc, q_cov = (t.double() for t in (x, W, loc, q_loc, q_cov))
    noise_var = torch.as_tensor(noise_scale).double() ** 2
    d, k = W.shape
    resid = x - loc - q_loc @ W.T  # (N, d)
    trace_wsw = torch.einsum("ij,...jl,il->...", W, q_cov, W)  # tr(W S W^T)
    expected_loglik = -0.5 * d * torch.log(2 * math.pi * noise_var) - 0.5 * (
        (resid**2).sum(-1) + trace_wsw) / noise_var
    expected_logprior = -0.5 * k * math.log(2 * math.pi) - 0.5 * (
        (q_loc**2).sum(-1) + torch.diagonal(q_cov, dim1=-2, dim2=-1).sum(-1))
    entropy = 0.5 * k * math.log(2 * math.pi * math.e) + 0.5 * torch.logdet(q_cov)
    return expected_loglik + expected_logprior + entropy


def gaussian_moments(q: torch.distributions.Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc (B, k), cov (B, k, k) or one shared (k, k)) of a Gaussian q(z): a diagonal
    ``Normal(...).to_event(1)`` or a ``MultivariateNormal``, float64."""
    if isinstance(q, torch.distributions.Independent):  # diagonal Normal
        return q.base_dist.loc.double(), torch.diag_embed(q.base_dist.scale.double() ** 2)
    L = q.scale_tril.double()  # L L^T in float64: a float32 product can lose positive-definiteness
    return q.loc.double(), L @ L.transpose(-1, -2)


def best_mean_field(cov: torch.Tensor) -> torch.Tensor:
    """The covariance of the diagonal Gaussian closest to N(m, cov) in KL(q || p):
    same mean, variances 1 / diag(cov^-1) (..., k, k), float64."""
    precision = torch.linalg.inv(cov.double())
    return torch.diag_embed(1.0 / torch.diagonal(precision, dim1=-2, dim2=-1))


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The principal angles between the column spaces of A (d, k) and B (d, l), in
    degrees, ascending (min(k, l),), float64."""
    qa = torch.linalg.qr(A.double())[0]
    qb = torch.linalg.qr(B.double())[0]
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)  # descending cosines
    return torch.rad2deg(torch.arccos(cos))


def kl_gaussians(loc_q: torch.Tensor, cov_q: torch.Tensor, loc_p: torch.Tensor, cov_p: torch.Tensor) -> torch.Tensor:
    """KL(N(loc_q, cov_q) || N(loc_p, cov_p)), batched over leading dims, float64."""
    q = torch.distributions.MultivariateNormal(loc_q.double(), covariance_matrix=cov_q.double())
    p = torch.distributions.MultivariateNormal(loc_p.double(), covariance_matrix=cov_p.double())
    return torch.distributions.kl_divergence(q, p)


def em(x: torch.Tensor, latent_dim: int, steps: int = 1000, tol: float = 1e-10, seed: int = 0,
       W: torch.Tensor | None = None, noise_scale: float = 1.0):
    """Tipping & Bishop's EM for PPCA in float64, from random W (or the given one).

    Returns (W, loc, noise_scale, n_steps, mean log-likelihood per step (list)).
    Stops when the mean log-likelihood improves by less than ``tol`` nats per row.
    """
    if steps < 1:
        raise ConfigError(f"EM needs steps >= 1, got {steps}")
    x = x.double()
    n, d = x.shape
    mean, S = sample_covariance(x)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, latent_dim, generator=g, dtype=torch.float64) if W is None else W.double().clone()
    noise_var = torch.tensor(float(noise_scale) ** 2, dtype=torch.float64)
    history = []
    eye_k = torch.eye(latent_dim, dtype=torch.float64)
    for step in range(1, steps + 1):
        M_inv = torch.linalg.inv(W.T @ W + noise_var * eye_k)
        SW = S @ W
        W_new = SW @ torch.linalg.inv(noise_var * eye_k + M_inv @ W.T @ SW)
        noise_var = torch.trace(S - SW @ M_inv @ W_new.T) / d
        W = W_new
        history.append(float(mean_log_marginal(S, W, noise_var)))
        if step > 1 and history[-1] - history[-2] < tol:
            break
    return W, mean, noise_var.sqrt(), step, history
