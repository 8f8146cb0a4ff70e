"""Fit a model by stochastic variational inference and write a run directory.

Writes into --out DIR: config.json (everything needed to rebuild the run),
checkpoint.ckpt, history.csv (per step), metrics.json (train / validation / test
ELBO in nats per datapoint with standard errors, steps, seconds, the config, and a
model's exact numbers where it has them) and loss_curve.png. With an amortized guide
also the importance-sampled test log-likelihood (K = --n-samples draws per row;
under ``test_log_likelihood``, or ``test_log_likelihood_is`` beside a model's exact
value) and the active units; for image models prior_samples.png,
reconstructions.png and latent_means.png.

Several processes (--devices N [--num-nodes M] --strategy ddp): each trains on
its shard of every global mini-batch of N*M*batch-size rows; the evaluation is
split over the processes and gathered; only rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from elbolab import models
from elbolab.inference.errors import UsageError
from elbolab.inference import distributed
from elbolab.inference.diagnostics import ParetoK, compose, reliability_note
from elbolab.inference.evaluate import (IWAELadder, active_units, elbo_estimate, elbo_terms, global_latent_sites,
                                 importance_estimates, tune_malloc)
from elbolab.inference.files import save_json
from elbolab.inference.traces import infers_new_rows, latent_names
from elbolab.models.protocol import ClosedForms
from elbolab.inference.checkpoints import CHECKPOINT, check_checkpoint
from elbolab.inference.train import check_objective_for_model, fit
from elbolab.inference.train_config import MAX_TENSOR_ELEMENTS, TrainConfig, check_config_for_data, rows_per_batch
from elbolab.scripts import _cli

PROG = "elbolab fit"
MODEL_FLAGS = {  # CLI flag -> Config field; a flag the chosen model has no field for is an error
    "guide": "guide", "latent_dim": "latent_dim", "hidden": "hidden", "activation": "activation",
    "n_components": "n_components", "prior": "prior",
}
RESUME_FLAGS = {"epochs", "steps", "threads", "progress", "resume", "n_samples"}
N_SAMPLES = 1000  # default importance samples per row for the test log-likelihood

EXAMPLES = """examples:
  elbolab fit --model ppca --latent-dim 10 --out runs/ppca
  elbolab fit --model ppca --data X.npy --latent-dim 3 --out runs/mine
  elbolab fit --model gaussian --data X.npy --guide structured --steps 400 --lr 0.1 --lr-final 1e-4 \\
      --n-particles 8 --out runs/bayes
  elbolab fit --model vae --objective iwae --n-particles 5 --out runs/vae
  elbolab fit --model gmvae --dataset mnist --data-dir ../shared/data/mnist \\
      --hidden 300,300 --activation elu --latent-dim 10 --n-components 500 --steps 20000 --out runs/gmvae
  elbolab fit --resume runs/ppca --epochs 50
  elbolab fit --model ppca --devices 2 --strategy ddp --batch-size 50 --out runs/ddp
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ppca", choices=models.model_names(), help="model family")
    g.add_argument("--guide", default=None, help="guide family (the model's default if omitted; "
                   "ppca: amortized-full, amortized-diag, per-datapoint, per-datapoint-full; "
                   "gaussian: mean-field, full-rank, structured)")
    g.add_argument("--prior", default=None, help="gaussian: normal-wishart (default), normal-gamma (1-D data), "
                   "known-scale")
    g.add_argument("--latent-dim", type=_cli.positive_int, default=None, help="latent dimension k")
    g.add_argument("--hidden", type=_cli.int_list, default=None, help="hidden layer sizes, e.g. 300,300")
    g.add_argument("--activation", default=None, help="hidden activation: relu, elu, tanh, softplus")
    g.add_argument("--n-components", type=_cli.positive_int, default=None, help="mixture prior components")
    _cli.add_data_args(p)
    _cli.add_train_args(p)
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-particles", type=_cli.positive_int, default=10,
                   help="samples per datapoint for the reported ELBO (models with global latents, "
                        "e.g. gaussian: draws of the whole set's ELBO)")
    e.add_argument("--n-samples", type=_cli.positive_int, default=N_SAMPLES,
                   help="importance samples K per row for the test log-likelihood (amortized guides)")
    _cli.add_out_args(p, resume=True)
    return p


def _spec_from_args(p, args) -> dict:
    model_cls = models.config_class(args.model)
    fields = set(model_cls.__dataclass_fields__)
    values = {}
    for flag, field in MODEL_FLAGS.items():
        v = getattr(args, flag)
        if v is None:
            continue
        if field not in fields:
            raise UsageError(f"--{flag.replace('_', '-')} does not apply to --model {args.model}")
        values[field] = v
    model_config = models.make_config(args.model, values)  # validates
    train = TrainConfig.from_dict(_cli.train_values(args))  # validates
    likelihood = models.REGISTRY[args.model][1].likelihood
    return {"model": args.model, "model_config": models.config_to_dict(model_config),
            "train": train.to_dict(), "data": _cli.data_spec(args, likelihood),
            "eval": {"eval_particles": args.eval_particles, "n_samples": args.n_samples}}


def _resume_spec(p, args, argv) -> dict:
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
             if a.startswith("--")}
    extra = sorted(given - RESUME_FLAGS - {"no_progress"})
    if extra:
        raise UsageError(f"--resume uses the run's own config.json; these flags cannot change it: "
                         + ", ".join("--" + e.replace("_", "-") for e in extra))
    path = os.path.join(args.resume, "config.json")
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--resume {args.resume}: no config.json there (not a run directory)") from None
    except (OSError, ValueError) as e:  # JSON and UTF-8 decoding errors are ValueErrors
        raise UsageError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    _check_spec(spec, path)
    for key in ("epochs", "steps", "threads", "progress"):
        if key in given or (key == "progress" and "no_progress" in given):
            spec["train"][key] = getattr(args, key)
    if "n_samples" in given:
        spec["eval"]["n_samples"] = args.n_samples
    if "steps" in given:
        spec["train"]["epochs"] = None
    _check_spec(spec, path)
    return spec


def _check_spec(spec, path: str) -> None:
    """A run's config.json, read back: the right shape and values, or one UsageError naming it."""
    shape = {"model": str, "model_config": dict, "train": dict, "data": dict, "eval": dict}
    if not isinstance(spec, dict) or any(not isinstance(spec.get(k), t) for k, t in shape.items()):
        raise UsageError(f"{path}: not an elbolab run config (needs {', '.join(shape)})")
    data, text = spec["data"], (str, type(None))
    kinds = {"dataset": str, "binarize": str, "data_path": text, "data_dir": text, "val_fraction": (int, float)}
    bad = [k for k, t in kinds.items() if not isinstance(data.get(k, None if k != "val_fraction" else 0.1), t)]
    k = spec["eval"].get("eval_particles")
    if bad or not isinstance(k, int) or k < 1:
        raise UsageError(f"{path}: bad value(s) for {', '.join(bad) or 'eval_particles'}")
    try:
        models.make_config(spec["model"], spec["model_config"])
        TrainConfig.from_dict(spec["train"])
    except (UsageError, models.ConfigError) as e:
        raise UsageError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"{path}: not a usable run config ({type(e).__name__}: {str(e)[:120]})") from None


def run(spec: dict, out: str, overwrite: bool, resume: bool) -> dict:
    train = TrainConfig.from_dict(spec["train"])
    model_cls = models.REGISTRY[spec["model"]][1]
    data = _cli.load_data(spec["data"], model_cls.likelihood)
    check_config_for_data(train, data)
    k = spec["eval"]["eval_particles"]
    if k * data.data_dim > MAX_TENSOR_ELEMENTS:
        raise UsageError(f"--eval-particles {k} x {data.data_dim} data dimensions is more than the "
                         f"{MAX_TENSOR_ELEMENTS:.3g} values allowed in one tensor; lower --eval-particles")
    torch.manual_seed(train.seed)
    model = models.build_model(spec["model"], spec["model_config"], data.data_dim, data.n_train)
    check_objective_for_model(model, data, train)
    # under DDP every process runs this; only (global) rank 0 locks and writes the directory
    run_dir = _cli.RunDir(out, overwrite=overwrite, resume=resume, rank=distributed.launch_rank(train.devices))
    if resume and os.path.isfile(run_dir.file(CHECKPOINT)):
        check_checkpoint(run_dir.file(CHECKPOINT), model)  # refused before anything is written
    with run_dir:
        if overwrite and not resume and run_dir.rank == 0:
            for name in ("checkpoint.ckpt", "metrics.json", "history.csv"):
                if os.path.exists(run_dir.file(name)):
                    os.unlink(run_dir.file(name))
        spec = {**spec, "data_info": data.describe()}
        if run_dir.rank == 0:
            save_json(spec, run_dir.file("config.json"))
        t0 = time.perf_counter()
        # a run killed before its first checkpoint resumes from the start: nothing was saved
        from_checkpoint = resume and os.path.isfile(run_dir.file(CHECKPOINT))
        result = fit(model, data, train, out_dir=out, resume=from_checkpoint)
        pareto = ParetoK()  # the Pareto k of each test row's importance weights (if any are drawn)
        metrics = evaluate_run(model, data, spec, result, pareto=pareto)  # every rank takes part
        metrics["wall_seconds"] = time.perf_counter() - t0
        metrics["world_size"], metrics["rank_param_diff"] = result.world_size, result.rank_param_diff
        if distributed.rank_and_world()[0] != 0:
            return metrics
        save_json(metrics, run_dir.file("metrics.json"))
        from elbolab.inference.plots import loss_curve, model_pictures

        ref = metrics.get("mle_log_likelihood")
        loss_curve(result.history, result.validations, run_dir.file("loss_curve.png"),
                   title=f"{spec['model']} / {train.objective} on {data.name}", reference=ref,
                   reference_label="closed-form max log-likelihood" if ref is not None else "")
        model_pictures(model, data, out, name=f"{spec['model']} / {train.objective}", seed=train.seed)
        if pareto.n:
            from elbolab.inference.diagnostic_plots import pareto_k_plot

            pareto_k_plot(pareto.values, run_dir.file("pareto_k.png"), f"{spec['model']} / {train.objective} on "
                          f"{data.name}: Pareto k of each test row's importance weights", pareto.n_samples)
    return metrics


def evaluate_run(model, data, spec, result, pareto: ParetoK | None = None) -> dict:
    """The reported numbers: ELBO (and its terms) per datapoint on each split."""
    k = spec["eval"]["eval_particles"]
    model.eval()
    splits = {"train": (data.train, torch.arange(data.n_train))}
    new_rows = infers_new_rows(model, data.train)
    if new_rows:
        splits.update({"val": (data.val, None), "test": (data.test, None)})
    metrics: dict = {
        "model": spec["model"], "config": spec, "data": data.describe(),
        "steps": result.steps, "epochs": result.epochs, "seconds": result.seconds,
        "stopped_early": result.stopped_early, "final_train_loss": result.final_loss,
        "units": "nats per datapoint",
    }
    if data.binarize == "dynamic":
        # the training rows evaluated at one fixed draw of their binarization
        g = torch.Generator().manual_seed(0)
        splits["train"] = (torch.bernoulli(data.train, generator=g), splits["train"][1])
    global_latents = bool(global_latent_sites(model, data.train[:2], torch.arange(2)))
    for i, (name, (x, rows)) in enumerate(splits.items()):
        if x.shape[0] == 0:
            continue
        if global_latents:  # no per-row ELBO: the whole set's, over k draws of the globals
            torch.manual_seed(distributed.chunk_seed(spec["train"]["seed"] + 1, i))
            est = elbo_estimate(model, x, rows, n_particles=k)
        else:  # rows split over the processes (if several); each chunk of rows has its own seed
            est = distributed.estimate_rows(lambda xb, rb: elbo_terms(model, xb, rb, k), x, rows,
                                            chunk_size=rows_per_batch(k, data.data_dim),
                                            seed=distributed.chunk_seed(spec["train"]["seed"] + 1, i))
        metrics[f"{name}_elbo"] = est["elbo"].to_dict()
        metrics[f"{name}_recon"] = est["recon"].to_dict()
        metrics[f"{name}_kl"] = est["kl"].to_dict()
    if isinstance(model, ClosedForms):
        metrics.update(model.closed_form_metrics(data))
    if "train_log_evidence" in metrics and "train_elbo" in metrics:
        # an exact log evidence log p(X) (global latents): its gap to the ELBO is KL(q || p(theta | X))
        elbo = metrics["train_elbo"]
        kl = metrics["train_log_evidence"] - elbo["mean"]
        metrics["train_kl_to_posterior"] = {"mean": kl, "se": elbo["se"], "total_nats": kl * data.n_train}
    if new_rows and not global_latents and data.test.shape[0]:
        metrics.update(test_likelihood_metrics(model, data.test, spec["eval"].get("n_samples", N_SAMPLES),
                                               seed=spec["train"]["seed"] + 2, exact="test_log_likelihood" in metrics,
                                               pareto=pareto))
    return metrics


def test_likelihood_metrics(model, x, n_samples: int, seed: int, exact: bool = False,
                            pareto: ParetoK | None = None) -> dict:
    """The importance-sampled test log-likelihood (K = n_samples) with its standard error;
    from the same draws the ELBO, its reconstruction and KL terms and the IWAE_m bounds
    for m = 1, 10, 100, ... dividing K (``test_importance``); and the active units.
    The log-likelihood goes under ``test_log_likelihood``, or ``test_log_likelihood_is``
    when the model already reported its exact value under that name (``exact``).
    Both carry ``pareto_k``: the Pareto k of each row's K importance weights, summarized
    (``inference.diagnostics.ParetoK``, also left in ``pareto`` when given), with the
    flag ``reliable``."""
    sizes = tuple(m for m in (10**i for i in range(7)) if m <= n_samples and n_samples % m == 0)
    ladder = IWAELadder(int(x.shape[0]), sizes)
    pareto = ParetoK() if pareto is None else pareto
    est = importance_estimates(model, x, n_samples, seed=seed, on_log_weights=compose(ladder, pareto))
    key = "test_log_likelihood_is" if exact else "test_log_likelihood"
    pareto_k = pareto.summary()
    out = {key: {**est["log_likelihood"].to_dict(), "n_samples": n_samples, "pareto_k": pareto_k},
           "test_importance": {"n_samples": n_samples, **{t: est[t].to_dict() for t in ("elbo", "recon", "kl")},
                               "iwae": {str(m): e.to_dict() for m, e in ladder.estimates().items()},
                               "pareto_k": pareto_k}}
    if len(latent_names(model, x[:1])[0]) == 1:
        au = active_units(model, x)
        out["test_active_units"] = {k: au[k] for k in ("active_units", "latent_dim", "threshold")}
    return out


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    tune_malloc()
    if args.resume:
        spec = _resume_spec(p, args, argv)
        out, overwrite, resume = args.resume, False, True
    else:
        if args.out is None:
            raise UsageError("--out DIR is required (or --resume DIR)")
        spec = _spec_from_args(p, args)
        out, overwrite, resume = args.out, args.overwrite, False
    metrics = run(spec, out, overwrite, resume)
    if distributed.rank_and_world()[0] != 0:
        return 0
    line = f"{spec['model']}: train ELBO {metrics['train_elbo']['mean']:.3f} ± {metrics['train_elbo']['se']:.3f}"
    if "test_elbo" in metrics:
        line += f", test ELBO {metrics['test_elbo']['mean']:.3f} ± {metrics['test_elbo']['se']:.3f}"
    ll = metrics.get("test_log_likelihood")
    if isinstance(ll, dict):
        line += f", test log-likelihood (K = {ll['n_samples']}) {ll['mean']:.3f} ± {ll['se']:.3f}"
        if ll.get("pareto_k"):
            line += f" [{reliability_note(ll['pareto_k'])}]"
    line += f" nats/datapoint; {metrics['steps']} steps in {metrics['seconds']:.1f} s -> {out}/metrics.json"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
