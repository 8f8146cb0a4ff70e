"""Posterior diagnostics of a fitted run, computed and written: an ArviZ InferenceData of
its guide, the Pareto k of its importance weights, PSIS-LOO and WAIC, posterior
predictive checks, and the posterior beside the exact one and NUTS's where those exist.
``elbolab diagnose`` and ``elbolab report`` are shells over :func:`diagnose_run`.

``diagnose(run, ...)`` computes (nothing written) a :class:`Diagnosis`;
``write_diagnosis(diagnosis, out)`` writes it; ``diagnose_run(run, out, ...)`` does both
and returns the numbers (``diagnostics.json``). ``run``: a run read back
(``inference.runs.read_run``) or an ``elbolab.Run``: anything with ``model`` and
``data`` (and, for the labels of the output, ``spec``, ``path``, ``step``).

Files (each written atomically into ``out``):

* ``diagnostics.nc``: the guide's InferenceData (``inference.diagnostics``: posterior,
  posterior_predictive, log_likelihood, replicated_log_likelihood, sample_stats,
  observed_data; dims row, latent, feature), and ``diagnostics_exact.nc`` /
  ``diagnostics_nuts.nc`` for the references;
* ``summary.csv``: ``az.summary`` of every posterior (mean, sd, 94% HDI; ESS and R-hat
  for NUTS); ``summary.md``: what to read first, with the tables and the pictures;
* ``diagnostics.json``: the numbers (Pareto k, LOO and WAIC per datapoint and summed,
  posterior predictive p-values, which elements the figures show);
* ``pareto_k.png`` (per-row latents: k of each row's K importance weights),
  ``loo_pareto_k.png``, ``ppc.png``, ``forest.png``, ``pair.png``, ``posterior.png``.

Which rows: a guide with per-row latents (PPCA, the VAEs) is diagnosed on the first
``max_rows`` rows of ``split`` (default: test for an amortized guide, train for a
per-datapoint one); a guide with global latents (the Bayesian Gaussian) on all training
rows, the data its posterior is conditioned on. NUTS runs for global latents of at most
``NUTS_MAX_DIM`` dimensions (``nuts_samples`` = 0: never).

What the figures show: every element of the global latents and the model's quantities
(a symmetric matrix's lower triangle); of per-row latents, which are one vector per row
(thousands of values), ``PLOT_ROWS`` rows chosen by the Pareto k of their importance
weights (the highest: where the guide is furthest from the posterior; the median; the
lowest) and the ``PLOT_LATENTS`` latent dimensions whose guide means vary most over the
rows (the dimensions the model uses); the figures' titles say so.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from elbolab.inference import diagnostic_plots as P
from elbolab.inference import diagnostics as D
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import global_latent_sites, importance_estimates
from elbolab.inference.files import atomic_write, save_json
from elbolab.inference.mcmc import run_nuts
from elbolab.inference.traces import split_rows, whole_set_log_weights
from elbolab.models.protocol import ExactLikelihood

NUTS_MAX_DIM = 100  # NUTS (dense mass matrix) runs for global latents of at most this many dimensions
MD_ROWS = 40  # summary lines per posterior in summary.md (summary.csv has them all)
PLOT_ROWS = 3  # rows of per-row latents in the forest / pair / posterior plots
PLOT_LATENTS = 2  # latent dimensions of those rows


@dataclass
class Diagnosis:
    """What :func:`diagnose` computes: the guide's InferenceData (``idata``), every
    posterior by name (``posteriors``: "variational", and "exact", "NUTS" where they
    exist), the numbers (``numbers``, JSON-ready), the ``az.summary`` table, the per-row
    Pareto k (``pareto``, per-row latents) and LOO results, the predictive checks, notes
    and what the figures show (``plot_variables``, ``plot_caption``)."""

    idata: object
    posteriors: dict
    numbers: dict
    table: object
    pareto: np.ndarray | None
    loos: dict
    ppc: dict
    notes: list = field(default_factory=list)
    row_index: np.ndarray | None = None
    plot_variables: list = field(default_factory=list)
    plot_caption: str = ""


def _describe(run) -> dict:
    spec = getattr(run, "spec", None)
    path = getattr(run, "path", None)
    step = getattr(run, "step", None)
    if step is None and getattr(run, "result", None) is not None:
        step = run.result.steps
    return {"run": os.path.abspath(path) if path else None,
            "model": spec.model if spec is not None else type(run.model).__name__,
            "checkpoint_step": step}


def _rows(run, split: str | None, max_rows: int, global_latents: bool):
    """(split name, x, training-row indices or None, each row's index (in the training set
    for training rows, else in the split: its first rows), labels): the rows of
    ``traces.split_rows``; global latents are diagnosed on all training rows, per-row
    latents on the first ``max_rows``."""
    data, model = run.data, run.model
    where = getattr(run, "path", None) or "the run"
    if global_latents:
        if split in ("val", "test"):
            raise UsageError(f"{where}: the guide's latents are global (a posterior given the training rows); "
                             f"split {split} does not apply")
        split = "train" if split is None else split
    s = split_rows(model, data, split, where=where, verb="diagnose")
    x, rows, labels = s.x, s.rows, s.labels
    if not global_latents:
        x = x[:max_rows]
        rows = None if rows is None else rows[:max_rows]
        labels = None if labels is None else labels[:max_rows]
    index = np.arange(x.shape[0]) if rows is None else rows.cpu().numpy()
    return s.split, x, rows, index, None if labels is None else labels.cpu().numpy()


def check_settings(max_rows: int, draws: int, chains: int, n_samples: int, nuts_samples: int, nuts_warmup: int,
                   nuts_chains: int) -> None:
    """The settings a diagnosis refuses (library names; the CLI checks its flags first)."""
    for name, value in (("max_rows", max_rows), ("draws", draws), ("chains", chains), ("nuts_chains", nuts_chains)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if n_samples < D.MIN_PARETO_SAMPLES:
        raise UsageError(f"n_samples must be at least {D.MIN_PARETO_SAMPLES} for a Pareto k fit, got {n_samples}")
    if nuts_samples < 0 or nuts_samples == 1:
        raise UsageError(f"nuts_samples must be 0 (no NUTS) or at least 2, got {nuts_samples}")
    if nuts_warmup < 0:
        raise UsageError(f"nuts_warmup must be >= 0, got {nuts_warmup}")


def diagnose(run, *, split: str | None = None, max_rows: int = 500, draws: int = 100,
             chains: int = D.DEFAULT_CHAINS, n_samples: int = 1000, nuts_samples: int = 500, nuts_warmup: int = 300,
             nuts_chains: int = 2, seed: int = 0) -> Diagnosis:
    """Everything :func:`write_diagnosis` writes, computed (nothing written): ``chains`` x
    ``draws`` draws from the guide, K = ``n_samples`` importance samples per row for the
    Pareto k, NUTS (``nuts_chains`` x ``nuts_samples`` draws after ``nuts_warmup``
    steps; one chain gets no R-hat) for global latents. Seeded by ``seed``."""
    check_settings(max_rows, draws, chains, n_samples, nuts_samples, nuts_warmup, nuts_chains)
    model = run.model
    probe = run.data.train[:2]
    global_latents = bool(global_latent_sites(model, probe, torch.arange(probe.shape[0])))
    split, x, rows, index, labels = _rows(run, split, max_rows, global_latents)
    t0 = time.perf_counter()
    idata = D.to_inference_data(model, x, rows, draws=draws, chains=chains, seed=seed, row_index=index,
                                labels=labels)
    local = frozenset(v for v in idata.attrs["local_latents"].split(",") if v)
    posteriors = {"variational": idata}
    exact = D.exact_inference_data(model, x, draws, chains, seed + 1, local=local, row_index=index, labels=labels)
    if exact is not None:
        posteriors["exact"] = exact
    numbers: dict = {**_describe(run), "split": split, "n_rows": int(x.shape[0]), "draws": draws, "chains": chains,
                     "seed": seed, "latents": "global" if global_latents else "per row", "units": "nats"}
    notes = []
    # NUTS: the reference sampler for global latents of modest dimension
    size = sum(math.prod(idata.posterior[v].shape[2:]) for v in idata.posterior.data_vars
               if v in _guide_sites(idata))
    if global_latents and nuts_samples > 0:
        if size > NUTS_MAX_DIM:
            notes.append(f"NUTS skipped: {size} latent dimensions (more than {NUTS_MAX_DIM}).")
        else:
            model64, x64 = copy.deepcopy(model).double(), x.double()
            results = [run_nuts(model64, x64, num_samples=nuts_samples, warmup_steps=nuts_warmup, seed=seed + 10 + c)
                       for c in range(nuts_chains)]
            posteriors["NUTS"] = D.mcmc_inference_data(model64, results, x64, rows)
            numbers["nuts"] = {"chains": nuts_chains, "num_samples": nuts_samples, "warmup_steps": nuts_warmup,
                               "divergences": sum(r.divergences for r in results),
                               "seconds": sum(r.seconds for r in results)}
            if nuts_chains < 2:
                notes.append("NUTS ran one chain: R-hat, which compares chains, is not computed (ESS is).")
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
        numbers["guide_pareto_k"] = {"k": k, "n_samples": n_samples, "reading": reading(k)}
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
    loos = {name: D.loo_waic(post, reff=None if name == "NUTS" else 1.0)
            for name, post in posteriors.items() if "log_likelihood" in post.groups()}
    numbers["loo"] = {name: {k: v for k, v in r.items() if not k.startswith("pointwise")} for name, r in loos.items()}
    ppc = D.posterior_predictive_checks(idata)
    numbers["ppc"] = {k: {kk: vv for kk, vv in s.items() if not isinstance(vv, np.ndarray)}
                      for k, s in ppc["statistics"].items()}
    table = D.summary_table(posteriors)
    variables, caption, shown = plot_selection(idata, local, pareto)
    numbers["figures_show"] = shown
    numbers["seconds"] = time.perf_counter() - t0
    return Diagnosis(idata, posteriors, numbers, table, pareto, loos, ppc, notes, index, variables, caption)


def _guide_sites(idata) -> list[str]:
    """The posterior variables drawn by the guide (not the model's derived quantities)."""
    return [v for v in idata.attrs.get("guide_sites", "").split(",") if v] or list(idata.posterior.data_vars)


def reading(k: float) -> str:
    """What a whole-guide Pareto k says (Yao et al. 2018)."""
    if math.isnan(k):
        return "undetermined"
    if k == -math.inf:
        return "exact (every weight equal: the guide is the posterior)"
    if k < D.K_GOOD:
        return "good (k < 0.5): the guide is close enough for importance sampling to correct it"
    if k <= D.K_BAD:
        return "usable (0.5 <= k <= 0.7)"
    return "unreliable (k > 0.7): the guide is far from the posterior (Yao et al. 2018)"


def plot_selection(idata, local: frozenset, pareto: np.ndarray | None) -> tuple[list, str, dict]:
    """(variables for the comparison figures, their caption, a JSON record of it): the
    model's quantities (or the guide's sites) of global latents, whole; of per-row
    latents PLOT_ROWS rows by Pareto k and the PLOT_LATENTS most used latent dims (see
    the module docstring)."""
    post = idata.posterior
    names = [v for v in idata.attrs.get("quantities", "").split(",") if v] or list(_guide_sites(idata))
    names = [v for v in names if float(post[v].std()) > 0] or names  # a known (constant) quantity: no density
    if not local:
        return names, "", {"variables": names}
    var = sorted(local)[0]
    z = post[var]
    rows = post[D.ROW].values
    n_rows = rows.size
    if pareto is not None and np.isfinite(pareto).any():
        k = np.where(np.isnan(pareto), -np.inf, pareto)
        order = np.argsort(k, kind="stable")  # ascending; undetermined rows first
        known = order[np.isfinite(k[order])]
        picks = [known[-1], known[len(known) // 2], known[0]]
        why_rows = "the rows with the highest, median and lowest Pareto k of their importance weights"
    else:
        picks = [0, n_rows // 2, n_rows - 1]
        why_rows = "the first, middle and last rows"
    picks = list(dict.fromkeys(int(i) for i in picks))[:PLOT_ROWS]
    chosen_rows = [rows[i].item() for i in picks]
    extra = [d for d in z.dims if d not in ("chain", "draw", D.ROW)]
    sel = {D.ROW: chosen_rows}
    latent_text = ""
    if extra:
        dim = extra[0]
        spread = z.mean(("chain", "draw")).std(D.ROW)  # over rows, of the guide's means: (dim,)
        for other in extra[1:]:
            spread = spread.max(other)
        top = np.argsort(-spread.values, kind="stable")[:PLOT_LATENTS]
        dims_chosen = [post[dim].values[i].item() for i in sorted(top)]
        sel[dim] = dims_chosen
        latent_text = (f"; {dim} dims {', '.join(map(str, dims_chosen))} of {post.sizes[dim]} (those whose "
                       "guide means vary most over the rows)")
    k_text = ""
    if pareto is not None:
        k_text = " (k = " + ", ".join(f"{pareto[i]:.2f}" for i in picks) + ")"
    caption = (f"{var} of rows {', '.join(map(str, chosen_rows))}{k_text} of {n_rows}: {why_rows}{latent_text}; "
               f"{var} is one vector per row, so a few are shown")
    return [(var, sel)], caption, {"variables": [var], "rows": chosen_rows, "why_rows": why_rows,
                                   **({"latent": sel[extra[0]]} if extra else {})}


# ----------------------------------------------------------------------------- writing


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


def summary_markdown(result: Diagnosis, files: list[str]) -> str:
    n = result.numbers
    name = os.path.basename(n["run"]) if n.get("run") else "run"
    lines = [f"# Posterior diagnostics: {n['model']} ({name})", "",
             f"Run `{n['run']}` at step {n['checkpoint_step']}; {n['n_rows']} {n['split']} rows; "
             f"{n['chains']} x {n['draws']} draws from the guide; latents {n['latents']}; seed {n['seed']}. "
             "Nats per datapoint (per row) unless a column says sum.", ""]
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
    lines += ["", "| posterior | elpd_loo per row | ± se per row | p_loo | loo k > 0.7 | elpd_waic per row | p_waic "
              "| elpd_loo, sum over rows |", "|---|---|---|---|---|---|---|---|"]
    for post_name, r in n["loo"].items():
        lines.append(f"| {post_name} | {r['elpd_loo_per_row']:.3f} | {r['elpd_loo_se_per_row']:.3f} | "
                     f"{r['p_loo']:.2f} | {_percent(r['loo_pareto_k']['share_above_0.7'])} | "
                     f"{r['elpd_waic_per_row']:.3f} | {r['p_waic']:.2f} | {r['elpd_loo']:.2f} ± {r['elpd_loo_se']:.2f} |")
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
    lines += [f"- {note}" for note in result.notes]
    if result.plot_caption:
        lines.append(f"- The figures show {result.plot_caption}.")
    lines.append("")
    table = result.table
    for post_name in dict.fromkeys(table["posterior"]):
        lines += [f"### {post_name}", "",
                  *_md_table(table[table["posterior"] == post_name].drop(columns="posterior"), MD_ROWS), ""]
    lines += [f"![{f}]({f})" for f in files if f in ("forest.png", "pair.png", "posterior.png")]
    lines += ["", f"_Computed in {n['seconds']:.1f} s._", ""]
    return "\n".join(lines)


def write_diagnosis(result: Diagnosis, out: str) -> list[str]:
    """Write every output file into ``out`` (each atomically); returns their names."""
    os.makedirs(out, exist_ok=True)
    n, idata = result.numbers, result.idata
    title = f"{n['model']} ({n['split']} rows)"
    files = []
    D.save_netcdf(idata, os.path.join(out, "diagnostics.nc"))
    files.append("diagnostics.nc")
    for name, post in result.posteriors.items():
        if name != "variational":
            fname = f"diagnostics_{name.lower()}.nc"
            D.save_netcdf(post, os.path.join(out, fname))
            files.append(fname)
    with atomic_write(os.path.join(out, "summary.csv")) as f:
        result.table.to_csv(f)
    files.append("summary.csv")
    if result.pareto is not None:
        ll = n["importance_log_likelihood"]
        P.pareto_k_plot(result.pareto, os.path.join(out, "pareto_k.png"),
                        f"{title}: Pareto k of log p(x, z) - log q(z | x)", ll["n_samples"], result.row_index)
        files.append("pareto_k.png")
    loo = result.loos.get("variational")
    if loo is not None:
        P.pareto_k_plot(loo["pointwise_k"], os.path.join(out, "loo_pareto_k.png"),
                        f"{title}: PSIS-LOO Pareto k of the guide's draws", loo["loo_pareto_k"]["n_samples"],
                        result.row_index)
        files.append("loo_pareto_k.png")
    P.ppc_plot(result.ppc, os.path.join(out, "ppc.png"), title)
    files.append("ppc.png")
    names = [v if isinstance(v, str) else v[0] for v in result.plot_variables]
    comparable = {k: v for k, v in result.posteriors.items() if all(name in v.posterior for name in names)}
    cap = result.plot_caption
    P.forest_plot(comparable, result.plot_variables, os.path.join(out, "forest.png"), f"{title}: posteriors", cap)
    P.pair_plot(comparable, result.plot_variables, os.path.join(out, "pair.png"), f"{title}: draws of each posterior",
                cap)
    P.posterior_plot(comparable, result.plot_variables, os.path.join(out, "posterior.png"), title, cap)
    files += ["forest.png", "pair.png", "posterior.png"]
    save_json(n, os.path.join(out, "diagnostics.json"))
    files.append("diagnostics.json")
    with atomic_write(os.path.join(out, "summary.md")) as f:
        f.write(summary_markdown(result, files))
    files.append("summary.md")
    return files


def diagnose_run(run, out: str, **settings) -> dict:
    """:func:`diagnose` the run (``settings``: its keyword arguments) and write every file
    into the directory ``out`` (made if missing; the run's own files are never touched);
    returns the numbers written to ``out/diagnostics.json``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out}: exists and is not a directory")
    result = diagnose(run, **settings)
    write_diagnosis(result, out)
    return result.numbers


def summary_line(numbers: dict) -> str:
    """One line of a diagnosis's headline numbers, per datapoint."""
    n = numbers
    line = f"{n['model']} ({n['n_rows']} {n['split']} rows): "
    if "importance_log_likelihood" in n:
        ll = n["importance_log_likelihood"]
        line += (f"IS log-likelihood {ll['mean']:.3f} ± {ll['se']:.3f} (K = {ll['n_samples']}), "
                 f"{D.reliability_note(ll['pareto_k'])}")
    else:
        line += f"guide Pareto k {n['guide_pareto_k']['k']:.2f}"
    loo = n["loo"].get("variational")
    if loo:
        line += f"; elpd_loo {loo['elpd_loo_per_row']:.3f} ± {loo['elpd_loo_se_per_row']:.3f}"
    return line + " nats per row"
