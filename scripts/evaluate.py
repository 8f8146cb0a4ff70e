"""Re-evaluate a trained run: the importance-sampled log-likelihood with K samples per
row, the ELBO, reconstruction and KL terms from the same draws, and the active units.

Rebuilds the model from RUN_DIR/config.json and RUN_DIR/checkpoint.ckpt and writes
DIR/evaluation.json (DIR = --out, by default RUN_DIR) atomically, with the Pareto k of
each row's importance weights summarized and flagged (and plotted in
DIR/evaluation_pareto_k.png); the run's own metrics.json is never touched. Numbers
are nats per datapoint, each a mean over the rows with its standard error.
"""

from __future__ import annotations

import contextlib
import os
import sys

from elbolab.inference.diagnostics import ParetoK, reliability_note
from elbolab.inference.files import save_json
from elbolab.inference.runs import EVALUATION, RunDir, check_value, evaluate_split
from elbolab.inference.train_config import MAX_SEED
from elbolab.scripts import _cli

PROG = "elbolab evaluate"

EXAMPLES = """examples:
  elbolab evaluate runs/vae --n-samples 5000
  elbolab evaluate runs/vae --n-samples 100 --split val --out runs/vae-eval
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by elbolab fit")
    p.add_argument("--n-samples", type=_cli.positive_int, default=5000, help="importance samples K per row")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="rows to evaluate (a per-datapoint guide knows only the training rows)")
    p.add_argument("--max-rows", type=_cli.positive_int, default=None, help="evaluate the first N rows only")
    p.add_argument("--threads", type=_cli.positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"where {EVALUATION} and its figure go (default: RUN_DIR); another directory is "
                        "refused if it holds files, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--seed", type=_cli.integer, default=None,
                   help="random seed of the importance draws (default: the run's own test-set seed, so that "
                        "the test estimate is the one its fit reported)")
    return p


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed is not None:
        check_value("--seed", "value", args.seed, int, low=0, high=MAX_SEED - 1)
    run, out_dir = _cli.open_run(args.run_dir, args.out, args.threads)
    pareto = ParetoK()
    target = None if os.path.abspath(out_dir) == os.path.abspath(args.run_dir) else \
        RunDir(out_dir, overwrite=args.overwrite, refusal=_cli.REFUSAL)
    if target is not None:
        target.check()  # before the work: a non-empty --out is refused
    result = evaluate_split(run, args.split, args.n_samples, args.seed, args.max_rows, pareto=pareto)
    with target or contextlib.nullcontext():
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, EVALUATION)
        save_json(result, path)
        from elbolab.inference.diagnostic_plots import pareto_k_plot

        pareto_k_plot(pareto.values, os.path.join(out_dir, "evaluation_pareto_k.png"),
                      f"{run.spec.model} {args.split} rows: Pareto k of each row's importance weights",
                      args.n_samples)
    ll, elbo = result["quantities"]["log_likelihood"], result["quantities"]["elbo"]
    line = (f"{run.spec.model} {args.split} ({result['n_rows']} rows): log-likelihood (K = {args.n_samples}) "
            f"{ll['value']:.3f} ± {ll['se']:.3f} [{reliability_note(result['pareto_k'])}], "
            f"ELBO {elbo['value']:.3f} ± {elbo['se']:.3f} nats/datapoint")
    if "active_units" in result:
        au = result["active_units"]
        line += f", {au['active_units']}/{au['latent_dim']} active units"
    print(f"{line} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
