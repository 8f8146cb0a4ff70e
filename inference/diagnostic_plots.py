"""Figures of the posterior diagnostics (PNG, written atomically through
``inference.plots.save_figure``): Pareto k per datapoint, ArviZ's forest, pair and
posterior plots of several posteriors side by side, and the posterior predictive
checks. Every axis is labelled with its unit."""

from __future__ import annotations

import warnings

import numpy as np

from elbolab.inference.plots import plt, save_figure

COLORS = ("C0", "C1", "C2", "C3")


def pareto_k_plot(k, path: str, title: str, n_samples: int, row_labels=None) -> None:
    """Pareto k of each row's importance weights against the row, with the 0.5 and 0.7
    thresholds and the share of rows above each; rows whose weights are all equal
    (k = -inf, an exact proposal) are drawn at the bottom edge, undetermined ones left out."""
    k = np.asarray(k, dtype=np.float64).ravel()
    rows = np.arange(k.size) if row_labels is None else np.asarray(row_labels)
    fin = np.isfinite(k)
    const = np.isneginf(k)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    colors = np.where(k[fin] > 0.7, "C3", np.where(k[fin] > 0.5, "C1", "C0"))
    ax.scatter(rows[fin], k[fin], s=8, c=colors, alpha=0.8, lw=0)
    lo = min(-0.1, float(np.min(k[fin])) - 0.05) if fin.any() else -0.1
    hi = max(1.0, float(np.max(k[fin])) + 0.05) if fin.any() else 1.0
    if const.any():
        ax.scatter(rows[const], np.full(const.sum(), lo), s=10, marker="v", color="0.4",
                   label=f"{const.sum()} rows with constant weights (k = -inf)")
    known = k[~np.isnan(k)]
    for level, color in ((0.5, "C1"), (0.7, "C3")):
        share = float((known > level).mean()) if known.size else float("nan")
        ax.axhline(level, color=color, ls="--", lw=1, label=f"k = {level}: {100 * share:.1f}% of rows above")
    ax.set_ylim(lo - 0.05, hi)
    ax.set_xlabel("row (datapoint)")
    ax.set_ylabel("Pareto k (dimensionless)")
    undetermined = int(np.isnan(k).sum())
    ax.set_title(title + (f"\nK = {n_samples} samples per row" if n_samples else "")
                 + (f"; {undetermined} rows undetermined" if undetermined else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7)
    save_figure(fig, path)


def first_coords(idata, var_names, per_dim: int = 3) -> dict:
    """Coordinates selecting the first ``per_dim`` entries of every non-sample dim of
    ``var_names`` (a plot of a few components, not thousands)."""
    coords = {}
    for v in var_names:
        for dim in idata.posterior[v].dims:
            if dim not in ("chain", "draw"):
                coords[dim] = idata.posterior[dim].values[:per_dim]
    return coords


def _figure(axes):
    return np.ravel(axes)[0].figure


def forest_plot(posteriors: dict, var_names, path: str, title: str, coords=None) -> None:
    """``az.plot_forest`` of several posteriors of the same variables (94% HDI, the
    interquartile range thick), one colour each."""
    import arviz as az

    names = [n for n, d in posteriors.items() if d is not None]
    data = [posteriors[n] for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = az.plot_forest(data, model_names=names, var_names=var_names, coords=coords, combined=True,
                              hdi_prob=0.94, colors=list(COLORS[:len(names)]))
    fig = _figure(axes)
    ax = np.ravel(axes)[0]
    ax.set_title(f"{title}\n94% HDI (thin), interquartile range (thick), median (dot)", fontsize=9)
    ax.set_xlabel("value (units of each variable)")
    save_figure(fig, path)


def pair_plot(posteriors: dict, var_names, path: str, title: str, coords=None, max_points: int = 500) -> None:
    """``az.plot_pair`` of each posterior overlaid (scatter of up to ``max_points`` draws each)."""
    import arviz as az

    axes = None
    handles = []
    for (name, idata), color in zip(((n, d) for n, d in posteriors.items() if d is not None), COLORS):
        post = idata.posterior
        n = post.sizes["chain"] * post.sizes["draw"]
        step = max(1, n // max_points)
        thinned = idata.posterior.stack(sample=("chain", "draw")).isel(sample=slice(None, None, step))
        sub = az.from_dict(posterior={v: thinned[v].transpose("sample", ...).values[None] for v in var_names},
                           dims={v: [d for d in thinned[v].dims if d != "sample"] for v in var_names},
                           coords={d: thinned[d].values for v in var_names for d in thinned[v].dims
                                   if d != "sample"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = az.plot_pair(sub, var_names=var_names, coords=coords, kind="scatter", ax=axes,
                                scatter_kwargs={"color": color, "alpha": 0.45, "s": 10},
                                figsize=(7.5, 7.5))
        handles.append(plt.Line2D([], [], ls="", marker="o", color=color, label=name))
    fig = _figure(axes)
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def posterior_plot(posteriors: dict, var_names, path: str, title: str, coords=None) -> None:
    """``az.plot_posterior`` of each posterior, one row of panels per posterior (mean and
    94% HDI marked), the panels of a column sharing their x axis."""
    import arviz as az

    items = [(n, d) for n, d in posteriors.items() if d is not None]
    first = items[0][1]
    sel = first.posterior[var_names]
    if coords:
        sel = sel.sel({k: v for k, v in coords.items() if k in sel.dims})
    n_cols = int(sum(np.prod([sel[v].sizes[d] for d in sel[v].dims if d not in ("chain", "draw")] or [1])
                     for v in var_names))
    fig, axes = plt.subplots(len(items), n_cols, figsize=(2.6 * n_cols + 0.5, 2.3 * len(items) + 0.6),
                             squeeze=False, sharex="col")
    for i, (name, idata) in enumerate(items):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            az.plot_posterior(idata, var_names=var_names, coords=coords, ax=axes[i], hdi_prob=0.94,
                              textsize=7, color=COLORS[i % len(COLORS)])
        axes[i, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(f"{title}: posterior densities (x: value of each variable), 94% HDI", fontsize=9)
    fig.subplots_adjust(hspace=0.6)
    save_figure(fig, path)


def ppc_plot(ppc: dict, path: str, title: str) -> None:
    """Posterior predictive checks: the replicated column means against the observed
    ones (with 90% intervals over the draws), and for each statistic its replicated
    distribution with the observed value and the posterior predictive p-value."""
    stats = ppc["statistics"]
    n_panels = 1 + len(stats)
    n_cols = min(3, n_panels)
    n_rows = -(-n_panels // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.5 * n_rows + 0.4), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    ax = axes[0]
    obs, rep = ppc["column_means"]["observed"], ppc["column_means"]["replicated"]  # (D,), (draws, D)
    lo, mid, hi = np.quantile(rep, [0.05, 0.5, 0.95], axis=0)  # the median lies inside its interval
    ax.errorbar(obs, mid, yerr=[mid - lo, hi - mid], fmt="o", ms=2, lw=0.6, alpha=0.7, color="C0")
    edge = [min(obs.min(), lo.min()), max(obs.max(), hi.max())]
    ax.plot(edge, edge, color="0.3", lw=0.8, ls="--", label="replicated = observed")
    ax.set_xlabel("observed column mean")
    ax.set_ylabel("replicated column mean (median, 90% interval)")
    ax.set_title("column (pixel) means", fontsize=9)
    ax.legend(fontsize=7)
    for ax, (key, s) in zip(axes[1:], stats.items()):
        if key == "log_likelihood":
            ax.hist(s["observed_per_row"], bins=30, alpha=0.6, color="C1", density=True, label="observed rows")
            ax.hist(s["replicated_per_row"], bins=30, alpha=0.6, color="C0", density=True, label="replicated rows")
            ax.set_xlabel("log p(x_i | latents), nats (every draw and row)")
            ax.set_ylabel("density")
            ax.legend(fontsize=7)
            ax.set_title(f"per-row log-likelihood; p = {s['p_value']:.3f}", fontsize=9)
            continue
        ax.hist(s["replicated"], bins=30, color="C0", alpha=0.7, label="replicated")
        ax.axvline(s["observed"], color="C3", lw=1.5, label="observed")
        ax.set_xlabel(f"{key.replace('_', ' ')} (data units)")
        ax.set_ylabel("draws")
        ax.set_title(f"{key.replace('_', ' ')}; p = {s['p_value']:.3f}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: posterior predictive checks ({ppc['n_draws']} draws, {ppc['n_rows']} rows)\n"
                 "p = P(T(replicated) >= T(observed)): near 0 or 1 is a misfit", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
