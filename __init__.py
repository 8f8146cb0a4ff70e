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

from elbolab.inference.api import Run, compare_guides, fit, importance_log_likelihood, load_run  # noqa: E402
from elbolab import models  # noqa: E402

__all__ = ["Run", "compare_guides", "fit", "importance_log_likelihood", "load_run", "models", "__version__"]
