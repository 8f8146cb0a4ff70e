"""What the reproduction programs share: the MNIST data spec, one training run per
model (through ``inference.runs.fit_run``, so every run directory is a normal run that
``elbolab evaluate`` can read again), reuse of finished runs, the AIS estimate beside
importance sampling on some test images, and markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from elbolab.inference.ais import Budget
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import Estimate
from elbolab.inference.files import atomic_write, save_json
from elbolab.inference.metrics import from_estimate
from elbolab.inference.train_config import TrainConfig
from elbolab.inference.runs import RunSpec, evaluate_split, fit_run, read_run
from elbolab.scripts import _cli

AIS_FILE = "ais.json"  # in each run directory: AIS beside importance sampling on the first test images
# AIS's default budget: 100 images, T = 500, M = 8 (L = 5) costs ~1.2 s per image for the CS236 VAE (~1.5 s for
# its GMVAE, ~0.8 s for the IWAE paper's model) on one thread, within a fifth of either full reproduction's time
AIS_ROWS, AIS_STEPS, AIS_CHAINS = 100, 500, 8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MNIST = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "mnist"))


def add_common_args(p: argparse.ArgumentParser, out: str, *, data_dir: bool = True,
                    out_help: str = "where table.md, metrics.json and one run per model go",
                    finished: str = "metrics.json") -> None:
    if data_dir:
        p.add_argument("--data-dir", metavar="DIR", default=DEFAULT_MNIST,
                       help="MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
    p.add_argument("--out", metavar="DIR", default=out, help=out_help)
    p.add_argument("--threads", type=_cli.positive_int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="random seed of every run")
    p.add_argument("--overwrite", action="store_true", help="retrain every run in a non-empty --out")
    p.add_argument("--reuse", action="store_true",
                   help=f"keep the runs in --out that finished (their {finished} exists); train the others")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")


def add_ais_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("annealed importance sampling (AIS) beside importance sampling")
    g.add_argument("--ais-rows", type=_non_negative, default=AIS_ROWS,
                   help="the first N test images on which AIS estimates each model's log-likelihood beside "
                        "importance sampling (0: no AIS)")
    g.add_argument("--ais-steps", type=_cli.positive_int, default=AIS_STEPS,
                   help="AIS annealing steps T (sigmoid schedule, from the encoder)")
    g.add_argument("--ais-chains", type=_cli.positive_int, default=AIS_CHAINS, help="AIS chains M per image")


def _non_negative(text: str) -> int:
    v = _cli.integer(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def mnist_spec(data_dir: str) -> dict:
    """All 60,000 training images (no validation rows: both protocols train on all of
    them), dynamically binarized; the 10,000 test images binarized once with a seed."""
    return {"dataset": "mnist", "data_dir": data_dir, "data_path": None, "binarize": "dynamic", "val_fraction": 0.0}


def check_out(args) -> None:
    if args.overwrite and args.reuse:
        raise UsageError("--overwrite and --reuse exclude each other")
    if os.path.isdir(args.out) and os.listdir(args.out) and not (args.overwrite or args.reuse):
        raise UsageError(f"--out {args.out}: the directory is not empty; pass --reuse to keep its finished runs "
                         "or --overwrite to retrain them")
    if not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot create it ({e.strerror})") from None


def train(name: str, model: str, model_config: dict, train_config: TrainConfig, data_spec: dict,
          n_samples: int, args) -> dict:
    """Train (or, with --reuse, read back) the run ``args.out/name``; returns its metrics."""
    run_dir = os.path.join(args.out, name)
    metrics_path = os.path.join(run_dir, "metrics.json")
    spec = {"model": model, "model_config": model_config, "train": train_config.to_dict(), "data": data_spec,
            "eval": {"eval_particles": 10, "n_samples": n_samples}}
    if args.reuse and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
        old = metrics["config"]
        if (old["model"], old["model_config"], old["train"]) != (model, model_config, spec["train"]):
            raise UsageError(f"--reuse: {run_dir} was trained with other settings; use --overwrite or another --out")
        print(f"[{name}] reused {metrics_path}", file=sys.stderr)
        return metrics
    print(f"[{name}] training {model} ({train_config.objective}, K = {train_config.n_particles}) ...", file=sys.stderr)
    metrics = fit_run(RunSpec.from_dict(spec, name), run_dir, overwrite=True, resume=False)
    print(f"[{name}] {metrics['run']['steps']} steps in {metrics['run']['seconds']:.0f} s", file=sys.stderr)
    return metrics


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """The mean of the per-row differences a - b and its standard error."""
    d = Estimate.of(torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64))
    return d.mean, d.se


def ais_beside_is(name: str, args, n_samples: int, is_eval: dict | None = None) -> dict | None:
    """AIS on the first ``--ais-rows`` test images of the run ``args.out/name`` (from its
    encoder; T = ``--ais-steps``, M = ``--ais-chains``, L = 5; ``runs.evaluate_split``)
    beside the importance-sampled log-likelihood with ``n_samples`` per image on the same
    images (``is_eval``: an evaluation of the run with per-row values whose first rows
    are those images; otherwise computed here, with the run's own test seed), and their
    paired difference AIS - IS. Written to the run's ``ais.json``; with --reuse a file of
    the same settings is read back. None when --ais-rows is 0."""
    if args.ais_rows == 0:
        return None
    run_dir = os.path.join(args.out, name)
    path = os.path.join(run_dir, AIS_FILE)
    budget = Budget(args.ais_steps, args.ais_chains)
    settings = {"rows": args.ais_rows, **budget.kwargs(), "is_samples": n_samples}
    if args.reuse and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("settings") == settings:
            return old
    print(f"[{name}] AIS ({budget.label()}) on the first {args.ais_rows} test images ...", file=sys.stderr)
    run = read_run(run_dir)
    ais = evaluate_split(run, "test", max_rows=args.ais_rows, per_row=True, estimator="ais", ais=budget)
    if is_eval is None or len(is_eval["log_likelihood_per_row"]) < ais["n_rows"]:
        is_eval = evaluate_split(run, "test", n_samples, max_rows=args.ais_rows, per_row=True)
    is_rows = is_eval["log_likelihood_per_row"][: ais["n_rows"]]
    is_ll = from_estimate(Estimate.of(torch.tensor(is_rows, dtype=torch.float64)), method="importance",
                          K=is_eval["n_samples"], bound="lower")
    diff = paired(ais["log_likelihood_per_row"], is_rows)
    record = {"settings": settings, "n_rows": ais["n_rows"], "ais": ais["quantities"]["log_likelihood"],
              "ais_stats": ais["ais"], "is": is_ll, "ais_minus_is": {"value": diff[0], "se": diff[1]},
              "seconds": ais["ais"]["seconds"]}
    save_json(record, path)
    return record


def ais_lines(records: dict, args) -> list[str]:
    """The table of AIS beside importance sampling, one row per model (``records``: label ->
    ``ais_beside_is``'s record), negative log-likelihoods in nats; [] when there is none."""
    records = {k: r for k, r in records.items() if r is not None}
    if not records:
        return []
    some = next(iter(records.values()))
    n, k = some["n_rows"], some["settings"]["is_samples"]
    rows = [[label, pm(-r["ais"]["value"], r["ais"]["se"]), f"{r['ais_stats']['mc_se_of_mean']:.3f}",
             pm(-r["is"]["value"], r["is"]["se"]), pm(-r["ais_minus_is"]["value"], r["ais_minus_is"]["se"], 3),
             f"{r['ais_stats']['acceptance_mean']:.2f}", f"{r['seconds']:.0f}"] for label, r in records.items()]
    return [f"Annealed importance sampling on the first {n} test images (T = {args.ais_steps} steps of a sigmoid "
            f"schedule, M = {args.ais_chains} chains per image, L = 5 leapfrog steps per HMC transition, from the "
            f"encoder; a stochastic lower bound of log p(x) like the importance estimate, tighter as T grows) beside "
            f"the {k}-sample importance estimate on the same images. NLL = minus the log-likelihood; the difference "
            "is paired per image (negative: AIS's bound is tighter):", "",
            *table(["model", f"AIS NLL ± s.e. ({n} images)", "AIS Monte Carlo s.e. (chains)",
                    f"IS-{k} NLL, same images", "AIS minus IS (paired)", "HMC acceptance", "AIS seconds"], rows), ""]


def pm(mean: float, se: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def write(out: str, lines: list[str], metrics: dict) -> None:
    with atomic_write(os.path.join(out, "table.md")) as f:
        f.write("\n".join(lines) + "\n")
    save_json(metrics, os.path.join(out, "metrics.json"))
