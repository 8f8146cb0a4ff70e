"""Posterior diagnostics of a trained run: an ArviZ InferenceData of its guide, the Pareto
k of its importance weights, PSIS-LOO and WAIC, posterior predictive checks, and the
posterior beside the exact one and NUTS's where those exist.

Rebuilds the model from RUN_DIR/config.json and RUN_DIR/checkpoint.ckpt and writes into
DIR (= --out, by default RUN_DIR; the run's own files are never touched):

* diagnostics.nc: the InferenceData (posterior, posterior_predictive, log_likelihood,
  sample_stats, observed_data; see inference/diagnostics.py), and beside it
  diagnostics_exact.nc / diagnostics_nuts.nc for the references;
* summary.csv: az.summary of every posterior (mean, sd, 94% HDI; ESS and R-hat for NUTS);
* summary.md: what to read first, with the tables and the pictures;
* diagnostics.json: the numbers (Pareto k, LOO, WAIC, posterior predictive p-values);
* pareto_k.png (per-row latents: k of each row's K importance weights), loo_pareto_k.png,
  ppc.png, forest.png, pair.png, posterior.png.

Which rows: a guide with per-row latents (PPCA, the VAEs) is diagnosed on the first
--max-rows rows of --split (default: test for an amortized guide, train for a
per-datapoint one); a guide with global latents (the Bayesian Gaussian) on all training
rows, the data its posterior is conditioned on. NUTS runs for global latents of at most
100 dimensions (--nuts-samples 0: never).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time

import numpy as np
import torch

from elbolab.inference import diagnostics as D
from elbolab.inference import diagnostic_plots as P
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import global_latent_sites, importance_estimates
from elbolab.inference.traces import infers_new_rows, whole_set_log_weights
from elbolab.models.protocol import ExactLikelihood
from elbolab.inference.files import atomic_write, save_json
from elbolab.inference.mcmc import run_nuts
from elbolab.scripts import _cli

PROG = "elbolab diagnose"
NUTS_MAX_DIM = 100  # NUTS (dense mass matrix) runs for global latents of at most this many dimensions
MD_ROWS = 40  # summary lines per posterior in summary.md (summary.csv has them all)
PLOT_ROWS = 3  # rows of per-row latents in the forest / pair / posterior plots

EXAMPLES = """examples:
  elbolab diagnose runs/ppca
  elbolab diagnose runs/vae --max-rows 200 --draws 200 --n-samples 5000 --out runs/vae-diag
  elbolab diagnose runs/bayes --nuts-samples 1000 --nuts-chains 4
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by scripts.fit")
    p.add_argument("--out", metavar="DIR", default=None, help="where the diagnostics go (default: RUN_DIR)")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="rows to diagnose (per-row latents; default: test, or train for a per-datapoint guide)")
    p.add_argument("--max-rows", type=_cli.positive_int, default=500,
                   help="diagnose the first N rows of the split (per-row latents)")
    p.add_argument("--draws", type=_cli.positive_int, default=100, help="draws per chain from the guide")
    p.add_argument("--chains", type=_cli.positive_int, default=1,
                   help="independent sets of draws from the guide (VI draws are independent)")
    p.add_argument("--n-samples", type=_cli.positive_int, default=1000,
                   help="importance samples K per row for the Pareto k (at least 21)")
    p.add_argument("--nuts-samples", type=int, default=500, help="NUTS draws per chain (0: no NUTS)")
    p.add_argument("--nuts-warmup", type=_cli.positive_int, default=300, help="NUTS warm-up steps per chain")
    p.add_argument("--nuts-chains", type=_cli.positive_int, default=2, help="NUTS chains (run one after another)")
    p.add_argument("--threads", type=_cli.positive_int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="random seed of every draw")
    return p


def _rows(run, split: str | None, max_rows: int, global_latents: bool):
    """(split name, x, training-row indices or None, row labels)."""
    data, model = run.data, run.model
    if global_latents:
        if split not in (None, "train"):
            raise UsageError(f"{run.path}: the guide's latents are global (a posterior given the training rows); "
                             f"--split {split} does not apply")
        split = "train"
    elif split is None:
        split = "test" if infers_new_rows(model, data.train) and data.test.shape[0] else "train"
    elif split != "train" and not infers_new_rows(model, data.train):
        raise UsageError(f"{run.path}: the run's guide is per-datapoint and cannot infer {split} rows; "
                         "use --split train")
    x = getattr(data, split)
    if x.shape[0] == 0:
        raise UsageError(f"{run.path}: the {split} split has no rows")
    rows = torch.arange(data.n_train) if split == "train" else None
    if split == "train" and data.binarize == "dynamic":  # one fixed draw of the training rows' binarization
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    if not global_latents:
        x = x[:max_rows]
        rows = None if rows is None else rows[:max_rows]
    return split, x, rows, np.arange(x.shape[0])


def diagnose(run, split=None, max_rows=500, draws=100, chains=1, n_samples=1000, nuts_samples=500,
             nuts_warmup=300, nuts_chains=2, seed=0) -> dict:
    """Everything diagnose.py writes, computed (nothing written): a dict with the
    InferenceData objects, the summary table, the numbers and the figures' inputs."""
    if n_samples < D.MIN_PARETO_SAMPLES:
        raise UsageError(f"--n-samples must be at least {D.MIN_PARETO_SAMPLES} for a Pareto k fit, got {n_samples}")
    if nuts_samples < 0 or nuts_samples == 1:
        raise UsageError(f"--nuts-samples must be 0 (no NUTS) or at least 2, got {nuts_samples}")
    model, spec = run.model, run.spec
    probe = run.data.train[:2]
    global_latents = bool(global_latent_sites(model, probe, torch.arange(probe.shape[0])))
    split, x, rows, labels = _rows(run, split, max_rows, global_latents)
    t0 = time.perf_counter()
    idata = D.to_inference_data(model, x, rows, draws=draws, chains=chains, seed=seed, row_labels=labels)
    local = set(idata.attrs["local_latents"].split(",")) - {""}
    posteriors = {"variational": idata}
    exact = D.exact_inference_data(model, x, draws, chains, seed + 1, local=local, row_labels=labels)
    if exact is not None:
        posteriors["exact"] = exact
    numbers: dict = {"run": os.path.abspath(run.path), "model": spec.model, "checkpoint_step": run.step,
                     "split": split, "n_rows": int(x.shape[0]), "draws": draws, "chains": chains, "seed": seed,
                     "latents": "global" if global_latents else "per row", "units": "nats"}
    notes = []
    # NUTS: the reference sampler for global latents of modest dimension
    nuts = None
    size = sum(math.prod(idata.posterior[v].shape[2:]) for v in idata.posterior.data_vars
               if v in _guide_sites(idata))
    if global_latents and nuts_samples > 0:
        if size > NUTS_MAX_DIM:
            notes.append(f"NUTS skipped: {size} latent dimensions (more than {NUTS_MAX_DIM}).")
        else:
            model64, x64 = copy.deepcopy(model).double(), x.double()
            results = [run_nuts(model64, x64, num_samples=nuts_samples, warmup_steps=nuts_warmup, seed=seed + 10 + c)
                       for c in range(nuts_chains)]
            nuts = D.mcmc_inference_data(model64, results, x64)
            posteriors["NUTS"] = nuts
            numbers["nuts"] = {"chains": nuts_chains, "num_samples": nuts_samples, "warmup_steps": nuts_warmup,
                               "divergences": sum(r.divergences for r in results),
                               "seconds": sum(r.seconds for r in results)}
    elif not global_latents:
        notes.append("NUTS not run: the latents are per row (one chain over every row's z at fixed parameters "
                     "would be a different, far larger problem).")
    # Pareto k of the importance weights
    pareto = None
    if global_latents:
        # Yao et al. (2018): k of the guide as a whole, log p(X, theta) - log q(theta) over
        # K = n_samples draws theta ~ q (its own draws: the InferenceData's may be few)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 2)
            w = whole_set_log_weights(model, x, rows, n_samples)
        k = float(D.pareto_k((w["log_lik"] + w["log_prior"] - w["log_q"]).double()))
        numbers["guide_pareto_k"] = {"k": k, "n_samples": n_samples, "reading": _reading(k)}
    else:
        pk = D.ParetoK()
        est = importance_estimates(model, x, n_samples, rows, seed=seed + 2, on_log_weights=pk)
        pareto = pk.values
        numbers["importance_log_likelihood"] = {**est["log_likelihood"].to_dict(), "n_samples": n_samples,
                                                "pareto_k": pk.summary()}
        numbers["importance_elbo"] = est["elbo"].to_dict()
        if isinstance(model, ExactLikelihood):
            with torch.no_grad():
                numbers["exact_log_likelihood"] = float(model.exact_log_likelihood(x).mean())
    # LOO and WAIC from the log_likelihood group
    loos = {}
    for name, post in posteriors.items():
        if post is not None and "log_likelihood" in post.groups():
            loos[name] = D.loo_waic(post, reff=None if name == "NUTS" else 1.0)
    numbers["loo"] = {name: {k: v for k, v in r.items() if not k.startswith("pointwise")} for name, r in loos.items()}
    ppc = D.posterior_predictive_checks(idata)
    numbers["ppc"] = {k: {kk: vv for kk, vv in s.items() if not isinstance(vv, np.ndarray)}
                      for k, s in ppc["statistics"].items()}
    table = D.summary_table(posteriors, coords=None)
    numbers["seconds"] = time.perf_counter() - t0
    return {"idata": idata, "posteriors": posteriors, "numbers": numbers, "table": table, "pareto": pareto,
            "loos": loos, "ppc": ppc, "notes": notes, "labels": labels, "local": local}


def _guide_sites(idata) -> list[str]:
    """The posterior variables drawn by the guide (not the model's derived quantities)."""
    return [v for v in idata.attrs.get("guide_sites", "").split(",") if v] or list(idata.posterior.data_vars)


def _reading(k: float) -> str:
    if math.isnan(k):
        return "undetermined"
    if k == -math.inf:
        return "exact (every weight equal: the guide is the posterior)"
    if k < D.K_GOOD:
        return "good (k < 0.5): the guide is close enough for importance sampling to correct it"
    if k <= D.K_BAD:
        return "usable (0.5 <= k <= 0.7)"
    return "unreliable (k > 0.7): the guide is far from the posterior (Yao et al. 2018)"


# ----------------------------------------------------------------------------- writing


def _plot_vars(idata, local: set) -> tuple[list[str], dict]:
    """Variables and coordinates for the comparison plots: the model's quantities (or the
    guide's sites) of global latents; a few rows' latents for per-row ones."""
    post = idata.posterior
    names = [v for v in idata.attrs.get("quantities", "").split(",") if v] or list(_guide_sites(idata))
    names = [v for v in names if float(post[v].std()) > 0] or names  # a known (constant) quantity: no density
    coords = P.first_coords(idata, names, per_dim=2 if local else 3)
    if local:
        coords["row"] = post["row"].values[:PLOT_ROWS]
    return names, coords


def _md_table(df, max_rows: int) -> list[str]:
    df = df.dropna(axis=1, how="all")  # ESS and R-hat exist for NUTS only
    cols = list(df.columns)
    lines = ["| variable | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, (idx, row) in enumerate(df.iterrows()):
        if i >= max_rows:
            lines.append(f"| ... {len(df) - max_rows} more in summary.csv | " + " | ".join("" for _ in cols) + " |")
            break
        cells = [str(v) if isinstance(v, str) else f"{v:.4g}" for v in row.values]
        lines.append(f"| {idx} | " + " | ".join(cells) + " |")
    return lines


def _percent(share) -> str:
    return "undetermined" if share is None else f"{100 * share:.1f}%"


def summary_markdown(result: dict, files: list[str]) -> str:
    n = result["numbers"]
    lines = [f"# Posterior diagnostics: {n['model']} ({os.path.basename(n['run'])})", "",
             f"Run `{n['run']}` at step {n['checkpoint_step']}; {n['n_rows']} {n['split']} rows; "
             f"{n['chains']} x {n['draws']} draws from the guide; latents {n['latents']}; seed {n['seed']}.", ""]
    lines += ["## Importance weights (Pareto k)", ""]
    if "importance_log_likelihood" in n:
        ll = n["importance_log_likelihood"]
        pk = ll["pareto_k"]
        lines.append(f"Importance-sampled log-likelihood (K = {ll['n_samples']}): {ll['mean']:.3f} ± {ll['se']:.3f} "
                     f"nats per row; {D.reliability_note(pk)}.")
        if pk["share_above_0.7"] is not None:
            q = pk["quantiles"]
            lines.append(f"k: median {q['0.5']:.2f}, 90% {q['0.9']:.2f}, max {pk['max']:.2f}; "
                         f"{100 * pk['share_above_0.5']:.1f}% of rows above 0.5 ({pk['rule']}).")
        if "exact_log_likelihood" in n:
            lines.append(f"Exact log-likelihood of the same rows: {n['exact_log_likelihood']:.3f} nats per row.")
        lines += ["", "![Pareto k per row](pareto_k.png)"]
    else:
        g = n["guide_pareto_k"]
        lines.append(f"Pareto k of the guide as a whole (log p(X, theta) - log q(theta) over {g['n_samples']} draws; "
                     f"Yao et al. 2018): {g['k']:.2f}, {g['reading']}.")
    lines += ["", "## Leave-one-out (PSIS-LOO) and WAIC", ""]
    if n["latents"] == "per row":
        lines.append("Per-row latents: leaving x_i out leaves z_i with its prior, so the exact LOO density is the "
                     "marginal p(x_i) at the fitted parameters, and PSIS-LOO from the guide's draws is the "
                     "harmonic-mean estimator of it (ratios 1 / p(x_i | z)), of infinite variance in general: its k "
                     "is expected to be large. The importance-sampled log-likelihood above estimates the same "
                     "p(x_i) from the right side.")
    else:
        lines.append("Global latents: PSIS-LOO of the rows, log p(x_i | X without x_i), from each posterior's draws "
                     "(the guide's stand in for the posterior's).")
    lines += ["", "| posterior | elpd_loo (sum) | se | per row | p_loo | loo k > 0.7 | elpd_waic | p_waic |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in n["loo"].items():
        lines.append(f"| {name} | {r['elpd_loo']:.2f} | {r['elpd_loo_se']:.2f} | {r['elpd_loo_per_row']:.3f} | "
                     f"{r['p_loo']:.2f} | {_percent(r['loo_pareto_k']['share_above_0.7'])} | {r['elpd_waic']:.2f} | "
                     f"{r['p_waic']:.2f} |")
    lines += ["", "![LOO Pareto k](loo_pareto_k.png)", "", "## Posterior predictive checks", "",
              "p = P(T(replicated) >= T(observed)) over the draws: near 0 or 1 is a misfit the statistic sees.", "",
              "| statistic | observed | replicated mean ± sd | p |", "|---|---|---|---|"]
    for key, s in n["ppc"].items():
        label = s["description"].replace("|", "\\|")  # a bar would end the markdown cell
        lines.append(f"| {label} | {s['observed']:.4g} | {s['replicated_mean']:.4g} ± "
                     f"{s['replicated_sd']:.2g} | {s['p_value']:.3f} |")
    lines += ["", "![posterior predictive checks](ppc.png)", "", "## Posteriors", ""]
    if "nuts" in n:
        u = n["nuts"]
        lines.append(f"NUTS: {u['chains']} chains x {u['num_samples']} draws after {u['warmup_steps']} warm-up steps, "
                     f"{u['divergences']} divergences, {u['seconds']:.1f} s.")
    lines += [f"- {note}" for note in result["notes"]]
    lines.append("")
    table = result["table"]
    for name in dict.fromkeys(table["posterior"]):
        lines += [f"### {name}", "", *_md_table(table[table["posterior"] == name].drop(columns="posterior"), MD_ROWS),
                  ""]
    lines += [f"![{f}]({f})" for f in files if f in ("forest.png", "pair.png", "posterior.png")]
    lines += ["", f"_Computed in {n['seconds']:.1f} s._", ""]
    return "\n".join(lines)


def write(result: dict, out: str) -> list[str]:
    """Write every output file into ``out`` (each atomically); returns their names."""
    os.makedirs(out, exist_ok=True)
    n, idata = result["numbers"], result["idata"]
    title = f"{n['model']} ({n['split']} rows)"
    files = []
    D.save_netcdf(idata, os.path.join(out, "diagnostics.nc"))
    files.append("diagnostics.nc")
    for name, post in result["posteriors"].items():
        if name != "variational":
            fname = f"diagnostics_{name.lower()}.nc"
            D.save_netcdf(post, os.path.join(out, fname))
            files.append(fname)
    with atomic_write(os.path.join(out, "summary.csv")) as f:
        result["table"].to_csv(f)
    files.append("summary.csv")
    if result["pareto"] is not None:
        ll = n["importance_log_likelihood"]
        P.pareto_k_plot(result["pareto"], os.path.join(out, "pareto_k.png"),
                        f"{title}: Pareto k of log p(x, z) - log q(z | x)", ll["n_samples"], result["labels"])
        files.append("pareto_k.png")
    loo = result["loos"].get("variational")
    if loo is not None:
        P.pareto_k_plot(loo["pointwise_k"], os.path.join(out, "loo_pareto_k.png"),
                        f"{title}: PSIS-LOO Pareto k of the guide's draws", loo["loo_pareto_k"]["n_samples"],
                        result["labels"])
        files.append("loo_pareto_k.png")
    P.ppc_plot(result["ppc"], os.path.join(out, "ppc.png"), title)
    files.append("ppc.png")
    names, coords = _plot_vars(idata, result["local"])
    comparable = {k: v for k, v in result["posteriors"].items() if all(name in v.posterior for name in names)}
    P.forest_plot(comparable, names, os.path.join(out, "forest.png"), f"{title}: posteriors", coords)
    P.pair_plot(comparable, names, os.path.join(out, "pair.png"), f"{title}: draws of each posterior", coords)
    P.posterior_plot(comparable, names, os.path.join(out, "posterior.png"), title, coords)
    files += ["forest.png", "pair.png", "posterior.png"]
    save_json(n, os.path.join(out, "diagnostics.json"))
    files.append("diagnostics.json")
    with atomic_write(os.path.join(out, "summary.md")) as f:
        f.write(summary_markdown(result, files))
    files.append("summary.md")
    return files


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run, out = _cli.open_run(args.run_dir, args.out, args.threads)
    result = diagnose(run, args.split, args.max_rows, args.draws, args.chains, args.n_samples, args.nuts_samples,
                      args.nuts_warmup, args.nuts_chains, args.seed)
    write(result, out)
    n = result["numbers"]
    line = f"{n['model']} ({n['n_rows']} {n['split']} rows): "
    if "importance_log_likelihood" in n:
        ll = n["importance_log_likelihood"]
        line += f"IS log-likelihood {ll['mean']:.3f} ± {ll['se']:.3f} (K = {ll['n_samples']}), " \
                f"{D.reliability_note(ll['pareto_k'])}"
    else:
        line += f"guide Pareto k {n['guide_pareto_k']['k']:.2f}"
    loo = n["loo"].get("variational")
    if loo:
        line += f"; elpd_loo {loo['elpd_loo']:.1f} ± {loo['elpd_loo_se']:.1f}"
    print(f"{line} -> {os.path.join(out, 'summary.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
