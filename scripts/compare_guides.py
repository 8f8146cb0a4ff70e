"""Compare amortized, semi-amortized, per-datapoint and flow guides: the inference-gap
decomposition of Cremer, Li & Duvenaud (2018) on training and test rows, and what
each guide costs to train and to infer a new datapoint.

For each model (PPCA, the VAE, the mixture-prior VAE, or yours: --model FILE.py:NAME)
and each guide, one model is trained with that guide through the training driver
(inference.train.fit), every guide from the same initial parameters:

* amortized: the model's encoder q_phi(z|x) (PPCA: diagonal and full covariance);
  for a model of yours, its own guide ("own");
* semi-amortized: the encoder's output refined by --semi-steps gradient steps on each
  row's ELBO, trained end to end through the steps (Kim et al. 2018; --semi-first-order
  for the variant without second derivatives);
* per-datapoint: one Gaussian per training row, trained jointly with the model from
  scratch (PPCA: diagonal and full covariance);
* flow (the VAEs, and a model of yours whose guide is a Gaussian encoder): --flow-layers
  inverse autoregressive flows (Kingma et al. 2016) on top of the encoder, conditioned
  on its output, trained jointly.

Then, for --n-rows training rows and --n-rows test rows, with the model fixed: the
guide's q for those rows (an encoder pass; a refinement; the table; the flow; for a
per-datapoint guide on test rows, which it cannot infer, the local optimization
itself), and q*, the best member of the same family for each row, optimized until its
running loss stops improving (inference.guides.optimize_local: a Gaussian per row;
for the flow guide, a flow per row with the same layers and width, started at the
encoder's Gaussian; Cremer et al.'s settings are --local-lr 1e-3 --local-decay 1
--local-particles 50 --local-window 100 --local-patience 10; the defaults are faster).

The table reports the ELBO L[q], the IWAE bound with K = --n-samples, log p(x), and the
inference, approximation and amortization gaps, each a mean over rows +- its standard
error (paired per row), and the wall time to infer. log p(x) is exact for PPCA; for
the others the larger of the K-sample importance estimates with q and with q* as
proposal, unless their Pareto k says it is unreliable (more than 1% of rows with
k > 0.7): then annealed importance sampling from q* (--ais-steps, --ais-chains,
--ais-leapfrog; --ais always / never), checked by bidirectional Monte Carlo on
--bdmc-rows rows simulated from each trained model (same budget; its gap bounds the
AIS error on data like the model's own). Each number is marked where it is not
reliable, and the estimator of each log p(x) is named.

Models of yours: --model FILE.py:NAME (or module:NAME) as for elbolab fit (an object
with model(x) and guide(x), a class making one, or a model function with --guide),
on --data X.npy (or a built-in data set). It must have one local latent per row (event
dimension 1, in the data plate). Its own guide is compared with the generic guides
that apply: per-datapoint always; semi-amortized and flow where its guide is a
Gaussian encoder (it infers new rows and its q(z|x) is a Normal).

Writes --out/compare.md, --out/metrics.json and --out/gaps.png. Numbers are nats per
datapoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from elbolab import models
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import tune_malloc
from elbolab.inference.files import atomic_write, save_json
from elbolab.inference.compare import AIS_USE, AISSettings, LocalSettings, eval_rows, study
from elbolab.inference.flows import IAFGuide
from elbolab.inference.traces import DATA_PLATE, guide_posterior, infers_new_rows
from elbolab.inference.guides import LocalGuide, PerDatapointGuide, SemiAmortizedGuide, local_latent, loc_and_scale
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig, check_config_for_data
from elbolab.inference.runs import RunDir, is_reference, user_model
from elbolab.models.datasources import DataSplits
from elbolab.scripts import _cli

PROG = "elbolab compare-guides"
FAMILIES = ("ppca", "vae", "gmvae")
GUIDES = {
    "ppca": ("amortized", "amortized-full", "semi-amortized", "per-datapoint", "per-datapoint-full"),
    "vae": ("amortized", "semi-amortized", "per-datapoint", "flow"),
    "gmvae": ("amortized", "semi-amortized", "per-datapoint", "flow"),
}
USER_GUIDES = ("own", "semi-amortized", "per-datapoint", "flow")  # for a model of yours, where they apply
# defaults per family where a flag is not given (small models: the default run is the digits)
FAMILY_DEFAULTS = {
    "ppca": {"latent_dim": 5, "epochs": 30, "lr": 0.03, "lr_final": 1e-3},
    "vae": {"latent_dim": 4, "hidden": (64,), "activation": "elu", "epochs": 30, "lr": 3e-3, "lr_final": None},
    "gmvae": {"latent_dim": 4, "hidden": (64,), "activation": "elu", "n_components": 10, "epochs": 30,
              "lr": 3e-3, "lr_final": None},
    "user": {"epochs": 30, "lr": 3e-3, "lr_final": None},
}
MODEL_FIELDS = ("latent_dim", "hidden", "activation", "n_components")
DAGGER = " †"  # marks a number flagged unreliable

EXAMPLES = """examples:
  elbolab compare-guides --out runs/compare
  elbolab compare-guides --model vae --epochs 50 --n-samples 5000 --out runs/compare-vae
  elbolab compare-guides --model vae --guides amortized,flow --ais always --ais-steps 200 --out runs/flows
  elbolab compare-guides --model my_vae.py:VAE --data X.npy --out runs/mine
  elbolab compare-guides --model my_model.py:model --guide my_model.py:guide --data X.npy --out runs/mine-fn
  elbolab compare-guides --model vae --guides amortized,flow --dataset mnist --data-dir ~/data/mnist \\
      --val-fraction 0 --latent-dim 10 --hidden 300,300 --epochs 5 --n-rows 100 --n-samples 1000 \\
      --ais always --ais-steps 100 --ais-chains 8 --threads 1 --out runs/compare-mnist-flows
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    g = p.add_argument_group("models")
    g.add_argument("--model", default="all", metavar="NAME",
                   help=f"a model family ({', '.join(FAMILIES)}), all three, or yours: FILE.py:NAME or module:NAME "
                        "(default: all)")
    g.add_argument("--guide", default=None,
                   help="for a model function of yours: its guide (auto-normal, auto-diagonal-normal, auto-mvn, "
                        "auto-lowrank-mvn, auto-delta or FILE.py:NAME)")
    g.add_argument("--plate", default=None, help=f"your model's plate over the data's rows (default: {DATA_PLATE})")
    g.add_argument("--guides", type=_guide_list, default=None,
                   help="comma-separated guides to compare (default: every one that applies; ppca: "
                        f"{', '.join(GUIDES['ppca'])}; vae, gmvae: {', '.join(GUIDES['vae'])}; yours: "
                        f"{', '.join(USER_GUIDES)})")
    g.add_argument("--latent-dim", type=_cli.positive_int, default=None,
                   help="latent dimension k (default: 5 for ppca, 4 for the VAEs)")
    g.add_argument("--hidden", type=_cli.int_list, default=None, help="VAE hidden layer sizes (default: 64)")
    g.add_argument("--activation", default=None, help="VAE activation: relu, elu, tanh, softplus (default: elu)")
    g.add_argument("--n-components", type=_cli.positive_int, default=None, help="GMVAE prior components (default: 10)")
    _cli.add_data_args(p)
    t = p.add_argument_group("training (one fit per model and guide)")
    t.add_argument("--epochs", type=_cli.positive_int, default=None, help="epochs (default: 30)")
    t.add_argument("--steps", type=_cli.positive_int, default=None, help="optimizer steps (wins over --epochs)")
    t.add_argument("--batch-size", type=_cli.positive_int, default=100, help="rows per mini-batch")
    t.add_argument("--lr", type=_cli.positive_float, default=None, help="Adam rate (default: 0.03 ppca, 3e-3 others)")
    t.add_argument("--lr-final", type=_cli.positive_float, default=None,
                   help="decay the rate exponentially to this (default: 1e-3 for ppca, none for the others)")
    t.add_argument("--threads", type=_cli.positive_int, default=None, help="torch CPU threads")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars while training (default: when stderr is a terminal)")
    s = p.add_argument_group("semi-amortized guide")
    s.add_argument("--semi-steps", type=_cli.positive_int, default=5, help="refinement steps S per mini-batch")
    s.add_argument("--semi-step-size", type=_cli.positive_float, default=0.1,
                   help="step on (loc, log scale), natural gradient (1: Newton's step for a Gaussian posterior)")
    s.add_argument("--semi-particles", type=_cli.positive_int, default=4, help="draws per row in each step")
    s.add_argument("--semi-plain-gradient", action="store_true",
                   help="plain gradient steps (Kim et al.) instead of natural-gradient ones")
    s.add_argument("--semi-first-order", action="store_true",
                   help="no differentiation through the steps (their Jacobian taken as the identity)")
    f = p.add_argument_group("flow guide (and its q*)")
    f.add_argument("--flow-layers", type=_cli.positive_int, default=2,
                   help="inverse autoregressive flow steps on the encoder (and in each row's flow q*)")
    f.add_argument("--flow-hidden", type=_cli.positive_int, default=32,
                   help="hidden units of each step's masked network (at least the latent dimension)")
    lo = p.add_argument_group("local optimization q* (Cremer et al.: rate 1e-3, decay 1, 50 draws, window 100, "
                              "patience 10)")
    lo.add_argument("--local-lr", type=_cli.positive_float, default=0.1, help="Adam rate (initial, per row)")
    lo.add_argument("--local-flow-lr", type=_cli.positive_float, default=0.01,
                    help="Adam rate (initial, per row) of the flow family's q*")
    lo.add_argument("--local-decay", type=_cli.positive_float, default=0.5,
                    help="a row's rate is multiplied by this after each window without improvement (1: constant)")
    lo.add_argument("--local-particles", type=_cli.positive_int, default=10, help="draws per row and step")
    lo.add_argument("--local-window", type=_cli.positive_int, default=25, help="steps per window of the running loss")
    lo.add_argument("--local-patience", type=int, default=3,
                    help="windows without improvement a row tolerates; it stops at the next")
    lo.add_argument("--local-max-steps", type=_cli.positive_int, default=20_000, help="cap on the steps")
    e = p.add_argument_group("evaluation")
    e.add_argument("--n-rows", type=_cli.positive_int, default=100,
                   help="training rows and test rows evaluated (a seeded random subset of each; fewer if the "
                        "split is smaller)")
    e.add_argument("--n-samples", type=_cli.positive_int, default=1000,
                   help="importance samples K per row (ELBO, IWAE_K, log p(x) where reliable); Cremer et al.: 5000")
    a = p.add_argument_group("annealed importance sampling of log p(x), checked by BDMC")
    a.add_argument("--ais", default="unreliable", choices=AIS_USE,
                   help="when log p(x) comes from AIS from q*: where the importance-sampled one is unreliable "
                        "by its Pareto k, always, or never")
    a.add_argument("--ais-steps", type=_cli.positive_int, default=AISSettings.steps,
                   help="annealing steps T of each AIS run")
    a.add_argument("--ais-chains", type=_cli.positive_int, default=AISSettings.chains, help="chains M per row")
    a.add_argument("--ais-leapfrog", type=_cli.positive_int, default=AISSettings.leapfrog,
                   help="leapfrog steps L per HMC transition")
    a.add_argument("--bdmc-rows", type=_cli.positive_int, default=AISSettings.bdmc_rows,
                   help="rows simulated from each trained model for the BDMC check of its AIS (same budget)")
    a.add_argument("--bdmc-tolerance", type=_cli.positive_float, default=AISSettings.tolerance,
                   help="an AIS log p(x) is reliable when BDMC's gap + 2 standard errors is at most this (nats)")
    _cli.add_out_args(p, what="where compare.md, metrics.json and gaps.png go")
    return p


def _guide_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    known = set(USER_GUIDES).union(*GUIDES.values())
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown guide(s) {', '.join(bad) or '(none given)'}; choose from "
                                         f"{', '.join(sorted(known))}")
    return names


# ----------------------------------------------------------------------------- set-up


@dataclass
class Subject:
    """One model under study: a built-in family or a model of yours, its data, its
    training, the guides compared, and ``build(guide)``: the model with that guide,
    always from the same initial parameters."""

    key: str
    data: DataSplits
    train: TrainConfig
    guides: tuple[str, ...]
    config: dict
    build: Callable[[str], torch.nn.Module]
    exact: bool = False
    notes: list[str] = field(default_factory=list)


def family_settings(args, family: str) -> tuple[dict, TrainConfig]:
    """The model Config fields and the TrainConfig of one family (flags over defaults)."""
    d = FAMILY_DEFAULTS[family]
    cls = models.config_class(family)
    fields = set(cls.__dataclass_fields__)
    values = {}
    for f in MODEL_FIELDS:
        v = getattr(args, f)
        v = d.get(f) if v is None else v
        if v is not None and f in fields:
            values[f] = list(v) if isinstance(v, tuple) else v
    models.make_config(family, values)  # validates
    return values, train_config(args, d)


def train_config(args, d: dict) -> TrainConfig:
    epochs = args.epochs if args.epochs is not None else d["epochs"]
    return TrainConfig(
        lr=args.lr if args.lr is not None else d["lr"],
        lr_final=args.lr_final if args.lr_final is not None else (d["lr_final"] if args.lr is None else None),
        batch_size=args.batch_size, epochs=None if args.steps else epochs, steps=args.steps, seed=args.seed,
        threads=args.threads, progress=args.progress)


def model_config(family: str, values: dict, guide: str) -> dict:
    if family == "ppca":
        return {**values, "guide": "amortized-full" if guide.endswith("full") else "amortized-diag"}
    return {**values, "guide": "amortized"}


def wrap(base, guide: str, args):
    """``base`` (a model with its own guide) with the guide under study."""
    if guide.startswith("per-datapoint"):
        return PerDatapointGuide(base, full=guide.endswith("full"))
    if guide == "semi-amortized":
        return SemiAmortizedGuide(base, steps=args.semi_steps, step_size=args.semi_step_size,
                                  n_particles=args.semi_particles, differentiable=not args.semi_first_order,
                                  natural=not args.semi_plain_gradient)
    if guide == "flow":
        return IAFGuide(base, layers=args.flow_layers, hidden=(args.flow_hidden,))
    return base  # amortized (its own encoder), own


def selected(args, available: tuple[str, ...], key: str) -> tuple[str, ...]:
    """The guides of ``available`` that --guides names (all without it); UsageError if none."""
    if args.guides is None:
        return available
    chosen = tuple(g for g in available if g in args.guides)
    if not chosen:
        raise UsageError(f"--guides {','.join(args.guides)}: none applies to {key} (its guides: "
                         f"{', '.join(available)})")
    return chosen


def builtin_subject(args, family: str) -> Subject:
    values, train = family_settings(args, family)
    likelihood = models.REGISTRY[family][1].likelihood
    data = _cli.data_spec(args, likelihood).load(likelihood)

    def build(guide: str):
        torch.manual_seed(args.seed)  # every guide starts from the same generative parameters
        return wrap(models.build_model(family, model_config(family, values, guide), data.data_dim, data.n_train),
                    guide, args)

    return Subject(family, data, train, selected(args, GUIDES[family], family), values, build, family == "ppca")


def user_guides(um, x: torch.Tensor, reference: str) -> tuple[tuple[str, ...], list[str]]:
    """The guides that apply to a model of yours (``um``, on its training rows x), and what
    the reasons are, one line each."""
    try:
        site, k, _ = local_latent(um)
    except UsageError as e:
        raise UsageError(f"--model {reference}: the gap study needs one local latent per row ({e})") from None
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


def user_subject(args) -> Subject:
    data = _cli.data_spec(args, None).load(None)
    train = train_config(args, FAMILY_DEFAULTS["user"])
    check_config_for_data(train, data)
    plate = args.plate or DATA_PLATE
    torch.manual_seed(args.seed)
    um = user_model(args.model, args.guide, plate, data.train)
    available, notes = user_guides(um, data.train, args.model)
    if args.guides is not None:
        off = [g for g in args.guides if g not in available]
        if off:
            raise UsageError(f"--guides: {', '.join(off)} does not apply to --model {args.model} ({notes[-1]})")
    initial = {k: v.detach().clone() for k, v in um.state_dict().items()}

    def build(guide: str):
        um.load_state_dict(initial)  # every guide starts from the parameters the model was built with
        torch.manual_seed(args.seed)  # and a guide's own parameters (a flow's) from the same seed
        return wrap(um, guide, args)

    config = {"model": args.model, "guide": args.guide or "its own", "plate": plate}
    return Subject(args.model, data, train, selected(args, available, args.model), config, build, notes=notes)


def subjects(args) -> list[Subject]:
    """Every model under study, everything checked (nothing trained)."""
    user = is_reference(args.model)
    if not user and args.model not in FAMILIES + ("all",):
        raise UsageError(f"--model {args.model!r}: choose one of {', '.join(FAMILIES)}, all, or give yours as "
                         "FILE.py:NAME")
    if user:
        given = [_cli.flag(f) for f in MODEL_FIELDS if getattr(args, f) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} configure the built-in models, not --model {args.model}")
    else:
        for name in ("guide", "plate"):
            if getattr(args, name) is not None:
                raise UsageError(f"--{name} applies to a model of yours (--model FILE.py:NAME), not --model "
                                 f"{args.model}")
    out = [user_subject(args)] if user else [builtin_subject(args, f) for f in
                                             (FAMILIES if args.model == "all" else (args.model,))]
    for sub in out:
        check_config_for_data(sub.train, sub.data)
        for guide in sub.guides:  # the Configs against the data (latent_dim <= d), the guides' settings
            sub.build(guide)
        if args.local_particles * sub.data.data_dim > (1 << 27):
            raise UsageError(f"--local-particles {args.local_particles} x {sub.data.data_dim} data dimensions "
                             "is too large for one tensor")
    return out


def closed_form_gap(model, family: str) -> float | None:
    """PPCA: the approximation gap of the guide's family in closed form at the fitted
    parameters (0 for a full covariance; the KL from the best diagonal Gaussian to the
    exact posterior, the same for every row)."""
    if family != "ppca":
        return None
    from elbolab.models import ppca

    base = model.base if isinstance(model, LocalGuide) else model
    _, cov = base.exact_posterior(torch.zeros(1, base.data_dim))
    q = guide_posterior(model, torch.zeros(1, base.data_dim), torch.zeros(1, dtype=torch.long))
    if isinstance(q, torch.distributions.MultivariateNormal):
        return 0.0
    zero = torch.zeros(base.latent_dim, dtype=torch.float64)
    return float(ppca.kl_gaussians(zero, ppca.best_mean_field(cov), zero, cov))


def local_settings(args) -> LocalSettings:
    return LocalSettings(lr=args.local_lr, decay=args.local_decay, n_particles=args.local_particles,
                         window=args.local_window, patience=args.local_patience, max_steps=args.local_max_steps,
                         flow_lr=args.local_flow_lr)


def ais_settings(args) -> AISSettings:
    return AISSettings(when=args.ais, steps=args.ais_steps, chains=args.ais_chains, leapfrog=args.ais_leapfrog,
                       bdmc_rows=args.bdmc_rows, tolerance=args.bdmc_tolerance)


# ----------------------------------------------------------------------------- one guide


def study_guide(sub: Subject, guide: str, splits: dict, args) -> dict:
    model = sub.build(guide)
    t0 = time.perf_counter()
    result = fit(model, sub.data, sub.train)
    train_seconds = time.perf_counter() - t0
    out: dict = {"training": {"steps": result.steps, "epochs": result.epochs, "seconds": train_seconds,
                              "final_train_loss": result.final_loss}}
    out.update(study(model, sub.data.train, splits, args.n_samples, local_settings(args), seed=args.seed,
                     log=lambda line: print(f"[{sub.key}/{guide}] {line}", file=sys.stderr),
                     ais=ais_settings(args)))
    cf = closed_form_gap(model, sub.key)
    if cf is not None:
        for split in splits:
            out[split]["approximation_gap_closed_form"] = cf
    return out


# ----------------------------------------------------------------------------- report


def pm(e: dict, digits: int = 3) -> str:
    return f"{e['mean']:.{digits}f} ± {e['se']:.{digits}f}"


def flagged(e: dict, digits: int = 3) -> str:
    """± with a dagger where the number is flagged unreliable."""
    return pm(e, digits) + (DAGGER if e.get("reliable") is False else "")


def seconds(s: float) -> str:
    return f"{s:.2g}"


ESTIMATORS = {"exact": "exact", "is": "IS", "ais": "AIS"}


def family_lines(key: str, res: dict, data_name: str, n_samples: int, ais: AISSettings) -> list[str]:
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


# ----------------------------------------------------------------------------- main


@_cli.guarded(PROG)
def main(argv: list[str] | None = None, on_trained: Callable[[str, str], None] | None = None) -> int:
    """``on_trained(family, guide)`` is called after each guide's study (report.py's progress bar)."""
    args = build_parser().parse_args(argv)
    if args.local_patience < 0:
        raise UsageError(f"--local-patience must be >= 0, got {args.local_patience}")
    if args.local_decay > 1:
        raise UsageError(f"--local-decay must be in (0, 1], got {args.local_decay}")
    ais = ais_settings(args)
    run_dir = RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL)
    run_dir.check()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tune_malloc()
    subs = subjects(args)  # everything checked before any training
    for sub in subs:
        for note in sub.notes:
            print(f"[{sub.key}] {note}", file=sys.stderr)
    t_start = time.perf_counter()
    cmd = "elbolab compare-guides " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {}
    with run_dir:
        for sub in subs:
            splits = eval_rows(sub.data, args.n_rows, args.seed)
            results[sub.key] = {"model_config": sub.config, "train_config": sub.train.to_dict(),
                                "data": sub.data.describe(), "exact_log_likelihood": sub.exact, "notes": sub.notes,
                                "guides": {}}
            for guide in sub.guides:
                print(f"[{sub.key}/{guide}] training ...", file=sys.stderr)
                results[sub.key]["guides"][guide] = study_guide(sub, guide, splits, args)
                if on_trained is not None:
                    on_trained(sub.key, guide)
        wall = time.perf_counter() - t_start
        data_name = subs[0].data.name
        lines = [f"# Amortized, semi-amortized, per-datapoint and flow guides on {data_name}", "",
                 f"Command: `{cmd.strip()}`", "",
                 "Nats per datapoint; ± one standard error over rows (the gaps: of the per-row differences). "
                 "inference gap = log p(x) - L[q] = approximation gap (log p(x) - L[q*]) + amortization gap "
                 "(L[q*] - L[q]); q* is the per-row optimum of the guide's family for the fixed model "
                 f"(Adam, rate {args.local_lr} decayed by {args.local_decay} per window without improvement, "
                 f"{args.local_particles} draws, windows of {args.local_window} steps, patience "
                 f"{args.local_patience}; the flow family: a flow per row with {args.flow_layers} steps of "
                 f"{args.flow_hidden} units, from the encoder's Gaussian, rate {args.local_flow_lr}). A "
                 "per-datapoint guide cannot infer test rows: there q is the "
                 "local optimization from N(0, I), so its amortization gap is 0 by construction. "
                 "Infer: wall time of the guide's pass over the rows (or of the optimization) per row.", ""]
        for sub in subs:
            lines += family_lines(sub.key, results[sub.key], data_name, args.n_samples, ais)
        lines += ["![gap decomposition](gaps.png)", "", f"_Wall time {wall:.0f} s, "
                  f"{torch.get_num_threads()} thread(s)._", ""]
        metrics = {"command": cmd.strip(), "units": "nats per datapoint", "n_samples": args.n_samples,
                   "n_rows": args.n_rows, "seed": args.seed, "wall_seconds": wall,
                   "threads": torch.get_num_threads(),
                   "semi_amortized": {"steps": args.semi_steps, "step_size": args.semi_step_size,
                                      "n_particles": args.semi_particles, "natural": not args.semi_plain_gradient,
                                      "differentiable": not args.semi_first_order},
                   "flow": {"layers": args.flow_layers, "hidden": args.flow_hidden},
                   "local": asdict(local_settings(args)), "ais": asdict(ais),
                   "models": results}
        gap_chart(results, run_dir.file("gaps.png"),
                  f"Inference-gap decomposition on {data_name} ({args.n_rows} rows per split)")
        save_json(metrics, run_dir.file("metrics.json"))
        with atomic_write(run_dir.file("compare.md")) as f:
            f.write("\n".join(lines))
    print("\n".join(lines[lines.index("") + 1:]).split("![gap")[0].rstrip())
    print(f"-> {args.out}/compare.md, metrics.json, gaps.png ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
