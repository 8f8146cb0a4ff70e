"""Re-evaluate a trained run: its log-likelihood on a split's rows, by importance
sampling (the default: K samples per row, with the Pareto k of each row's weights) or
by annealed importance sampling (--estimator ais: T steps, M chains per row, from the
guide), the ELBO, reconstruction and KL terms, and the active units.

Rebuilds the model from RUN_DIR/config.json and RUN_DIR/checkpoint.ckpt and writes
DIR/evaluation.json (DIR = --out, by default RUN_DIR) atomically, naming the estimator
and its budget. Importance sampling: the Pareto k of each row's weights summarized and
flagged (and plotted in DIR/evaluation_pareto_k.png); the ELBO from the same draws.
AIS: each row's estimate log (1/M) sum_m w_m (a stochastic lower bound of log p(x)
that tightens as T grows), its standard error over rows and the Monte Carlo standard
error of the mean over the chains, and the chains' acceptance rate and effective
sample size; the ELBO from the run's eval_particles draws per row. The run's own
metrics.json is never touched. Numbers are nats per datapoint, each a mean over the
rows with its standard error.
"""

from __future__ import annotations

import contextlib
import os
import sys

from elbolab.inference.ais import Budget
from elbolab.inference.diagnostics import ParetoK, reliability_note
from elbolab.inference.errors import UsageError
from elbolab.inference.files import save_json
from elbolab.inference.runs import ESTIMATORS, EVALUATION, RunDir, evaluate_split
from elbolab.scripts import _cli

PROG = "elbolab evaluate"
N_SAMPLES = 5000  # importance samples per row by default

EXAMPLES = """examples:
  elbolab evaluate runs/vae --n-samples 5000
  elbolab evaluate runs/vae --n-samples 100 --split val --out runs/vae-eval
  elbolab evaluate runs/vae --estimator ais --steps 500 --chains 16 --max-rows 200 --out runs/vae-ais
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by elbolab fit")
    p.add_argument("--estimator", default="is", choices=ESTIMATORS,
                   help="is: importance sampling with the guide as proposal; ais: annealed importance sampling "
                        "from the guide (slower, tighter)")
    p.add_argument("--n-samples", type=_cli.positive_int, default=None,
                   help=f"--estimator is: importance samples K per row (default: {N_SAMPLES})")
    p.add_argument("--steps", type=_cli.positive_int, default=None,
                   help=f"--estimator ais: annealing steps T (sigmoid schedule) (default: {Budget.steps})")
    p.add_argument("--chains", type=_cli.positive_int, default=None,
                   help=f"--estimator ais: chains M per row (default: {Budget.chains})")
    p.add_argument("--leapfrog", type=_cli.positive_int, default=None,
                   help=f"--estimator ais: leapfrog steps L per HMC transition (default: {Budget.leapfrog})")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="rows to evaluate (a per-datapoint guide knows only the training rows)")
    p.add_argument("--max-rows", type=_cli.positive_int, default=None, help="evaluate the first N rows only")
    p.add_argument("--threads", type=_cli.positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"where {EVALUATION} and its figure go (default: RUN_DIR); another directory is "
                        "refused if it holds files, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--seed", type=_cli.integer, default=None,
                   help="random seed of the draws (default: the run's own test-set seed, so that the test "
                        "estimate is the one its fit reported)")
    return p


def budget(args) -> Budget | None:
    """The AIS budget from the flags (None for importance sampling); flags of the other
    estimator are refused."""
    ais_flags = [_cli.flag(n) for n in ("steps", "chains", "leapfrog") if getattr(args, n) is not None]
    if args.estimator == "is":
        if ais_flags:
            raise UsageError(f"{', '.join(ais_flags)} apply to --estimator ais")
        return None
    if args.n_samples is not None:
        raise UsageError("--n-samples applies to --estimator is (AIS's budget: --steps, --chains, --leapfrog)")
    d = Budget()
    return Budget(args.steps or d.steps, args.chains or d.chains, args.leapfrog or d.leapfrog)


def summary_line(run, args, result: dict) -> str:
    ll, elbo = result["quantities"]["log_likelihood"], result["quantities"]["elbo"]
    if result["estimator"] == "is":
        head = (f"log-likelihood (K = {result['n_samples']}) {ll['value']:.3f} ± {ll['se']:.3f} "
                f"[{reliability_note(result['pareto_k'])}]")
    else:
        a = result["ais"]
        head = (f"AIS log-likelihood (T = {a['steps']}, M = {a['chains']}, L = {a['leapfrog']}) {ll['value']:.3f} ± "
                f"{ll['se']:.3f} (Monte Carlo s.e. over chains {a['mc_se_of_mean']:.4f}; acceptance "
                f"{a['acceptance_mean']:.2f})")
    line = (f"{run.spec.model} {args.split} ({result['n_rows']} rows): {head}, "
            f"ELBO {elbo['value']:.3f} ± {elbo['se']:.3f} nats/datapoint")
    if "active_units" in result:
        au = result["active_units"]
        line += f", {au['active_units']}/{au['latent_dim']} active units"
    return line


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ais = budget(args)
    n_samples = args.n_samples or N_SAMPLES
    run, out_dir = _cli.open_run(args.run_dir, args.out, args.threads)
    pareto = ParetoK()
    target = None if os.path.abspath(out_dir) == os.path.abspath(args.run_dir) else \
        RunDir(out_dir, overwrite=args.overwrite, refusal=_cli.REFUSAL)
    if target is not None:
        target.check()  # before the work: a non-empty --out is refused
    result = evaluate_split(run, args.split, n_samples, args.seed, args.max_rows, pareto=pareto,
                            estimator=args.estimator, ais=ais)
    with target or contextlib.nullcontext():
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, EVALUATION)
        save_json(result, path)
        if args.estimator == "is":
            from elbolab.inference.diagnostic_plots import pareto_k_plot

            pareto_k_plot(pareto.values, os.path.join(out_dir, "evaluation_pareto_k.png"),
                          f"{run.spec.model} {args.split} rows: Pareto k of each row's importance weights",
                          n_samples)
    print(f"{summary_line(run, args, result)} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
