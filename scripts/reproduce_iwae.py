"""Reproduce the pattern of Burda, Grosse & Salakhutdinov (2015), Table 1 (MNIST, one
stochastic layer): VAE and IWAE trained with K in {1, 5, 50} samples, compared by
their test log-likelihood (5000 importance samples) and active units.

Protocol (the paper's, except the training budget): latent_dim 50; encoder and
decoder 784-200-200 with tanh; dynamic binarization of the 60,000 training images;
Adam with batch 20 and learning rate 1e-3 decayed towards the value the paper's
schedule (3^i epochs at 1e-3 * 10^(-i/7)) has reached after --epochs epochs. The
paper trains for 3280 epochs; this script runs --epochs (the CPU budget), so its
numbers are those of short training: compare the trend across K and objectives,
not the levels. VAE with K = 1 and IWAE with K = 1 are the same objective, trained
once. The test log-likelihood is the K = --n-samples importance estimate on the first
--test-rows test images (the same rows for every model, so differences are paired);
active units use all 10,000 test images.

Each model's log-likelihood is also estimated by annealed importance sampling on the
first --ais-rows of those images (T = --ais-steps, M = --ais-chains, from the encoder),
beside the importance estimate on the same images (paired).

Writes --out/table.md, --out/metrics.json and one run directory per model (with
evaluation.json and ais.json).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from elbolab.inference.diagnostics import reliability_note
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import tune_malloc
from elbolab.inference.files import save_json
from elbolab.inference.train_config import TrainConfig
from elbolab.inference.runs import EVALUATION, evaluate_split, read_run
from elbolab.scripts import _cli, _reproduce

PROG = "elbolab reproduce-iwae"
PUBLISHED_NLL = {("vae", 1): 86.76, ("vae", 5): 86.47, ("vae", 50): 86.35,
                 ("iwae", 1): 86.76, ("iwae", 5): 85.54, ("iwae", 50): 84.78}
PAPER_EPOCHS = 3280

EXAMPLES = """examples:
  elbolab reproduce-iwae --data-dir ~/data/mnist --out runs/iwae --epochs 10 --threads 1
  elbolab reproduce-iwae --epochs 1 --ks 1,5 --test-rows 200 --n-samples 500 --out runs/iwae-short
"""


def burda_lr(epoch: float, lr: float = 1e-3) -> float:
    """The learning rate of Burda et al.'s schedule during epoch ``epoch`` (1-based):
    3^i epochs at lr * 10^(-i/7), i = 0..7."""
    i, end = 0, 1
    while epoch > end and i < 7:
        i += 1
        end += 3**i
    return lr * 10 ** (-i / 7)


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    _reproduce.add_common_args(p, out="runs/iwae")
    p.add_argument("--epochs", type=_cli.positive_int, default=10, help="training epochs per model (paper: 3280)")
    p.add_argument("--batch-size", type=_cli.positive_int, default=20, help="rows per mini-batch (paper: 20)")
    p.add_argument("--ks", type=_cli.int_list, default=(1, 5, 50), help="training samples K, comma-separated")
    p.add_argument("--n-samples", type=_cli.positive_int, default=5000, help="importance samples per test image")
    p.add_argument("--test-rows", type=_cli.positive_int, default=1000,
                   help="test images for the 5000-sample log-likelihood (the first N; all: 10000)")
    p.add_argument("--fit-samples", type=_cli.positive_int, default=100,
                   help="importance samples of each run's own metrics.json over all test images")
    _reproduce.add_ais_args(p)
    return p


def runs_to_train(ks) -> list[tuple[str, str, int]]:
    out = []
    for k in ks:
        out.append((f"vae-k{k}", "elbo", k))
        if k > 1:  # with one sample the IWAE bound is the ELBO: the vae-k1 run serves both rows
            out.append((f"iwae-k{k}", "iwae", k))
    return out


def evaluation(name: str, args) -> dict:
    run_dir = os.path.join(args.out, name)
    path = os.path.join(run_dir, EVALUATION)
    if args.reuse and os.path.isfile(path):
        with open(path) as f:
            ev = json.load(f)
        if (ev.get("n_samples"), ev.get("n_rows"), ev.get("seed")) == (args.n_samples, args.test_rows, args.seed) \
                and "log_likelihood_per_row" in ev:
            return ev
    print(f"[{name}] test log-likelihood, K = {args.n_samples} on {args.test_rows} images ...", file=sys.stderr)
    ev = evaluate_split(read_run(run_dir), "test", args.n_samples, seed=args.seed, max_rows=args.test_rows,
                        per_row=True)
    save_json(ev, path)
    return ev


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if 1 not in args.ks:
        raise UsageError("--ks must include 1 (the baseline every difference is measured from)")
    _reproduce.check_out(args)
    torch.set_num_threads(args.threads)
    tune_malloc()
    t0 = time.perf_counter()
    data = _reproduce.mnist_spec(args.data_dir)
    config = {"latent_dim": 50, "hidden": [200, 200], "activation": "tanh", "guide": "amortized"}
    lr_final = burda_lr(args.epochs)
    metrics, evals = {}, {}
    for name, objective, k in runs_to_train(args.ks):
        train = TrainConfig(objective=objective, n_particles=k, lr=1e-3, lr_final=lr_final if lr_final < 1e-3 else None,
                            batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, threads=args.threads,
                            progress=args.progress)
        metrics[name] = _reproduce.train(name, "vae", config, train, data, args.fit_samples, args)
        evals[name] = evaluation(name, args)
    ais = {name: _reproduce.ais_beside_is(name, args, args.n_samples, evals[name]) for name in evals}
    base = evals["vae-k1"]["log_likelihood_per_row"]
    rows, ours = [], {}
    for kind in ("vae", "iwae"):
        for k in args.ks:
            name = "vae-k1" if k == 1 else f"{kind}-k{k}"
            ev, m = evals[name], metrics[name]
            nll = (-ev["quantities"]["log_likelihood"]["value"], ev["quantities"]["log_likelihood"]["se"])
            diff = _reproduce.paired([-v for v in ev["log_likelihood_per_row"]], [-v for v in base])
            ladder = m["diagnostics"]["test_importance"]["iwae"]
            bound = ladder[str(max(int(s) for s in ladder))]
            au = m["diagnostics"]["test_active_units"]
            ours[f"{kind}-k{k}"] = {"run": name, "nll": nll, "nll_minus_vae_k1": diff,
                                    "active_units": au["active_units"], "train_seconds": m["run"]["seconds"],
                                    "ais": ais[name]}
            pub = PUBLISHED_NLL.get((kind, k))
            rows.append([kind.upper(), str(k), "—" if pub is None else f"{pub:.2f}",
                         _reproduce.pm(*nll), reliability_note(ev["pareto_k"]),
                         "0 (baseline)" if name == "vae-k1" else _reproduce.pm(*diff),
                         f"{au['active_units']} / {au['latent_dim']}",
                         _reproduce.pm(-bound["value"], bound["se"]), f"{m['run']['seconds'] / 60:.1f}"
                         + (" (same run as VAE k = 1)" if kind == "iwae" and k == 1 else "")])
    gaps = []
    for k in args.ks:
        if k > 1:
            d = _reproduce.paired([-v for v in evals[f"iwae-k{k}"]["log_likelihood_per_row"]],
                       [-v for v in evals[f"vae-k{k}"]["log_likelihood_per_row"]])
            pub = PUBLISHED_NLL.get(("iwae", k), math.nan) - PUBLISHED_NLL.get(("vae", k), math.nan)
            gaps.append([str(k), "—" if math.isnan(pub) else f"{pub:+.2f}", _reproduce.pm(*d)])
            ours[f"iwae-minus-vae-k{k}"] = d
    cmd = "elbolab reproduce-iwae " + " ".join(argv if argv is not None else sys.argv[1:])
    n_test = metrics["vae-k1"]["data"]["n_test"]
    tab = _reproduce.table(
        ["model", "K (training)", "published NLL (3280 epochs)", f"ours: test NLL ± s.e. ({args.epochs} epochs)",
         "Pareto k of its importance weights",
         "ours minus VAE k = 1 (paired) ± s.e.", f"active units ({n_test} test images)",
         f"ours: -IWAE_{args.fit_samples} bound, {n_test} test images", "training minutes"], rows)
    gap_tab = _reproduce.table(["K", "published IWAE minus VAE", "ours: IWAE minus VAE (paired) ± s.e."], gaps)
    lines = [
        "# IWAE paper, Table 1 pattern (MNIST, one stochastic layer): ours beside the published values", "",
        f"Command: `{cmd.strip()}`", "",
        f"Negative log-likelihoods in nats (lower is better). Ours: {args.epochs} epochs of the 60,000 training "
        f"images (batch {args.batch_size}, learning rate 1e-3 decayed to {lr_final:.2e}), against the paper's "
        f"{PAPER_EPOCHS}; test NLL = minus the {args.n_samples}-sample importance estimate on the first "
        f"{args.test_rows} test images (the same images for every model, so the differences are paired and their "
        "standard errors small); ± is one standard error over images. An estimate is marked UNRELIABLE when "
        "more than 1% of its images have Pareto k > 0.7 (PSIS; inference/diagnostics.py).", "",
        *tab, "", "IWAE against VAE at the same K (negative: IWAE better):", "", *gap_tab, "",
        *_reproduce.ais_lines({f"{'IWAE' if n.startswith('iwae') else 'VAE'} K = {n.split('-k')[1]}": r
                               for n, r in ais.items()}, args),
        f"_Wall time {time.perf_counter() - t0:.0f} s with {args.threads} thread(s)._",
    ]
    _reproduce.write(args.out, lines, {
        "protocol": "burda2015-table1", "command": cmd.strip(), "units": "nats per datapoint",
        "published_nll": {f"{a}-k{b}": v for (a, b), v in PUBLISHED_NLL.items()}, "paper_epochs": PAPER_EPOCHS,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr_final": lr_final, "n_samples": args.n_samples,
        "test_rows": args.test_rows, "ours": ours,
        "ais": {"rows": args.ais_rows, "steps": args.ais_steps, "chains": args.ais_chains, "leapfrog": 5},
    })
    print("\n".join(tab + [""] + gap_tab))
    print(f"-> {args.out}/table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
