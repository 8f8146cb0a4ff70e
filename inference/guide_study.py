"""The gap study: amortized, semi-amortized, per-datapoint and flow guides compared by the
inference-gap decomposition of Cremer, Li & Duvenaud (2018), on training and test rows,
with what each guide costs to train and to infer a row.

A study is a list of :class:`Subject` (a model, its data, its training, the guides
compared, and how to build the model with each guide, always from the same initial
parameters) and :class:`StudySettings` (rows, importance samples, seed, the local
optimization of q*, AIS, the guides' own options). For each subject and guide,
:func:`study_guide` trains the model with that guide (``inference.train.fit``); then,
with the model fixed, :func:`gap_study` decomposes, per row and on ``n_rows`` training
rows and ``n_rows`` test rows (``inference.compare.study``),

    inference gap  log p(x) - L[q]  =  approximation gap  log p(x) - L[q*]
                                     +  amortization gap   L[q*] - L[q],

q the guide's q(z|x) for the rows, q* the best member of the same family for each row.
:func:`run_guide_study` runs every subject and guide and writes ``compare.md`` (the
tables, :func:`compare_lines`), ``metrics.json`` (the numbers it returns) and
``gaps.png`` (:func:`gap_chart`).

Subjects: a built-in family of the registry (:func:`builtin_subject`: ``ppca``, ``vae``,
``gmvae``, with the guides of :data:`GUIDES`), or a user's model given by reference
(:func:`user_subject`, ``FILE.py:NAME``: its own guide and the generic guides that apply
to it, :data:`USER_GUIDES`). What is exact comes from the model's declared protocols
(``models.protocol``), never from its name: ``ExactLikelihood`` makes log p(x) exact
(``Subject.exact``), and ``GaussianPosterior`` gives a Gaussian guide family's
approximation gap in closed form (:func:`closed_form_gap`).

``elbolab compare-guides`` and ``elbolab report``'s gaps stage are shells over this
module; ``elbolab.compare_guides`` (a user's model with guides of their own) shares
:func:`gap_study`. Numbers are nats per datapoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

from elbolab import models
from elbolab.inference.compare import AISSettings, LocalSettings, eval_rows, study
from elbolab.inference.errors import UsageError
from elbolab.inference.files import atomic_write, save_json
from elbolab.inference.flows import IAFGuide
from elbolab.inference.guides import LocalGuide, PerDatapointGuide, SemiAmortizedGuide, loc_and_scale, local_latent
from elbolab.inference.runs import DataSpec, RunDir, check_value, resolve_binarize, user_model
from elbolab.inference.traces import DATA_PLATE, guide_posterior, infers_new_rows
from elbolab.inference.train import fit
from elbolab.inference.train_config import MAX_SEED, MAX_TENSOR_ELEMENTS, TrainConfig, check_config_for_data
from elbolab.models.datasources import DataSplits
from elbolab.models.protocol import ExactLikelihood, GaussianPosterior

FAMILIES = ("ppca", "vae", "gmvae")
GUIDES = {
    "ppca": ("amortized", "amortized-full", "semi-amortized", "per-datapoint", "per-datapoint-full"),
    "vae": ("amortized", "semi-amortized", "per-datapoint", "flow"),
    "gmvae": ("amortized", "semi-amortized", "per-datapoint", "flow"),
}
USER_GUIDES = ("own", "semi-amortized", "per-datapoint", "flow")  # for a model of yours, where they apply
GUIDE_NAMES = frozenset(USER_GUIDES).union(*GUIDES.values())
# the model's own guide (its Config's ``guide`` field) under each guide studied: the
# wrappers build on it (a diagonal or a full covariance; its encoder)
OWN_GUIDE = {
    "ppca": {"amortized": "amortized-diag", "amortized-full": "amortized-full", "semi-amortized": "amortized-diag",
             "per-datapoint": "amortized-diag", "per-datapoint-full": "amortized-full"},
    "vae": dict.fromkeys(GUIDES["vae"], "amortized"),
    "gmvae": dict.fromkeys(GUIDES["gmvae"], "amortized"),
}
# defaults per family where the caller gives none (small models: the default study is the digits)
FAMILY_DEFAULTS = {
    "ppca": {"latent_dim": 5, "epochs": 30, "lr": 0.03, "lr_final": 1e-3},
    "vae": {"latent_dim": 4, "hidden": (64,), "activation": "elu", "epochs": 30, "lr": 3e-3, "lr_final": None},
    "gmvae": {"latent_dim": 4, "hidden": (64,), "activation": "elu", "n_components": 10, "epochs": 30,
              "lr": 3e-3, "lr_final": None},
    "user": {"epochs": 30, "lr": 3e-3, "lr_final": None},
}
MODEL_FIELDS = ("latent_dim", "hidden", "activation", "n_components")  # the built-in models' fields a study sets
DAGGER = " †"  # marks a number flagged unreliable
ESTIMATORS = {"exact": "exact", "is": "IS", "ais": "AIS"}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GuideOptions:
    """The studied guides' own settings. Semi-amortized (``SemiAmortizedGuide``, Kim et al.
    2018): ``semi_steps`` refinement steps S of (loc, log scale) per mini-batch, each of
    size ``semi_step_size`` (``natural``: natural-gradient steps, where 1 is Newton's step
    for a Gaussian posterior; else plain gradient ones) on each row's ELBO from
    ``semi_particles`` draws, differentiated through (``differentiable``; else their
    Jacobian taken as the identity). Flow (``IAFGuide``, Kingma et al. 2016):
    ``flow_layers`` inverse autoregressive steps on the encoder, each with a masked
    network of ``flow_hidden`` units (at least the latent dimension), also the depth and
    width of the flow family's q*."""

    semi_steps: int = 5
    semi_step_size: float = 0.1
    semi_particles: int = 4
    natural: bool = True
    differentiable: bool = True
    flow_layers: int = 2
    flow_hidden: int = 32

    def __post_init__(self):
        where = "guide options"
        for name in ("semi_steps", "semi_particles", "flow_layers", "flow_hidden"):
            check_value(where, name, getattr(self, name), int, low=1)
        check_value(where, "semi_step_size", self.semi_step_size, float, low=0, low_open=True)
        for name in ("natural", "differentiable"):
            check_value(where, name, getattr(self, name), bool)

    def to_dict(self) -> dict:
        """As ``metrics.json`` holds them: {"semi_amortized": {...}, "flow": {...}}."""
        return {"semi_amortized": {"steps": self.semi_steps, "step_size": self.semi_step_size,
                                   "n_particles": self.semi_particles, "natural": self.natural,
                                   "differentiable": self.differentiable},
                "flow": {"layers": self.flow_layers, "hidden": self.flow_hidden}}


@dataclass(frozen=True)
class StudySettings:
    """What every subject of a study shares: ``n_rows`` training rows and ``n_rows`` test
    rows evaluated (a seeded random subset of each, fewer where a split is smaller),
    ``n_samples`` importance samples K per row (ELBO, IWAE_K, log p(x) where reliable),
    the ``seed``, how q* is found (``local``), when log p(x) comes from AIS (``ais``) and
    the guides' own settings (``options``)."""

    n_rows: int = 100
    n_samples: int = 1000
    seed: int = 0
    local: LocalSettings = LocalSettings()
    ais: AISSettings = AISSettings()
    options: GuideOptions = GuideOptions()

    def __post_init__(self):
        where = "study settings"
        check_value(where, "n_rows", self.n_rows, int, low=1)
        check_value(where, "n_samples", self.n_samples, int, low=1, high=10**9)
        check_value(where, "seed", self.seed, int, low=0, high=MAX_SEED - 1)
        for name, kind in (("local", LocalSettings), ("ais", AISSettings), ("options", GuideOptions)):
            if not isinstance(getattr(self, name), kind):
                raise UsageError(f"{where}: {name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")


# ----------------------------------------------------------------------------- subjects


def wrap(base, guide: str, options: GuideOptions = GuideOptions()):
    """``base`` (a model with its own guide) with the guide under study: per-datapoint
    (a table; ``-full``: full covariances), semi-amortized or flow over ``base``'s guide,
    else ``base`` itself (amortized: its own encoder; own)."""
    if guide.startswith("per-datapoint"):
        return PerDatapointGuide(base, full=guide.endswith("full"))
    if guide == "semi-amortized":
        return SemiAmortizedGuide(base, steps=options.semi_steps, step_size=options.semi_step_size,
                                  n_particles=options.semi_particles, differentiable=options.differentiable,
                                  natural=options.natural)
    if guide == "flow":
        return IAFGuide(base, layers=options.flow_layers, hidden=(options.flow_hidden,))
    return base


@dataclass
class Subject:
    """One model under study: a built-in family or a model of yours (``user``), its data,
    its training, the guides compared, its Config (as the tables show it), and ``make``:
    the model with its own guide for the guide under study, always from the same initial
    parameters. ``build(guide, options)`` wraps that in the guide (:func:`wrap`).
    ``exact``: the model declares an exact log p(x) (``ExactLikelihood``). ``notes``:
    what applies to a model of yours and why."""

    key: str
    data: DataSplits
    train: TrainConfig
    guides: tuple[str, ...]
    config: dict
    make: Callable[[str], torch.nn.Module]
    exact: bool = False
    notes: list[str] = field(default_factory=list)
    user: bool = False

    def build(self, guide: str, options: GuideOptions = GuideOptions()) -> torch.nn.Module:
        return wrap(self.make(guide), guide, options)


def load_data(spec: DataSpec, likelihood: str | None, where: str = "data") -> DataSplits:
    """The data of ``spec`` for a model with ``likelihood`` (its ``binarize`` "auto"
    resolved for it: ``runs.resolve_binarize``), every field checked."""
    binarize = resolve_binarize(spec.binarize, spec.dataset, spec.data_path, likelihood)
    return DataSpec.from_dict({**asdict(spec), "binarize": binarize}, where).load(likelihood)


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed")


def train_config(overrides: dict | None, defaults: dict, seed: int = 0) -> TrainConfig:
    """The TrainConfig of a subject: ``overrides`` (TrainConfig fields as plain values) over
    ``defaults`` (lr, lr_final, epochs). A rate given without a final rate decays to none;
    ``steps`` given wins over epochs."""
    o = dict(overrides or {})
    unknown = sorted(set(o) - set(TRAIN_FIELDS))
    if unknown:
        raise UsageError(f"train: unknown field(s) {', '.join(unknown)}; choose from {', '.join(TRAIN_FIELDS)}")
    values = {"lr": defaults["lr"], "lr_final": None if "lr" in o else defaults["lr_final"],
              "epochs": defaults["epochs"], **o, "seed": seed}
    if values.get("steps") is not None:
        values["epochs"] = None
    return TrainConfig.from_dict(values)


def family_settings(family: str, model: dict | None = None, train: dict | None = None,
                    seed: int = 0) -> tuple[dict, TrainConfig]:
    """The model Config fields (``model``'s over the family's defaults; fields the family's
    Config lacks are left out) and the TrainConfig of one family."""
    given = dict(model or {})
    unknown = sorted(set(given) - set(MODEL_FIELDS))
    if unknown:
        raise UsageError(f"model: unknown field(s) {', '.join(unknown)}; choose from {', '.join(MODEL_FIELDS)}")
    d = FAMILY_DEFAULTS[family]
    fields = set(models.config_class(family).__dataclass_fields__)
    values = {}
    for f in MODEL_FIELDS:
        v = given.get(f, d.get(f))
        if v is not None and f in fields:
            values[f] = list(v) if isinstance(v, tuple) else v
    models.make_config(family, values)  # validates
    return values, train_config(train, d, seed)


def builtin_subject(family: str, data: DataSpec = DataSpec(binarize="auto"), model: dict | None = None,
                    train: dict | None = None, guides: Iterable[str] | None = None, seed: int = 0) -> Subject:
    """A built-in family (one of :data:`FAMILIES`) on ``data`` (its ``binarize`` may be
    "auto": resolved for the family's likelihood), with ``model`` (:data:`MODEL_FIELDS`)
    and ``train`` (TrainConfig fields) over :data:`FAMILY_DEFAULTS`, the ``guides`` of
    :data:`GUIDES` asked for (all by default; those that apply to the family), every
    guide's model from the same parameters (``seed``). Everything checked, nothing
    trained."""
    if family not in FAMILIES:
        raise UsageError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    values, config = family_settings(family, model, train, seed)
    likelihood = models.REGISTRY[family][1].likelihood
    splits = load_data(data, likelihood)
    check_config_for_data(config, splits)

    def make(guide: str):
        torch.manual_seed(seed)  # every guide starts from the same generative parameters
        return models.build_model(family, {**values, "guide": OWN_GUIDE[family][guide]}, splits.data_dim,
                                  splits.n_train)

    exact = issubclass(models.REGISTRY[family][1], ExactLikelihood)
    return restrict(Subject(family, splits, config, GUIDES[family], values, make, exact), guides)


def user_guides(um, x: torch.Tensor, reference: str) -> tuple[tuple[str, ...], list[str]]:
    """The guides of :data:`USER_GUIDES` that apply to a model of yours (``um``, on its
    training rows x (N, D)), and the reasons, one line each: per-datapoint always;
    semi-amortized and flow where its guide is a Gaussian encoder (it infers new rows and
    its q(z|x) is a Normal)."""
    try:
        site, k, _ = local_latent(um)
    except UsageError as e:
        raise UsageError(f"model {reference}: the gap study needs one local latent per row ({e})") from None
    new_rows = infers_new_rows(um, x)
    try:
        loc_and_scale(guide_posterior(um, x[:2], torch.arange(min(2, int(x.shape[0])))), full=False)
        gaussian = True
    except UsageError:
        gaussian = False
    notes = [f"your model's local latent {site!r} (k = {k}): the per-datapoint table applies"]
    if gaussian and new_rows:
        notes.append("your guide is a Gaussian encoder: semi-amortized refinement and the flow on it apply")
        return USER_GUIDES, notes
    why = "its q(z|x) is not a Normal" if not gaussian else "it does not infer new rows (it reads their positions)"
    notes.append(f"semi-amortized and flow do not apply: they build on a Gaussian encoder, and your guide is not "
                 f"one ({why})")
    return ("own", "per-datapoint"), notes


def user_subject(model: str, data: DataSpec = DataSpec(binarize="auto"), guide: str | None = None,
                 plate: str = DATA_PLATE, train: dict | None = None, guides: Iterable[str] | None = None,
                 seed: int = 0) -> Subject:
    """A model of yours by reference (``FILE.py:NAME`` or ``module:NAME``, as for
    ``elbolab fit``; a model function takes ``guide``: an automatic guide's name or a
    reference) observing ``data``'s rows in the plate ``plate``, with one local latent per
    row; ``train`` (TrainConfig fields) over :data:`FAMILY_DEFAULTS` ["user"]; ``guides``:
    those of :data:`USER_GUIDES` asked for (by default every one that applies; one that
    does not is refused). Every guide's model starts from the parameters the model was
    built with (``seed``). Everything checked, nothing trained."""
    splits = load_data(data, None)
    config = train_config(train, FAMILY_DEFAULTS["user"], seed)
    check_config_for_data(config, splits)
    torch.manual_seed(seed)
    um = user_model(model, guide, plate, splits.train)
    available, notes = user_guides(um, splits.train, model)
    initial = {k: v.detach().clone() for k, v in um.state_dict().items()}

    def make(_guide: str):
        um.load_state_dict(initial)  # every guide starts from the parameters the model was built with
        torch.manual_seed(seed)  # and a guide's own parameters (a flow's) from the same seed
        return um

    described = {"model": model, "guide": guide or "its own", "plate": plate}
    sub = Subject(model, splits, config, available, described, make, isinstance(um, ExactLikelihood), notes,
                  user=True)
    return restrict(sub, guides)


def restrict(sub: Subject, guides: Iterable[str] | None, parameter: str = "guides") -> Subject:
    """``sub`` with only the ``guides`` asked for (None: all of its guides). A built-in
    family keeps those that apply to it (one list serves several families) and refuses
    a list of which none applies; a model of yours refuses any that does not apply.
    ``parameter``: how the errors name the list (a program: its flag)."""
    if guides is None:
        return sub
    asked = tuple(dict.fromkeys(guides))
    unknown = [g for g in asked if g not in GUIDE_NAMES]
    if unknown:
        raise UsageError(f"{parameter}: unknown guide(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(GUIDE_NAMES))}")
    if sub.user:
        off = [g for g in asked if g not in sub.guides]
        if off:
            raise UsageError(f"{parameter}: {', '.join(off)} does not apply to {sub.key} ({sub.notes[-1]})")
    chosen = tuple(g for g in sub.guides if g in asked)
    if not chosen:
        raise UsageError(f"{parameter} {','.join(asked)}: none applies to {sub.key} (its guides: "
                         f"{', '.join(sub.guides)})")
    return dataclasses.replace(sub, guides=chosen)


def check_subjects(subjects: list[Subject], settings: "StudySettings") -> None:
    """Everything a study checks before it trains: subjects with distinct keys, each
    one's training against its data, every guide's model built (e.g. a flow narrower
    than the latent dimension is refused), q*'s draws x data dimensions within one
    tensor's bounds."""
    if not subjects:
        raise UsageError("subjects: none given")
    keys = [sub.key for sub in subjects]
    if len(set(keys)) != len(keys):
        raise UsageError(f"subjects: each needs a key of its own, got {', '.join(keys)}")
    for sub in subjects:
        check_config_for_data(sub.train, sub.data)
        for guide in sub.guides:
            sub.build(guide, settings.options)
        if settings.local.n_particles * sub.data.data_dim > MAX_TENSOR_ELEMENTS:
            raise UsageError(f"local n_particles {settings.local.n_particles} x {sub.data.data_dim} data "
                             "dimensions is too large for one tensor")


# ----------------------------------------------------------------------------- one guide


def closed_form_gap(model) -> float | None:
    """The approximation gap of the guide's family in closed form at the fitted
    parameters, for a model declaring a Gaussian posterior with a shared covariance
    (``models.protocol.GaussianPosterior``: PPCA), the same for every row: 0 for a
    full-covariance Gaussian family (it holds the posterior); for a diagonal one the KL
    from its best member, N(loc, diag(1 / diag(Lambda))) with Lambda = cov^-1, to the
    posterior N(loc, cov):

        KL = 1/2 (sum_i log Lambda_ii - log det Lambda)

    (the trace term is k and cancels). None for any other model or family (a flow)."""
    base = model.base if isinstance(model, LocalGuide) else model
    if not isinstance(base, GaussianPosterior):
        return None
    x = torch.zeros(1, base.data_dim)
    _, cov = base.exact_posterior(x)
    if cov.dim() != 2:
        raise UsageError(f"{type(base).__name__}.exact_posterior: expected one covariance (k, k) shared by the "
                         f"rows, got shape {tuple(cov.shape)}")
    q = guide_posterior(model, x, torch.zeros(1, dtype=torch.long))
    if isinstance(q, torch.distributions.MultivariateNormal):
        return 0.0
    if not (isinstance(q, torch.distributions.Independent) and isinstance(q.base_dist, torch.distributions.Normal)):
        return None
    precision = torch.linalg.inv(cov.double())
    return float(0.5 * (torch.diagonal(precision).log().sum() - torch.logdet(precision)))


def gap_study(model, data: DataSplits, settings: StudySettings = StudySettings(), log=None) -> dict:
    """The gap decomposition of a trained ``model`` (its guide under study) on
    ``settings.n_rows`` training and test rows of ``data`` (``inference.compare.study``):
    {split: numbers}, with the family's closed-form approximation gap
    (``approximation_gap_closed_form``) where :func:`closed_form_gap` has one. ``log``:
    called with each progress line."""
    splits = eval_rows(data, settings.n_rows, settings.seed)
    out = study(model, data.train, splits, settings.n_samples, settings.local, seed=settings.seed, log=log,
                ais=settings.ais)
    cf = closed_form_gap(model)
    if cf is not None:
        for split in splits:
            out[split]["approximation_gap_closed_form"] = cf
    return out


def study_guide(sub: Subject, guide: str, settings: StudySettings = StudySettings(), log=None) -> dict:
    """Train ``sub``'s model with ``guide`` (``inference.train.fit``) and study its gaps:
    {"training": {steps, epochs, seconds, final_train_loss}, split: numbers, ...}."""
    model = sub.build(guide, settings.options)
    t0 = time.perf_counter()
    result = fit(model, sub.data, sub.train)
    train_seconds = time.perf_counter() - t0
    out: dict = {"training": {"steps": result.steps, "epochs": result.epochs, "seconds": train_seconds,
                              "final_train_loss": result.final_loss}}
    out.update(gap_study(model, sub.data, settings, log))
    return out


# ----------------------------------------------------------------------------- the study


def run_guide_study(subjects: Iterable[Subject], out: str | RunDir, settings: StudySettings = StudySettings(), *,
                    command: str | None = None, on_trained: Callable[[str, str], None] | None = None,
                    log: Callable[[str], None] | None = None, overwrite: bool = False) -> dict:
    """Study every guide of every subject and write ``compare.md``, ``metrics.json`` and
    ``gaps.png`` into ``out`` (a directory: refused if it holds files, unless
    ``overwrite``; or a ``RunDir``). Everything is checked before anything is trained or
    created. ``command``: how the study was asked for (in both files);
    ``on_trained(key, guide)``: called after each guide's study; ``log``: called with
    each progress line ("[key/guide] ..."). Returns the metrics saved: {"command",
    "units", "n_samples", "n_rows", "seed", "wall_seconds", "threads",
    "semi_amortized", "flow", "local", "ais", "models": {key: {"model_config",
    "train_config", "data", "exact_log_likelihood", "notes", "guides": {guide:
    study_guide's numbers}}}}."""
    subjects = list(subjects)
    if not isinstance(settings, StudySettings):
        raise UsageError(f"settings must be a StudySettings, got {type(settings).__name__}")
    check_subjects(subjects, settings)
    run_dir = out if isinstance(out, RunDir) else RunDir(out, overwrite=overwrite)
    run_dir.check()
    say = log if log is not None else (lambda line: None)
    for sub in subjects:
        for note in sub.notes:
            say(f"[{sub.key}] {note}")
    t_start = time.perf_counter()
    results: dict = {}
    with run_dir:
        for sub in subjects:
            res = results[sub.key] = {"model_config": sub.config, "train_config": sub.train.to_dict(),
                                      "data": sub.data.describe(), "exact_log_likelihood": sub.exact,
                                      "notes": sub.notes, "guides": {}}
            for guide in sub.guides:
                say(f"[{sub.key}/{guide}] training ...")
                res["guides"][guide] = study_guide(sub, guide, settings,
                                                   log=lambda line, p=f"[{sub.key}/{guide}] ": say(p + line))
                if on_trained is not None:
                    on_trained(sub.key, guide)
        wall = time.perf_counter() - t_start
        metrics = {"command": command.strip() if command is not None else None, "units": "nats per datapoint",
                   "n_samples": settings.n_samples, "n_rows": settings.n_rows, "seed": settings.seed,
                   "wall_seconds": wall, "threads": torch.get_num_threads(), **settings.options.to_dict(),
                   "local": asdict(settings.local), "ais": asdict(settings.ais), "models": results}
        data_name = subjects[0].data.name
        gap_chart(results, run_dir.file("gaps.png"),
                  f"Inference-gap decomposition on {data_name} ({settings.n_rows} rows per split)")
        save_json(metrics, run_dir.file("metrics.json"))
        with atomic_write(run_dir.file("compare.md")) as f:
            f.write("\n".join(compare_lines(metrics)))
    return metrics


# ----------------------------------------------------------------------------- tables and chart


def pm(e: dict, digits: int = 3) -> str:
    return f"{e['mean']:.{digits}f} ± {e['se']:.{digits}f}"


def flagged(e: dict, digits: int = 3) -> str:
    """± with a dagger where the number is flagged unreliable."""
    return pm(e, digits) + (DAGGER if e.get("reliable") is False else "")


def seconds(s: float) -> str:
    return f"{s:.2g}"


def compare_lines(metrics: dict) -> list[str]:
    """``compare.md``, line by line, from a study's metrics (:func:`run_guide_study`)."""
    results = metrics["models"]
    data_name = next(iter(results.values()))["data"]["dataset"]
    local, flow = metrics["local"], metrics["flow"]
    ais = AISSettings(**metrics["ais"])
    lines = [f"# Amortized, semi-amortized, per-datapoint and flow guides on {data_name}", ""]
    if metrics["command"] is not None:
        lines += [f"Command: `{metrics['command']}`", ""]
    lines += ["Nats per datapoint; ± one standard error over rows (the gaps: of the per-row differences). "
              "inference gap = log p(x) - L[q] = approximation gap (log p(x) - L[q*]) + amortization gap "
              "(L[q*] - L[q]); q* is the per-row optimum of the guide's family for the fixed model "
              f"(Adam, rate {local['lr']} decayed by {local['decay']} per window without improvement, "
              f"{local['n_particles']} draws, windows of {local['window']} steps, patience "
              f"{local['patience']}; the flow family: a flow per row with {flow['layers']} steps of "
              f"{flow['hidden']} units, from the encoder's Gaussian, rate {local['flow_lr']}). A "
              "per-datapoint guide cannot infer test rows: there q is the "
              "local optimization from N(0, I), so its amortization gap is 0 by construction. "
              "Infer: wall time of the guide's pass over the rows (or of the optimization) per row.", ""]
    for key, res in results.items():
        lines += family_lines(key, res, data_name, metrics["n_samples"], ais)
    lines += ["![gap decomposition](gaps.png)", "", f"_Wall time {metrics['wall_seconds']:.0f} s, "
              f"{metrics['threads']} thread(s)._", ""]
    return lines


def family_lines(key: str, res: dict, data_name: str, n_samples: int, ais: AISSettings) -> list[str]:
    """One subject's section of ``compare.md``: the decomposition per guide and split, the
    AIS numbers beside importance sampling where log p(x) came from AIS, and what each
    guide cost."""
    cfg = res["model_config"]
    desc = ", ".join(f"{k} = {v}" for k, v in cfg.items())
    exact = res.get("exact_log_likelihood", False)
    lines = [f"## {key} on {data_name} ({desc})", ""]
    lines += [f"- {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
    lines += [("log p(x) and the ELBOs are exact (closed forms); IWAE from "
               f"K = {n_samples} importance samples per row." if exact else
               f"L[q] and IWAE_K from K = {n_samples} importance samples per row; log p(x) (its estimator named "
               "beside it) is the larger of the K-sample IWAE estimates with q and with q* as proposal (IS), or, "
               f"where their Pareto k flags that{' (here: always)' if ais.when == 'always' else ''}, AIS from q* "
               f"({ais.budget.label()})."), "",
              "| guide | rows | ELBO L[q] | IWAE_K | log p(x) | inference gap | approximation gap | "
              "amortization gap | infer (s/row) | q* steps |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    ais_rows = []
    for guide, r in res["guides"].items():
        for split in ("train", "test"):
            if split not in r:
                continue
            s = r[split]
            gap_note = ""
            if "approximation_gap_closed_form" in s:
                gap_note = f" (closed form {s['approximation_gap_closed_form']:.3f})"
            infer = seconds(s["inference_seconds_per_row"]) + ("" if s["inference"] == "guide" else " (opt.)")
            est = s.get("log_likelihood_estimator", "is")
            lines.append(f"| {guide} | {split} ({s['n_rows']}) | {flagged(s['elbo'])} | {flagged(s['iwae'])} | "
                         f"{flagged(s['log_likelihood'])} ({ESTIMATORS[est]}) | {flagged(s['inference_gap'])} | "
                         f"{flagged(s['approximation_gap'])}{gap_note} | {flagged(s['amortization_gap'])} | "
                         f"{infer} | {s['local']['steps']} |")
            if est == "ais":
                b = s["bdmc"]
                bd = (f"{pm(b['gap'])} ({b['n_rows']} rows, {b['seconds']:.1f} s)" if "gap" in b
                      else f"— ({b['error']})")
                ais_rows.append(f"| {guide} | {split} ({s['n_rows']}) | {pm(s['log_likelihood'])} | "
                                f"{flagged(s['log_likelihood_is'])} | {pm(s['ais_minus_is'], 4)} | "
                                f"{s['ais']['mc_se_of_mean']:.4f} | {s['ais']['seconds']:.1f} | {bd} | "
                                f"{'yes' if b['reliable'] else 'NO'} |")
    lines += ["", f"{DAGGER.strip()} flagged unreliable: an importance-sampled number whose weights have Pareto "
              "k > 0.7 on more than 1% of rows, or an AIS log p(x) whose BDMC check exceeds the tolerance "
              f"({ais.tolerance:g} nats), and the gaps computed from it."]
    if ais_rows:
        lines += ["", f"log p(x) by AIS from q* ({ais.budget.label()}), beside importance sampling (IS-{n_samples}); "
                  "BDMC: forward and reverse AIS at the same budget, from q* fitted to rows simulated from the "
                  "trained model, whose gap bounds the AIS error on such rows:", "",
                  "| guide | rows | AIS log p(x) | IS log p(x) | AIS - IS (paired) | AIS s.e. over chains | "
                  "AIS (s) | BDMC gap | reliable |", "|---|---|---|---|---|---|---|---|---|", *ais_rows]
    lines += ["", "| guide | training steps | training time (s) | final training loss | test ELBO | "
              "inferring a new row (s/row) |", "|---|---|---|---|---|---|"]
    for guide, r in res["guides"].items():
        t = r["training"]
        test = r.get("test")
        infer = "—" if test is None else seconds(test["inference_seconds_per_row"]) + (
            "" if test["inference"] == "guide" else " (local optimization)")
        lines.append(f"| {guide} | {t['steps']} | {t['seconds']:.1f} | {t['final_train_loss']:.3f} | "
                     f"{pm(test['elbo']) if test else '—'} | {infer} |")
    return lines + [""]


def gap_chart(results: dict, path: str, title: str) -> None:
    """Stacked bars per guide, training and test rows side by side: approximation gap
    (bottom) + amortization gap (top) = inference gap (error bar: ±2 standard errors)."""
    import numpy as np

    from elbolab.inference.plots import plt, save_figure

    fams = list(results)
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams) + 1, 4.6), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        guides = list(results[fam]["guides"])
        xs = np.arange(len(guides))
        for j, (split, hatch) in enumerate((("train", ""), ("test", "//"))):
            off = xs + (j - 0.5) * 0.38
            get = [results[fam]["guides"][g].get(split) for g in guides]
            approx = np.array([s["approximation_gap"]["mean"] if s else np.nan for s in get])
            amort = np.array([s["amortization_gap"]["mean"] if s else np.nan for s in get])
            total = np.array([s["inference_gap"]["mean"] if s else np.nan for s in get])
            err = np.array([2 * s["inference_gap"]["se"] if s else np.nan for s in get])
            ax.bar(off, approx, 0.36, color="C0", hatch=hatch, edgecolor="white",
                   label="approximation gap" if j == 0 else None)
            ax.bar(off, amort, 0.36, bottom=approx, color="C1", hatch=hatch, edgecolor="white",
                   label="amortization gap" if j == 0 else None)
            ax.errorbar(off, total, yerr=err, fmt="none", ecolor="k", capsize=3, lw=1,
                        label="inference gap ±2 s.e." if j == 0 else None)
            for xo, v, e in zip(off, total, err):
                if np.isfinite(v):
                    ax.annotate(f"{v:.2f}", (xo, v + e), textcoords="offset points", xytext=(0, 2),
                                ha="center", fontsize=6)
        tops = [s["inference_gap"]["mean"] + 2 * s["inference_gap"]["se"] for g in guides
                for s in results[fam]["guides"][g].values() if isinstance(s, dict) and "inference_gap" in s]
        if tops and max(tops) > 0:
            ax.set_ylim(top=1.4 * max(tops))  # room for the legend above the bars
        ax.set_xticks(xs)
        ax.set_xticklabels(guides, rotation=25, ha="right", fontsize=8)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylabel("gap (nats per datapoint)")
        ax.set_title(f"{fam}: training (plain) and test (hatched) rows", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, -0.1, "A per-datapoint guide cannot infer test rows: there its q is the local optimization "
             "itself (amortization gap 0). Bars: means over rows; numbers: the inference gap.",
             ha="center", fontsize=8)
    save_figure(fig, path)
