"""The course notes' identities, each measured: a table of left side, right side, their
difference, the standard error of a Monte Carlo side, the tolerance used, and whether the
statement holds (scripts/identities.py has the statements and their reasons).

Writes into --out DIR: metrics.json (every row with its details), demos.md (the table,
the notes under it and the sub-tables) and the figures iwae_vs_k.png, bimodal_fit.png and
samples_for_accuracy.png. The PPCA rows use the data's closed-form maximum-likelihood
PPCA with --latent-dim factors, evaluated on its test rows; the VAE row uses a small
Bernoulli VAE (models.vae, k = 2, 32 tanh units) at its initialization on the
data binarized.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from elbolab.scripts import identities as ids
from elbolab.inference.errors import UsageError
from elbolab.inference.files import atomic_write, save_json
from elbolab.inference.plots import save_figure
from elbolab.models.vae import VAE, VAEConfig
from elbolab.inference.runs import RunDir
from elbolab.scripts import _cli

import matplotlib.pyplot as plt  # noqa: E402  (inference.plots selected the Agg backend)

PROG = "elbolab demos"
EXAMPLES = """examples:
  elbolab demos --out runs/demos
  elbolab demos --data X.npy --latent-dim 3 --out runs/demos-mine --overwrite
"""

# sample sizes: (full, --quick)
SIZES = {
    "eye_mc": (20000, 4000), "is_single": (20000, 4000), "is_confirm_reps": (50, 0), "iwae_rows": (100, 20),
    "iwae_samples": (1024, 256), "elbo_particles": (200, 50), "bimodal_steps": (400, 200), "grad_groups": (40, 20),
    "ml_reps": (20, 8), "ml_eval": (20000, 5000), "kl_samples": (100000, 20000), "kl_grid": (801, 401),
}


def small_vae(data_dim: int, n_rows: int) -> VAE:
    """The row-6 VAE: models.vae's VAE, small (k = 2, one tanh layer of 32), float64, at
    its (seeded) initialization: p(z) = N(0, I), x | z ~ Bernoulli(logits = f(z)),
    q(z | x) = N(loc(x), diag scale(x)^2)."""
    return VAE(VAEConfig(latent_dim=2, hidden=(32,), activation="tanh"), data_dim, n_rows).double()


def binarized(x: torch.Tensor) -> torch.Tensor:
    """0/1 data for the Bernoulli VAE: grey levels in [0, 1] thresholded at 0.5; any other
    matrix at each column's mean."""
    if float(x.min()) >= 0 and float(x.max()) <= 1:
        return (x >= 0.5).double()
    return (x >= x.mean(0)).double()


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    _cli.add_data_args(p)
    p.add_argument("--latent-dim", type=_cli.positive_int, default=2,
                   help="PPCA latent dimension k for the PPCA rows (2-4, 6, 7, 9)")
    p.add_argument("--quick", action="store_true", help="fewer samples and steps (a smoke test; wider errors)")
    p.add_argument("--threads", type=_cli.positive_int, default=1,
                   help="torch CPU threads (the tensors here are small: one thread is fastest on a shared machine)")
    _cli.add_out_args(p, default="runs/demos")
    return p


# ----------------------------------------------------------------------------- the table


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "exact"
    if isinstance(v, (list, tuple)):
        return " / ".join(fmt(a, digits) for a in v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}"


def cell(text: str) -> str:
    """Text for a markdown table cell (a literal | would end the cell)."""
    return text.replace("|", "\\|")


def markdown_table(rows: list[ids.Row]) -> list[str]:
    out = ["| # | statement (seed) | left side | rel. | right side | difference | s.e. | tolerance | holds |",
           "|---|---|---|:-:|---|---|---|---|:-:|"]
    for r in rows:
        rel = {"<=": "≤", ">=": "≥"}.get(r.relation, r.relation)
        holds = ("**yes**" if r.holds else "**no**") + ("" if r.kind == "identity" else f" ({r.kind})")
        out.append(f"| {r.key} | {cell(r.statement)} ({r.seed}) | {fmt(r.lhs)} | {rel} | {fmt(r.rhs)} | "
                   f"{fmt(r.difference, 3)} | {fmt(r.se, 3)} | {fmt(r.tolerance, 3)} | {holds} |")
    return out


def print_table(rows: list[ids.Row], file=sys.stdout) -> None:
    for r in rows:
        kind = "" if r.kind == "identity" else f" [{r.kind}]"
        print(f"{r.key:>3} {'holds' if r.holds else 'FAILS':5}  {r.statement} (seed {r.seed}){kind}", file=file)
        print(f"      {r.lhs_label or 'lhs'}: {fmt(r.lhs)}  {r.relation}  {r.rhs_label or 'rhs'}: {fmt(r.rhs)}"
              f"   difference {fmt(r.difference, 3)}, s.e. {fmt(r.se, 3)}, tolerance {fmt(r.tolerance, 3)}",
              file=file)
        if r.note:
            print(f"      {r.note}", file=file)


# ----------------------------------------------------------------------------- figures


def figure_iwae(rows: list[ids.Row], path: str) -> None:
    """IWAE_K - log p(x) against K for the rows 3b, 9a, 9b, with 2 standard errors."""
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = {"3b": "q: posterior shifted 0.5 sd, scale x1.5", "9a": "q = prior p(z)",
              "9b": "q: posterior scale x0.7"}
    for r in rows:
        if r.key in labels and "gap_se" in r.details:
            K, gap, se = r.details["K"], r.details["gap"], r.details["gap_se"]
            ax.errorbar(K, gap, yerr=[2 * s for s in se], fmt="o-", ms=3, capsize=2, label=labels[r.key])
    ax.axhline(0.0, color="k", lw=1, ls="--", label="log p(x) (exact)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1e-2)  # linear within 0.01 nat of log p(x), logarithmic beyond
    ax.set_xlabel("K (importance samples per datapoint)")
    ax.set_ylabel("IWAE_K - log p(x) (nats per datapoint)")
    ax.set_title("IWAE_K rises with K toward log p(x) and never passes it (PPCA, ±2 s.e.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def figure_bimodal(row: ids.Row, path: str) -> None:
    det = row.details
    target = ids.bimodal_target(det["separation"], det["mode_scale"])
    sd = det["target_sd"]
    z = torch.linspace(-4 * sd, 4 * sd, 801, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(z, target.log_prob(z).exp(), color="0.85", label="target p(z): two modes")
    for name, color in (("reverse", "C0"), ("forward", "C3")):
        f = det[f"{name}_fit"]
        q = torch.distributions.Normal(torch.tensor(f["loc"], dtype=torch.float64), f["scale"])
        how = "Trace_ELBO" if name == "reverse" else "reweighted wake-sleep"
        ax.plot(z, q.log_prob(z).exp(), color=color, lw=2,
                label=f"{name} KL ({how}): N({f['loc']:.2f}, {f['scale']:.2f}²)")
    ax.axvline(det["target_mean"] - sd, color="0.4", ls=":", lw=1)
    ax.axvline(det["target_mean"] + sd, color="0.4", ls=":", lw=1, label=f"target mean ± sd ({sd:.2f})")
    ax.set_xlabel("z")
    ax.set_ylabel("density")
    ax.set_title("A Gaussian fitted to two modes: reverse KL picks one, forward KL covers both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def figure_samples(by_dim: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in (("box", "naive MC: z uniform on a box"), ("prior", "naive MC: z ~ p(z)"),
                        ("guide", "importance sampling: z ~ q(z|x)")):
        ax.plot(by_dim["latent_dim"], [math.log10(max(k, 1)) for k in by_dim[name]], "o-", label=label)
    ax.set_xlabel("latent dimension k (PPCA, closed-form maximum likelihood)")
    ax.set_ylabel("log10 samples for 0.1-nat accuracy")
    ax.set_title("Samples K = rho / 0.01 for sd[log p_hat] = 0.1 nat (median over test rows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the run


def run(args, out: str) -> dict:
    q = 1 if args.quick else 0
    n = {k: v[q] for k, v in SIZES.items()}
    seed = args.seed
    data = _cli.data_spec(args, "gaussian").load("gaussian")
    train = data.train.double()
    evaluation = next((s for s in (data.test, data.val, data.train) if s.shape[0]), data.train).double()
    k = args.latent_dim
    if not 1 <= k < data.data_dim:
        raise UsageError(f"--latent-dim {k} must be below the data dimension {data.data_dim}")
    timings, rows = {}, []

    def stage(name, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        rows.extend(result)
        return result

    stage("1 marginalization", lambda: ids.marginalization(n_samples=n["eye_mc"], seed=seed))
    model = ids.ppca_model(train, k, q_shift=0.5, q_inflate=1.5)
    rho_prior = ids.relative_variance(model, evaluation, "prior")
    typical = int(rho_prior.argsort()[len(rho_prior) // 2])  # the test row with the median rho
    stage("2 naive MC against IS", lambda: ids.importance_sampling(
        model, evaluation[typical], n_samples=n["is_single"], K=100, confirm_reps=n["is_confirm_reps"], seed=seed))
    sub = evaluation[: n["iwae_rows"]]
    stage("3 Jensen and IWAE_K", lambda: ids.jensen_and_iwae(model, sub, n_samples=n["iwae_samples"], seed=seed))
    stage("4 ELBO forms", lambda: ids.elbo_forms(model, evaluation, n_particles=n["elbo_particles"], seed=seed))
    stage("5 reverse and forward KL", lambda: ids.reverse_forward_kl(steps=n["bimodal_steps"], seed=seed))
    stage("6 gradients, PPCA", lambda: ids.ppca_gradient_rows(model, evaluation[:10], n_groups=n["grad_groups"],
                                                              seed=seed))

    def vae_rows():
        torch.manual_seed(seed)
        xb = binarized(evaluation[:10])
        vae = small_vae(data.data_dim, xb.shape[0])
        return ids.reparameterization_vs_score(vae.model, vae.guide, list(vae.encoder.parameters()),
                                               (xb,), "small Bernoulli VAE (models.vae) at initialization", ("6d",),
                                               n_groups=n["grad_groups"], seed=seed)

    stage("6 gradients, VAE", vae_rows)
    stage("7 ML and forward KL", lambda: ids.ml_minimizes_forward_kl(
        train, k, reps=n["ml_reps"], n_eval=n["ml_eval"], seed=seed))
    stage("8 mixture KL estimator", lambda: ids.mixture_kl_unbiased(n["kl_samples"], n_grid=n["kl_grid"], seed=seed))
    stage("9 IWAE lower bound", lambda: ids.iwae_lower_bound(train, sub, k, n_samples=n["iwae_samples"], seed=seed))
    rows.sort(key=lambda r: (int("".join(c for c in r.key if c.isdigit())), r.key))

    t0 = time.perf_counter()
    dims = list(range(1, min(10, data.data_dim - 1) + 1))
    by_dim = ids.samples_for_accuracy_by_dim(train, evaluation, dims)
    timings["2 samples by latent dimension"] = round(time.perf_counter() - t0, 3)
    figures = {"iwae_vs_k.png": lambda p: figure_iwae(rows, p),
               "bimodal_fit.png": lambda p: figure_bimodal(next(r for r in rows if r.key == "5a"), p),
               "samples_for_accuracy.png": lambda p: figure_samples(by_dim, p)}
    for name, draw in figures.items():
        draw(os.path.join(out, name))
    identities = [r for r in rows if r.kind == "identity"]
    return {"units": "nats (per datapoint where a data set is involved)", "seed": seed, "quick": args.quick,
            "data": data.describe(), "latent_dim": k, "evaluation_rows": int(evaluation.shape[0]),
            "is_datapoint": typical, "sizes": n, "rows": [r.to_dict() for r in rows],
            "identities_hold": sum(r.holds for r in identities), "identities": len(identities),
            "all_identities_hold": all(r.holds for r in identities),
            "data_checks_failed": [r.key for r in rows if r.kind != "identity" and not r.holds],
            "samples_for_accuracy_by_latent_dim": by_dim, "figures": list(figures), "timings": timings}


def markdown(metrics: dict, rows: list[ids.Row]) -> str:
    by_key = {r.key: r for r in rows}
    lines = [f"# The course notes' identities, measured ({metrics['data']['dataset']})", "",
             f"{metrics['identities_hold']} of {metrics['identities']} identities hold. Numbers are nats "
             "(per datapoint where data are involved); s.e. is one standard error of a Monte Carlo side "
             "('exact' when both sides are closed forms); a row holds when the difference is within the "
             "tolerance in the direction of its relation.", ""]
    lines += markdown_table(rows)
    lines += ["", "Notes:", ""]
    lines += [f"- **{r.key}** {r.note}" for r in rows if r.note]
    lines += ["", "## Row 2: naive Monte Carlo against importance sampling, one test digit", "",
              "| proposal | rho = Var[w]/p(x)² | samples for 0.1 nat | bias at K = 100 | sd at K = 100 "
              "| delta method: bias, sd | RMSE at K_0.1 (replicates) |", "|---|---|---|---|---|---|---|"]
    for key in ("2a", "2b", "2c"):
        d = by_key[key].details
        conf = (f"{d['rmse_at_K01']:.3f} ({d['confirm_reps']})" if "rmse_at_K01" in d else "not run")
        lines.append(f"| {d['proposal']} | {d['rho']:.4g} | {d['K_for_0.1_nat']} | {d['bias_log_phat']:+.3f} ± "
                     f"{d['bias_log_phat_se']:.3f} | {d['sd_log_phat']:.3f} | {d['bias_predicted']:+.3f}, "
                     f"{d['sd_predicted']:.3f} | {conf} |")
    lines += ["", "The delta method (bias -rho/2K, sd sqrt(rho/K)) needs K much larger than rho; at K = 100 the "
              "naive estimators are outside that regime: their error at that budget is worse than its "
              "first-order prediction."]
    by_dim = metrics["samples_for_accuracy_by_latent_dim"]
    lines += ["", "Samples for 0.1-nat accuracy against the latent dimension (closed form, median over test rows):",
              "", "| k | " + " | ".join(str(k) for k in by_dim["latent_dim"]) + " |",
              "|---|" + "---|" * len(by_dim["latent_dim"])]
    for name in ("box", "prior", "guide"):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in by_dim[name]) + " |")
    r3 = by_key["3b"].details
    lines += ["", "![samples for accuracy](samples_for_accuracy.png)", "",
              "## Rows 3 and 9: IWAE_K against K", "", "| K | " + " | ".join(str(k) for k in r3["K"]) + " |",
              "|---|" + "---|" * len(r3["K"]),
              "| IWAE_K - log p(x) | " + " | ".join(f"{g:.4f}" for g in r3["gap"]) + " |",
              "| s.e. | " + " | ".join(f"{s:.4f}" for s in r3["gap_se"]) + " |",
              "", "![IWAE against K](iwae_vs_k.png)", "", "## Row 5: a Gaussian fitted to a bimodal target", ""]
    d5 = by_key["5a"].details
    lines += ["| fit | loc | scale | mass between the modes |", "|---|---|---|---|",
              f"| target | {d5['target_mean']:.3f} | {d5['target_sd']:.3f} (overall sd) | "
              f"{d5['mass_between_modes']['target']:.3f} |",
              f"| reverse KL, Trace_ELBO | {d5['reverse_fit']['loc']:.3f} | {d5['reverse_fit']['scale']:.3f} | "
              f"{d5['mass_between_modes']['reverse']:.3f} |",
              f"| reverse-KL optimum (quadrature) | {d5['reverse_optimum']['loc']:.3f} | "
              f"{d5['reverse_optimum']['scale']:.3f} | |",
              f"| forward KL, reweighted wake-sleep | {d5['forward_fit']['loc']:.3f} | "
              f"{d5['forward_fit']['scale']:.3f} | {d5['mass_between_modes']['forward']:.3f} |",
              "", "![bimodal fit](bimodal_fit.png)", "",
              f"_Seed {metrics['seed']}; {metrics['seconds']:.1f} s._", ""]
    return "\n".join(lines)


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir = RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL)
    run_dir.check()
    t0 = time.perf_counter()
    with run_dir:
        metrics = run(args, args.out)
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        rows = [ids.Row(**r) for r in metrics["rows"]]
        print_table(rows)
        save_json(metrics, run_dir.file("metrics.json"))
        with atomic_write(run_dir.file("demos.md")) as f:
            f.write(markdown(metrics, rows))
    print(f"{metrics['identities_hold']} of {metrics['identities']} identities hold"
          + (f"; data checks that found the notes wrong: {', '.join(metrics['data_checks_failed'])}"
             if metrics["data_checks_failed"] else "") + f" ({metrics['seconds']:.1f} s). Wrote {args.out}/")
    if not metrics["all_identities_hold"]:
        print(f"{PROG}: warning: an identity does not hold: "
              + ", ".join(r.key for r in rows if r.kind == "identity" and not r.holds), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
