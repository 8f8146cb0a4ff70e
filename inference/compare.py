"""The inference-gap study of one trained model and guide: for some training rows and
some held-out rows, the guide's q (or, for a guide that cannot infer held-out rows, the
local optimization itself), q* the per-row optimum of the same family
(``inference.guides.optimize_local``; for a flow guide, ``inference.flows.
optimize_local_flow``), and the decomposition of ``inference.gaps``, with what
inferring a row costs. ``elbolab compare-guides`` and ``elbolab.compare_guides`` both
run it on each guide they train.

log p(x). Where the importance-sampled log p(x) is unreliable by its Pareto k (or
always, or never: :class:`AISSettings`), it is estimated by annealed importance
sampling from q* instead, and that AIS is checked once per trained model by
bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015) on rows simulated from the
model: the same AIS (same budget, from the same kind of q*, fitted to the simulated
rows the way q* is fitted to the real ones) forward (a stochastic lower bound) and in
reverse from the exact latent each row was drawn with (a stochastic upper bound). The
gap between the two bounds how far such an AIS falls short of log p(x) on data like the
model's own; the AIS estimates are marked reliable when that gap, plus two standard
errors, is within ``tolerance`` nats.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from elbolab.inference.ais import Budget, bdmc
from elbolab.inference.errors import UsageError
from elbolab.inference.flows import IAFGuide, optimize_local_flow
from elbolab.inference.gaps import AIS_WHEN, decompose, to_dict
from elbolab.inference.guides import materialize, optimize_local
from elbolab.inference.traces import guide_posterior, infers_new_rows


@dataclass(frozen=True)
class LocalSettings:
    """How q* is found (``optimize_local``): Adam at ``lr`` per row, multiplied by ``decay``
    after each window of ``window`` steps without improvement, ``n_particles`` draws per row
    and step, stop after ``patience`` + 1 windows without improvement or ``max_steps``.
    Cremer, Li & Duvenaud (2018): lr 1e-3, decay 1, 50 draws, windows of 100, patience 10
    (slow); these defaults reach the same L[q*] within 0.005 nats on the digits VAE in a
    twentieth of the time. The flow family's q* (``optimize_local_flow``) starts at
    ``flow_lr``: at 0.1 a row of the digits VAE's flow q* diverged to NaN; at 0.03 and
    0.01 both reached the same L[q*] within 0.001 nats."""

    lr: float = 0.1
    decay: float = 0.5
    n_particles: int = 10
    window: int = 25
    patience: int = 3
    max_steps: int = 20_000
    flow_lr: float = 0.01

    def __post_init__(self):
        for name in ("lr", "flow_lr"):
            if not getattr(self, name) > 0:
                raise UsageError(f"local {name} must be positive, got {getattr(self, name)}")
        if not 0 < self.decay <= 1:
            raise UsageError(f"local decay must be in (0, 1], got {self.decay}")
        if self.patience < 0:
            raise UsageError(f"local patience must be >= 0, got {self.patience}")
        for name in ("n_particles", "window", "max_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"local {name} must be >= 1, got {getattr(self, name)}")

    def kwargs(self, flow: bool = False) -> dict:
        """The keyword arguments of ``optimize_local`` (``flow``: of ``optimize_local_flow``)."""
        kw = asdict(self)
        lr = kw.pop("flow_lr")
        return {**kw, "lr": lr} if flow else kw


AIS_USE = AIS_WHEN + ("never",)


@dataclass(frozen=True)
class AISSettings:
    """When log p(x) comes from AIS and at what cost: ``when`` "unreliable" (where the
    importance-sampled estimate's Pareto k flags it), "always" or "never"; the budget
    ``steps`` (T), ``chains`` (M), ``leapfrog`` (L) of each AIS run (from q*, per row);
    BDMC on ``bdmc_rows`` simulated rows with the same budget, and the ``tolerance`` (nats)
    its gap + 2 standard errors must meet for the AIS estimates to count as reliable.

    The defaults are the digits' budget (the default ``elbolab compare-guides`` run stays
    near its time without AIS): on 100 test rows of the digits VAE (k = 4), AIS from the
    Gaussian q* at T = 20 and 50 (M = 8) was -0.003 +- 0.006 and -0.001 +- 0.006 nats from
    a T = 500, M = 16 run (0.5 s at T = 30, one thread), and BDMC's gap at T = 30, M = 8 on
    50 simulated rows 0.014 +- 0.011 (from q* started at the encoder) and 0.018 +- 0.015
    (from N(0, I)), 2.3 s each with the fit of q*."""

    when: str = "unreliable"
    steps: int = 30
    chains: int = 8
    leapfrog: int = 5
    bdmc_rows: int = 50
    tolerance: float = 0.1

    def __post_init__(self):
        if self.when not in AIS_USE:
            raise UsageError(f"AIS use must be one of {', '.join(AIS_USE)}, got {self.when!r}")
        self.budget  # noqa: B018  (checks steps, chains, leapfrog)
        if isinstance(self.bdmc_rows, bool) or int(self.bdmc_rows) != self.bdmc_rows or self.bdmc_rows < 2:
            raise UsageError(f"BDMC rows must be an integer >= 2, got {self.bdmc_rows}")
        if not self.tolerance > 0:
            raise UsageError(f"BDMC tolerance must be positive, got {self.tolerance}")

    @property
    def budget(self) -> Budget:
        return Budget(self.steps, self.chains, self.leapfrog)


def eval_rows(data, n_rows: int, seed: int) -> dict:
    """Seeded random subsets of the training and test rows: {split: (x, rows)}; rows are
    training indices for the training split (per-datapoint guides need them)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, x in (("train", data.train), ("test", data.test)):
        if x.shape[0] == 0:
            continue
        idx = torch.randperm(x.shape[0], generator=g)[: min(n_rows, x.shape[0])].sort().values
        xs = x[idx]
        if split == "train" and data.binarize == "dynamic":  # one fixed draw of the grey levels
            xs = torch.bernoulli(xs, generator=torch.Generator().manual_seed(seed))
        out[split] = (xs, idx if split == "train" else None)
    return out


def q_star_fitter(model, new_rows: bool, full: bool | None, local: LocalSettings
                  ) -> Callable[..., object]:
    """``fit(x, rows, seed, start)`` -> ``LocalFit``: q* of the guide's family for the rows x
    of the fixed model. The flow family (an :class:`IAFGuide`): per-row flows with the
    guide's layers and width, started at its Gaussian encoder q_0 (``optimize_local_flow``);
    a Gaussian family: from ``start`` (the guide's q for these rows, a table), else from
    N(0, I) (``full``: the table's covariance family)."""
    if isinstance(model, IAFGuide):
        def fit_flow(x, rows, seed, start=None):
            return optimize_local_flow(model.base, x, rows, init="guide", layers=model.layers,
                                       hidden=model.hidden[0], seed=seed, **local.kwargs(flow=True))
        return fit_flow

    def fit_gaussian(x, rows, seed, start=None):
        if start is None and new_rows:
            start = materialize(model, x, rows)
        if start is not None:
            return optimize_local(model, x, init=start, seed=seed, **local.kwargs())
        return optimize_local(model, x, init="standard", full=full, seed=seed, **local.kwargs())
    return fit_gaussian


def bdmc_check(model, fit_q_star: Callable, ais: AISSettings, seed: int) -> dict:
    """BDMC of the study's AIS on ``ais.bdmc_rows`` rows simulated from ``model``: forward
    and reverse AIS from q* fitted to those rows by ``fit_q_star``. Returns the bounds,
    their gap (Estimates as dicts), the settings, the seconds and ``reliable`` (gap + 2
    s.e. <= tolerance); a model that cannot be simulated (``ais.simulate``: one observed
    site holding the row) gives ``error`` and ``reliable`` False."""
    t0 = time.perf_counter()
    try:
        b = bdmc(model, ais.bdmc_rows, init="guide", seed=seed,
                 proposal=lambda x: fit_q_star(x, None, seed).model, **ais.budget.kwargs())
    except UsageError as e:
        return {"error": str(e), "reliable": False, "n_rows": ais.bdmc_rows, **ais.budget.kwargs()}
    gap = b.gap
    return {"n_rows": ais.bdmc_rows, **ais.budget.kwargs(), "init": "q* of the simulated rows",
            "lower": b.lower.to_dict(), "upper": b.upper.to_dict(), "gap": gap.to_dict(),
            "tolerance": ais.tolerance, "reliable": bool(gap.mean + 2 * gap.se <= ais.tolerance),
            "rule": f"AIS reliable when BDMC's gap + 2 s.e. <= {ais.tolerance:g} nats",
            "seconds": time.perf_counter() - t0}


class _Once:
    """A function's value, computed at the first call and kept."""

    def __init__(self, fn: Callable[[], dict]):
        self.fn, self.value, self.called = fn, None, False

    def __call__(self) -> dict:
        if not self.called:
            self.value, self.called = self.fn(), True
        return self.value


def study(model, train_rows: torch.Tensor, splits: dict, n_samples: int, local: LocalSettings = LocalSettings(),
          seed: int = 0, log=None, ais: AISSettings | None = AISSettings()) -> dict:
    """The gap decomposition of a trained ``model`` (its guide under study) on each split of
    ``splits`` ({split: (x, training-row indices or None)}); ``train_rows``: some training
    rows (to tell whether the guide infers new rows). Returns {split: numbers}, each with
    the decomposition (``inference.gaps.to_dict``; log p(x) by AIS where ``ais`` says, and
    BDMC's check of that AIS under ``bdmc``), how the rows' q was obtained and what it
    cost, and q*'s run (``LocalFit.describe``). ``ais`` None: importance sampling only."""
    model.eval()
    flow = isinstance(model, IAFGuide)
    new_rows = infers_new_rows(model, train_rows)
    full = None
    if not new_rows:  # the family of the table q* is fitted in on rows the guide cannot infer
        n0 = min(2, int(train_rows.shape[0]))
        probe = guide_posterior(model, train_rows[:n0], torch.arange(n0))
        full = isinstance(probe, torch.distributions.MultivariateNormal)
    fit_q_star = q_star_fitter(model, new_rows, full, local)
    use_ais = ais is not None and ais.when != "never"
    vouch = _Once(lambda: bdmc_check(model, fit_q_star, ais, seed + 1000)) if use_ais else None
    out = {}
    for i, (split, (x, rows)) in enumerate(splits.items()):
        split_seed = seed + 10 * i
        q_rows = None
        if flow or rows is not None or new_rows:
            t0 = time.perf_counter()
            guide_posterior(model, x, rows)  # what inferring these rows costs: one pass of the guide
            infer_seconds = time.perf_counter() - t0
            if flow:  # the flow's q is a function of x alone: the guide itself is q
                q, q_rows = model, rows
                fit = fit_q_star(x, rows, split_seed)
            else:  # the guide's q for these rows, fixed (a refinement is random); q* starts from it
                q = materialize(model, x, rows)
                fit = fit_q_star(x, rows, split_seed, start=q)
            how = "guide"
        else:  # the guide cannot infer new rows: inferring them is the local optimization
            fit = fit_q_star(x, None, split_seed)
            q, infer_seconds, how = fit.model, fit.seconds, "local optimization"
        gaps = decompose(q, fit.model, x, n_samples, rows=q_rows, seed=split_seed + 1,
                         ais=ais.budget if use_ais else None, ais_when=ais.when if use_ais else "unreliable",
                         vouch=vouch)
        n = int(x.shape[0])
        out[split] = {**to_dict(gaps), "n_rows": n, "inference": how, "inference_seconds": infer_seconds,
                      "inference_seconds_per_row": infer_seconds / n, "local": fit.describe()}
        if log is not None:
            log(f"{split}: ELBO {gaps['elbo'].mean:.3f}, inference gap {gaps['inference_gap'].mean:.3f} = "
                f"approximation {gaps['approximation_gap'].mean:.3f} + amortization "
                f"{gaps['amortization_gap'].mean:.3f} nats (q*: {fit.steps} steps, {fit.seconds:.1f} s)")
            if gaps["log_likelihood_estimator"] == "ais":
                d, check = gaps["ais_minus_is"], gaps["bdmc"]
                bd = (f"BDMC gap {check['gap']['mean']:.3f} ± {check['gap']['se']:.3f}" if "gap" in check
                      else f"no BDMC ({check['error']})")
                log(f"{split}: log p(x) by AIS ({ais.budget.label()}, {gaps['ais']['seconds']:.1f} s): "
                    f"AIS - IS {d.mean:+.4f} ± {d.se:.4f}; {bd} "
                    f"({'reliable' if check['reliable'] else 'UNRELIABLE'})")
    return out
