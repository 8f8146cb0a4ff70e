"""Posterior diagnostics of a trained run: an ArviZ InferenceData of its guide, the Pareto
k of its importance weights, PSIS-LOO and WAIC, posterior predictive checks, and the
posterior beside the exact one and NUTS's where those exist (the library's
``inference.diagnosis.diagnose_run``).

Rebuilds the model from RUN_DIR/config.json and RUN_DIR/checkpoint.ckpt and writes into
DIR (= --out, by default RUN_DIR; the run's own files are never touched):

* diagnostics.nc: the InferenceData (posterior, posterior_predictive, log_likelihood,
  replicated_log_likelihood, sample_stats, observed_data; dims row, latent, feature),
  and beside it diagnostics_exact.nc / diagnostics_nuts.nc for the references;
* summary.csv: az.summary of every posterior (mean, sd, 94% HDI; ESS and R-hat for NUTS);
* summary.md: what to read first, with the tables and the pictures;
* diagnostics.json: the numbers (Pareto k, LOO and WAIC, posterior predictive p-values);
* pareto_k.png (per-row latents: k of each row's K importance weights), loo_pareto_k.png,
  ppc.png, forest.png, pair.png, posterior.png.

Which rows: a guide with per-row latents (PPCA, the VAEs) is diagnosed on the first
--max-rows rows of --split (default: test for an amortized guide, train for a
per-datapoint one); a guide with global latents (the Bayesian Gaussian) on all training
rows, the data its posterior is conditioned on. NUTS runs for global latents of at most
100 dimensions (--nuts-samples 0: never). Every number is per datapoint (nats per row)
unless it says sum.
"""

from __future__ import annotations

import argparse
import os
import sys

from elbolab.inference import diagnosis
from elbolab.inference.diagnostics import DEFAULT_CHAINS, MIN_PARETO_SAMPLES
from elbolab.scripts import _cli

PROG = "elbolab diagnose"

EXAMPLES = """examples:
  elbolab diagnose runs/ppca
  elbolab diagnose runs/vae --max-rows 200 --draws 200 --n-samples 5000 --out runs/vae-diag
  elbolab diagnose runs/bayes --nuts-samples 1000 --nuts-chains 4
"""


def nuts_samples(text: str) -> int:
    v = _cli.integer(text)
    if v < 0 or v == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (no NUTS) or at least 2, got {v}")
    return v


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by elbolab fit")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="rows to diagnose (per-row latents; default: test, or train for a per-datapoint guide)")
    p.add_argument("--max-rows", type=_cli.positive_int, default=500,
                   help="diagnose the first N rows of the split (per-row latents)")
    p.add_argument("--draws", type=_cli.positive_int, default=100, help="draws per chain from the guide")
    p.add_argument("--chains", type=_cli.positive_int, default=DEFAULT_CHAINS,
                   help="independent sets of draws from the guide (VI draws are independent; two let the "
                        "chain-comparing diagnostics run)")
    p.add_argument("--n-samples", type=_cli.at_least(MIN_PARETO_SAMPLES), default=1000,
                   help=f"importance samples K per row for the Pareto k (at least {MIN_PARETO_SAMPLES})")
    p.add_argument("--nuts-samples", type=nuts_samples, default=500, help="NUTS draws per chain (0: no NUTS)")
    p.add_argument("--nuts-warmup", type=_cli.positive_int, default=300, help="NUTS warm-up steps per chain")
    p.add_argument("--nuts-chains", type=_cli.positive_int, default=2,
                   help="NUTS chains, run one after another (R-hat needs at least 2)")
    _cli.add_threads_arg(p)
    _cli.add_out_args(p, default=None, what="diagnostics.nc (the ArviZ InferenceData), summary.md, summary.csv, "
                      "diagnostics.json and the figures (default: RUN_DIR itself, whose own files are never "
                      "touched)", required=False, overwrite=False)
    return p


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run, out = _cli.open_run(args.run_dir, args.out, args.threads)
    numbers = diagnosis.diagnose_run(run, out, split=args.split, max_rows=args.max_rows, draws=args.draws,
                                     chains=args.chains, n_samples=args.n_samples, nuts_samples=args.nuts_samples,
                                     nuts_warmup=args.nuts_warmup, nuts_chains=args.nuts_chains, seed=args.seed)
    print(f"{diagnosis.summary_line(numbers)} -> {os.path.join(out, 'summary.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
