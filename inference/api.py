"""The Python API: fit a Pyro model and guide, evaluate, diagnose, compare guides.

The model and guide are what Pyro users write for ``SVI.step(*args, **kwargs)``: plain
functions or ``PyroModule``s, ``pyro.param`` / ``pyro.module`` or ``AutoGuide``s, the
observed rows inside ``pyro.plate("data", len(x))`` (another name: ``plate=``)::

    import elbolab
    run = elbolab.fit(model, guide, x, y)          # SVI; the guide holds the fit afterwards
    run.metrics["train_elbo"]                      # nats per datapoint, with its standard error
    run.evaluate(x_test, y_test)                   # held-out log-likelihood, Pareto k
    idata = run.diagnose()                         # an arviz.InferenceData of the guide
    run.sample(out="runs/mine-samples")            # a model with a decoder: prior samples, interpolations
    run.save("runs/mine"); elbolab.load_run("runs/mine", model, guide)

Every tensor argument whose first dimension is the plate's size is data: elbolab
mini-batches it (``batch_size``) and scales the sites inside the plate by N/B; global
latents are not scaled. After ``fit`` the user's own guide holds the trained
parameters, as after ``SVI.step`` (``guide.get_posterior()``, ``Predictive(model,
guide=guide)``). The built-in models go through the same function:
``elbolab.fit(elbolab.models.PPCA(config, data_dim, n_data), x)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from elbolab.inference import traces
from elbolab.inference.checkpoints import CHECKPOINT, atomic_torch_save, write_history
from elbolab.inference.diagnostics import ParetoK
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import Estimate, importance_estimates, test_log_likelihood
from elbolab.inference.files import save_json
from elbolab.inference.metrics import UNITS, from_estimate
from elbolab.inference.runs import (ARGUMENTS, CONFIG, FROM_PYTHON, METRICS, PYTHON, DataSpec, EvalSpec, RunDir,
                                    RunSpec, evaluate_run, read_run)
from elbolab.inference.train import FitResult, fit as train_fit
from elbolab.inference.train_config import TrainConfig
from elbolab.inference.usermodel import UserModel
from elbolab.models.datasources import DataSplits, check_binary, check_unit_interval
from elbolab.models.errors import DataError
from elbolab import models
from elbolab.models.protocol import InitializesFromData, Model



def _workbench_model(model, guide, args, kwargs, plate: str):
    """(the workbench model, its training rows, the arguments to save): a built-in model
    (``model`` satisfies ``models.protocol.Model``) takes the rows x as its one argument;
    anything else is a user's model and guide (``UserModel``)."""
    if isinstance(model, Model) and not callable(guide) and isinstance(model, torch.nn.Module):
        rows = guide if isinstance(guide, torch.Tensor) else (args[0] if args else None)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
            raise UsageError(f"{type(model).__name__} is fit to a matrix of rows (N, D): elbolab.fit(model, x)")
        if int(rows.shape[0]) != int(model.n_data):
            raise UsageError(f"{type(model).__name__} was built for {model.n_data} rows; x has {rows.shape[0]}")
        check_rows(model, rows, "x")
        return model, rows, None
    if guide is None:
        raise UsageError("fit(model, guide, *args): give the guide (an AutoGuide such as "
                         "pyro.infer.autoguide.AutoNormal(model), a function or a PyroModule)")
    um = UserModel(model, guide, args, kwargs, plate)
    um.prepare()
    return um, um.rows, {"args": list(args), "kwargs": dict(kwargs)}


def check_rows(model, x: torch.Tensor, name: str) -> None:
    """Refuse rows a built-in model cannot score: a value that is not finite, a width
    other than the model's, values outside {0, 1} for a Bernoulli decoder or outside
    [0, 1] for a continuous Bernoulli one (DataError naming ``name``)."""
    if x.dim() != 2 or int(x.shape[1]) != int(model.data_dim):
        raise DataError(f"{name}: {type(model).__name__} scores rows of {model.data_dim} columns; "
                        f"got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise DataError(f"{name}: {int(bad.sum())} non-finite value(s); first at row {r}, column {c}")
    likelihood = getattr(model, "likelihood", None)
    if likelihood == "bernoulli":
        check_binary(x, name)
    elif likelihood == "continuous-bernoulli":
        check_unit_interval(x, name, "continuous-Bernoulli")


def fit(model, guide=None, *args, objective: str = "elbo", num_particles: int = 1, steps: int | None = None,
        epochs: int | None = None, lr: float | None = None, lr_final: float | None = None,
        batch_size: int | None = None, seed: int = 0, alpha: float | None = None, plate: str = traces.DATA_PLATE,
        out: str | None = None, overwrite: bool = False, progress: bool | None = None, threads: int | None = None,
        num_samples: int = 1000, **kwargs) -> "Run":
    """Fit ``model`` and ``guide`` to the data ``args`` / ``kwargs`` by SVI; a :class:`Run`.

    ``objective``: "elbo" (Pyro's Trace_ELBO), "elbo-analytic", "iwae", "iwae-dreg" or
    "renyi" (``alpha``), with ``num_particles`` vectorized draws per row. ``steps``
    optimizer steps (or ``epochs`` passes) of Adam at ``lr``, decaying exponentially to
    ``lr_final``, ``batch_size`` rows per step: each defaults to what converges for the
    model (``elbolab.models.train_defaults``: for a user's model 2000 steps at 0.01
    decaying to 0.001, full batch up to 10,000 rows). ``plate``: the name of the plate over
    the data's rows. ``out``: also write a run directory there (refused if it holds
    files, unless ``overwrite``). ``num_samples``: importance samples per row for the
    held-out log-likelihood of built-in models with a test split. The remaining keyword
    arguments go to the model and guide, as for ``SVI.step``.

    A model (function or module) with the attribute ``static_steps = True`` declares
    that its loss performs the same tensor operations at every step, given the batch's
    shape: no Python value that changes between steps (a counter, an annealed weight)
    and no random numbers but torch's. The driver then records one step's operations
    and replays them, once the replay has reproduced the loss and its gradient
    (``elbolab.inference.replay``): Pyro's per-step work is skipped, and the numbers
    are the eager ones (bit for bit on the built-in models; the check allows float32
    round-off).
    """
    wm, rows, saved = _workbench_model(model, guide, args, kwargs, plate)
    n = int(rows.shape[0])
    family = next((name for name, (_, cls) in models.REGISTRY.items() if type(wm) is cls), None)
    given = {k: v for k, v in (("lr", lr), ("lr_final", lr_final), ("batch_size", batch_size), ("steps", steps),
                               ("epochs", epochs)) if v is not None}
    if "steps" in given or "epochs" in given:  # a budget given: the other budget field is not the default's
        given.setdefault("steps", None)
        given.setdefault("epochs", None)
    if "lr" in given and "lr_final" not in given:
        given["lr_final"] = None
    settings = {**models.train_defaults(family, n, getattr(wm, "config", None) if family else None), **given}
    settings["batch_size"] = min(settings["batch_size"], n)
    config = TrainConfig(objective=objective, n_particles=num_particles, alpha=alpha, seed=seed, progress=progress,
                         threads=threads, **settings)
    if isinstance(wm, InitializesFromData):
        wm.initialize_from_data(rows)
    empty = rows[:0]
    data = DataSplits("data", rows, empty, empty, source="arguments")
    spec = None
    if saved is not None:
        spec = RunSpec(PYTHON, {"plate": plate}, config, DataSpec(FROM_PYTHON), EvalSpec(n_samples=num_samples))
    elif family is not None:  # a built-in model: its config rebuilds it, the rows are saved with it
        spec = RunSpec(family, models.config_to_dict(wm.config), config, DataSpec(FROM_PYTHON),
                       EvalSpec(n_samples=num_samples))
        saved = {"args": [rows], "kwargs": {}}
    run_dir = RunDir(out, overwrite=overwrite) if out is not None else None
    if run_dir is not None:
        run_dir.check()
    torch.manual_seed(seed)
    result = train_fit(wm, data, config)
    run = Run(wm, data, spec, result, arguments=saved)
    if run_dir is not None:
        run.save(out, overwrite=overwrite)
    return run


@dataclass
class Run:
    """A fitted model and guide: ``model`` (the workbench model: a built-in one, or the
    user's pair as a ``UserModel``), the training ``data``, ``spec`` (how it was fit),
    ``result`` (the fit's history and timings) and ``metrics`` (train ELBO and its terms,
    a model's closed forms, ...: nats per datapoint with standard errors)."""

    model: Any
    data: DataSplits
    spec: RunSpec | None = None
    result: FitResult | None = None
    metrics: dict = field(default_factory=dict)
    path: str | None = None
    arguments: dict | None = None  # a user's model's data arguments (saved with the run)

    def __post_init__(self):
        if not self.metrics and self.result is not None:
            spec = self.spec or RunSpec("ppca", train=TrainConfig())
            self.metrics = evaluate_run(self.model, self.data, spec, self.result)
            if self.spec is None:  # a built-in model fit through the API: the numbers without a spec
                self.metrics.pop("config", None)

    @property
    def history(self) -> list[dict]:
        """One row per optimizer step: step, epoch, loss (the negative bound per datapoint), seconds."""
        return list(self.result.history) if self.result is not None else []

    def rows(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Held-out data with the training data's layout, as the model's rows (None: none given)."""
        if not args and not kwargs:
            return None
        if isinstance(self.model, UserModel):
            return self.model.pack(*args, **kwargs)
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            check_rows(self.model, args[0], "x")
            return args[0]
        raise UsageError(f"{type(self.model).__name__} evaluates a matrix of rows: run.evaluate(x)")

    def evaluate(self, *args, num_samples: int = 1000, seed: int = 0, estimator: str = "is", steps: int = 200,
                 chains: int = 16, leapfrog: int = 5, **kwargs) -> dict:
        """Held-out rows (``args`` / ``kwargs``: data with the training data's layout; none:
        the training rows), nats per datapoint, each a mean over rows with its standard
        error:

        * a model whose latents are per row: the importance-sampled log-likelihood
          (K = ``num_samples`` draws per row) with the Pareto k of each row's weights, and
          the ELBO from the same draws: {"log_likelihood": quantity, "elbo": quantity,
          "pareto_k": summary} (a quantity: ``inference.metrics``'s shape, {"value", "se",
          "n", "method", "K", ...}); with ``estimator="ais"``, annealed importance sampling
          from the guide instead (one local latent per row; ``steps`` T, ``chains`` M,
          ``leapfrog`` L; ``inference.ais``): {"log_likelihood": quantity (method "ais",
          K = M), "ais": {"steps", "chains", "leapfrog", "mc_se" (the Monte Carlo standard
          error of the mean over the chains)}};
        * a model with global latents (a regression's weights): the posterior predictive
          log density of each row, log (1/S) sum_s p(x_i | theta_s) with S = ``num_samples``
          draws theta_s from the guide (fit to the training rows), under "log_predictive".
        """
        from elbolab.inference.ais import Budget, ais_log_likelihood

        if estimator not in ("is", "ais"):
            raise UsageError(f"estimator must be 'is' or 'ais', got {estimator!r}")
        x = self.rows(args, kwargs)
        rows = None
        if x is None:
            x, rows = self.data.train, torch.arange(self.data.n_train)
        local, glob = traces.latent_names(self.model, self.data.train[:2], torch.arange(min(2, self.data.n_train)))
        if glob and not local:
            if estimator == "ais":
                raise UsageError("estimator='ais' anneals a latent per row; this model's latents are global")
            lp = log_predictive(self.model, self.data.train, x, num_samples, seed)
            return {"log_predictive": from_estimate(lp, method="monte-carlo", K=num_samples, bound="lower"),
                    "units": UNITS}
        if estimator == "ais":
            budget = Budget(steps, chains, leapfrog)
            r = ais_log_likelihood(self.model, x, rows, seed=seed, **budget.kwargs())
            return {"log_likelihood": from_estimate(r.log_likelihood, method="ais", K=budget.chains, bound="lower"),
                    "ais": {**budget.kwargs(), "mc_se": r.mc_se_of_mean}, "units": UNITS}
        pareto = ParetoK()
        est = test_log_likelihood(self.model, x, num_samples, seed, rows, pareto=pareto)
        return {"log_likelihood": from_estimate(est["log_likelihood"], method="importance", K=num_samples,
                                                bound="lower"),
                "elbo": from_estimate(est["elbo"], method="importance", K=num_samples, bound="lower"),
                "pareto_k": pareto.summary(), "units": UNITS}

    def diagnose(self, *args, draws: int = 200, chains: int = 2, seed: int = 0, **kwargs):
        """An ``arviz.InferenceData`` of the guide (its draws, pointwise log-likelihoods,
        replicated data) for held-out rows (``args``) or the training rows."""
        from elbolab.inference.diagnostics import to_inference_data

        x = self.rows(args, kwargs)
        rows, labels = None, None
        if x is None:
            x, rows, labels = self.data.train, torch.arange(self.data.n_train), self.data.train_labels
        return to_inference_data(self.model, x, rows, draws=draws, chains=chains, seed=seed,
                                 labels=None if labels is None else labels.cpu().numpy())

    def sample(self, n: int = 100, out: str | None = None, pair: tuple[int, int] | None = None, steps: int = 10,
               seed: int = 0, overwrite: bool = False) -> dict:
        """Generate from a model with a decoder (``models.protocol.Generative``: the VAEs):
        ``n`` prior samples, reconstructions, an interpolation between the rows ``pair`` and
        latent traversals, as numpy arrays (``inference.generate.generate``: means of
        p(x | z), (..., D)); with ``out``, also their figures and ``samples.npz`` there
        (refused if it holds files, unless ``overwrite``)."""
        from elbolab.inference.generate import check_generative, generate, write_samples

        check_generative(self.model, self.path or "this run")
        target = RunDir(out, overwrite=overwrite) if out is not None else None
        if target is not None:
            target.check()
        result = generate(self.model, self.data, n=n, pair=pair, steps=steps, seed=seed)
        if target is not None:
            with target:
                write_samples(result, self.data, out)
        return result

    def save(self, path: str, overwrite: bool = False) -> str:
        """Write the run directory ``path``: config.json, checkpoint.ckpt, metrics.json,
        history.csv (and the data arguments of a user's model). Refused if ``path`` holds
        files, unless ``overwrite``."""
        if self.spec is None:
            raise UsageError("this run has no spec to save (a model class of elbolab's subclassed: save its "
                             "state_dict, or fit it as a model function with its guide)")
        with RunDir(path, overwrite=overwrite) as run_dir:
            save_json({**self.spec.to_dict(), "data_info": self.data.describe()}, run_dir.file(CONFIG))
            state = {"state_dict": {"model." + k: v for k, v in self.model.state_dict().items()},
                     "global_step": self.result.steps if self.result is not None else 0}
            atomic_torch_save(state, run_dir.file(CHECKPOINT))
            if self.arguments is not None:
                atomic_torch_save(self.arguments, run_dir.file(ARGUMENTS))
            save_json(self.metrics, run_dir.file(METRICS))
            if self.result is not None:
                write_history(self.result.history, self.result.validations, run_dir.file("history.csv"))
        self.path = path
        return path


def log_predictive(model, train: torch.Tensor, x: torch.Tensor, n_samples: int, seed: int = 0) -> Estimate:
    """log (1/S) sum_s p(x_i | theta_s) per row of x, theta_s ~ q the guide of a model with
    global latents only (drawn given the training rows): the posterior predictive log
    density of held-out rows, S = ``n_samples``."""
    from elbolab.inference.diagnostics import guide_draws, model_draws

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draws = guide_draws(model, train, torch.arange(int(train.shape[0])), n_samples, predictive=False)
        d = model_draws(model, x, None, draws.latents, frozenset(), predictive=False)
    log_lik = sum(d.log_lik.values())  # (S, B)
    return Estimate.of(torch.logsumexp(log_lik, 0) - math.log(n_samples))


def load_run(path: str, model: Callable | None = None, guide: Callable | None = None) -> Run:
    """The run in the directory ``path`` with its checkpoint's parameters. A run of a
    built-in model or of ``elbolab fit --model FILE.py:NAME`` is rebuilt from its
    config.json; a run fit from Python needs its ``model`` and ``guide`` again (they are
    given the saved parameters)."""
    loaded = read_run(path, model=model, guide=guide)
    metrics = {}
    if os.path.isfile(os.path.join(path, METRICS)):
        import json

        with open(os.path.join(path, METRICS)) as f:
            metrics = json.load(f)
    return Run(loaded.model, loaded.data, loaded.spec, None, metrics, path)


def importance_log_likelihood(model, guide, *args, num_samples: int = 1000, seed: int = 0,
                              plate: str = traces.DATA_PLATE, **kwargs) -> dict:
    """log p(x_i) per row of the data ``args`` / ``kwargs`` by importance sampling with the
    guide as proposal (K = ``num_samples`` draws per row, every latent local to a row):
    {"mean", "se", "n", "values" (per row), "pareto_k" (summary of each row's k)}; nats per
    datapoint. The model and guide are run as they are (no fitting)."""
    um = UserModel(model, guide, args, kwargs, plate)
    um.prepare()
    pareto = ParetoK()
    est = importance_estimates(um, um.rows, num_samples, seed=seed, on_log_weights=pareto)["log_likelihood"]
    return {**est.to_dict(), "values": est.values, "pareto_k": pareto.summary(), "n_samples": num_samples}


def compare_guides(model, guides: dict, *args, heldout: tuple | None = None, n_rows: int = 100,
                   num_samples: int = 1000, local=None, seed: int = 0, plate: str = traces.DATA_PLATE,
                   fit_options: dict | None = None, ais=None, **kwargs) -> dict:
    """Train ``model`` with each guide of ``guides`` (name -> guide) from the same initial
    parameters, and decompose each guide's inference gap on ``n_rows`` training rows (and
    held-out rows: ``heldout``, a tuple of arguments with the training data's layout):
    inference gap log p(x) - L[q] = approximation gap log p(x) - L[q*] + amortization gap
    L[q*] - L[q], q* the per-row optimum of the guide's Gaussian family (Cremer, Li &
    Duvenaud 2018). Needs one local latent per row. ``ais``: an
    ``inference.compare.AISSettings`` (default: its defaults, AIS where importance
    sampling is unreliable, checked by BDMC). Returns {name: {"run": Run, "train":
    numbers, "test": numbers}} (numbers: ``inference.guide_study.gap_study``'s, as
    ``elbolab compare-guides`` reports them)."""
    from elbolab.inference.compare import AISSettings, LocalSettings
    from elbolab.inference.guide_study import StudySettings, gap_study

    if not isinstance(guides, dict) or not guides:
        raise UsageError("guides must be a dict of name -> guide")
    settings = StudySettings(n_rows=n_rows, n_samples=num_samples, seed=seed, local=local or LocalSettings(),
                             ais=AISSettings() if ais is None else ais)
    initial = None
    out = {}
    for name, guide in guides.items():
        um = UserModel(model, guide, args, kwargs, plate)
        um.prepare()
        params = _model_params(um)
        if initial is None:  # every guide starts from the model's parameters as they were given
            initial = [p.detach().clone() for p in params]
        else:
            with torch.no_grad():
                for p, v in zip(params, initial):
                    p.copy_(v)
        run = fit(model, guide, *args, plate=plate, seed=seed, **(fit_options or {}), **kwargs)
        data = run.data
        if heldout is not None:
            test = run.model.pack(*heldout)
            data = DataSplits("data", data.train, data.val, test, source="arguments")
        out[name] = {"run": run, **gap_study(run.model, data, settings)}
    return out


def _model_params(um: UserModel) -> list[torch.Tensor]:
    """The unconstrained parameters the model (not the guide) reads, from one trace."""
    from pyro import poutine

    x = um.rows[:2]
    with torch.no_grad(), torch.random.fork_rng(), traces.batch(um, x):
        guide_tr = poutine.trace(um.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(um.model, trace=guide_tr)).get_trace(x)
    seen, params = set(), []
    for site in model_tr.nodes.values():
        if site["type"] == "param":
            leaf = site["value"].unconstrained() if hasattr(site["value"], "unconstrained") else site["value"]
            if id(leaf) not in seen:
                seen.add(id(leaf))
                params.append(leaf)
    return params


__all__ = ["Run", "compare_guides", "fit", "importance_log_likelihood", "load_run"]
