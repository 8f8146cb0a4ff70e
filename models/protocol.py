"""The model contract: what the workbench reads from a model, declared.

A model the workbench trains, evaluates and diagnoses is a :class:`Model`: a Pyro model
and guide that take the rows ``x`` (B, D) of a data set, observe them inside a plate
named ``data_plate`` (``pyro.plate(data_plate, len(x))``), and say how many rows the
training set has. The built-in models are Models; a user's model and guide, written for
``SVI.step(*args, **kwargs)``, become one through ``elbolab.fit`` (which packs the
arguments into such rows).

Everything else is optional and declared by a protocol of its own, checked with
``isinstance``: steps that repeat the same operations (:class:`StaticSteps`), a
closed-form log-likelihood (:class:`ExactLikelihood`), closed-form ELBOs
(:class:`ExactELBO`), exact posterior draws (:class:`ExactPosterior`), an exact
Gaussian posterior of each row's local latent (:class:`GaussianPosterior`), the exact
numbers a fit reports (:class:`ClosedForms`), derived posterior quantities
(:class:`DerivedQuantities`) and the names of their dimensions
(:class:`NamedDims`), a decoder for pictures (:class:`Generative`), and
starting values taken from the training rows (:class:`InitializesFromData`). What
is not declared is not used; nothing is guessed.

Structure that Pyro already states is read from traces, not declared: which latent
sites are local (inside the data plate) and which global, and whether the guide reads
the rows' positions (a per-datapoint table) or only their values (an encoder).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Model(Protocol):
    """A model and its guide over rows x (B, D) of a data set of ``n_data`` rows."""

    data_plate: str  # the name of the plate over the rows
    n_data: int  # rows of the training set (what a mini-batch is scaled to)
    data_dim: int  # D, the width of a row
    max_plate_nesting: int  # the deepest vectorized plate (particles go one further left)

    def model(self, x: torch.Tensor) -> Any: ...

    def guide(self, x: torch.Tensor) -> Any: ...


@runtime_checkable
class SequentialParticles(Protocol):
    """A model whose sites are not written for a vectorized particles plate (e.g. ``X @ w``
    with w a latent vector): ``sequential_particles`` True means that several draws per
    row are made one at a time (as Pyro's ELBOs do without ``vectorize_particles``)."""

    sequential_particles: bool


@runtime_checkable
class StaticSteps(Protocol):
    """A model whose training loss, given the batch's shape, is the same tensor operations
    at every step: only the rows, the parameters' values and torch's random draws change,
    and no Python value that changes between steps is read (a step counter, a weight
    annealed from outside, numpy's random numbers). ``static_steps`` True lets the
    training driver record one step's operations and replay them
    (``inference.replay.ReplayedLoss``, which checks the replay against the model's own
    loss before using it). Every built-in model is static; a subclass that adds such a
    value sets ``static_steps = False``."""

    static_steps: bool


@runtime_checkable
class ExactLikelihood(Protocol):
    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_i) per row (B,), float64, at the current parameters."""


@runtime_checkable
class ExactELBO(Protocol):
    def exact_elbo(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's ELBO under the guide, in closed form (B,), float64."""

    def exact_elbo_of(self, x: torch.Tensor, q: torch.distributions.Distribution) -> torch.Tensor:
        """Each row's ELBO under any Gaussian q(z_i) (batch (B,)), in closed form."""


@runtime_checkable
class ExactPosterior(Protocol):
    def exact_posterior_samples(self, x: torch.Tensor, n_samples: int) -> dict[str, torch.Tensor]:
        """Draws of the latent sites from the exact posterior given the rows x."""


@runtime_checkable
class GaussianPosterior(ExactLikelihood, Protocol):
    """A model with an exact likelihood whose exact posterior of each row's local latent
    is Gaussian with one covariance shared by every row: p(z_i | x_i) = N(loc_i, cov).
    PPCA (Tipping & Bishop 1999): loc_i = M^-1 W^T (x_i - mu), cov = sigma^2 M^-1 with
    M = W^T W + sigma^2 I. The best member of a Gaussian guide family is then known in
    closed form (``inference.guide_study.closed_form_gap``)."""

    def exact_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc (B, k), cov (k, k)) of p(z_i | x_i) for the rows x (B, D), float64."""


@runtime_checkable
class ClosedForms(Protocol):
    def closed_form_metrics(self, data) -> dict:
        """The exact numbers of a fit on ``data`` (a ``DataSplits``), nats per datapoint."""


@runtime_checkable
class DerivedQuantities(Protocol):
    def quantities(self, samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Quantities of interest (e.g. a precision matrix) from draws of the latent sites."""


@runtime_checkable
class NamedDims(Protocol):
    """Names of the event dimensions of the global latent sites and derived quantities,
    for ArviZ: variable -> one name per dim, e.g. {"loc": ("feature",), "precision":
    ("feature", "feature_bis")}. A name given for a variable whose draws have another
    number of dims is not used."""

    variable_dims: dict[str, tuple[str, ...]]


@runtime_checkable
class Generative(Protocol):
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z) for latent points z (..., k)."""

    def sample_prior(self, n: int) -> torch.Tensor:
        """n draws z ~ p(z), (n, k)."""


@runtime_checkable
class InitializesFromData(Protocol):
    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Set data-dependent starting values (e.g. an output bias at the data's mean, a
        noise scale at its spread) from the training rows x (N, D), in place. Called
        once before a fresh fit, never on a resumed one (the values are in the state)."""


def missing(obj, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (empty when it satisfies it)."""
    names = [n for n in getattr(protocol, "__protocol_attrs__", ()) if not n.startswith("_")]
    if not names:  # Python < 3.12 keeps them elsewhere
        names = [n for n in list(getattr(protocol, "__annotations__", {})) + list(vars(protocol))
                 if not n.startswith("_")]
    return sorted({n for n in names if not hasattr(obj, n)})
