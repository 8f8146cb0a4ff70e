"""The main job: the whole workbench at work on one data set, and one report.

Stages, each a set of ordinary runs (the same library calls a user makes) in a
directory of its own under --out, summarized in one line on the terminal:

  ppca        probabilistic PCA by SVI against its closed-form optimum and EM
  gaussian    the Bayesian Gaussian: three variational guides, the exact conjugate
              posterior and NUTS, on the two most strongly correlated columns
  vae         the VAE and the mixture-prior VAE under the ELBO and IWAE objectives,
              with amortized and per-datapoint guides; importance-sampled test
              log-likelihoods
  gaps        amortized, semi-amortized and per-datapoint guides for PPCA, the VAE and
              the mixture-prior VAE: the inference gap split into its approximation
              and amortization parts (the study of elbolab compare-guides)
  identities  the course notes' identities, each measured

The data: a built-in set (--dataset), or your own matrix (--data X.npy, real-valued or
binary; --test-data for your own test rows, --labels to colour the latent plots). On
your own data the VAEs get the likelihood the values call for (--likelihood auto:
bernoulli for 0/1 values, continuous-bernoulli for values in [0, 1], gaussian
otherwise), and a stage that does not apply is skipped, the report saying why.

Writes --out/report.md and --out/report.html (self-contained: figures embedded) and
prints the report's path. Every number is in nats per datapoint unless it says
otherwise; ± is one standard error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from elbolab.inference import diagnosis
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import tune_malloc
from elbolab.inference.files import atomic_write, save_json
from elbolab.models.datasources import DataSplits
from elbolab.inference.runs import DataSpec, RunDir, RunSpec, fit_run, read_run, resolve_binarize
from elbolab.inference.train_config import TrainConfig
from elbolab.models.vae import LIKELIHOODS
from elbolab.scripts import _cli
from elbolab.scripts._document import Document

PROG = "elbolab report"
STAGES = ("ppca", "gaussian", "vae", "gaps", "identities")

# Training budgets per data set: the digits run is the main job (minutes on 2 cores);
# MNIST is the same study at full size; a matrix of your own gets the digits' budget.
# "gaps": the gap study's settings over inference.guide_study's defaults: "families" and
# "guides" studied, "data" (DataSpec fields), "model" (its MODEL_FIELDS), "train"
# (TrainConfig fields), "n_rows", "local" (LocalSettings fields).
BUDGETS = {
    "digits": {"ppca_steps": 600, "ppca_batch": None, "ppca_lr": 0.03, "gaussian_steps": 1500,
               "vae_epochs": 100, "vae_batch": 100, "n_samples": 1000,
               "latent_dim": 4, "hidden": (128, 128), "n_components": 10, "iwae_k": 5, "nuts_samples": 300,
               "gaps": {}},
    # MNIST: the same study at full size, in under 20 minutes on one thread. PPCA (k = 20, W
    # from the principal directions at the data's spread): 2000 steps of 2000 rows at 0.005
    # decaying to 1e-4 end 0.006 nats per datapoint short of the closed form, 0.011 at 0.01, 0.12
    # at 0.05 (a high rate's noisy steps shorten the largest components, and a decayed rate
    # lengthens them back slowly). The VAEs: 5 epochs (3000 steps of 100 images) each, their test
    # log-likelihood with K = 250 importance samples on all 10,000 test images (the standard error
    # is set by the rows; K sets the bound's slack). The gap study: the VAE with its encoder and with a
    # per-datapoint table, 3 epochs each, 100 rows per split (compare-guides with the flow guide
    # and AIS on MNIST took 19 minutes by itself: results/compare-mnist-flows).
    "mnist": {"ppca_steps": 2000, "ppca_batch": 2000, "ppca_lr": 0.005, "gaussian_steps": 1500,
              "vae_epochs": 5, "vae_batch": 100, "n_samples": 250,
              "latent_dim": 10, "hidden": (300, 300), "n_components": 50, "iwae_k": 5, "nuts_samples": 300,
              "gaps": {"families": ("vae",), "guides": ("amortized", "per-datapoint"), "data": {"val_fraction": 0.0},
                       "model": {"latent_dim": 10, "hidden": (300, 300)}, "train": {"epochs": 3}, "n_rows": 100}},
}
BUDGETS["fashion-mnist"] = BUDGETS["mnist"]
GAUSSIAN_ROWS = 1257  # the Bayesian Gaussian's rows at most (the digits' training rows)
# --quick: the same report from tiny budgets (a smoke test of the whole pipeline; numbers not meaningful)
QUICK = {"ppca_steps": 60, "gaussian_steps": 60, "vae_epochs": 2, "n_samples": 50, "nuts_samples": 40,
         "gaps": {"train": {"epochs": 2}, "n_rows": 20, "local": {"max_steps": 100}}}
VAE_RUNS = [(model, guide, objective) for model in ("vae", "gmvae") for guide in ("amortized", "per-datapoint")
            for objective in ("elbo", "iwae")]
PICTURE_RUNS = ("vae-amortized-elbo", "gmvae-amortized-iwae")  # the VAE runs whose pictures the report shows
INTERVAL_TEXT = "94% central intervals"


def build_parser():
    p = _cli.parser(PROG, __doc__, "examples:\n  elbolab report --out runs/report\n"
                    "  elbolab report --data X.npy --labels y.npy --out runs/report-mine\n"
                    "  elbolab report --data train.npy --test-data test.npy --likelihood gaussian --out runs/r2\n"
                    "  elbolab report --dataset mnist --data-dir ~/data/mnist --out runs/report-mnist\n")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of the stages {','.join(STAGES)} (default: all)")
    _cli.add_data_args(p)
    p.add_argument("--likelihood", default="auto", choices=("auto",) + LIKELIHOODS,
                   help="the VAEs' observation model; auto: bernoulli for the built-in images (binarized) and for "
                        "0/1 data, continuous-bernoulli for values in [0, 1], gaussian otherwise (default: auto)")
    _cli.add_threads_arg(p)
    p.add_argument("--quick", action="store_true",
                   help="tiny budgets: checks the whole pipeline in a fraction of the time; the numbers are not "
                        "meaningful")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    _cli.add_out_args(p, default="runs/report")
    return p


def vae_likelihood(data: DataSplits, requested: str = "auto", binarize: str = "none") -> str:
    """The VAEs' likelihood: ``requested`` unless auto; auto: bernoulli for binarized data or
    0/1 values, continuous-bernoulli for values in [0, 1], gaussian otherwise."""
    if requested != "auto":
        return requested
    if binarize != "none":
        return "bernoulli"
    rows = torch.cat([data.train, data.val, data.test])
    if bool(((rows == 0) | (rows == 1)).all()):
        return "bernoulli"
    if float(rows.min()) >= 0 and float(rows.max()) <= 1:
        return "continuous-bernoulli"
    return "gaussian"


class Study:
    """What the stages share: where to write, the data flags, budgets, the seed; the data
    (``source``: as loaded, unbinarized) and what the VAEs observe."""

    def __init__(self, args, command: str = PROG):
        self.args, self.out, self.seed = args, args.out, args.seed
        self.command = command  # how the report was asked for
        self.own = args.data is not None  # a matrix of the user's own
        self.budget = {**BUDGETS["digits" if self.own else args.dataset], **(QUICK if args.quick else {})}
        self.source = self.load("none")
        self.name = self.source.name
        self.images = self.source.image_shape is not None
        # the VAEs: binarization and likelihood (the built-in images: binarized under a Bernoulli decoder)
        requested = args.likelihood
        if self.own:
            binarize = "none" if args.binarize == "auto" else args.binarize
        elif requested in ("auto", "bernoulli"):
            binarize = resolve_binarize(args.binarize, args.dataset, None, "bernoulli")
        else:
            binarize = "none" if args.binarize == "auto" else args.binarize
        self.vae_binarize = binarize
        self.vae_likelihood = vae_likelihood(self.source, requested, binarize)
        self.summary: dict = {"data": self.source.describe(), "seed": args.seed, "stages": {}, "skipped": {}}
        self.bar = None  # the running stage's progress bar (its unit: one run of a program)

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def data(self, binarize: str, path: str | None = None) -> dict:
        """The data spec of a run: the study's data (or the matrix ``path``, split alike)."""
        a = self.args
        if path is not None:
            return {"dataset": "digits", "data_path": path, "binarize": binarize, "val_fraction": a.val_fraction,
                    "test_fraction": a.test_fraction}
        return {"dataset": a.dataset, "data_dir": a.data_dir, "data_path": a.data, "binarize": binarize,
                "val_fraction": a.val_fraction, "test_fraction": a.test_fraction, "test_path": a.test_data,
                "labels_path": a.labels, "test_labels_path": a.test_labels}

    def load(self, binarize: str) -> DataSplits:
        return DataSpec.from_dict(self.data(binarize), "the data flags").load()

    def fit(self, name: str, model: str, model_config: dict, train: dict, data: dict, **eval_kw) -> dict:
        """One ordinary fit into the run directory OUT/name; returns its metrics."""
        spec = {"model": model, "model_config": model_config,
                "train": {**TrainConfig(seed=self.seed, progress=self.args.progress,
                                        threads=self.args.threads).to_dict(), **train},
                "data": data, "eval": {"eval_particles": 10, "n_samples": self.budget["n_samples"], **eval_kw}}
        metrics = fit_run(RunSpec.from_dict(spec, name), os.path.join(self.out, name), overwrite=True)
        self.tick()
        return metrics


def diagnose(study: Study, name: str, **settings) -> dict:
    """The library's diagnosis (``inference.diagnosis.diagnose_run``: InferenceData, Pareto k,
    LOO, predictive checks, figures) of the run OUT/name, written into that run directory;
    returns its numbers (diagnostics.json)."""
    run_dir = os.path.join(study.out, name)
    settings = {"seed": study.seed, "n_samples": max(21, study.budget["n_samples"]), **settings}
    if study.args.quick:  # few rows and draws
        settings.update(max_rows=40, draws=20)
    numbers = diagnosis.diagnose_run(read_run(run_dir), run_dir, **settings)
    study.tick()
    return numbers


def skip(study: Study, doc: Document, stage: str, heading: str, why: str) -> str:
    """A stage that does not apply to the data: said in the report, recorded in summary.json."""
    doc.heading(heading)
    doc.para(f"Skipped on {study.name}: {why}.")
    study.summary["skipped"][stage] = why
    return f"skipped: {why}"


def _k_share(est: dict | None) -> str:
    """The share of rows whose importance weights have Pareto k > 0.7, and the verdict
    (a quantity of ``metrics.json``, or a Pareto k summary)."""
    if not isinstance(est, dict):
        return "n/a"
    share = est.get("pareto_k_share", est.get("share_above_0.7"))
    if share is None and isinstance(est.get("pareto_k"), dict):
        share, est = est["pareto_k"].get("share_above_0.7"), est["pareto_k"]
    if share is None:
        return "n/a"
    return f"{100 * share:.1f}%" + ("" if est.get("reliable") is not False else " (**unreliable**)")


def _pm(est: dict | None, digits: int = 2) -> str:
    """value ± standard error of a quantity (``metrics.json``) or an estimate (mean, se)."""
    if not isinstance(est, dict):
        return "n/a"
    value = est.get("value", est.get("mean"))
    if est.get("se") is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {est['se']:.{digits}f}"


def _v(m: dict, name: str) -> float:
    """The value of the quantity ``name`` of a run's metrics."""
    return m["quantities"][name]["value"]


# ------------------------------------------------------------------------------ stages


def stage_ppca(study: Study, doc: Document) -> str:
    from elbolab.models import ppca

    heading = "Probabilistic PCA: SVI against the closed form"
    d = study.source.data_dim
    if d < 2:
        return skip(study, doc, "ppca", heading, "PPCA needs at least 2 columns (a latent dimension below the "
                                                  "data's)")
    k = 20 if study.args.dataset != "digits" and not study.own else min(10, d - 1)
    data = study.data("none")
    n_train = study.source.n_train
    m = study.fit("ppca", "ppca", {"latent_dim": k, "guide": "amortized-full"},
                  {"steps": study.budget["ppca_steps"], "batch_size": study.budget["ppca_batch"] or n_train,
                   "lr": study.budget["ppca_lr"], "lr_final": 1e-4,
                   "epochs": None}, data)
    x = study.source.train
    t0 = time.perf_counter()
    W, loc, scale, em_steps, em_hist = ppca.em(x, k, steps=2000, tol=1e-9, seed=study.seed)
    em_seconds = time.perf_counter() - t0
    q = m["quantities"]
    em_within = next((i + 1 for i, v in enumerate(em_hist) if _v(m, "mle_log_likelihood") - v < 0.01), None)
    gap = _v(m, "mle_log_likelihood") - _v(m, "train_log_likelihood")
    what = "grey levels" if study.images else "columns"
    doc.heading(heading)
    doc.para(f"z ~ N(0, I_{k}), x | z ~ N(W z + loc, noise_scale² I) on the {study.name} {what}; "
             "SVI with the full-covariance amortized guide (its family holds the exact posterior), "
             f"{'full-batch' if not study.budget['ppca_batch'] else str(study.budget['ppca_batch']) + '-row mini-batch'} "
             f"Adam {study.budget['ppca_lr']} → 1e-4 over {m['run']['steps']} steps. The exact log-likelihood and "
             "the ELBO's exact gap KL(q || p(z|x)) come from the closed forms (Tipping & Bishop).")
    imp = q.get("test_importance_log_likelihood")
    doc.table(["quantity", "value"], [
        ["closed-form maximum log-likelihood (train)", f"{_v(m, 'mle_log_likelihood'):.4f}"],
        ["SVI: exact log-likelihood at the fitted parameters (train)", f"{_v(m, 'train_log_likelihood'):.4f}"],
        ["SVI: distance to the optimum", f"{gap:.4f}"],
        ["SVI: ELBO (train, 10 draws per row)", _pm(q["train_elbo"], 4)],
        ["SVI: exact KL(q ‖ p(z|x)) (train)", _pm(q.get("train_exact_kl"), 4)],
        ["SVI: exact test log-likelihood", _pm(q.get("test_log_likelihood"), 4)],
        ["SVI: importance-sampled test log-likelihood (K = "
         f"{imp['K'] if imp else 'n/a'})", _pm(imp, 4)],
        ["SVI: convergence", m["run"]["convergence"]["verdict"]],
        ["SVI: seconds", f"{m['run']['seconds']:.1f}"],
        ["EM: steps to within 0.01 nats / to convergence",
         f"{em_within if em_within is not None else 'not within ' + str(len(em_hist))} / {em_steps}"],
        ["EM: seconds to convergence", f"{em_seconds:.2f}"],
    ])
    doc.figure("ppca/loss_curve.png", "PPCA: the training ELBO per datapoint against the step (grey: each "
               "mini-batch; blue: its running mean), the validation ELBO with its ±2 standard-error band (orange), "
               "and the closed-form maximum log-likelihood (red, dashed), which the ELBO approaches from below")
    dg = diagnose(study, "ppca", max_rows=270)
    ll = dg["importance_log_likelihood"]
    exact_test = q.get("test_log_likelihood")
    doc.para(f"Diagnostics (`ppca/summary.md`, InferenceData `ppca/diagnostics.nc`): the importance-sampled "
             f"log-likelihood of the first {dg['n_rows']} {dg['split']} rows {_pm(ll, 3)} (K = {ll['n_samples']})"
             + (f" against the exact {dg['exact_log_likelihood']:.3f} of the same rows"
                if "exact_log_likelihood" in dg else "")
             + f"; rows whose importance weights have Pareto k > 0.7: {_k_share(ll)} "
             "(the guide's family holds the exact posterior: at the optimum every weight would equal p(x)). "
             "Posterior-predictive p-values: " + ", ".join(f"{k} {v['p_value']:.2f}" for k, v in dg["ppc"].items())
             + " (near 0 or 1: the model misses that statistic of the data).")
    doc.figure("ppca/ppc.png", "PPCA: posterior-predictive checks (replicated statistics against the observed)")
    study.summary["stages"]["ppca"] = {"latent_dim": k, "optimum": _v(m, "mle_log_likelihood"),
                                       "svi": _v(m, "train_log_likelihood"),
                                       "exact_test": exact_test["value"] if exact_test else None,
                                       "svi_seconds": m["run"]["seconds"], "em_steps": em_steps,
                                       "em_seconds": em_seconds, "convergence": m["run"]["convergence"]}
    return (f"SVI {m['run']['steps']} steps: {gap:.4f} nats below the closed-form optimum "
            f"{_v(m, 'mle_log_likelihood'):.3f}; "
            f"EM within 0.01 in {em_within} steps")


def correlated_columns(x: torch.Tensor, min_sd: float = 0.0) -> tuple[int, int, float]:
    """The pair of columns with the largest |correlation| among those whose standard
    deviation exceeds ``min_sd`` (a posterior of loc with that correlation)."""
    xs = x.double()
    sd = xs.std(0)
    keep = torch.nonzero(sd > max(min_sd, 1e-12 * float(sd.max()))).flatten()
    if keep.numel() < 2:
        raise UsageError("fewer than two columns of the data vary")
    c = torch.corrcoef(xs[:, keep].T)
    c.fill_diagonal_(0)
    i, j = divmod(int(c.abs().argmax()), c.shape[0])
    return int(keep[i]), int(keep[j]), float(c[i, j])


GAUSSIAN_GUIDES = ("mean-field", "full-rank", "structured")


def stage_gaussian(study: Study, doc: Document) -> str:
    from elbolab.inference import diagnostic_plots as P
    from elbolab.inference.diagnostics import load_netcdf

    heading = "The Bayesian Gaussian: variational, exact and NUTS posteriors"
    full = study.source
    if full.data_dim < 2 or int((full.train.std(0) > 0).sum()) < 2:
        return skip(study, doc, "gaussian", heading, "the Bayesian Gaussian is fit to two correlated columns, and "
                                                      "fewer than two columns of the data vary")
    what = "pixels" if study.images else "columns"
    i, j, _ = correlated_columns(full.train, 0.2 if study.images else 0.0)  # images: no nearly constant pixel
    os.makedirs(os.path.join(study.out, "gaussian"), exist_ok=True)
    path = os.path.join(study.out, "gaussian", "pixels.npy" if study.images else "columns.npy")
    pair = full.train[:, [i, j]].double()
    if pair.shape[0] > GAUSSIAN_ROWS:  # MNIST: a seeded subset (NUTS over 54,000 rows costs minutes, and
        # the lesson, the mean-field variance ratio 1 - rho^2, does not depend on the number of rows)
        keep = torch.randperm(pair.shape[0], generator=torch.Generator().manual_seed(study.seed))[:GAUSSIAN_ROWS]
        pair = pair[keep.sort().values]
    rho = float(torch.corrcoef(pair.T)[0, 1])  # of the rows the posterior sees
    np.save(path, ((pair - pair.mean(0)) / pair.std(0)).numpy())  # standardized: the prior's scale is 1
    data = study.data("none", path)
    n_train = DataSpec.from_dict(data).load().n_train
    rows, res = [], {}
    for guide in GAUSSIAN_GUIDES:
        res[guide] = study.fit(f"gaussian/{guide}", "gaussian", {"guide": guide},
                               {"steps": study.budget["gaussian_steps"], "lr": 0.1, "lr_final": 1e-4,
                                "n_particles": 16, "epochs": None, "batch_size": n_train}, data)
    exact = res["structured"]["closed_forms"]["exact_posterior"]
    rows.append(["exact (Normal-Wishart)", *(f"{v:.4f}" for v in exact["loc_mean"]),
                 *(f"{v:.4f}" for v in exact["loc_sd"]), "1", "0"])
    for guide, m in res.items():
        g = m["closed_forms"]["guide_posterior"]
        kl = m["quantities"]["train_kl_to_posterior"]  # per datapoint; in total nats below
        rows.append([f"SVI, {guide}", *(f"{v:.4f}" for v in g["loc_mean"]), *(f"{v:.4f}" for v in g["loc_sd"]),
                     " / ".join(f"{v:.2f}" for v in m["closed_forms"]["guide_loc_variance_ratio"]),
                     f"{kl['value'] * n_train:.3f} ± {kl['se'] * n_train:.3f}"])
    # each guide's diagnosis; NUTS (2 chains) beside the exact posterior on the structured run's
    nuts_samples = study.budget["nuts_samples"]
    dg = {}
    for guide in GAUSSIAN_GUIDES:
        nuts = {"nuts_samples": nuts_samples, "nuts_warmup": min(300, nuts_samples), "nuts_chains": 2} \
            if guide == "structured" else {"nuts_samples": 0}
        dg[guide] = diagnose(study, f"gaussian/{guide}", draws=300, **nuts)
    base = os.path.join(study.out, "gaussian")
    posteriors = {g: load_netcdf(os.path.join(base, g, "diagnostics.nc")) for g in GAUSSIAN_GUIDES}
    posteriors["exact"] = load_netcdf(os.path.join(base, "structured", "diagnostics_exact.nc"))
    posteriors["NUTS"] = load_netcdf(os.path.join(base, "structured", "diagnostics_nuts.nc"))
    nuts_loc = posteriors["NUTS"].posterior["loc"].values.reshape(-1, 2)
    rows.append([f"NUTS (2 chains x {nuts_samples} draws)", *(f"{v:.4f}" for v in nuts_loc.mean(0)),
                 *(f"{v:.4f}" for v in nuts_loc.std(0, ddof=1)), "", ""])
    mf = res["mean-field"]["closed_forms"]["guide_loc_variance_ratio"]
    names = f"loc[0] is {what[:-1]} {i}, loc[1] {what[:-1]} {j}"
    draws = dg["structured"]["draws"] * dg["structured"]["chains"]
    P.interval_comparison_plot(
        posteriors, "loc", os.path.join(base, "loc.png"),
        f"The mean-field guide under-estimates the posterior variance of loc: var(loc) / exact = "
        f"{min(mf):.2f}-{max(mf):.2f}, 1 - rho² = {1 - rho**2:.2f} at correlation rho = {rho:.2f}",
        caption=f"{names} (standardized); {INTERVAL_TEXT} from {draws} draws of each guide and of the exact "
                f"posterior, and {2 * nuts_samples} of NUTS")
    P.forest_plot(posteriors, ["loc", "precision"], os.path.join(base, "forest.png"),
                  "The Bayesian Gaussian: every guide beside the exact posterior and NUTS",
                  caption=f"{names}; a panel per variable, each on its own scale, and per element of the precision "
                          "(its diagonal near +8, its off-diagonal near -7); its lower triangle (the matrix is "
                          "symmetric)")
    nuts_s = dg["structured"]["nuts"]["seconds"]
    doc.heading(heading)
    doc.para(f"{what.capitalize()} {i} and {j} of the {study.name} {'images' if study.images else 'rows'} "
             f"({'grey levels, ' if study.images else ''}standardized; correlation {rho:.2f}), {n_train} training "
             f"rows, full-batch SVI ({study.budget['gaussian_steps']} steps, 16 draws each), a Normal-Wishart prior "
             "on (loc, precision). The posterior of loc is correlated like the data, so the mean-field guide, which "
             "cannot represent that correlation, under-estimates the variance of loc (the notes: variational "
             "inference under-estimates variance); for a Gaussian posterior with that correlation the factor "
             f"would be 1 - rho² = {1 - rho**2:.2f}. The structured guide's family holds the exact posterior; the "
             "KL column is log p(X) - ELBO, exact evidence minus a Monte Carlo ELBO (± its standard error: a small "
             "negative value is Monte Carlo noise around 0).")
    doc.table(["posterior", "E[loc_1]", "E[loc_2]", "sd(loc_1)", "sd(loc_2)", "var(loc) guide / exact",
               "KL(q ‖ posterior), nats"], rows)
    doc.figure("gaussian/loc.png", f"The headline: loc's {INTERVAL_TEXT} of each guide on each coordinate's own "
               "scale (the exact posterior's shaded), with each one's variance against the exact variance (from the "
               "draws), and "
               "the 94% ellipses of (loc[0], loc[1]): a guide that holds the posterior's correlation lies on the "
               "exact ellipse; the mean-field guide's is axis-aligned, and narrower along each axis")
    ks = ", ".join(f"{g} {dg[g]['guide_pareto_k']['k']:.2f}" for g in GAUSSIAN_GUIDES)
    doc.para(f"Each guide's Pareto k (Yao et al. 2018, over its draws of the global latents; below 0.5 importance "
             f"sampling can correct the guide, above 0.7 it cannot): {ks}. NUTS: "
             f"{dg['structured']['nuts']['divergences']} divergences in {nuts_s:.0f} s. Summary tables (mean, sd, "
             "HDI; ESS and R-hat for NUTS) and the InferenceData files: `gaussian/GUIDE/summary.md`, "
             "`diagnostics*.nc`.")
    doc.figure("gaussian/forest.png", "Every posterior of loc and of the precision matrix, each variable (and each "
               "element of the precision) in a panel of its own on its own scale (loc's sd is about "
               f"{exact['loc_sd'][0]:.2g}, the "
               "precision's entries several units)")
    doc.figure("gaussian/structured/pair.png", "The structured guide's draws against the exact posterior's and "
               "NUTS's (drawn underneath); the outlines are each one's 94% ellipse")
    study.summary["stages"]["gaussian"] = {"columns": [i, j], "correlation": rho,
                                           "variance_ratio": {g: m["closed_forms"]["guide_loc_variance_ratio"]
                                                              for g, m in res.items()},
                                           "pareto_k": {g: dg[g]["guide_pareto_k"]["k"] for g in GAUSSIAN_GUIDES},
                                           "nuts_seconds": nuts_s}
    kl = res["structured"]["quantities"]["train_kl_to_posterior"]["value"] * n_train
    return (f"mean-field var(loc)/exact = {min(mf):.2f}-{max(mf):.2f} (1 - rho² = {1 - rho**2:.2f}); "
            f"structured KL {kl:.3f} nats")


LIKELIHOOD_TEXT = {"bernoulli": "Bernoulli decoders", "continuous-bernoulli": "continuous-Bernoulli decoders",
                   "gaussian": "Gaussian decoders (one learned noise scale)",
                   "gaussian-diag": "Gaussian decoders (a learned noise scale per column)"}


def stage_vae(study: Study, doc: Document) -> str:
    b = study.budget
    likelihood, binarize = study.vae_likelihood, study.vae_binarize
    data = study.data(binarize)
    latent_dim = min(b["latent_dim"], study.source.data_dim)
    rows, best = [], None
    for model, guide, objective in VAE_RUNS:
        cfg = {"latent_dim": latent_dim, "hidden": list(b["hidden"]), "activation": "elu", "likelihood": likelihood}
        if model == "gmvae":
            cfg["n_components"] = b["n_components"]
        name = f"{model}-{guide}-{objective}"
        train = {"objective": objective, "n_particles": b["iwae_k"] if objective == "iwae" else 1,
                 "epochs": b["vae_epochs"], "batch_size": b["vae_batch"], "lr": 1e-3, "lr_final": None,
                 "steps": None}
        m = study.fit(f"vae/{name}", model, {**cfg, "guide": guide}, train, data)
        q = m["quantities"]
        ll = q.get("test_log_likelihood")
        au = m["diagnostics"].get("test_active_units", {})
        rows.append([model, guide, f"{objective} (K = {train['n_particles']})", _pm(q["train_elbo"]),
                     _pm(q.get("test_elbo")), _pm(ll), _k_share(ll),
                     f"{au['active_units']} / {au['latent_dim']}" if au else "n/a",
                     f"{m['run']['seconds']:.1f}"])
        if isinstance(ll, dict) and (best is None or ll["value"] > best[1]):
            best = (name, ll["value"])
    doc.heading("VAEs: objectives and guides")
    observed = (f"the {'binarized ' if binarize != 'none' else ''}{study.name} "
                + ("images" if study.images else "rows"))
    chosen = ("" if study.args.likelihood != "auto" else
              " (the likelihood the data call for: " + {"bernoulli": "0/1 values",
                                                        "continuous-bernoulli": "values in [0, 1]",
                                                        "gaussian": "real values",
                                                        "gaussian-diag": "real values"}[likelihood] + ")")
    doc.para(f"{LIKELIHOOD_TEXT[likelihood]} on {observed}{chosen}; latent dimension {latent_dim}, "
             f"MLPs {'-'.join(str(h) for h in b['hidden'])} (ELU); the mixture prior has {b['n_components']} "
             f"components. {b['vae_epochs']} epochs, batch {b['vae_batch']}, Adam 1e-3. The test log-likelihood is "
             f"the importance-sampled estimate with K = {b['n_samples']} draws per row (a lower bound in "
             "expectation). A per-datapoint guide has no encoder: it cannot infer test rows without an "
             "optimization of its own, so its test columns are empty here (the inference-gap section below "
             "measures per-datapoint q on test rows by that optimization).")
    doc.table(["model", "guide", "objective", "train ELBO", "test ELBO", "test log-likelihood",
               "rows with Pareto k > 0.7", "active units", "seconds"], rows)
    doc.para("Pareto k (PSIS, Vehtari et al.) of each test row's importance weights: above 0.7 the "
             "estimate of that row is unreliable; the column marks the whole estimate unreliable when more than "
             "1% of the rows are (the weights have too heavy a tail for K draws).")
    mean_name = "Bernoulli means" if likelihood == "bernoulli" else "means of p(x | z)"
    for name in PICTURE_RUNS:
        for pic, what in (("reconstructions.png", "test images and their reconstructions"),
                          ("prior_samples.png", f"samples from the prior ({mean_name})"),
                          ("latent_means.png", "the guide's means of the test rows, in 2-D"
                                               + (", coloured by label" if study.source.test_labels is not None
                                                  else ""))):
            if os.path.exists(os.path.join(study.out, "vae", name, pic)):
                doc.figure(f"vae/{name}/{pic}", f"{name}: {what}")
    for name in PICTURE_RUNS:
        dg = diagnose(study, f"vae/{name}", max_rows=270)
        doc.figure(f"vae/{name}/pareto_k.png", f"{name}: Pareto k of each test row's importance weights")
        shown = dg["figures_show"]
        doc.para(f"{name}: posterior-predictive p-values " + ", ".join(
            f"{k} {v['p_value']:.2f}" for k, v in dg["ppc"].items()) + "; diagnostics and InferenceData in "
            f"`vae/{name}/summary.md`, `vae/{name}/diagnostics.nc`.")
        if name == PICTURE_RUNS[0]:
            doc.figure(f"vae/{name}/forest.png",
                       f"{name}: the guide's posterior of z for rows {', '.join(map(str, shown['rows']))} of the "
                       f"{dg['n_rows']} diagnosed ({shown['why_rows']}), latent dims "
                       f"{', '.join(map(str, shown.get('latent', [])))} (those whose means vary most over the rows): "
                       "z is one vector per row, so a few are shown")
    study.summary["stages"]["vae"] = {"likelihood": likelihood, "binarize": binarize, "best": best}
    return f"{len(rows)} fits ({likelihood}); best test log-likelihood {best[1]:.2f} ({best[0]})" if best \
        else f"{len(rows)} fits ({likelihood})"


def stage_gaps(study: Study, doc: Document) -> str:
    from elbolab.inference import guide_study
    from elbolab.inference.compare import LocalSettings

    heading = "Amortized against per-datapoint guides: the inference gap"
    a, out = study.args, os.path.join(study.out, "gaps")
    d = study.source.data_dim
    if d < 2:
        return skip(study, doc, "gaps", heading, "the guides are compared on PPCA and VAEs with a latent dimension "
                                                  "below the data's, and the data have one column")
    budget = study.budget["gaps"]
    families, model = budget.get("families", guide_study.FAMILIES), dict(budget.get("model", {}))
    skipped_vaes = ""
    if study.own:
        data = DataSpec(data_path=a.data, test_path=a.test_data, binarize="auto", val_fraction=a.val_fraction,
                        test_fraction=a.test_fraction)
        model["latent_dim"] = min(5, d - 1)
        if study.vae_likelihood != "bernoulli" or study.vae_binarize != "none":
            families = ("ppca",)  # compare-guides' VAEs have Bernoulli decoders: 0/1 data only
            skipped_vaes = (f"The VAEs are left out here: compare-guides' VAEs have Bernoulli decoders, and these "
                            f"data call for a {study.vae_likelihood} likelihood. ")
    else:
        data = DataSpec(dataset=a.dataset, data_dir=a.data_dir, binarize="auto", **budget.get("data", {}))
    train = {"threads": a.threads, "progress": a.progress, **budget.get("train", {})}
    subjects = [guide_study.builtin_subject(family, data, model=model, train=train, guides=budget.get("guides"),
                                            seed=study.seed) for family in families]
    settings = guide_study.StudySettings(n_rows=budget.get("n_rows", guide_study.StudySettings.n_rows),
                                         n_samples=study.budget["n_samples"], seed=study.seed,
                                         local=LocalSettings(**budget.get("local", {})))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "log.txt"), "w") as log:  # the study's progress lines: not the terminal's
        metrics = guide_study.run_guide_study(subjects, RunDir(out, overwrite=True), settings,
                                              command=f"{study.command} (its gaps stage)",
                                              on_trained=lambda family, guide: study.tick(),
                                              log=lambda line: print(line, file=log, flush=True))
    rows, amortization = [], {}
    for family, res in metrics["models"].items():
        for guide, r in res["guides"].items():
            t = r.get("test")
            if t is None:
                continue
            note = (f" (exact {t['approximation_gap_closed_form']:.3f})"
                    if "approximation_gap_closed_form" in t else "")
            infer = f"{t['inference_seconds_per_row']:.1e}" + ("" if t["inference"] == "guide" else " (optimization)")
            rows.append([family, guide, _pm(t["elbo"], 3), _pm(t["inference_gap"], 3),
                         _pm(t["approximation_gap"], 3) + note, _pm(t["amortization_gap"], 3),
                         f"{r['training']['seconds']:.1f}", infer])
            if guide == "amortized":
                amortization[family] = t["amortization_gap"]["mean"]
    doc.heading(heading)
    doc.para(skipped_vaes + "One model per guide, trained with that guide; then on test rows, with the model fixed, the "
             "guide's q and q*, the best Gaussian of the same family for each row (a per-row optimization). "
             "inference gap = log p(x) - L[q] = approximation gap (log p(x) - L[q*], the family's limit) + "
             "amortization gap (L[q*] - L[q], what the encoder gives away by sharing one network across rows; "
             "Cremer, Li & Duvenaud 2018). PPCA's log p(x) and ELBOs are exact; for the VAEs log p(x) is the "
             f"larger K = {metrics['n_samples']} importance estimate (with q or with q* as proposal). A "
             "per-datapoint guide has no encoder: on a test row its q is that optimization itself, so its "
             "amortization gap is 0 by construction and its cost is the optimization's. "
             f"{metrics['n_rows']} test rows per model; full tables in [gaps/compare.md](gaps/compare.md).")
    doc.table(["model", "guide", "test ELBO", "inference gap", "approximation gap", "amortization gap",
               "training (s)", "inferring a test row (s)"], rows)
    doc.figure("gaps/gaps.png", "the inference gap of each guide, split into approximation (family) and "
                                "amortization (encoder) parts, on training and test rows")
    study.summary["stages"]["gaps"] = {"amortization_gap": amortization}
    return f"{len(rows)} guides; amortization gap of the encoders: " + ", ".join(
        f"{k} {v:.3f}" for k, v in amortization.items())


def stage_identities(study: Study, doc: Document) -> str:
    from elbolab.scripts import identities as ids
    from elbolab.scripts import demos

    heading = "The course notes' identities, measured"
    latent_dim = 2
    if study.source.data_dim <= latent_dim:
        return skip(study, doc, "identities", heading,
                    f"the identities' PPCA rows need a latent dimension ({latent_dim}) below the data's "
                    f"({study.source.data_dim} columns)")
    a = study.args
    args = argparse.Namespace(dataset=a.dataset, data=a.data, test_data=a.test_data, labels=None, test_labels=None,
                              data_dir=a.data_dir, binarize="none", val_fraction=a.val_fraction,
                              test_fraction=a.test_fraction, latent_dim=latent_dim, quick=a.quick, seed=study.seed)
    out = os.path.join(study.out, "identities")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    metrics = demos.run(args, out)
    study.tick()
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    rows = [ids.Row(**r) for r in metrics["rows"]]
    save_json(metrics, os.path.join(out, "metrics.json"))
    with atomic_write(os.path.join(out, "demos.md")) as f:
        f.write(demos.markdown(metrics, rows))
    doc.heading(heading)
    doc.para(f"{metrics['identities_hold']} of {metrics['identities']} identities hold. Each row measures both "
             "sides (nats); s.e. is the standard error of a Monte Carlo side ('exact' when both are closed forms); "
             "a row holds when the difference is within the stated tolerance in the direction of its relation. "
             "Details: [identities/demos.md](identities/demos.md).")
    table = []
    for r in rows:
        table.append([r.key, r.statement, demos.fmt(r.lhs), demos.fmt(r.rhs), demos.fmt(r.difference),
                      "exact" if r.se is None else demos.fmt(r.se), r.relation,
                      "yes" if r.holds else ("**no: the notes' table is inconsistent**" if r.kind != "identity"
                                             else "**no**")])
    doc.table(["row", "statement", "left", "right", "difference", "s.e.", "relation", "holds"], table)
    for fig, what in (("iwae_vs_k.png", "IWAE_K against K: increasing toward log p(x)"),
                      ("bimodal_fit.png", "reverse against forward KL on a bimodal target"),
                      ("samples_for_accuracy.png", "samples for 0.1-nat accuracy: naive Monte Carlo against "
                                                   "importance sampling")):
        doc.figure(f"identities/{fig}", what)
    study.summary["stages"]["identities"] = {"hold": metrics["identities_hold"], "of": metrics["identities"],
                                             "data_checks_failed": metrics["data_checks_failed"]}
    return (f"{metrics['identities_hold']} of {metrics['identities']} identities hold; data checks failed: "
            f"{', '.join(metrics['data_checks_failed']) or 'none'}")


# runs of a program per stage (fits, diagnoses, trainings of the gap study), for the stage's bar
STAGE_RUNS = {"ppca": 2, "gaussian": 6, "vae": 10, "gaps": 11, "identities": 1}
STAGE_FUNCTIONS = {"ppca": stage_ppca, "gaussian": stage_gaussian, "vae": stage_vae, "gaps": stage_gaps,
                   "identities": stage_identities}


def write_report(doc: Document, out: str) -> tuple[str, str]:
    md, page = os.path.join(out, "report.md"), os.path.join(out, "report.html")
    with atomic_write(md) as f:
        f.write(doc.to_markdown())
    with atomic_write(page) as f:
        f.write(doc.to_html(out))
    return md, page


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise UsageError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(STAGES)}")
    if args.dataset != "digits" and args.data_dir is None and args.data is None:
        raise UsageError(f"--dataset {args.dataset} needs --data-dir DIR holding its IDX files")
    _cli.check_data_args(args)
    _cli.set_threads(args.threads)
    tune_malloc()  # process-wide, for every stage's chunked evaluations of K x rows tensors
    command = " ".join(argv if argv is not None else sys.argv[1:])
    # the data loaded and checked: bad data are refused before anything is written
    study = Study(args, f"{PROG} {command}")
    DataSpec.from_dict(study.data(study.vae_binarize)).load(study.vae_likelihood)  # e.g. --likelihood bernoulli
    doc = Document(f"elbolab report: {study.name}")
    doc.para("Every number is in nats per datapoint unless it says otherwise; ± is one standard error over the "
             "rows of the set (or over Monte Carlo draws where a row says so). Each section is an ordinary run "
             "of the workbench's own programs; their run directories sit beside this report.")
    t_all, cpu_all = time.perf_counter(), time.process_time()
    with RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL) as run_dir:
        for name in stages:
            t0, cpu0 = time.perf_counter(), time.process_time()
            # a bar per stage over its runs (each fit's own bar below it while it trains);
            # it gives way to the stage's one-line summary
            study.bar = tqdm(total=STAGE_RUNS[name], desc=name, unit="run", leave=False, dynamic_ncols=True,
                             disable=None if args.progress is None else not args.progress)
            try:
                line = STAGE_FUNCTIONS[name](study, doc)
            finally:
                study.bar.close()
                study.bar = None
            seconds = time.perf_counter() - t0
            # CPU seconds beside the wall-clock ones: on a shared machine the wall clock counts the
            # other programs' turns too
            study.summary["stages"].setdefault(name, {}).update(seconds=seconds,
                                                                cpu_seconds=time.process_time() - cpu0)
            print(f"[{name}] {line} ({seconds:.0f} s)", flush=True)
        total, cpu_total = time.perf_counter() - t_all, time.process_time() - cpu_all
        doc.heading("Run")
        doc.table(["stage", "seconds (wall clock)", "CPU seconds"],
                  [[n, f"{s['seconds']:.1f}", f"{s['cpu_seconds']:.1f}"]
                   for n, s in ((n, study.summary["stages"][n]) for n in stages)] + [["total", f"{total:.1f}", f"{cpu_total:.1f}"]])
        doc.para(f"Seed {args.seed}; torch threads {torch.get_num_threads()}. Reproduce with "
                 f"`elbolab report {command}`.")
        study.summary["seconds"], study.summary["cpu_seconds"] = total, cpu_total
        save_json(study.summary, run_dir.file("summary.json"))
        md, page = write_report(doc, args.out)
    print(f"report: {md} (and {page}), {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
