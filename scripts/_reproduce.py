"""What the reproduction programs share: the MNIST data spec, one training run per
model (through ``inference.runs.fit_run``, so every run directory is a normal run that
``elbolab evaluate`` can read again), reuse of finished runs, and markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import sys

from elbolab.inference.errors import UsageError
from elbolab.inference.files import atomic_write, save_json
from elbolab.inference.train_config import TrainConfig
from elbolab.inference.runs import RunSpec, fit_run
from elbolab.scripts import _cli

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


def mnist_spec(data_dir: str) -> dict:
    """All 60,000 training images (no validation rows: both protocols train on all of
    them), dynamically binarized; the 10,000 test images binarized once with a seed."""
    return {"dataset": "mnist", "data_dir": data_dir, "data_path": None, "binarize": "dynamic", "val_fraction": 0.0}


def check_out(args) -> None:
    if args.overwrite and args.reuse:
        raise UsageError("--overwrite and --reuse exclude each other")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a directory")
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


def pm(mean: float, se: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def write(out: str, lines: list[str], metrics: dict) -> None:
    with atomic_write(os.path.join(out, "table.md")) as f:
        f.write("\n".join(lines) + "\n")
    save_json(metrics, os.path.join(out, "metrics.json"))
