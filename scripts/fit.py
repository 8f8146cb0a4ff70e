"""Fit a model by stochastic variational inference and write a run directory.

The model is a built-in family (--model ppca | gaussian | vae | gmvae, its Config's
fields as flags) or yours: --model FILE.py:NAME (or package.module:NAME), where NAME is
an object with model(x) and guide(x) methods (e.g. a PyroModule), a class making one
(called with data_dim= and n_data= if it takes them), or a model function with its guide
given by --guide (auto-normal, auto-diagonal-normal, auto-mvn, auto-lowrank-mvn,
auto-delta, or FILE.py:NAME). x is the data matrix (--data, or a built-in data set),
its rows observed inside pyro.plate("data", len(x)) (--plate names another).

Writes into --out DIR: config.json (everything needed to rebuild the run),
checkpoint.ckpt, history.csv (per step), metrics.json (train / validation / test
ELBO in nats per datapoint with standard errors, steps, seconds, the config, and a
model's exact numbers where it has them) and loss_curve.png. With a guide that infers
new rows also the importance-sampled test log-likelihood (K = --n-samples draws per
row, with the Pareto k of each row's weights) and the active units; for image models
prior_samples.png, reconstructions.png and latent_means.png. With --logger csv or
tensorboard also Lightning's logs, in lightning_logs/version_N (the training bound and
the validation ELBO; history.csv is written either way).

Several processes (--devices N [--num-nodes M] --strategy ddp): each trains on
its shard of every global mini-batch of N*M*batch-size rows; the evaluation is
split over the processes and gathered; only rank 0 writes the run directory.
"""

from __future__ import annotations

import dataclasses
import sys

from elbolab import models
from elbolab.inference import distributed
from elbolab.inference.diagnostics import reliability_note
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import tune_malloc
from elbolab.inference.loggers import check_logger
from elbolab.inference.runs import (EVAL_PARTICLES, N_SAMPLES, EvalSpec, RunSpec, distance_to_closed_form, fit_run,
                                    is_reference)
from elbolab.inference.traces import DATA_PLATE
from elbolab.inference.train_config import TrainConfig
from elbolab.scripts import _cli

PROG = "elbolab fit"
# flags --resume may change (the rest come from the run's config.json)
RESUME_FLAGS = {"epochs", "steps", "threads", "progress", "resume", "n_samples"}

EXAMPLES = """examples:
  elbolab fit --model ppca --latent-dim 10 --out runs/ppca
  elbolab fit --model ppca --data X.npy --latent-dim 3 --out runs/mine
  elbolab fit --model gaussian --data X.npy --guide structured --out runs/bayes
  elbolab fit --model vae --objective iwae --n-particles 5 --out runs/vae
  elbolab fit --model gmvae --dataset mnist --data-dir ~/data/mnist \\
      --hidden 300,300 --activation elu --latent-dim 10 --n-components 500 --steps 20000 --out runs/gmvae
  elbolab fit --model my_model.py:MyVAE --data X.npy --out runs/mine       # your PyroModule with model/guide
  elbolab fit --model my_model.py:model --guide auto-mvn --data X.npy --out runs/mine-fn
  elbolab fit --resume runs/ppca --epochs 50          # 50 epochs in all (not 50 more)
  elbolab fit --model ppca --devices 2 --strategy ddp --batch-size 50 --out runs/ddp
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ppca", metavar="NAME",
                   help=f"a built-in family ({', '.join(models.model_names())}) or yours: FILE.py:NAME or "
                        "module:NAME (default: ppca)")
    configs = {name: models.config_class(name) for name in models.model_names()}
    model_fields = _cli.add_config_args(g, configs, exclude=("guide",),
                                        positive=("latent_dim", "n_components"))
    guides = "; ".join(f"{name}: {', '.join(cls.__dataclass_fields__['guide'].metadata['choices'])}"
                       for name, cls in configs.items())
    g.add_argument("--guide", default=None,
                   help=f"guide family of a built-in model (default: its own; {guides}); for a model function of "
                        "yours: auto-normal, auto-diagonal-normal, auto-mvn, auto-lowrank-mvn, auto-delta or "
                        "FILE.py:NAME")
    g.add_argument("--plate", default=None,
                   help=f"your model's plate over the data's rows (default: {DATA_PLATE})")
    _cli.add_data_args(p)
    train_fields = _cli.add_train_args(p, defaults={
        "lr": "what converges for the model: 0.05 for ppca and gaussian, 0.001 for the VAEs, 0.01 for yours",
        "lr_final": "0.001 for ppca, gaussian and yours, none for the VAEs; none when --lr is given",
        "batch_size": "the whole training set up to 5000 rows (10,000 for yours) for ppca, gaussian and yours, "
                      "100 for the VAEs",
        "steps": "500 for ppca (2000 beyond 5000 rows), 1000 for gaussian, 2000 for yours",
        "epochs": "at least 10 and 2000 steps for the VAEs"})
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-particles", type=_cli.positive_int, default=None,
                   help="samples per datapoint for the reported ELBO (models with global latents, "
                        f"e.g. gaussian: draws of the whole set's ELBO) (default: {EVAL_PARTICLES})")
    e.add_argument("--n-samples", type=_cli.positive_int, default=None,
                   help=f"importance samples K per row for the test log-likelihood (default: {N_SAMPLES})")
    _cli.add_out_args(p, resume=True)
    p.set_defaults(model_fields=model_fields, train_fields=train_fields)
    return p


def spec_from_args(args):
    """The run spec of a new run from the flags (every value checked), the training
    settings the user did not give from what converges for the model on this data
    (``models.train_defaults``); and the data, loaded."""
    evals = EvalSpec(args.eval_particles or EVAL_PARTICLES, args.n_samples or N_SAMPLES)
    given = _cli.config_args(args, TrainConfig, args.train_fields)
    if given.get("logger") is not None:
        check_logger(given["logger"], "--logger")
    if is_reference(args.model):
        stray = [n for n in args.model_fields if getattr(args, n) is not None]
        if stray:
            raise UsageError(f"{', '.join(_cli.flag(n) for n in stray)} configure the built-in models, not "
                             f"--model {args.model}")
        config = {"guide": args.guide, "plate": args.plate or DATA_PLATE}
        spec = RunSpec(args.model, config, data=_cli.data_spec(args, None), eval=evals)
        family = None
    else:
        if args.model not in models.REGISTRY:
            raise UsageError(f"--model {args.model!r}: choose one of {', '.join(models.model_names())}, or give "
                             "yours as FILE.py:NAME")
        if args.plate is not None:
            raise UsageError(f"--plate applies to a model of yours, not --model {args.model}")
        cls = models.config_class(args.model)
        values = _cli.config_args(args, cls, args.model_fields, f"--model {args.model}")
        if args.guide is not None:
            values["guide"] = args.guide
        config = models.config_to_dict(models.make_config(args.model, values))
        likelihood = RunSpec(args.model, config).likelihood()  # the Config's: binarize only for Bernoulli
        spec = RunSpec(args.model, config, data=_cli.data_spec(args, likelihood), eval=evals)
        family = args.model
    data = spec.data.load(spec.likelihood())
    defaults = models.train_defaults(family, data.n_train, config if family else None)
    if "steps" in given or "epochs" in given:  # a budget given: the defaults' budget does not apply
        defaults.pop("steps", None)
        defaults["epochs"] = None if "steps" in given else defaults.get("epochs")
    if "lr" in given:
        defaults.pop("lr_final", None)  # a rate given: constant unless --lr-final is given too
    train = {**TrainConfig().to_dict(), **defaults, **given, "seed": args.seed}
    if train["steps"] is None and train["epochs"] is None:
        train["epochs"] = TrainConfig().epochs
    d = spec.to_dict()
    d["train"] = train
    return RunSpec.from_dict(d, "the flags"), data


def resume_spec(args, argv) -> RunSpec:
    """The run's own spec, with the budget, threads, progress and n_samples given."""
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
             if a.startswith("--")}
    extra = sorted(given - RESUME_FLAGS - {"no_progress"})
    if extra:
        raise UsageError("--resume uses the run's own config.json; these flags cannot change it: "
                         + ", ".join(_cli.flag(e) for e in extra))
    spec = RunSpec.read(args.resume)
    train = spec.train.to_dict()
    for key in ("epochs", "steps", "threads", "progress"):
        if key in given or (key == "progress" and "no_progress" in given):
            train[key] = getattr(args, key)
    if "steps" in given:
        train["epochs"] = None
    evals = spec.eval
    if "n_samples" in given:
        evals = dataclasses.replace(evals, n_samples=args.n_samples)
    return RunSpec.from_dict({**spec.to_dict(), "train": train, "eval": dataclasses.asdict(evals)},
                             f"{args.resume}/config.json with the flags given")


def summary_line(spec: RunSpec, metrics: dict, out: str) -> str:
    """What a fit prints: its ELBOs, test log-likelihood (with the reliability of an
    importance-sampled one), convergence verdict and distance to a closed form."""
    q, run = metrics["quantities"], metrics["run"]

    def pm(key: str) -> str:
        e = q[key]
        return f"{e['value']:.3f}" if e["se"] is None else f"{e['value']:.3f} ± {e['se']:.3f}"

    line = f"{spec.model}: train ELBO {pm('train_elbo')}"
    if "test_elbo" in q:
        line += f", test ELBO {pm('test_elbo')}"
    if "test_log_likelihood" in q:
        ll = q["test_log_likelihood"]
        how = "exact" if ll["method"] == "exact" else f"K = {ll['K']}"
        line += f", test log-likelihood ({how}) {pm('test_log_likelihood')}"
        if ll["method"] != "exact":
            line += f" [{reliability_note(metrics['diagnostics'].get('test_pareto_k'))}]"
    line += " nats/datapoint"
    closed = distance_to_closed_form(metrics)
    if closed:
        line += f"; {closed}"
    line += f"; {run['convergence']['verdict']}"
    return line + f"; {run['steps']} steps in {run['seconds']:.1f} s -> {out}/metrics.json"


@_cli.guarded(PROG, resume_flag="--resume")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()
    if args.resume:
        spec = resume_spec(args, argv)
        out, overwrite, resume = args.resume, False, True
    else:
        if args.out is None:
            raise UsageError("--out DIR is required (or --resume DIR)")
        spec, data = spec_from_args(args)
        out, overwrite, resume = args.out, args.overwrite, False
        return _finish(spec, fit_run(spec, out, overwrite, resume, refusal=_cli.REFUSAL_RUN, data=data), out)
    return _finish(spec, fit_run(spec, out, overwrite, resume, refusal=_cli.REFUSAL_RUN), out)


def _finish(spec: RunSpec, metrics: dict, out: str) -> int:
    if distributed.rank_and_world()[0] == 0:
        print(summary_line(spec, metrics, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
