"""elbolab: a workbench for variational inference on Pyro.

Bring a Pyro model and guide (functions or ``PyroModule``s, ``pyro.param`` or
``AutoGuide``s, the observed rows inside ``pyro.plate("data", len(x))``)::

    import elbolab
    run = elbolab.fit(model, guide, x, y)        # SVI; afterwards the guide holds the fit
    run.metrics["train_elbo"]                    # nats per datapoint, with its standard error
    run.evaluate(x_test, y_test)                 # importance-sampled log-likelihood, Pareto k
    idata = run.diagnose()                       # arviz.InferenceData of the guide
    run.save("runs/mine")                        # elbolab.load_run("runs/mine", model, guide)
    elbolab.compare_guides(model, {"amortized": g1, "per-datapoint": g2}, x)

The built-in models (``elbolab.models``: PPCA, the Bayesian Gaussian, the VAE and the
mixture-prior VAE) go through the same functions; the ``elbolab`` command runs them and
the studies from the shell (``elbolab --help``).
"""

__version__ = "0.2.0"

import importlib

# The API is imported on first use (PEP 562), not by ``import elbolab``: the ``elbolab``
# command then starts without torch, answers ``--help`` at once, and a Ctrl-C while a
# program imports torch and Pyro is its ``interrupted``, not a traceback.
_API = ("Run", "compare_guides", "fit", "importance_log_likelihood", "load_run")
_SUBPACKAGES = ("models", "inference", "scripts")

__all__ = [*_API, "models", "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module("elbolab.inference.api"), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"elbolab.{name}")
    else:
        raise AttributeError(f"module 'elbolab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_SUBPACKAGES})
