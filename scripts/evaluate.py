"""Re-evaluate a trained run: the importance-sampled log-likelihood with K samples per
row, the ELBO, reconstruction and KL terms from the same draws, and the active units.

Rebuilds the model from RUN_DIR/config.json and RUN_DIR/checkpoint.ckpt and writes
DIR/evaluation.json (DIR = --out, by default RUN_DIR) atomically, with the Pareto k of
each row's importance weights summarized and flagged (and plotted in
DIR/evaluation_pareto_k.png); the run's own metrics.json is never touched. Numbers
are nats per datapoint, each a mean over the rows with its standard error.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from elbolab.inference.diagnostics import ParetoK, reliability_note
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import active_units, importance_estimates
from elbolab.inference.files import save_json
from elbolab.inference.traces import infers_new_rows, latent_names
from elbolab.inference.runs import LoadedRun
from elbolab.scripts import _cli

PROG = "elbolab evaluate"
EVALUATION = "evaluation.json"

EXAMPLES = """examples:
  elbolab evaluate runs/vae --n-samples 5000
  elbolab evaluate runs/vae --n-samples 100 --split val --out runs/vae-eval
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by scripts.fit")
    p.add_argument("--n-samples", type=_cli.positive_int, default=5000, help="importance samples K per row")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="rows to evaluate (a per-datapoint guide knows only the training rows)")
    p.add_argument("--max-rows", type=_cli.positive_int, default=None, help="evaluate the first N rows only")
    p.add_argument("--batch-size", type=_cli.positive_int, default=None,
                   help="rows per chunk (default: chosen from the data dimension)")
    p.add_argument("--threads", type=_cli.positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", metavar="DIR", default=None, help=f"where {EVALUATION} goes (default: RUN_DIR)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the importance draws")
    return p


def evaluate(run: LoadedRun, split: str, n_samples: int, seed: int = 0, max_rows: int | None = None,
             batch_size: int | None = None, per_row: bool = False, pareto: ParetoK | None = None) -> dict:
    """The evaluation record of a run (what evaluation.json holds); ``per_row`` adds each
    row's log-likelihood estimate (for paired comparisons of runs on the same rows).
    ``pareto``: a ParetoK to fill with each row's k (one is made if not given)."""
    data, model = run.data, run.model
    x = getattr(data, split)
    rows = None
    if split == "train":
        rows = torch.arange(data.n_train)
        if data.binarize == "dynamic":  # one fixed draw of the training rows' binarization
            x = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    elif not infers_new_rows(model, data.train):
        raise UsageError(f"{run.path}: the run's guide is per-datapoint and cannot infer {split} rows; "
                         "use --split train")
    if x.shape[0] == 0:
        raise UsageError(f"{run.path}: the {split} split has no rows")
    if max_rows is not None:
        x = x[:max_rows]
        rows = None if rows is None else rows[:max_rows]
    t0 = time.perf_counter()
    pareto = ParetoK() if pareto is None else pareto
    est = importance_estimates(model, x, n_samples, rows, seed=seed, batch_size=batch_size, on_log_weights=pareto)
    seconds = time.perf_counter() - t0
    out = {
        "run": os.path.abspath(run.path), "model": run.spec.model, "checkpoint_step": run.step,
        "split": split, "n_rows": int(x.shape[0]), "n_samples": n_samples, "seed": seed,
        "units": "nats per datapoint",
        "log_likelihood": {**est["log_likelihood"].to_dict(), "pareto_k": pareto.summary()},
        "elbo": est["elbo"].to_dict(), "recon": est["recon"].to_dict(), "kl": est["kl"].to_dict(),
        "seconds": seconds,
    }
    if len(latent_names(model, x[:1], None if rows is None else rows[:1])[0]) == 1:
        out["active_units"] = active_units(model, x, rows)
    if per_row:
        out["log_likelihood_per_row"] = [float(v) for v in est["log_likelihood"].values]
    return out


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run, out_dir = _cli.open_run(args.run_dir, args.out, args.threads)
    pareto = ParetoK()
    result = evaluate(run, args.split, args.n_samples, args.seed, args.max_rows, args.batch_size, pareto=pareto)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, EVALUATION)
    save_json(result, path)
    from elbolab.inference.diagnostic_plots import pareto_k_plot

    pareto_k_plot(pareto.values, os.path.join(out_dir, "evaluation_pareto_k.png"),
                  f"{run.spec.model} {args.split} rows: Pareto k of each row's importance weights", args.n_samples)
    ll, elbo = result["log_likelihood"], result["elbo"]
    line = (f"{run.spec.model} {args.split} ({result['n_rows']} rows): log-likelihood (K = {args.n_samples}) "
            f"{ll['mean']:.3f} ± {ll['se']:.3f} [{reliability_note(ll['pareto_k'])}], "
            f"ELBO {elbo['mean']:.3f} ± {elbo['se']:.3f} nats/datapoint")
    if "active_units" in result:
        au = result["active_units"]
        line += f", {au['active_units']}/{au['latent_dim']} active units"
    print(f"{line} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
