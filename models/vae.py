"""The variational autoencoder (Kingma & Welling 2014) and its mixture-prior variant
(the GMVAE), with a choice of observation model for binary or real-valued data.

Generative story, for each row x_i (i = 1..N) of a data matrix X (N, D)::

    z_i ~ p(z)                                        z: (..., B, k)
    x_i | z_i ~ p(x | f_theta(z_i))                   x: (B, D), f_theta(z) (..., B, D)

with p(z) = N(0, I_k) for the VAE and, for the GMVAE,
p(z) = (1/n) sum_j N(z; loc_j, diag scale_j^2), n learnable components, as one
``MixtureSameFamily`` site (no enumerated component index, so every objective
applies and its KL term is estimated by Monte Carlo).
``...`` is the vectorized-particles dimension K when an objective draws several.

Observation models (``VAEConfig.likelihood``), f_theta(z) the decoder's output:

* ``bernoulli``: x_d ~ Bernoulli(logits = f_d), x in {0, 1}^D;
* ``continuous-bernoulli``: x_d ~ CB(logits = f_d) on [0, 1] (Loaiza-Ganem &
  Cunningham 2019; :class:`models.common.ContinuousBernoulliLogits`), for grey levels;
* ``gaussian``: x ~ N(f, scale^2 I_D), one learned ``noise_scale`` () for all features;
* ``gaussian-diag``: x ~ N(f, diag(scale_d^2)), a learned ``noise_scale`` (D,).

The Gaussian decoders output f(z) = data_loc + data_scale * g_theta(z) with g_theta the
MLP and ``data_loc``, ``data_scale`` (D,) fixed buffers set from the training rows by
:meth:`VAE.initialize_from_data` (identity, 0 and 1, until then); their encoders read
(x - data_loc) / data_scale. The Bernoulli decoders' output is the MLP's.

Guides (``VAEConfig.guide``):

* ``amortized``: q_phi(z|x) = N(loc_phi(x), diag scale_phi(x)^2), an MLP encoder
  D -> hidden -> 2k (the scale through a softplus);
* ``per-datapoint``: one (loc_i, scale_i) per training row
  (:class:`models.common.PerDatapointNormal`); it cannot infer unseen rows.

The decoder is the mirror MLP k -> reversed(hidden) -> D. ``hidden = ()`` makes both
affine maps (no hidden layer): with a Gaussian likelihood the model is then probabilistic
PCA (``gaussian``) or factor analysis (``gaussian-diag``), x ~ N(b, W W^T + noise) with
(W, b) = :meth:`VAE.decoder_affine`, and its encoder a linear-Gaussian q(z|x). The input
size D comes from the data.
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

from elbolab.models.common import (ACTIVATIONS, DATA_PLATE, BernoulliLogits, ConfigError, ContinuousBernoulliLogits,
                                   PerDatapointNormal, SharedScaleNormal, data_plate, mlp, param)
from elbolab.models.errors import UsageError

GUIDES = ("amortized", "per-datapoint")
LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian", "gaussian-diag")
GAUSSIAN_LIKELIHOODS = ("gaussian", "gaussian-diag")
MIN_SCALE = 1e-4  # floor of the encoder's scale (a variance floor of 1e-8, as in the CS236 code)
# initialize_from_data: the Bernoulli decoders' output bias is the logit of each feature's
# mean clipped to [MEAN_CLIP, 1 - MEAN_CLIP] (a feature always 0 or always 1 gets a
# logit of -+6.9, not an infinite one)
MEAN_CLIP = 1e-3
# ... and a feature's scale is at least this fraction of the overall scale (a constant
# feature would otherwise divide the encoder's input by 0 and give a zero noise scale)
RELATIVE_SCALE_FLOOR = 1e-3


@dataclass(frozen=True)
class VAEConfig:
    """Defaults: the CS236 homework's VAE (k = 10, 300-300 ELU)."""

    latent_dim: int = param(10, "latent dimension k")
    hidden: tuple[int, ...] = param((300, 300), "hidden layer sizes of the encoder; the decoder's reversed; "
                                    "none: affine encoder and decoder")
    activation: str = param("elu", "activation of the hidden layers", choices=tuple(ACTIVATIONS))
    guide: str = param("amortized", "guide family", choices=GUIDES)
    init_scale: float = param(0.1, "initial scale of the per-datapoint guide")
    likelihood: str = param("bernoulli", "observation model p(x | z)", choices=LIKELIHOODS)

    def __post_init__(self):
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if any(h < 1 for h in self.hidden):  # () is allowed: affine encoder and decoder
            raise ConfigError(f"hidden must be positive layer sizes (or none), got {self.hidden}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.guide not in GUIDES:
            raise ConfigError(f"guide for the VAE must be one of {', '.join(GUIDES)}, got {self.guide!r}")
        if not self.init_scale > 0:
            raise ConfigError(f"init_scale must be > 0, got {self.init_scale}")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")


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
    """The VAE with a N(0, I) prior; ``model(x)`` / ``guide(x)`` take x (B, D).

    ``likelihood`` is the Config's (per instance); the class attribute is the default,
    "bernoulli", for code that reads it from the class.
    """

    likelihood = "bernoulli"
    max_plate_nesting = 1
    data_plate = DATA_PLATE
    static_steps = True  # (models.protocol.StaticSteps)

    def __init__(self, config: VAEConfig, data_dim: int, n_data: int):
        super().__init__()
        self.config, self.data_dim, self.n_data = config, data_dim, n_data
        self.likelihood = config.likelihood
        self.latent_dim = k = config.latent_dim
        self.decoder = mlp([k, *reversed(config.hidden), data_dim], config.activation)  # f_theta or g_theta
        if self.gaussian:
            # the data's location and scale (D,), fixed (see initialize_from_data); in the
            # state dict, so a model loaded from a checkpoint reads its data as it was trained
            self.register_buffer("data_loc", torch.zeros(data_dim))
            self.register_buffer("data_scale", torch.ones(data_dim))
            shape = () if config.likelihood == "gaussian" else (data_dim,)
            self.noise_scale = PyroParam(torch.ones(shape), constraint=constraints.positive)
        if config.guide == "per-datapoint":
            self.encoder = PerDatapointNormal(n_data, k, config.init_scale)
        else:
            self.encoder = Encoder(data_dim, k, tuple(config.hidden), config.activation)

    @property
    def gaussian(self) -> bool:
        """Whether p(x | z) is Gaussian (``gaussian`` or ``gaussian-diag``)."""
        return self.likelihood in GAUSSIAN_LIKELIHOODS

    def _zeros(self, *shape: int) -> torch.Tensor:
        w = self.decoder[0].weight
        return w.new_zeros(shape)

    def prior(self) -> dist.Distribution:
        """p(z): batch (), event (k,)."""
        zero = self._zeros(self.latent_dim)
        return dist.Normal(zero, 1.0).to_event(1)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """f_theta(z) (..., D) of latent points z (..., k): the logits (Bernoulli
        likelihoods) or the Gaussian's loc, data_loc + data_scale * g_theta(z)."""
        out = self.decoder(z)
        return self.data_loc + self.data_scale * out if self.gaussian else out

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) of latent points z (..., B, k): batch (..., B), event (D,)."""
        out = self.decoder_output(z)  # (..., B, D)
        if self.likelihood == "bernoulli":
            return BernoulliLogits(logits=out).to_event(1)
        if self.likelihood == "continuous-bernoulli":
            return ContinuousBernoulliLogits(out).to_event(1)
        return SharedScaleNormal(out, self.noise_scale)  # noise_scale () or (D,)

    def model(self, x: torch.Tensor) -> None:
        with data_plate(x):
            z = pyro.sample("z", self.prior())  # (..., B, k)
            pyro.sample("x", self.observation(z), obs=x)  # (B, D)

    def guide(self, x: torch.Tensor) -> None:
        with data_plate(x) as rows:
            pyro.sample("z", self.guide_dist(x, rows))  # (..., B, k)

    def guide_dist(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> dist.Distribution:
        """q(z | x): batch (B,), event (k,); ``rows``: the rows' positions in the training
        set (the per-datapoint guide reads them; default 0..B-1)."""
        if self.encoder.amortized:
            return self.encoder.dist(self.encoder_input(x))
        return self.encoder.dist(torch.arange(x.shape[0]) if rows is None else rows)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the amortized encoder reads: (x - data_loc) / data_scale (Gaussian
        likelihoods), x itself (Bernoulli ones, whose data lie in [0, 1]); (B, D)."""
        return (x - self.data_loc) / self.data_scale if self.gaussian else x

    # -- initialization from the data --------------------------------------------------

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Set data-dependent starting values from the training rows x (N, D), so that
        training from the defaults is equally well conditioned whatever the data's
        location and scale (e.g. offsets of 10 and scales of 5). Call it once, before
        training.

        Bernoulli likelihoods (x in [0, 1]): the decoder's output bias b_d = logit(m_d)
        with m_d the mean of feature d clipped to [``MEAN_CLIP``, 1 - ``MEAN_CLIP``], so
        that the untrained decoder predicts each feature's frequency. (For the continuous
        Bernoulli this is lambda = m_d; the distribution's mean is then between m_d and
        1/2. Its exact maximum-likelihood logit, the inverse of the mean function, is
        -1 / m_d for small m_d (-100 at m_d = 0.01): a logit the decoder would have to
        undo for every row where the feature is on.)

        Gaussian likelihoods, with m (D,) the feature means, s_d their standard
        deviations (1/N) and s = sqrt(mean_d s_d^2) the overall one:

        * ``data_loc`` = m and ``data_scale`` = s_d (at least ``RELATIVE_SCALE_FLOOR`` s),
          fixed buffers; the decoder's last bias is zeroed, so its output bias in data
          units is the data mean: f(z) = m + s_d g_theta(z);
        * ``noise_scale`` = s (``gaussian``) or s_d (``gaussian-diag``): the maximum-
          likelihood Gaussian of the data with the latents ignored;
        * the encoder reads (x - m) / s_d.

        Why: the networks then see and produce values of order 1 for any data, so their
        default initialization and a learning rate mean the same thing on any data set.
        Adam moves each weight by about the learning rate per step, whatever the scale
        of its gradient: with outputs in data units a decoder would need ~s / lr steps
        just to reach the data's scale, and an encoder reading raw x = 10 +- 5 would
        start with its units saturated. With this parameterization an affine change of
        the data, a + c x (c a scalar), changes the loss by the constant N D log c and
        leaves every gradient (of the networks' weights and of log noise_scale) as it
        was: training is the same on both (checked in tests/test_likelihoods.py).
        Measured on PPCA data there (d = 10, k = 3, offsets ~10, loadings of length 5-12;
        the linear VAE, 1500 full-batch steps of Adam from 0.1 to 3e-4): 1.4e-5 nats per
        datapoint from the closed-form maximum; with the encoder reading raw x, 0.98 nats
        short; with the decoder's output in data units (its bias at the mean), the ELBO's
        preferred rotation not reached (off-diagonal of W^T W 13.5 against its smallest
        diagonal 25) and factor analysis 0.021 nats short; without this method, 9.2 short.
        The per-datapoint guide reads no x: only the decoder's side applies.
        """
        x = self._check_rows(x)
        x64 = x.double()
        mean = x64.mean(0)  # (D,)
        last = self.decoder[-1]  # the output layer (nn.Linear)
        if not self.gaussian:
            if float(x64.min()) < 0.0 or float(x64.max()) > 1.0:
                raise UsageError(f"initialize_from_data: a {self.likelihood} likelihood needs x in [0, 1], "
                                 f"got values in [{float(x64.min()):.4g}, {float(x64.max()):.4g}]")
            last.bias.copy_(torch.logit(mean.clamp(MEAN_CLIP, 1.0 - MEAN_CLIP)))
            return
        feature_scale = x64.std(0, unbiased=False)  # (D,)
        overall = float(feature_scale.pow(2).mean().sqrt())
        if not overall > 0:
            raise UsageError("initialize_from_data: x has no spread (every feature is constant)")
        feature_scale = feature_scale.clamp_min(RELATIVE_SCALE_FLOOR * overall)
        dtype = self.data_loc.dtype
        self.data_loc.copy_(mean)
        self.data_scale.copy_(feature_scale)
        last.bias.zero_()
        if self.likelihood == "gaussian":
            self.noise_scale = torch.tensor(overall, dtype=dtype)
        else:
            self.noise_scale = feature_scale.to(dtype)

    def _check_rows(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.data_dim or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(f"initialize_from_data: x must be the training rows (N, {self.data_dim}), got {shape}")
        if not bool(torch.isfinite(x).all()):
            raise UsageError("initialize_from_data: x has NaN or infinite values")
        return x

    # -- what pictures and evaluations use ------------------------------------------

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z) (..., D) at latent points z (..., k): sigmoid(f) for the
        Bernoulli, the continuous Bernoulli's mean for it, f itself for the Gaussians."""
        out = self.decoder_output(z)
        if self.likelihood == "bernoulli":
            return torch.sigmoid(out)
        if self.likelihood == "continuous-bernoulli":
            return ContinuousBernoulliLogits(out).mean
        return out

    @torch.no_grad()
    def decoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (D, k), b (D,)), float64, with f_theta(z) = W z + b in data units: the
        linear decoder (``hidden = ()``) as the loading matrix and offset of PPCA or
        factor analysis. A decoder with hidden layers is not affine: UsageError."""
        if len(self.decoder) != 1:
            raise UsageError(f"decoder_affine: the decoder has hidden layers {self.config.hidden}; "
                             "only hidden=() is affine")
        W, b = self.decoder[0].weight.double(), self.decoder[0].bias.double()  # (D, k), (D,)
        if self.gaussian:
            loc, scale = self.data_loc.double(), self.data_scale.double()
            return scale[:, None] * W, loc + scale * b
        return W.clone(), b.clone()

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
