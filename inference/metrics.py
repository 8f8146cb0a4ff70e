"""One shape for every number a run reports, and the schema of ``metrics.json``.

Every quantity is a dict of the same keys, in nats per datapoint::

    {"value": float, "se": float | None, "n": rows, "method": "exact" | "importance" |
     "monte-carlo" | "ais", "K": samples per row (or draws) | None, "bound": "exact" |
     "lower" | "upper" | "estimate", "better": "higher" | "lower", "reliable": bool | None,
     "pareto_k_share": share of rows with Pareto k > 0.7 | None}

``bound`` says how the estimate relates to what it estimates in expectation (an ELBO is a
lower bound of log p(x), an importance-sampled log-likelihood too; an exact value is
exact); ``better`` which way is good (log-likelihoods and bounds: higher; divergences and
gaps: lower). ``reliable`` is False when the Pareto k of the importance weights says the
number cannot be trusted whatever its standard error.

``metrics.json`` (``SCHEMA``, kept as ``metrics.schema.json`` beside this module, which the
tests validate every run against)::

    {"schema": "elbolab-metrics/1", "units": ..., "model": ..., "config": run spec,
     "data": data description, "run": {steps, epochs, seconds, ..., "convergence": {...}},
     "quantities": {name: quantity}, "diagnostics": {...}, "closed_forms": {...}}
"""

from __future__ import annotations

import json
import math
import os

SCHEMA_VERSION = "elbolab-metrics/1"
UNITS = "nats per datapoint; see each quantity's 'better'"
METHODS = ("exact", "importance", "monte-carlo", "ais")
BOUNDS = ("exact", "lower", "upper", "estimate")
SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics.schema.json")


def quantity(value: float, se: float | None = None, n: int | None = None, *, method: str = "exact",
             K: int | None = None, bound: str = "exact", better: str = "higher", reliable: bool | None = None,
             pareto_k_share: float | None = None) -> dict:
    """A number in the one shape (see the module docstring)."""
    if method not in METHODS or bound not in BOUNDS or better not in ("higher", "lower"):
        raise ValueError(f"quantity: method {method!r}, bound {bound!r}, better {better!r}")
    se = None if se is None or not math.isfinite(se) else float(se)
    return {"value": float(value), "se": se, "n": None if n is None else int(n), "method": method,
            "K": None if K is None else int(K), "bound": bound, "better": better, "reliable": reliable,
            "pareto_k_share": pareto_k_share}


def from_estimate(est, *, method: str, K: int | None, bound: str, better: str = "higher", n: int | None = None
                  ) -> dict:
    """A quantity from an ``inference.evaluate.Estimate`` (its mean, standard error, rows,
    and the Pareto k summary and reliability it carries, if any)."""
    share = est.pareto_k.get("share_above_0.7") if est.pareto_k else None
    return quantity(est.mean, est.se, est.n if n is None else n, method=method, K=K, bound=bound, better=better,
                    reliable=est.reliable, pareto_k_share=share)


def exact(value: float, n: int | None = None, better: str = "higher") -> dict:
    """A closed-form number."""
    return quantity(value, None, n, method="exact", bound="exact", better=better)


def load_schema() -> dict:
    with open(SCHEMA_FILE) as f:
        return json.load(f)


def validate(metrics: dict) -> None:
    """Check ``metrics`` against the schema (``jsonschema.ValidationError`` if it fails)."""
    import jsonschema

    jsonschema.validate(metrics, load_schema())
