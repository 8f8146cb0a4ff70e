"""The variational autoencoder (Kingma & Welling 2014) and its mixture-prior variant
(the course notes' GMVAE), both with Bernoulli decoders.

Generative story, for each row x_i (i = 1..N) of a binary data matrix X (N, D)::

    z_i ~ p(z)                                        z: (..., B, k)
    x_i | z_i ~ Bernoulli(logits = f_theta(z_i))      x: (B, D), logits (..., B, D)

with p(z) = N(0, I_k) for the VAE and, for the GMVAE,
p(z) = (1/n) sum_j N(z; loc_j, diag scale_j^2), n learnable components, as one
``MixtureSameFamily`` site (no enumerated component index, so every objective
applies and its KL term is estimated by Monte Carlo, as in the notes).
``...`` is the vectorized-particles dimension K when an objective draws several.

Guides (``VAEConfig.guide``):

* ``amortized``: q_phi(z|x) = N(loc_phi(x), diag scale_phi(x)^2), an MLP encoder
  D -> hidden -> 2k (the scale through a softplus);
* ``per-datapoint``: one (loc_i, scale_i) per training row
  (:class:`models.common.PerDatapointNormal`); it cannot infer unseen rows.

The decoder is the mirror MLP k -> reversed(hidden) -> D, its output the logits.
The input size D comes from the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from elbolab.models.common import (ACTIVATIONS, DATA_PLATE, BernoulliLogits, ConfigError, PerDatapointNormal,
                                   data_plate, mlp, param)

GUIDES = ("amortized", "per-datapoint")
MIN_SCALE = 1e-4  # floor of the encoder's scale (a variance floor of 1e-8, as in the CS236 code)


@dataclass(frozen=True)
class VAEConfig:
    """Defaults: the CS236 homework's VAE (k = 10, 300-300 ELU)."""

    latent_dim: int = param(10, "latent dimension k")
    hidden: tuple[int, ...] = param((300, 300), "hidden layer sizes of the encoder; the decoder's reversed")
    activation: str = param("elu", "activation of the hidden layers", choices=tuple(ACTIVATIONS))
    guide: str = param("amortized", "guide family", choices=GUIDES)
    init_scale: float = param(0.1, "initial scale of the per-datapoint guide")

    def __post_init__(self):
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"hidden must be positive layer sizes, got {self.hidden}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.guide not in GUIDES:
            raise ConfigError(f"guide for the VAE must be one of {', '.join(GUIDES)}, got {self.guide!r}")
        if not self.init_scale > 0:
            raise ConfigError(f"init_scale must be > 0, got {self.init_scale}")


@dataclass(frozen=True)
class GMVAEConfig(VAEConfig):
    """Defaults: the CS236 homework's GMVAE (k = 10, 500 components, 300-300 ELU)."""

    n_components: int = param(500, "components of the mixture prior")

    def __post_init__(self):
        super().__post_init__()
        if self.n_components < 1:
            raise ConfigError(f"n_components must be >= 1, got {self.n_components}")


class Encoder(PyroModule):
    """q_phi(z|x) = N(loc_phi(x), diag scale_phi(x)^2): an MLP D -> hidden -> 2k."""

    amortized = True

    def __init__(self, data_dim: int, latent_dim: int, hidden: tuple[int, ...], activation: str):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp([data_dim, *hidden, 2 * latent_dim], activation)

    def loc_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x)  # (B, 2k)
        loc, raw = h[..., : self.latent_dim], h[..., self.latent_dim :]
        return loc, F.softplus(raw) + MIN_SCALE  # (B, k), (B, k)

    def dist(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(x)
        return dist.Normal(loc, scale).to_event(1)  # batch (B,), event (k,)


class DiagNormalMixture(dist.MixtureSameFamily):
    """p(z) = sum_j softmax(logits)_j N(z; loc_j, diag scale_j^2): a ``MixtureSameFamily``
    of n diagonal Normals in k dimensions, with batch shape () before any expansion.

    ``log_prob`` expands the quadratic form, sum_d (z_d - loc_jd)^2 / scale_jd^2 =
    z^2 . prec_j - 2 z . (loc_j prec_j) + loc_j^2 . prec_j, as two (M, k) x (k, n)
    products: memory O(M n) for M points instead of the O(M n k) of the generic
    ``MixtureSameFamily.log_prob``. The expansion cancels terms of size z^2 / scale^2,
    so it is evaluated in float64 (an error of ~1e-16 of those terms) and cast back.
    """

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        if loc.dim() != 2 or scale.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise ValueError(f"expected logits (n,), loc and scale (n, k); got {tuple(logits.shape)}, "
                             f"{tuple(loc.shape)}, {tuple(scale.shape)}")
        super().__init__(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1),
                         validate_args=validate_args)
        self._params = (logits, loc, scale)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagNormalMixture, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._params = self._params
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, loc, scale = (t.double() for t in self._params)  # (n,), (n, k), (n, k)
        prec = scale.pow(-2)
        z = value.double()  # (..., k)
        # [z^2, z, 1] (..., 2k+1) against [prec, -2 loc prec, sum loc^2 prec] (n, 2k+1): one product
        features = torch.cat([z.pow(2), z, z.new_ones(z.shape[:-1] + (1,))], -1)
        coef = torch.cat([prec, -2.0 * loc * prec, (loc.pow(2) * prec).sum(-1, keepdim=True)], -1)
        quad = (features @ coef.T).clamp_min(0.0).to(value.dtype)  # (..., n), each term exact to ~1e-16
        k = loc.shape[-1]
        log_norm = -scale.log().sum(-1) - 0.5 * k * math.log(2 * math.pi)  # (n,)
        log_mix = torch.log_softmax(logits, -1)
        lp = torch.logsumexp((log_mix + log_norm).to(value.dtype) - 0.5 * quad, -1)  # (...,)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))


class VAE(PyroModule):
    """The VAE with a N(0, I) prior; ``model(x)`` / ``guide(x)`` take x (B, D)."""

    likelihood = "bernoulli"
    max_plate_nesting = 1
    data_plate = DATA_PLATE

    def __init__(self, config: VAEConfig, data_dim: int, n_data: int):
        super().__init__()
        self.config, self.data_dim, self.n_data = config, data_dim, n_data
        self.latent_dim = k = config.latent_dim
        self.decoder = mlp([k, *reversed(config.hidden), data_dim], config.activation)  # logits
        if config.guide == "per-datapoint":
            self.encoder = PerDatapointNormal(n_data, k, config.init_scale)
        else:
            self.encoder = Encoder(data_dim, k, tuple(config.hidden), config.activation)

    def _zeros(self, *shape: int) -> torch.Tensor:
        w = self.decoder[0].weight
        return w.new_zeros(shape)

    def prior(self) -> dist.Distribution:
        """p(z): batch (), event (k,)."""
        zero = self._zeros(self.latent_dim)
        return dist.Normal(zero, 1.0).to_event(1)

    def model(self, x: torch.Tensor) -> None:
        with data_plate(x):
            z = pyro.sample("z", self.prior())  # (..., B, k)
            logits = self.decoder(z)  # (..., B, D)
            pyro.sample("x", BernoulliLogits(logits=logits).to_event(1), obs=x)  # (B, D)

    def guide(self, x: torch.Tensor) -> None:
        with data_plate(x) as rows:
            pyro.sample("z", self.guide_dist(x, rows))  # (..., B, k)

    def guide_dist(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> dist.Distribution:
        """q(z | x): batch (B,), event (k,); ``rows``: the rows' positions in the training
        set (the per-datapoint guide reads them; default 0..B-1)."""
        if self.encoder.amortized:
            return self.encoder.dist(x)
        return self.encoder.dist(torch.arange(x.shape[0]) if rows is None else rows)

    # -- what pictures and evaluations use ------------------------------------------

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli means sigmoid(f_theta(z)) (..., D) of latent points z (..., k)."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def sample_prior(self, n: int) -> torch.Tensor:
        """n draws z ~ p(z), (n, k)."""
        return self.prior().sample((n,))

    @torch.no_grad()
    def latent_mean(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """E_q[z | x] (B, k)."""
        return self.guide_dist(x, rows).mean


class GMVAE(VAE):
    """The VAE with a learnable equal-weight mixture of n diagonal Gaussians as its prior."""

    def __init__(self, config: GMVAEConfig, data_dim: int, n_data: int):
        super().__init__(config, data_dim, n_data)
        n, k = config.n_components, config.latent_dim
        # As in the CS236 code: component locations ~ N(0, 1/(n k)), initial variance softplus(0) = log 2.
        self.prior_loc = PyroParam(torch.randn(n, k) / math.sqrt(n * k))
        self.prior_scale = PyroParam(torch.full((n, k), math.sqrt(math.log(2.0))), constraint=constraints.positive)

    def prior(self) -> dist.Distribution:
        loc, scale = self.prior_loc, self.prior_scale  # (n, k), (n, k)
        return DiagNormalMixture(self._zeros(self.config.n_components), loc, scale)  # batch (), event (k,)
