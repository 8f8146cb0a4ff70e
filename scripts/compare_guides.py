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
from collections.abc import Callable

import torch

from elbolab.inference import guide_study
from elbolab.inference.compare import AIS_USE, AISSettings, LocalSettings
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import tune_malloc
from elbolab.inference.guide_study import (FAMILIES, GUIDE_NAMES, GUIDES, MODEL_FIELDS, USER_GUIDES, GuideOptions,
                                           StudySettings, Subject, compare_lines)
from elbolab.inference.runs import RunDir, is_reference
from elbolab.inference.traces import DATA_PLATE
from elbolab.inference.train_config import MAX_TENSOR_ELEMENTS
from elbolab.scripts import _cli

PROG = "elbolab compare-guides"

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
    s.add_argument("--semi-steps", type=_cli.positive_int, default=GuideOptions.semi_steps, help="refinement steps S per mini-batch")
    s.add_argument("--semi-step-size", type=_cli.positive_float, default=GuideOptions.semi_step_size,
                   help="step on (loc, log scale), natural gradient (1: Newton's step for a Gaussian posterior)")
    s.add_argument("--semi-particles", type=_cli.positive_int, default=GuideOptions.semi_particles, help="draws per row in each step")
    s.add_argument("--semi-plain-gradient", action="store_true",
                   help="plain gradient steps (Kim et al.) instead of natural-gradient ones")
    s.add_argument("--semi-first-order", action="store_true",
                   help="no differentiation through the steps (their Jacobian taken as the identity)")
    f = p.add_argument_group("flow guide (and its q*)")
    f.add_argument("--flow-layers", type=_cli.positive_int, default=GuideOptions.flow_layers,
                   help="inverse autoregressive flow steps on the encoder (and in each row's flow q*)")
    f.add_argument("--flow-hidden", type=_cli.positive_int, default=GuideOptions.flow_hidden,
                   help="hidden units of each step's masked network (at least the latent dimension)")
    lo = p.add_argument_group("local optimization q* (Cremer et al.: rate 1e-3, decay 1, 50 draws, window 100, "
                              "patience 10)")
    lo.add_argument("--local-lr", type=_cli.positive_float, default=LocalSettings.lr, help="Adam rate (initial, per row)")
    lo.add_argument("--local-flow-lr", type=_cli.positive_float, default=LocalSettings.flow_lr,
                    help="Adam rate (initial, per row) of the flow family's q*")
    lo.add_argument("--local-decay", type=_cli.positive_float, default=LocalSettings.decay,
                    help="a row's rate is multiplied by this after each window without improvement (1: constant)")
    lo.add_argument("--local-particles", type=_cli.positive_int, default=LocalSettings.n_particles, help="draws per row and step")
    lo.add_argument("--local-window", type=_cli.positive_int, default=LocalSettings.window, help="steps per window of the running loss")
    lo.add_argument("--local-patience", type=int, default=LocalSettings.patience,
                    help="windows without improvement a row tolerates; it stops at the next")
    lo.add_argument("--local-max-steps", type=_cli.positive_int, default=LocalSettings.max_steps, help="cap on the steps")
    e = p.add_argument_group("evaluation")
    e.add_argument("--n-rows", type=_cli.positive_int, default=StudySettings.n_rows,
                   help="training rows and test rows evaluated (a seeded random subset of each; fewer if the "
                        "split is smaller)")
    e.add_argument("--n-samples", type=_cli.positive_int, default=StudySettings.n_samples,
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
    _cli.add_out_args(p)
    return p


def _guide_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in GUIDE_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown guide(s) {', '.join(bad) or '(none given)'}; choose from "
                                         f"{', '.join(sorted(GUIDE_NAMES))}")
    return names


# ----------------------------------------------------------------------------- flags -> the library


def subjects(args) -> list[Subject]:
    """Every model under study (``inference.guide_study``'s subjects), from the flags;
    everything checked, nothing trained."""
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
    data = _cli.data_flags(args)  # --binarize auto: resolved per model, for its likelihood
    train = {**{k: getattr(args, k) for k in ("epochs", "steps", "lr", "lr_final") if getattr(args, k) is not None},
             "batch_size": args.batch_size, "threads": args.threads, "progress": args.progress}
    if user:
        out = [guide_study.user_subject(args.model, data, guide=args.guide, plate=args.plate or DATA_PLATE,
                                        train=train, seed=args.seed)]
    else:
        model = {f: getattr(args, f) for f in MODEL_FIELDS if getattr(args, f) is not None}
        out = [guide_study.builtin_subject(family, data, model=model, train=train, seed=args.seed)
               for family in (FAMILIES if args.model == "all" else (args.model,))]
    out = [guide_study.restrict(sub, args.guides, "--guides") for sub in out]
    for sub in out:
        if args.local_particles * sub.data.data_dim > MAX_TENSOR_ELEMENTS:
            raise UsageError(f"--local-particles {args.local_particles} x {sub.data.data_dim} data dimensions "
                             "is too large for one tensor")
    return out


def settings(args) -> StudySettings:
    """The study's settings from the flags."""
    if args.local_patience < 0:
        raise UsageError(f"--local-patience must be >= 0, got {args.local_patience}")
    if args.local_decay > 1:
        raise UsageError(f"--local-decay must be in (0, 1], got {args.local_decay}")
    local = LocalSettings(lr=args.local_lr, decay=args.local_decay, n_particles=args.local_particles,
                          window=args.local_window, patience=args.local_patience, max_steps=args.local_max_steps,
                          flow_lr=args.local_flow_lr)
    ais = AISSettings(when=args.ais, steps=args.ais_steps, chains=args.ais_chains, leapfrog=args.ais_leapfrog,
                      bdmc_rows=args.bdmc_rows, tolerance=args.bdmc_tolerance)
    options = GuideOptions(semi_steps=args.semi_steps, semi_step_size=args.semi_step_size,
                           semi_particles=args.semi_particles, natural=not args.semi_plain_gradient,
                           differentiable=not args.semi_first_order, flow_layers=args.flow_layers,
                           flow_hidden=args.flow_hidden)
    return StudySettings(n_rows=args.n_rows, n_samples=args.n_samples, seed=args.seed, local=local, ais=ais,
                         options=options)


# ----------------------------------------------------------------------------- main


@_cli.guarded(PROG)
def main(argv: list[str] | None = None, on_trained: Callable[[str, str], None] | None = None) -> int:
    """``on_trained(family, guide)`` is called after each guide's study."""
    args = build_parser().parse_args(argv)
    study_settings = settings(args)
    run_dir = RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL)
    run_dir.check()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tune_malloc()
    subs = subjects(args)  # everything checked before any training
    cmd = "elbolab compare-guides " + " ".join(argv if argv is not None else sys.argv[1:])
    metrics = guide_study.run_guide_study(subs, run_dir, study_settings, command=cmd, on_trained=on_trained,
                                          log=lambda line: print(line, file=sys.stderr))
    lines = compare_lines(metrics)
    print("\n".join(lines[lines.index("") + 1:]).split("![gap")[0].rstrip())
    print(f"-> {args.out}/compare.md, metrics.json, gaps.png ({metrics['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
