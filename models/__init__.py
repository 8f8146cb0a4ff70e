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
           "GaussianConfig", "VAE", "VAEConfig", "GMVAE", "GMVAEConfig"]
