"""Model families: each module holds a generative model, its guides, its Config and
its closed forms. ``build_model(name, config, data_dim, n_data)`` makes one; the
classes are here too (``elbolab.models.PPCA(PPCAConfig(latent_dim=2), data_dim, n_data)``).

Every model here holds its parameters in its own modules (PyroParam / nn.Module),
never in Pyro's global parameter store: its model and guide are methods called
directly (never a PyroModule's ``__call__``, whose context would register the
parameters in the store under their names), so two models never share a parameter by
name, and Pyro's own settings are left as the user has them.
"""

from __future__ import annotations

from typing import Any


from elbolab.models.common import ConfigError, config_from_dict, config_to_dict
from elbolab.models import gaussian, ppca, vae


# name -> (Config class, model class); a model class takes (config, data_dim, n_data).
REGISTRY: dict[str, tuple[type, type]] = {
    "ppca": (ppca.PPCAConfig, ppca.PPCA),
    "gaussian": (gaussian.GaussianConfig, gaussian.BayesianGaussian),
    "vae": (vae.VAEConfig, vae.VAE),
    "gmvae": (vae.GMVAEConfig, vae.GMVAE),
}


def model_names() -> list[str]:
    return sorted(REGISTRY)


def config_class(name: str) -> type:
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    return REGISTRY[name][0]


def make_config(name: str, values: dict[str, Any] | None = None):
    """The model's Config from a dict of field values (defaults for the rest)."""
    return config_from_dict(config_class(name), dict(values or {}))


def build_model(name: str, config, data_dim: int, n_data: int):
    """A fresh model of family ``name``: ``config`` is its Config or a dict of fields."""
    cls = config_class(name)
    if isinstance(config, dict):
        config = config_from_dict(cls, config)
    return REGISTRY[name][1](config, data_dim, n_data)


PPCA, PPCAConfig = ppca.PPCA, ppca.PPCAConfig
BayesianGaussian, GaussianConfig = gaussian.BayesianGaussian, gaussian.GaussianConfig
VAE, VAEConfig, GMVAE, GMVAEConfig = vae.VAE, vae.VAEConfig, vae.GMVAE, vae.GMVAEConfig

__all__ = ["REGISTRY", "build_model", "make_config", "config_class", "model_names",
           "config_to_dict", "config_from_dict", "ConfigError", "PPCA", "PPCAConfig", "BayesianGaussian",
           "GaussianConfig", "VAE", "VAEConfig", "GMVAE", "GMVAEConfig", "train_defaults"]


def train_defaults(name: str | None, n_rows: int) -> dict[str, Any]:
    """Training settings that converge for family ``name`` (None: a user's model) on
    ``n_rows`` training rows (TrainConfig fields; what a user gives wins). A user's
    model: Adam at 0.01 decaying to 0.001 over 2000 steps, full batch up to 10,000 rows
    (batches of 500 beyond). Measured: PPCA, with its parameters in the
    data's units (``PPCA.initialize_from_data``), ends 1e-4 nats per datapoint from the
    closed form after 500 full-batch steps at a rate decaying 0.05 -> 0.001, on data of
    any offset and scale (12 columns, k = 3, 1000 rows; 4e-4 with batches of 100 over
    1000 steps); the Bayesian Gaussian's structured guide, started at the data's moments,
    ends 1e-4 to 1e-3 nats per datapoint (KL) from the exact posterior after 1000
    full-batch steps at the same rates (59 rows, offsets of 10, scales of 5). The VAEs
    keep the CS236 homework's Adam rate 1e-3 and batches of 100, for at least 2000 steps."""
    full = min(n_rows, 5000)  # full batch up to 5000 rows
    if name is None:
        return {"lr": 0.01, "lr_final": 1e-3, "batch_size": n_rows if n_rows <= 10_000 else 500, "steps": 2000,
                "epochs": None}
    if name == "ppca":
        return {"lr": 0.05, "lr_final": 1e-3, "batch_size": full if n_rows <= 5000 else 1000,
                "steps": 500 if n_rows <= 5000 else 2000, "epochs": None}
    if name == "gaussian":
        return {"lr": 0.05, "lr_final": 1e-3, "batch_size": full if n_rows <= 5000 else 1000, "steps": 1000,
                "epochs": None}
    steps_per_epoch = max(1, -(-n_rows // 100))
    return {"lr": 1e-3, "batch_size": 100, "epochs": max(10, -(-2000 // steps_per_epoch)), "steps": None}

