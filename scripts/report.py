"""The main job: the whole workbench at work on one data set, and one report.

Stages, each a set of ordinary runs (the same programs a user runs) in a directory
of its own under --out, summarized in one line on the terminal:

  ppca        probabilistic PCA by SVI against its closed-form optimum and EM
  gaussian    the Bayesian Gaussian: three variational guides, the exact conjugate
              posterior and NUTS, on two strongly correlated pixels
  vae         the VAE and the mixture-prior VAE under the ELBO and IWAE objectives,
              with amortized and per-datapoint guides; importance-sampled test
              log-likelihoods
  gaps        amortized, semi-amortized and per-datapoint guides for PPCA, the VAE and
              the mixture-prior VAE: the inference gap split into its approximation
              and amortization parts (scripts/compare_guides.py)
  identities  the course notes' identities, each measured

Writes --out/report.md and --out/report.html (self-contained: figures embedded) and
prints the report's path. Every number is in nats per datapoint unless it says
otherwise; ± is one standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from elbolab.inference.errors import UsageError
from elbolab.inference.files import atomic_write, save_json
from elbolab.models.datasources import load_dataset
from elbolab.inference.runs import RunDir, RunSpec, fit_run
from elbolab.inference.train_config import TrainConfig
from elbolab.scripts import _cli
from elbolab.scripts._document import Document

PROG = "elbolab report"
STAGES = ("ppca", "gaussian", "vae", "gaps", "identities")

# Training budgets per data set: the digits run is the main job (minutes on 2 cores);
# MNIST is the same study at full size.
BUDGETS = {
    "digits": {"ppca_steps": 600, "ppca_batch": None, "ppca_lr": 0.03, "gaussian_steps": 1500,
               "vae_epochs": 100, "vae_batch": 100, "n_samples": 1000,
               "latent_dim": 4, "hidden": (128, 128), "n_components": 10, "iwae_k": 5, "nuts_samples": 300,
               "gaps": []},
    # PPCA on MNIST: full-batch steps cost ~2 s each; 2000 steps of 2000 rows at 0.05 end
    # 0.008 nats from the optimum in 76 s (600 of 5000 rows at 0.03: 0.77 nats short)
    "mnist": {"ppca_steps": 2000, "ppca_batch": 2000, "ppca_lr": 0.05, "gaussian_steps": 1500,
              "vae_epochs": 10, "vae_batch": 100, "n_samples": 1000,
              "latent_dim": 10, "hidden": (300, 300), "n_components": 50, "iwae_k": 5, "nuts_samples": 300,
              # compare_guides' MNIST budget (README): 5 epochs per model and guide, 100 rows per split
              "gaps": ["--val-fraction", "0", "--latent-dim", "10", "--hidden", "300,300", "--epochs", "5"]},
}
BUDGETS["fashion-mnist"] = BUDGETS["mnist"]
GAUSSIAN_ROWS = 1257  # the Bayesian Gaussian's rows at most (the digits' training rows)
# --quick: the same report from tiny budgets (a smoke test of the whole pipeline; numbers not meaningful)
QUICK = {"ppca_steps": 60, "gaussian_steps": 60, "vae_epochs": 2, "n_samples": 50, "nuts_samples": 40,
         "gaps": ["--epochs", "2", "--n-rows", "20", "--local-max-steps", "100"]}


def build_parser():
    p = _cli.parser(PROG, __doc__, "examples:\n  elbolab report --out runs/report\n"
                    "  elbolab report --dataset mnist --data-dir ../shared/data/mnist --out runs/report-mnist\n")
    p.add_argument("--dataset", default="digits", choices=("digits", "mnist", "fashion-mnist"),
                   help="data set for the whole study")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="IDX files for mnist / fashion-mnist")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of the stages {','.join(STAGES)}")
    p.add_argument("--threads", type=_cli.positive_int, default=None,
                   help="torch CPU threads (default: 1 for the digits, whose small tensors gain nothing from "
                        "more on a shared machine; torch's default otherwise)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budgets: checks the whole pipeline in a fraction of the time; the numbers are not "
                        "meaningful")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    _cli.add_out_args(p, default="runs/report")
    return p


class Study:
    """What the stages share: where to write, the data flags, budgets, the seed."""

    def __init__(self, args):
        self.args, self.out, self.seed = args, args.out, args.seed
        self.budget = {**BUDGETS[args.dataset], **(QUICK if args.quick else {})}
        self.summary: dict = {"dataset": args.dataset, "seed": args.seed, "stages": {}}
        self.bar = None  # the running stage's progress bar (its unit: one run of a program)

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def data(self, binarize: str, path: str | None = None) -> dict:
        return {"dataset": self.args.dataset, "data_dir": self.args.data_dir, "data_path": path,
                "binarize": binarize, "val_fraction": 0.1}

    def fit(self, name: str, model: str, model_config: dict, train: dict, data: dict, **eval_kw) -> dict:
        """One ordinary fit into the run directory OUT/name; returns its metrics."""
        spec = {"model": model, "model_config": model_config,
                "train": {**TrainConfig(seed=self.seed, progress=self.args.progress,
                                        threads=self.args.threads).to_dict(), **train},
                "data": data, "eval": {"eval_particles": 10, "n_samples": self.budget["n_samples"], **eval_kw}}
        metrics = fit_run(RunSpec.from_dict(spec, name), os.path.join(self.out, name), overwrite=True)
        self.tick()
        return metrics


def diagnose(study: "Study", name: str, *flags: str) -> dict:
    """elbolab.scripts.diagnose on the run OUT/name (InferenceData, Pareto k, LOO, predictive checks,
    written into that run directory); returns its diagnostics.json."""
    from elbolab.scripts import diagnose as diagnose_script

    run_dir = os.path.join(study.out, name)
    argv = [run_dir, "--seed", str(study.seed), "--n-samples", str(max(21, study.budget["n_samples"])), *flags]
    if study.args.threads is not None:
        argv += ["--threads", str(study.args.threads)]
    if study.args.quick:  # later flags win: few rows and draws
        argv += ["--max-rows", "40", "--draws", "20"]
    log = io.StringIO()  # its one-line summary: the report has it
    with contextlib.redirect_stdout(log):
        status = diagnose_script.main(argv)
    if status != 0:
        raise RuntimeError(f"diagnose.py failed on {run_dir}")
    study.tick()

    with open(os.path.join(run_dir, "diagnostics.json")) as f:
        return json.load(f)


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

    k = 10 if study.args.dataset == "digits" else 20
    data = study.data("none")
    n_train = load_dataset(study.args.dataset, data_dir=study.args.data_dir).n_train
    m = study.fit("ppca", "ppca", {"latent_dim": k, "guide": "amortized-full"},
                  {"steps": study.budget["ppca_steps"], "batch_size": study.budget["ppca_batch"] or n_train,
                   "lr": study.budget["ppca_lr"], "lr_final": 1e-4,
                   "epochs": None}, data)
    x = load_dataset(study.args.dataset, data_dir=study.args.data_dir).train
    t0 = time.perf_counter()
    W, loc, scale, em_steps, em_hist = ppca.em(x, k, steps=2000, tol=1e-9, seed=study.seed)
    em_seconds = time.perf_counter() - t0
    q = m["quantities"]
    em_within = next((i + 1 for i, v in enumerate(em_hist) if _v(m, "mle_log_likelihood") - v < 0.01), None)
    gap = _v(m, "mle_log_likelihood") - _v(m, "train_log_likelihood")
    doc.heading("Probabilistic PCA: SVI against the closed form")
    doc.para(f"z ~ N(0, I_{k}), x | z ~ N(W z + loc, noise_scale² I) on the {study.args.dataset} grey levels; "
             "SVI with the full-covariance amortized guide (its family holds the exact posterior), "
             f"{'full-batch' if not study.budget['ppca_batch'] else str(study.budget['ppca_batch']) + '-row mini-batch'} "
             f"Adam {study.budget['ppca_lr']} → 1e-4 over {m['run']['steps']} steps. The exact log-likelihood and the ELBO's exact gap "
             "KL(q || p(z|x)) come from the closed forms (Tipping & Bishop).")
    doc.table(["quantity", "value"], [
        ["closed-form maximum log-likelihood (train)", f"{_v(m, 'mle_log_likelihood'):.4f}"],
        ["SVI: exact log-likelihood at the fitted parameters (train)", f"{_v(m, 'train_log_likelihood'):.4f}"],
        ["SVI: distance to the optimum", f"{gap:.4f}"],
        ["SVI: ELBO (train, 10 draws per row)", _pm(q["train_elbo"], 4)],
        ["SVI: exact KL(q ‖ p(z|x)) (train)", _pm(q.get("train_exact_kl"), 4)],
        ["SVI: exact test log-likelihood", _pm(q.get("test_log_likelihood"), 4)],
        ["SVI: importance-sampled test log-likelihood (K = "
         f"{q['test_importance_log_likelihood']['K']})", _pm(q.get("test_importance_log_likelihood"), 4)],
        ["SVI: convergence", m["run"]["convergence"]["verdict"]],
        ["SVI: seconds", f"{m['run']['seconds']:.1f}"],
        ["EM: steps to within 0.01 nats / to convergence", f"{em_within} / {em_steps}"],
        ["EM: seconds to convergence", f"{em_seconds:.2f}"],
    ])
    doc.figure("ppca/loss_curve.png", "PPCA: the training ELBO per datapoint against the step, with the "
               "closed-form maximum log-likelihood (dashed)")
    dg = diagnose(study, "ppca", "--max-rows", "270")
    ll = dg["importance_log_likelihood"]
    doc.para(f"Diagnostics (`ppca/summary.md`, InferenceData `ppca/diagnostics.nc`): the importance-sampled test "
             f"log-likelihood {_pm(ll, 3)} (K = {ll['n_samples']}) against the exact "
             f"{_v(m, 'test_log_likelihood'):.3f}; rows whose importance weights have Pareto k > 0.7: {_k_share(ll)} "
             "(the guide is the exact posterior up to training error, so the weights are nearly constant). "
             "Posterior-predictive p-values: " + ", ".join(f"{k} {v['p_value']:.2f}" for k, v in dg["ppc"].items())
             + " (near 0 or 1: the model misses that statistic of the data).")
    doc.figure("ppca/ppc.png", "PPCA: posterior-predictive checks (replicated statistics against the observed)")
    study.summary["stages"]["ppca"] = {"optimum": _v(m, "mle_log_likelihood"), "svi": _v(m, "train_log_likelihood"),
                                       "svi_seconds": m["run"]["seconds"], "em_steps": em_steps,
                                       "em_seconds": em_seconds, "convergence": m["run"]["convergence"]}
    return (f"SVI {m['run']['steps']} steps: {gap:.4f} nats below the closed-form optimum "
            f"{_v(m, 'mle_log_likelihood'):.3f}; "
            f"EM within 0.01 in {em_within} steps")


def correlated_pixels(x: torch.Tensor) -> tuple[int, int, float]:
    """The pair of pixels with the largest |correlation| (a posterior with correlated loc)."""
    xs = x.double()
    sd = xs.std(0)
    keep = torch.nonzero(sd > 0.2).flatten()
    c = torch.corrcoef(xs[:, keep].T)
    c.fill_diagonal_(0)
    i, j = divmod(int(c.abs().argmax()), c.shape[0])
    return int(keep[i]), int(keep[j]), float(c[i, j])


def stage_gaussian(study: Study, doc: Document) -> str:
    full = load_dataset(study.args.dataset, data_dir=study.args.data_dir)
    i, j, _ = correlated_pixels(full.train)
    os.makedirs(os.path.join(study.out, "gaussian"), exist_ok=True)
    path = os.path.join(study.out, "gaussian", "pixels.npy")
    pair = full.train[:, [i, j]].double()
    if pair.shape[0] > GAUSSIAN_ROWS:  # MNIST: a seeded subset (NUTS over 54,000 rows costs minutes, and
        # the lesson, the mean-field variance ratio 1 - rho^2, does not depend on the number of rows)
        keep = torch.randperm(pair.shape[0], generator=torch.Generator().manual_seed(study.seed))[:GAUSSIAN_ROWS]
        pair = pair[keep.sort().values]
    rho = float(torch.corrcoef(pair.T)[0, 1])  # of the rows the posterior sees
    np.save(path, ((pair - pair.mean(0)) / pair.std(0)).numpy())  # standardized: the prior's scale is 1
    data = {"dataset": "digits", "data_dir": None, "data_path": path, "binarize": "none", "val_fraction": 0.1}
    n_train = load_dataset(data_path=path).n_train
    rows, res = [], {}
    for guide in ("mean-field", "full-rank", "structured"):
        res[guide] = m = study.fit(f"gaussian/{guide}", "gaussian", {"guide": guide},
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
    # NUTS, the exact posterior and the guide side by side: scripts.diagnose on the structured run
    nuts_samples = study.budget["nuts_samples"]
    dg = diagnose(study, "gaussian/structured", "--nuts-samples", str(nuts_samples), "--nuts-warmup",
                  str(min(300, nuts_samples)), "--nuts-chains", "2")
    import arviz as az

    nuts_post = az.from_netcdf(os.path.join(study.out, "gaussian", "structured", "diagnostics_nuts.nc")).posterior
    draws = torch.as_tensor(nuts_post["loc"].values).reshape(-1, 2)
    rows.append([f"NUTS (2 chains x {nuts_samples} draws)", *(f"{v:.4f}" for v in draws.mean(0)),
                 *(f"{v:.4f}" for v in draws.std(0)), "", ""])
    d = load_dataset(data_path=path)
    nuts_s = dg["nuts"]["seconds"]
    doc.heading("The Bayesian Gaussian: variational, exact and NUTS posteriors")
    doc.para(f"Pixels {i} and {j} of the {study.args.dataset} images (grey levels, standardized; correlation "
             f"{rho:.2f}), {d.n_train} training rows, full-batch SVI ({study.budget['gaussian_steps']} steps, 16 draws each), a Normal-Wishart prior on (loc, precision). The posterior of loc is "
             "correlated like the data, so the mean-field guide, which cannot represent that correlation, "
             "under-estimates the variance of loc (the notes: variational inference under-estimates variance); "
             f"for a Gaussian posterior with that correlation the factor would be 1 - rho² = {1 - rho**2:.2f}. The "
             "structured guide's family holds the exact posterior; the KL column is log p(X) - ELBO, exact "
             "evidence minus a Monte Carlo ELBO (± its standard error: a small negative value is Monte Carlo "
             "noise around 0).")
    doc.table(["posterior", "E[loc_1]", "E[loc_2]", "sd(loc_1)", "sd(loc_2)", "var(loc) guide / exact",
               "KL(q ‖ posterior), nats"], rows)
    gk = dg["guide_pareto_k"]
    doc.para(f"The structured guide's Pareto k (Yao et al. 2018, over its draws of the global latents): "
             f"{gk['k']:.2f}: {gk['reading']}. NUTS: {dg['nuts']['divergences']} divergences in "
             f"{dg['nuts']['seconds']:.0f} s. Summary tables (mean, sd, HDI; ESS and R-hat for NUTS) and the "
             "InferenceData files: `gaussian/structured/summary.md`, `diagnostics*.nc`.")
    doc.figure("gaussian/structured/forest.png", "The Bayesian Gaussian: guide, exact and NUTS posteriors "
               "side by side (94% intervals)")
    doc.figure("gaussian/structured/pair.png", "The Bayesian Gaussian: pairwise posterior draws")
    study.summary["stages"]["gaussian"] = {"pixels": [i, j], "correlation": rho,
                                           "variance_ratio": {g: m["closed_forms"]["guide_loc_variance_ratio"]
                                                              for g, m in res.items()},
                                           "nuts_seconds": nuts_s}
    mf = res["mean-field"]["closed_forms"]["guide_loc_variance_ratio"]
    kl = res["structured"]["quantities"]["train_kl_to_posterior"]["value"] * n_train
    return (f"mean-field var(loc)/exact = {min(mf):.2f}-{max(mf):.2f} (1 - rho² = {1 - rho**2:.2f}); "
            f"structured KL {kl:.3f} nats")


def stage_vae(study: Study, doc: Document) -> str:
    b = study.budget
    data = study.data("threshold" if study.args.dataset == "digits" else "dynamic")
    rows, best = [], None
    for model in ("vae", "gmvae"):
        cfg = {"latent_dim": b["latent_dim"], "hidden": list(b["hidden"]), "activation": "elu"}
        if model == "gmvae":
            cfg["n_components"] = b["n_components"]
        for guide in ("amortized", "per-datapoint"):
            for objective in ("elbo", "iwae"):
                name = f"{model}-{guide}-{objective}"
                train = {"objective": objective, "n_particles": b["iwae_k"] if objective == "iwae" else 1,
                         "epochs": b["vae_epochs"], "batch_size": b["vae_batch"], "lr": 1e-3}
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
    doc.para(f"Bernoulli decoders on the binarized {study.args.dataset} images; latent dimension {b['latent_dim']}, "
             f"MLPs {'-'.join(str(h) for h in b['hidden'])} (ELU); the mixture prior has {b['n_components']} "
             f"components. {b['vae_epochs']} epochs, batch {b['vae_batch']}, Adam 1e-3. The test log-likelihood is "
             f"the importance-sampled estimate with K = {b['n_samples']} draws per image (a lower bound in "
             "expectation). A per-datapoint guide has no encoder: it cannot infer test images without an "
             "optimization of its own, so its test columns are empty here (the inference-gap section below "
             "measures per-datapoint q on test rows by that optimization).")
    doc.table(["model", "guide", "objective", "train ELBO", "test ELBO", "test log-likelihood",
               "rows with Pareto k > 0.7", "active units", "seconds"], rows)
    doc.para("Pareto k (PSIS, Vehtari et al.) of each test image's importance weights: above 0.7 the "
             "estimate of that row is unreliable; the column marks the whole estimate unreliable when more than "
             "1% of the rows are (the weights have too heavy a tail for K draws).")
    for name in ("vae-amortized-elbo", "gmvae-amortized-iwae"):
        for pic, what in (("reconstructions.png", "test images and their reconstructions"),
                          ("prior_samples.png", "samples from the prior (Bernoulli means)"),
                          ("latent_means.png", "the guide's means of the test images, in 2-D")):
            if os.path.exists(os.path.join(study.out, "vae", name, pic)):
                doc.figure(f"vae/{name}/{pic}", f"{name}: {what}")
    for name in ("vae-amortized-elbo", "gmvae-amortized-iwae"):
        dg = diagnose(study, f"vae/{name}", "--max-rows", "270")
        doc.figure(f"vae/{name}/pareto_k.png", f"{name}: Pareto k of each test image's importance weights")
        doc.para(f"{name}: posterior-predictive p-values " + ", ".join(
            f"{k} {v['p_value']:.2f}" for k, v in dg["ppc"].items()) + "; diagnostics and InferenceData in "
            f"`vae/{name}/summary.md`, `vae/{name}/diagnostics.nc`.")
    study.summary["stages"]["vae"] = {"best": best}
    return f"{len(rows)} fits; best test log-likelihood {best[1]:.2f} ({best[0]})" if best else f"{len(rows)} fits"

def stage_gaps(study: Study, doc: Document) -> str:
    from elbolab.scripts import compare_guides

    a, out = study.args, os.path.join(study.out, "gaps")
    argv = ["--dataset", a.dataset, "--out", out, "--overwrite", "--seed", str(study.seed),
            "--n-samples", str(study.budget["n_samples"]), *study.budget["gaps"]]
    if a.data_dir is not None:
        argv += ["--data-dir", a.data_dir]
    if a.threads is not None:
        argv += ["--threads", str(a.threads)]
    if a.progress is not None:
        argv.append("--progress" if a.progress else "--no-progress")
    log = io.StringIO()  # its tables go to the report, not to the terminal
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = compare_guides.main(argv, on_trained=lambda family, guide: study.tick())
    if status != 0:
        raise RuntimeError(f"compare_guides.py failed: {log.getvalue().strip().splitlines()[-1:]}")
    with atomic_write(os.path.join(out, "log.txt")) as f:
        f.write(log.getvalue())
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
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
    doc.heading("Amortized against per-datapoint guides: the inference gap")
    doc.para("One model per guide, trained with that guide; then on test rows, with the model fixed, the "
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

    args = argparse.Namespace(dataset=study.args.dataset, data=None, data_dir=study.args.data_dir,
                              binarize="none", val_fraction=0.1, latent_dim=2, quick=study.args.quick,
                              seed=study.seed)
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
    doc.heading("The course notes' identities, measured")
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


# runs of a program per stage (fits, diagnoses, trainings of compare_guides), for the stage's bar
STAGE_RUNS = {"ppca": 2, "gaussian": 4, "vae": 10, "gaps": 11, "identities": 1}
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
    if args.dataset != "digits" and args.data_dir is None:
        raise UsageError(f"--dataset {args.dataset} needs --data-dir DIR holding its IDX files")
    load_dataset(args.dataset, data_dir=args.data_dir)  # bad data: refused before anything is written
    if args.threads is None and args.dataset == "digits":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    study = Study(args)
    doc = Document(f"elbolab report: {args.dataset}")
    doc.para("Every number is in nats per datapoint unless it says otherwise; ± is one standard error over the "
             "rows of the set (or over Monte Carlo draws where a row says so). Each section is an ordinary run "
             "of the workbench's own programs; their run directories sit beside this report.")
    t_all = time.perf_counter()
    with RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL) as run_dir:
        for name in stages:
            t0 = time.perf_counter()
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
            study.summary["stages"].setdefault(name, {})["seconds"] = seconds
            print(f"[{name}] {line} ({seconds:.0f} s)", flush=True)
        total = time.perf_counter() - t_all
        doc.heading("Run")
        doc.table(["stage", "seconds"], [[n, f"{study.summary['stages'][n]['seconds']:.1f}"] for n in stages]
                  + [["total", f"{total:.1f}"]])
        doc.para(f"Seed {args.seed}; torch threads {torch.get_num_threads()}. Reproduce with "
                 f"`elbolab report --dataset {args.dataset} --out {args.out}`.")
        study.summary["seconds"] = total
        save_json(study.summary, run_dir.file("summary.json"))
        md, page = write_report(doc, args.out)
    print(f"report: {md} (and {page}), {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
