"""Generate from a trained run whose model has a decoder (the VAEs): samples from the
prior, reconstructions of rows, an interpolation between two rows in latent space, a
latent traversal (one latent dimension varied, the others at the rows' mean), and the
guide's latent means coloured by label where the data set has labels (the library's
``inference.generate``).

Rebuilds the model from RUN_DIR/config.json and RUN_DIR/checkpoint.ckpt. The rows are
the test split's for a guide with an encoder, the training rows for a per-datapoint
guide. Writes into --out DIR: for image data prior_samples.png, reconstructions.png,
interpolation.png and traversal.png (image grids), for other data columns.png (the two
most variable columns, data against generated); latent_means.png; samples.npz (every
array) and samples.json (what each array holds). Decoded values are the means of
p(x | z). A model without a decoder (PPCA, the Bayesian Gaussian, a model of yours
without decode and sample_prior) is refused.
"""

from __future__ import annotations

import argparse
import os
import sys

from elbolab.inference.generate import check_generative, generate, write_samples
from elbolab.inference.runs import RunDir
from elbolab.scripts import _cli

PROG = "elbolab sample"

EXAMPLES = """examples:
  elbolab sample runs/vae --out runs/vae-samples
  elbolab sample runs/vae --pair 3,17 --steps 12 --n 64 --out runs/vae-samples --overwrite
"""


def pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two row indices A,B, got {text!r}") from None
    if a < 0 or b < 0 or a == b:
        raise argparse.ArgumentTypeError(f"expected two different row indices >= 0, got {text!r}")
    return a, b


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by elbolab fit")
    p.add_argument("--n", type=_cli.positive_int, default=100, help="samples from the prior")
    p.add_argument("--reconstructions", type=_cli.positive_int, default=20, help="rows reconstructed")
    p.add_argument("--pair", type=pair, default=(0, 1), metavar="A,B",
                   help="the two rows (indices in the split) to interpolate between (default: 0,1)")
    p.add_argument("--steps", type=_cli.at_least(2), default=10,
                   help="points of the interpolation and of each traversal")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="rows to reconstruct and interpolate (default: test, or train for a per-datapoint guide)")
    _cli.add_threads_arg(p)
    _cli.add_out_args(p, what="prior_samples.png, reconstructions.png, interpolation.png, traversal.png (image "
                              "data) or columns.png, latent_means.png, samples.npz and samples.json")
    return p


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL)
    target.check()  # a non-empty --out is refused before any work
    run, out = _cli.open_run(args.run_dir, args.out, args.threads)
    check_generative(run.model, args.run_dir)
    result = generate(run.model, run.data, n=args.n, n_reconstructions=args.reconstructions, pair=args.pair,
                      steps=args.steps, split=args.split, seed=args.seed, where=args.run_dir)
    with target:
        files = write_samples(result, run.data, out, f"{run.spec.model} on {run.data.name}")
    print(f"{run.spec.model}: {len(result['prior'])} prior samples, {len(result['reconstructions'])} reconstructions, "
          f"interpolation between {result['split']} rows {result['pair'][0]} and {result['pair'][1]}, traversals of "
          f"{len(result['traversal_dims'])} latent dims -> {os.path.join(out, '')} ({', '.join(files)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
