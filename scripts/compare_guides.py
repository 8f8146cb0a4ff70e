"""Compare amortized, semi-amortized and per-datapoint guides: the inference-gap
decomposition of Cremer, Li & Duvenaud (2018) on training and test rows, and what
each guide costs to train and to infer a new datapoint.

For each model (PPCA, the VAE, the mixture-prior VAE) and each guide, one model is
trained with that guide through the training driver (inference.train.fit):

* amortized: the model's encoder q_phi(z|x) (PPCA: diagonal and full covariance);
* semi-amortized: the encoder's output refined by --semi-steps gradient steps on each
  row's ELBO, trained end to end through the steps (Kim et al. 2018; --semi-first-order
  for the variant without second derivatives);
* per-datapoint: one Gaussian per training row, trained jointly with the model from
  scratch (PPCA: diagonal and full covariance).

Then, for --n-rows training rows and --n-rows test rows, with the model fixed: the
guide's q for those rows (an encoder pass; a refinement; the table; for a per-datapoint
guide on test rows, which it cannot infer, the local optimization itself), and q*, a
Gaussian of the same family per row optimized until its running loss stops improving
(inference.guides.optimize_local; Cremer et al.'s settings are --local-lr 1e-3
--local-decay 1 --local-particles 50 --local-window 100 --local-patience 10; the
defaults are faster).
The table reports the ELBO L[q], the IWAE bound with K = --n-samples, log p(x) (exact
for PPCA; for the VAEs the larger of the K-sample importance estimates with q and with
q* as proposal), and the inference, approximation and amortization gaps, each a mean
over rows +- its standard error (paired per row), and the wall time to infer.

Writes --out/compare.md, --out/metrics.json and --out/gaps.png. Numbers are nats per
datapoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from elbolab import models
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import tune_malloc
from elbolab.inference.files import atomic_write, save_json
from elbolab.inference.compare import LocalSettings, eval_rows, study
from elbolab.inference.traces import guide_posterior
from elbolab.inference.guides import LocalGuide, PerDatapointGuide, SemiAmortizedGuide
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig, check_config_for_data
from elbolab.inference.runs import RunDir
from elbolab.scripts import _cli

PROG = "elbolab compare-guides"
FAMILIES = ("ppca", "vae", "gmvae")
GUIDES = {
    "ppca": ("amortized", "amortized-full", "semi-amortized", "per-datapoint", "per-datapoint-full"),
    "vae": ("amortized", "semi-amortized", "per-datapoint"),
    "gmvae": ("amortized", "semi-amortized", "per-datapoint"),
}
# defaults per family where a flag is not given (small models: the default run is the digits)
FAMILY_DEFAULTS = {
    "ppca": {"latent_dim": 5, "epochs": 30, "lr": 0.03, "lr_final": 1e-3},
    "vae": {"latent_dim": 4, "hidden": (64,), "activation": "elu", "epochs": 30, "lr": 3e-3, "lr_final": None},
    "gmvae": {"latent_dim": 4, "hidden": (64,), "activation": "elu", "n_components": 10, "epochs": 30,
              "lr": 3e-3, "lr_final": None},
}
MODEL_FIELDS = ("latent_dim", "hidden", "activation", "n_components")

EXAMPLES = """examples:
  elbolab compare-guides --out runs/compare
  elbolab compare-guides --model vae --epochs 50 --n-samples 5000 --out runs/compare-vae
  elbolab compare-guides --model vae --dataset mnist --data-dir ../shared/data/mnist \\
      --latent-dim 10 --hidden 300,300 --epochs 10 --n-rows 200 --n-samples 5000 --threads 1 --out runs/compare-mnist
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    g = p.add_argument_group("models")
    g.add_argument("--model", default="all", choices=FAMILIES + ("all",), help="model family, or all three")
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
    t.add_argument("--lr", type=_cli.positive_float, default=None, help="Adam rate (default: 0.03 ppca, 3e-3 VAEs)")
    t.add_argument("--lr-final", type=_cli.positive_float, default=None,
                   help="decay the rate exponentially to this (default: 1e-3 for ppca, none for the VAEs)")
    t.add_argument("--threads", type=_cli.positive_int, default=None, help="torch CPU threads")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars while training (default: when stderr is a terminal)")
    s = p.add_argument_group("semi-amortized guide")
    s.add_argument("--semi-steps", type=_cli.positive_int, default=5, help="refinement steps S per mini-batch")
    s.add_argument("--semi-step-size", type=_cli.positive_float, default=0.1,
                   help="step on (loc, log scale), natural gradient (1: Newton's step for a Gaussian posterior)")
    s.add_argument("--semi-particles", type=_cli.positive_int, default=4, help="draws per row in each step")
    s.add_argument("--semi-plain-gradient", action="store_true",
                   help="plain gradient steps (Kim et al.) instead of natural-gradient ones")
    s.add_argument("--semi-first-order", action="store_true",
                   help="no differentiation through the steps (their Jacobian taken as the identity)")
    lo = p.add_argument_group("local optimization q* (Cremer et al.: rate 1e-3, decay 1, 50 draws, window 100, "
                              "patience 10)")
    lo.add_argument("--local-lr", type=_cli.positive_float, default=0.1, help="Adam rate (initial, per row)")
    lo.add_argument("--local-decay", type=_cli.positive_float, default=0.5,
                    help="a row's rate is multiplied by this after each window without improvement (1: constant)")
    lo.add_argument("--local-particles", type=_cli.positive_int, default=10, help="draws per row and step")
    lo.add_argument("--local-window", type=_cli.positive_int, default=25, help="steps per window of the running loss")
    lo.add_argument("--local-patience", type=int, default=3,
                    help="windows without improvement a row tolerates; it stops at the next")
    lo.add_argument("--local-max-steps", type=_cli.positive_int, default=20_000, help="cap on the steps")
    e = p.add_argument_group("evaluation")
    e.add_argument("--n-rows", type=_cli.positive_int, default=100,
                   help="training rows and test rows evaluated (a seeded random subset of each; fewer if the "
                        "split is smaller)")
    e.add_argument("--n-samples", type=_cli.positive_int, default=1000,
                   help="importance samples K per row (ELBO, IWAE_K, log p(x) for the VAEs); Cremer et al.: 5000")
    _cli.add_out_args(p)
    return p


# ----------------------------------------------------------------------------- set-up


def family_settings(args, family: str) -> tuple[dict, TrainConfig]:
    """The model Config fields and the TrainConfig of one family (flags over defaults)."""
    d = FAMILY_DEFAULTS[family]
    cls = models.config_class(family)
    fields = set(cls.__dataclass_fields__)
    values = {}
    for f in MODEL_FIELDS:
        v = getattr(args, f)
        v = d.get(f) if v is None else v
        if v is not None and f in fields:
            values[f] = list(v) if isinstance(v, tuple) else v
    models.make_config(family, values)  # validates
    epochs = args.epochs if args.epochs is not None else d["epochs"]
    train = TrainConfig(
        lr=args.lr if args.lr is not None else d["lr"],
        lr_final=args.lr_final if args.lr_final is not None else (d["lr_final"] if args.lr is None else None),
        batch_size=args.batch_size, epochs=None if args.steps else epochs, steps=args.steps, seed=args.seed,
        threads=args.threads, progress=args.progress)
    return values, train


def model_config(family: str, values: dict, guide: str) -> dict:
    if family == "ppca":
        return {**values, "guide": "amortized-full" if guide.endswith("full") else "amortized-diag"}
    return {**values, "guide": "amortized"}


def build_guided(family: str, values: dict, guide: str, data, args):
    """A fresh model with the guide under study (seeded: every guide starts from the same
    generative parameters)."""
    torch.manual_seed(args.seed)
    base = models.build_model(family, model_config(family, values, guide), data.data_dim, data.n_train)
    if guide.startswith("per-datapoint"):
        return PerDatapointGuide(base, full=guide.endswith("full"))
    if guide == "semi-amortized":
        return SemiAmortizedGuide(base, steps=args.semi_steps, step_size=args.semi_step_size,
                                  n_particles=args.semi_particles, differentiable=not args.semi_first_order,
                                  natural=not args.semi_plain_gradient)
    return base


def closed_form_gap(model, family: str) -> float | None:
    """PPCA: the approximation gap of the guide's family in closed form at the fitted
    parameters (0 for a full covariance; the KL from the best diagonal Gaussian to the
    exact posterior, the same for every row)."""
    if family != "ppca":
        return None
    from elbolab.models import ppca

    base = model.base if isinstance(model, LocalGuide) else model
    _, cov = base.exact_posterior(torch.zeros(1, base.data_dim))
    q = guide_posterior(model, torch.zeros(1, base.data_dim), torch.zeros(1, dtype=torch.long))
    if isinstance(q, torch.distributions.MultivariateNormal):
        return 0.0
    zero = torch.zeros(base.latent_dim, dtype=torch.float64)
    return float(ppca.kl_gaussians(zero, ppca.best_mean_field(cov), zero, cov))


# ----------------------------------------------------------------------------- one guide


def study_guide(family: str, guide: str, values: dict, train: TrainConfig, data, splits: dict, args) -> dict:
    model = build_guided(family, values, guide, data, args)
    t0 = time.perf_counter()
    result = fit(model, data, train)
    train_seconds = time.perf_counter() - t0
    local = LocalSettings(lr=args.local_lr, decay=args.local_decay, n_particles=args.local_particles,
                          window=args.local_window, patience=args.local_patience, max_steps=args.local_max_steps)
    out: dict = {"training": {"steps": result.steps, "epochs": result.epochs, "seconds": train_seconds,
                              "final_train_loss": result.final_loss}}
    out.update(study(model, data.train, splits, args.n_samples, local, seed=args.seed,
                     log=lambda line: print(f"[{family}/{guide}] {line}", file=sys.stderr)))
    cf = closed_form_gap(model, family)
    if cf is not None:
        for split in splits:
            out[split]["approximation_gap_closed_form"] = cf
    return out


# ----------------------------------------------------------------------------- report


def pm(e: dict, digits: int = 3) -> str:
    return f"{e['mean']:.{digits}f} ± {e['se']:.{digits}f}"


def seconds(s: float) -> str:
    return f"{s:.2g}"


def family_lines(family: str, res: dict, data_name: str, n_samples: int) -> list[str]:
    cfg = res["model_config"]
    desc = ", ".join(f"{k} = {v}" for k, v in cfg.items())
    exact = family == "ppca"
    lines = [f"## {family} on {data_name} ({desc})", "",
             ("log p(x) and the ELBOs are exact (closed forms); IWAE from "
              f"K = {n_samples} importance samples per row." if exact else
              f"L[q] and IWAE_K from K = {n_samples} importance samples per row; log p(x) is the larger of the "
              "K-sample IWAE estimates with q and with q* as proposal."), "",
             "| guide | rows | ELBO L[q] | IWAE_K | log p(x) | inference gap | approximation gap | "
             "amortization gap | infer (s/row) | q* steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for guide, r in res["guides"].items():
        for split in ("train", "test"):
            if split not in r:
                continue
            s = r[split]
            gap_note = ""
            if "approximation_gap_closed_form" in s:
                gap_note = f" (closed form {s['approximation_gap_closed_form']:.3f})"
            infer = seconds(s["inference_seconds_per_row"]) + ("" if s["inference"] == "guide" else " (opt.)")
            lines.append(f"| {guide} | {split} ({s['n_rows']}) | {pm(s['elbo'])} | {pm(s['iwae'])} | "
                         f"{pm(s['log_likelihood'])} | {pm(s['inference_gap'])} | "
                         f"{pm(s['approximation_gap'])}{gap_note} | {pm(s['amortization_gap'])} | {infer} | "
                         f"{s['local']['steps']} |")
    lines += ["", "| guide | training steps | training time (s) | final training loss | test ELBO | "
              "inferring a new row (s/row) |", "|---|---|---|---|---|---|"]
    for guide, r in res["guides"].items():
        t = r["training"]
        test = r.get("test")
        lines.append(f"| {guide} | {t['steps']} | {t['seconds']:.1f} | {t['final_train_loss']:.3f} | "
                     f"{pm(test['elbo']) if test else '—'} | "
                     f"{seconds(test['inference_seconds_per_row']) + ('' if test['inference'] == 'guide' else ' (local optimization)') if test else '—'} |")
    return lines + [""]


def gap_chart(results: dict, path: str, title: str) -> None:
    """Stacked bars per guide, training and test rows side by side: approximation gap
    (bottom) + amortization gap (top) = inference gap (error bar: ±2 standard errors)."""
    import numpy as np

    from elbolab.inference.plots import plt, save_figure

    fams = list(results)
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams) + 1, 4.6), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        guides = list(results[fam]["guides"])
        xs = np.arange(len(guides))
        for j, (split, hatch) in enumerate((("train", ""), ("test", "//"))):
            off = xs + (j - 0.5) * 0.38
            get = [results[fam]["guides"][g].get(split) for g in guides]
            approx = np.array([s["approximation_gap"]["mean"] if s else np.nan for s in get])
            amort = np.array([s["amortization_gap"]["mean"] if s else np.nan for s in get])
            total = np.array([s["inference_gap"]["mean"] if s else np.nan for s in get])
            err = np.array([2 * s["inference_gap"]["se"] if s else np.nan for s in get])
            ax.bar(off, approx, 0.36, color="C0", hatch=hatch, edgecolor="white",
                   label="approximation gap" if j == 0 else None)
            ax.bar(off, amort, 0.36, bottom=approx, color="C1", hatch=hatch, edgecolor="white",
                   label="amortization gap" if j == 0 else None)
            ax.errorbar(off, total, yerr=err, fmt="none", ecolor="k", capsize=3, lw=1,
                        label="inference gap ±2 s.e." if j == 0 else None)
            for xo, v, e in zip(off, total, err):
                if np.isfinite(v):
                    ax.annotate(f"{v:.2f}", (xo, v + e), textcoords="offset points", xytext=(0, 2),
                                ha="center", fontsize=6)
        ax.set_xticks(xs)
        ax.set_xticklabels(guides, rotation=25, ha="right", fontsize=8)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylabel("gap (nats per datapoint)")
        ax.set_title(f"{fam}: training (plain) and test (hatched) rows", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, -0.1, "A per-datapoint guide cannot infer test rows: there its q is the local optimization "
             "itself (amortization gap 0). Bars: means over rows; numbers: the inference gap.",
             ha="center", fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main


@_cli.guarded(PROG)
def main(argv: list[str] | None = None, on_trained: Callable[[str, str], None] | None = None) -> int:
    """``on_trained(family, guide)`` is called after each guide's study (report.py's progress bar)."""
    args = build_parser().parse_args(argv)
    if args.local_patience < 0:
        raise UsageError(f"--local-patience must be >= 0, got {args.local_patience}")
    if args.local_decay > 1:
        raise UsageError(f"--local-decay must be in (0, 1], got {args.local_decay}")
    families = FAMILIES if args.model == "all" else (args.model,)
    run_dir = RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL)
    run_dir.check()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tune_malloc()
    settings, datas = {}, {}
    for fam in families:  # everything checked before any training
        settings[fam] = family_settings(args, fam)
        likelihood = models.REGISTRY[fam][1].likelihood
        datas[fam] = _cli.data_spec(args, likelihood).load(likelihood)
        check_config_for_data(settings[fam][1], datas[fam])
        for guide in ("amortized-full", "amortized"):  # the Configs against the data (e.g. latent_dim <= d)
            models.build_model(fam, model_config(fam, settings[fam][0], guide), datas[fam].data_dim, 2)
        if args.local_particles * datas[fam].data_dim > (1 << 27):
            raise UsageError(f"--local-particles {args.local_particles} x {datas[fam].data_dim} data dimensions "
                             "is too large for one tensor")
    t_start = time.perf_counter()
    cmd = "elbolab compare-guides " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {}
    with run_dir:
        for fam in families:
            values, train = settings[fam]
            data = datas[fam]
            splits = eval_rows(data, args.n_rows, args.seed)
            results[fam] = {"model_config": values, "train_config": train.to_dict(), "data": data.describe(),
                            "guides": {}}
            for guide in GUIDES[fam]:
                print(f"[{fam}/{guide}] training ...", file=sys.stderr)
                results[fam]["guides"][guide] = study_guide(fam, guide, values, train, data, splits, args)
                if on_trained is not None:
                    on_trained(fam, guide)
        wall = time.perf_counter() - t_start
        data_name = next(iter(datas.values())).name
        lines = [f"# Amortized, semi-amortized and per-datapoint guides on {data_name}", "",
                 f"Command: `{cmd.strip()}`", "",
                 "Nats per datapoint; ± one standard error over rows (the gaps: of the per-row differences). "
                 "inference gap = log p(x) - L[q] = approximation gap (log p(x) - L[q*]) + amortization gap "
                 "(L[q*] - L[q]); q* is the per-row optimum of the guide's family for the fixed model "
                 f"(Adam, rate {args.local_lr} decayed by {args.local_decay} per window without improvement, "
                 f"{args.local_particles} draws, windows of {args.local_window} steps, patience {args.local_patience}). A per-datapoint guide cannot infer test rows: there q is the "
                 "local optimization from N(0, I), so its amortization gap is 0 by construction. "
                 "Infer: wall time of the guide's pass over the rows (or of the optimization) per row.", ""]
        for fam in families:
            lines += family_lines(fam, results[fam], data_name, args.n_samples)
        lines += ["![gap decomposition](gaps.png)", "", f"_Wall time {wall:.0f} s, "
                  f"{torch.get_num_threads()} thread(s)._", ""]
        metrics = {"command": cmd.strip(), "units": "nats per datapoint", "n_samples": args.n_samples,
                   "n_rows": args.n_rows, "seed": args.seed, "wall_seconds": wall,
                   "semi_amortized": {"steps": args.semi_steps, "step_size": args.semi_step_size,
                                      "n_particles": args.semi_particles, "natural": not args.semi_plain_gradient,
                                      "differentiable": not args.semi_first_order},
                   "models": results}
        gap_chart(results, run_dir.file("gaps.png"),
                  f"Inference-gap decomposition on {data_name} ({args.n_rows} rows per split)")
        save_json(metrics, run_dir.file("metrics.json"))
        with atomic_write(run_dir.file("compare.md")) as f:
            f.write("\n".join(lines))
    print("\n".join(lines[lines.index("") + 1:]).split("![gap")[0].rstrip())
    print(f"-> {args.out}/compare.md, metrics.json, gaps.png ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
