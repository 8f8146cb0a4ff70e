"""Model families: each module holds a generative model, its guides, its Config and
its closed forms. ``build_model(name, config, data_dim, n_data)`` makes one.

Every model here holds its parameters in its own modules (PyroParam / nn.Module),
never in Pyro's global parameter store: the setting below makes PyroModules keep
them local, so two models never share a parameter by name.
"""

from __future__ import annotations

from typing import Any

import pyro

from elbolab.models.common import ConfigError, config_from_dict, config_to_dict
from elbolab.models import gaussian, ppca, vae

pyro.settings.set(module_local_params=True)

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
        raise ConfigError(f"unknown --model {name!r}; choose one of {', '.join(model_names())}")
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


__all__ = ["REGISTRY", "build_model", "make_config", "config_class", "model_names",
           "config_to_dict", "config_from_dict", "ConfigError"]
