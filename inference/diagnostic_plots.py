"""Figures of the posterior diagnostics (PNG, written atomically through
``inference.plots.save_figure``; each function also returns its matplotlib Figure, so
that what it shows can be read back): Pareto k per datapoint, several posteriors of the
same variables side by side (forest, pair and density plots, one panel per variable or
element so that each keeps its own scale), the comparison of the guides' intervals and
ellipses with the exact posterior's, and the posterior predictive checks. Every axis is
labelled with its unit.

The posteriors are ``arviz.InferenceData`` (``inference.diagnostics``), given as an
ordered dict name -> InferenceData; a name keeps its colour in every figure
(:func:`method_color`). An element is one scalar of a variable, e.g. ``loc[1]`` or
``z[row 17, latent 2]``; a matrix that is symmetric in every draw (a precision matrix)
shows its lower triangle only.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from elbolab.inference.plots import plt, save_figure

COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")
# one colour per method in every figure; references (exact, NUTS) dark, drawn underneath
METHOD_COLORS = {"exact": "0.15", "NUTS": "C2", "variational": "C0", "mean-field": "C3", "full-rank": "C1",
                 "structured": "C0"}
REFERENCES = ("exact", "NUTS")
INTERVAL = 0.94  # ArviZ's default credible mass
SAMPLE_DIMS = ("chain", "draw")


def _suptitle(fig, text: str, caption: str = "") -> None:
    """The figure's title and caption, wrapped to the figure's width (9-point text)."""
    width = max(40, int(fig.get_figwidth() * 14))
    lines = [textwrap.fill(part, width) for part in text.split("\n") + ([caption] if caption else [])]
    fig.suptitle("\n".join(lines), fontsize=9)


def _bins(n: int) -> int:
    """Histogram bins for n draws: about sqrt(n), between 10 and 30."""
    return int(np.clip(round(math.sqrt(n)), 10, 30))


def method_color(name: str, i: int = 0) -> str:
    return METHOD_COLORS.get(name, COLORS[i % len(COLORS)])


def _draw_order(names) -> list[str]:
    """References first (underneath), then the guides in the given order (on top)."""
    names = list(names)
    return [n for n in names if n in REFERENCES] + [n for n in names if n not in REFERENCES]


# ----------------------------------------------------------------------------- Pareto k


def pareto_k_plot(k, path: str, title: str, n_samples: int, row_index=None):
    """Pareto k of each row's importance weights against the row (its index in the data
    set: ``row_index``, default 0..n-1), with the 0.5 and 0.7 thresholds and the share of
    rows above each; rows whose weights are all equal (k = -inf, an exact proposal) are
    drawn at the bottom edge, undetermined ones left out."""
    k = np.asarray(k, dtype=np.float64).ravel()
    rows = np.arange(k.size) if row_index is None else np.asarray(row_index)
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
    ax.set_xlabel("row (its index in the data set)")
    ax.set_ylabel("Pareto k (dimensionless)")
    undetermined = int(np.isnan(k).sum())
    ax.set_title(title + (f"\nK = {n_samples} samples per row" if n_samples else "")
                 + (f"; {undetermined} rows undetermined" if undetermined else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7)
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- elements of variables


def _coord_text(dim: str, value, labels: dict) -> str:
    if dim == "row":
        label = labels.get(value)
        return f"row {value}" + (f" (label {label})" if label is not None else "")
    if dim == "latent":
        return f"latent {value}"
    return str(value)


def elements(idata, var: str, sel: dict | None = None) -> list[tuple[str, dict, np.ndarray]]:
    """The scalars of ``idata.posterior[var]`` (restricted by ``sel``, dim -> coordinate
    values): (label, coordinates, draws (chain * draw,)) each, in order; of a matrix
    symmetric in every draw (its last two dims of equal size) the lower triangle only."""
    da = idata.posterior[var]
    if sel:
        da = da.sel({k: v for k, v in sel.items() if k in da.dims})
    own = [d for d in da.dims if d not in SAMPLE_DIMS]
    da = da.transpose(*own, *SAMPLE_DIMS)
    values = np.asarray(da.values, dtype=np.float64)
    shape = values.shape[:len(own)]
    symmetric = (len(own) >= 2 and shape[-1] == shape[-2] and shape[-1] > 1
                 and np.allclose(values, np.swapaxes(values, len(own) - 2, len(own) - 1)))
    labels = {}
    if "label" in da.coords and "row" in own:
        labels = dict(zip(da["row"].values.tolist(), da["label"].values.tolist()))
    out = []
    for index in np.ndindex(*shape):
        if symmetric and index[-1] > index[-2]:
            continue
        coords = {d: da[d].values[i].item() for d, i in zip(own, index)}
        text = ", ".join(_coord_text(d, coords[d], labels) for d in own)
        out.append((f"{var}[{text}]" if own else var, coords, values[index].reshape(-1)))
    return out


def _element_draws(idata, var: str, coords: dict) -> np.ndarray | None:
    """One element's draws in another posterior (None if it lacks that variable or element)."""
    if var not in idata.posterior:
        return None
    da = idata.posterior[var]
    try:
        da = da.sel({k: v for k, v in coords.items() if k in da.dims})
    except KeyError:
        return None
    if any(d not in SAMPLE_DIMS for d in da.dims):
        return None
    return np.asarray(da.values, dtype=np.float64).reshape(-1)


def _table(posteriors: dict, variables) -> list[tuple[str, str, dict, dict[str, np.ndarray]]]:
    """[(variable, element label, its coordinates, {method: draws})] for ``variables`` (name
    or (name, sel)), the elements those of the first posterior holding the variable."""
    rows = []
    for item in variables:
        var, sel = (item, None) if isinstance(item, str) else item
        first = next((d for d in posteriors.values() if var in d.posterior), None)
        if first is None:
            continue
        for label, coords, _ in elements(first, var, sel):
            draws = {}
            for name, idata in posteriors.items():
                v = _element_draws(idata, var, coords)
                if v is not None:
                    draws[name] = v
            rows.append((var, label, coords, draws))
    return rows


def _interval(v: np.ndarray, mass: float = INTERVAL) -> tuple[float, float]:
    """The central interval holding ``mass`` of the draws (equal tails)."""
    lo, hi = np.quantile(v, [(1 - mass) / 2, (1 + mass) / 2])
    return float(lo), float(hi)


def _legend_handles(names) -> list:
    return [plt.Line2D([], [], color=method_color(n, i), lw=2, marker="o", ms=4, label=n)
            for i, n in enumerate(names)]


# ----------------------------------------------------------------------------- forest


def _spread_out(entries: list, ratio: float = 3.0) -> bool:
    """Whether a variable's elements (``[(label, {method: draws})]``) lie so far apart that
    on one axis each interval would be a speck: the range of their medians exceeds
    ``ratio`` times the widest 94% interval."""
    if len(entries) < 2:
        return False
    medians = [float(np.median(v)) for _, draws in entries for v in draws.values()]
    widest = max(np.subtract(*_interval(v)[::-1]) for _, draws in entries for v in draws.values())
    return max(medians) - min(medians) > ratio * max(widest, 1e-300)


def forest_plot(posteriors: dict, variables, path: str, title: str, caption: str = ""):
    """One panel per variable, each with its own x axis (variables of different scales
    never share one; a variable whose elements lie far apart beside their intervals, like a
    precision matrix's positive diagonal and negative off-diagonal, a panel per element):
    for each element and posterior the 94% central interval (thin), the
    interquartile range (thick) and the median (dot), labelled with the element's full
    name. ``variables``: names or (name, selection) pairs. ``caption``: a line under the
    title (e.g. which rows are shown and why)."""
    table = _table(posteriors, variables)
    names = list(posteriors)
    by_var: dict[str, list] = {}
    for var, label, _, draws in table:
        by_var.setdefault(var, []).append((label, draws))
    panels: dict[str, list] = {}  # a panel per variable, or per element where its elements lie far apart
    for var, entries in by_var.items():
        if _spread_out(entries):  # e.g. a precision matrix's +8 diagonal and -7 off-diagonal
            panels.update({label: [(label, draws)] for label, draws in entries})
        else:
            panels[var] = entries
    by_var = panels
    heights = [max(1, len(v)) * (0.18 * len(names) + 0.25) + 0.5 for v in by_var.values()]
    fig, axes = plt.subplots(len(by_var), 1, figsize=(7.5, sum(heights) + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for ax, (var, entries) in zip(axes[:, 0], by_var.items()):
        ticks, tick_labels = [], []
        y = 0.0
        for label, draws in entries:
            top = y
            for i, name in enumerate(names):
                if name not in draws:
                    continue
                v = draws[name]
                lo, hi = _interval(v)
                q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
                color = method_color(name, i)
                ax.plot([lo, hi], [y, y], color=color, lw=1.2, solid_capstyle="butt")
                ax.plot([q1, q3], [y, y], color=color, lw=3.5, solid_capstyle="butt")
                ax.plot([med], [y], "o", color=color, ms=4, mfc="white")
                y -= 1
            ticks.append((top + y + 1) / 2)
            tick_labels.append(label)
            y -= 0.8
        ax.set_yticks(ticks, tick_labels, fontsize=8)
        ax.set_ylim(y + 0.3, 0.7)
        ax.set_xlabel(f"{var} (its own units)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=_legend_handles(names), loc="outside lower center", fontsize=8, ncols=min(len(names), 5))
    _suptitle(fig, f"{title}\n{INTERVAL:.0%} interval (thin), interquartile range (thick), median (dot)", caption)
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- pair plot


def _ellipse(ax, x: np.ndarray, y: np.ndarray, color, mass: float = INTERVAL, **kw):
    """The ellipse holding ``mass`` of a Gaussian with the draws' mean and covariance."""
    mean = np.array([x.mean(), y.mean()])
    cov = np.cov(np.vstack([x, y]))
    radius = math.sqrt(-2 * math.log(1 - mass))  # P(chi^2_2 <= r^2) = mass
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * math.pi, 120)
    pts = mean[:, None] + vecs @ (radius * np.sqrt(np.maximum(vals, 0))[:, None] * np.vstack([np.cos(t), np.sin(t)]))
    return ax.plot(pts[0], pts[1], color=color, **kw)[0]


def _scatter_pair(ax, dx: dict, dy: dict, names: list[str], max_points: int) -> None:
    """Each posterior's draws of two elements (references first, fainter) and its 94%
    ellipse as an outline on top of every point."""
    for name in _draw_order(names):
        if name not in dx or name not in dy:
            continue
        color = method_color(name, names.index(name))
        ref = name in REFERENCES
        step = max(1, -(-dx[name].size // max_points))  # (rounded up: at most max_points)
        ax.scatter(dx[name][::step], dy[name][::step], s=4 if ref else 5, color=color, alpha=0.25 if ref else 0.5,
                   lw=0, zorder=1 if ref else 2)
        _ellipse(ax, dx[name], dy[name], color, lw=1.6, ls="--" if ref else "-", zorder=3)


def _title_room(fig, n_lines: int) -> float:
    """The share of the figure's height its title and legend take (9-point lines)."""
    return min(0.4, (0.17 * n_lines + 0.25) / fig.get_figheight())


def pair_plot(posteriors: dict, variables, path: str, title: str, caption: str = "", max_points: int = 300):
    """Pairs of elements of ``variables``: each posterior's draws (at most ``max_points``,
    references drawn first and fainter, the guides on top) and the 94% ellipse of each
    posterior's draws as an outline, so that no posterior hides another. Elements of
    per-row latents (a ``row`` coordinate) are paired within their row only, one panel per
    row (the rows' latents are independent of each other a posteriori); other elements
    against each other, lower triangle, each one's density (histogram outline) on the
    diagonal."""
    table = _table(posteriors, variables)
    names = list(posteriors)
    rows: dict = {}
    for var, label, coords, draws in table:
        if "row" in coords:
            rows.setdefault(coords["row"], []).append((label, draws))
    refs = "references fainter, underneath; " if any(n in REFERENCES for n in names) else ""
    head = f"{title}\ndraws ({refs}at most {max_points} each); lines: {INTERVAL:.0%} ellipse of each posterior's draws"
    if rows:
        pairs = [(entries[0], entries[1]) for entries in rows.values() if len(entries) >= 2]
        fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(3.4 * max(1, len(pairs)) + 0.6, 4.2),
                                 squeeze=False)
        for ax, ((lx, dx), (ly, dy)) in zip(axes[0], pairs):
            _scatter_pair(ax, dx, dy, names, max_points)
            ax.set_xlabel(lx, fontsize=7)
            ax.set_ylabel(ly, fontsize=7)
            ax.tick_params(labelsize=6)
        fig.subplots_adjust(wspace=0.35)
    else:
        n = len(table)
        size = min(2.2, 9.0 / max(n, 1))
        fig, axes = plt.subplots(n, n, figsize=(size * n + 1.0, size * n + 1.2), squeeze=False)
        for i in range(n):
            for j in range(n):
                ax = axes[i, j]
                if j > i:
                    ax.set_visible(False)
                    continue
                dy, dx = table[i][3], table[j][3]
                if i == j:
                    for name in _draw_order(names):
                        if name in dx:
                            ax.hist(dx[name], bins=_bins(dx[name].size), density=True, histtype="step",
                                    color=method_color(name, names.index(name)),
                                    lw=1.6 if name in REFERENCES else 1.2)
                else:
                    _scatter_pair(ax, dx, dy, names, max_points)
                if i == n - 1:
                    ax.set_xlabel(table[j][1], fontsize=7)
                else:
                    ax.tick_params(labelbottom=False)
                if j == 0:
                    ax.set_ylabel(table[i][1] if i > 0 else "density", fontsize=7)
                else:
                    ax.tick_params(labelleft=False)
                ax.tick_params(labelsize=6)
        fig.subplots_adjust(wspace=0.08, hspace=0.08)
    _suptitle(fig, head, caption)
    lines = fig._suptitle.get_text().count("\n") + 1
    handles = _legend_handles(names)
    if rows:  # the legend in a line of its own between the title and the panels
        top = 1 - _title_room(fig, lines + 1.5)
        fig.subplots_adjust(top=top)
        fig.legend(handles=handles, loc="lower center", fontsize=8, ncols=len(names), frameon=False,
                   bbox_to_anchor=(0.5, top + 0.05 / fig.get_figheight()))
    else:  # in the empty upper triangle
        top = 1 - _title_room(fig, lines)
        fig.subplots_adjust(top=top)
        fig.legend(handles=handles, loc="upper right", fontsize=9, bbox_to_anchor=(0.98, top))
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- densities


def posterior_plot(posteriors: dict, variables, path: str, title: str, caption: str = "", max_cols: int = 4):
    """One panel per element, the posteriors' densities overlaid in it (a Gaussian
    kernel estimate), each posterior's 94% interval as a bar under its curve."""
    from scipy.stats import gaussian_kde

    table = _table(posteriors, variables)
    names = list(posteriors)
    n = len(table)
    cols = min(max_cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.4, 2.4 * rows + 1.0), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, (var, label, _, draws) in zip(axes.ravel(), table):
        lo = min(np.quantile(v, 0.001) for v in draws.values())
        hi = max(np.quantile(v, 0.999) for v in draws.values())
        grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 200)
        top = 0.0
        curves = []
        for name in names:
            if name not in draws:
                continue
            v = draws[name]
            dens = gaussian_kde(v)(grid) if np.ptp(v) > 0 else np.zeros_like(grid)
            curves.append((name, v, dens))
            top = max(top, float(dens.max()))
        for k, (name, v, dens) in enumerate(curves):
            color = method_color(name, names.index(name))
            ax.plot(grid, dens, color=color, lw=1.4)
            a, b = _interval(v)
            ax.plot([a, b], [-(k + 1) * 0.06 * top] * 2, color=color, lw=2.5, solid_capstyle="butt")
        ax.set_ylim(-(len(curves) + 1) * 0.06 * top, 1.08 * top if top > 0 else 1)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("value", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    fig.legend(handles=_legend_handles(names), loc="outside lower center", fontsize=8, ncols=min(len(names), 5))
    _suptitle(fig, f"{title}: posterior densities; bars: {INTERVAL:.0%} intervals", caption)
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- guides against the exact posterior


def interval_comparison_plot(posteriors: dict, var: str, path: str, title: str, reference: str = "exact",
                             caption: str = ""):
    """The headline of a comparison of guides: one panel per element of ``var`` (a
    vector, e.g. loc), each method's 94% interval and median on the element's own
    scale, the ``reference`` posterior's interval shaded across the panel, and each
    method's variance ratio var / var(reference) written beside it (a mean-field
    guide's 1 - rho^2 on a Gaussian posterior with correlation rho); and, for a vector of two or more
    elements, a last panel with the first two elements' 94% ellipses (the reference
    filled), where a mean-field guide's missing correlation shows as an axis-aligned,
    narrower ellipse."""
    names = list(posteriors)
    table = _table(posteriors, [var])
    pairs = len(table) >= 2
    panels = len(table) + (1 if pairs else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels + 0.6, 0.45 * len(names) + 2.6), squeeze=False,
                             layout="constrained")
    axes = axes[0]
    for ax, (_, label, _, draws) in zip(axes, table):
        ref = draws.get(reference)
        if ref is not None:
            a, b = _interval(ref)
            ax.axvspan(a, b, color="0.85", zorder=0, label=f"{reference}: {INTERVAL:.0%} interval")
        for k, name in enumerate(names):
            if name not in draws:
                continue
            v = draws[name]
            a, b = _interval(v)
            y = len(names) - 1 - k
            color = method_color(name, k)
            ax.plot([a, b], [y, y], color=color, lw=3, solid_capstyle="butt")
            ax.plot([np.median(v)], [y], "o", color=color, ms=5, mfc="white")
            if ref is not None:
                ax.annotate(f"var ratio {v.var() / ref.var():.2f}", (b, y), xytext=(4, 0), textcoords="offset points",
                            va="center", fontsize=7, color=color)
        ax.set_yticks(range(len(names)), names[::-1], fontsize=8)
        ax.set_ylim(-0.7, len(names) - 0.3)
        lo = min(np.quantile(v, 0.002) for v in draws.values())
        hi = max(np.quantile(v, 0.998) for v in draws.values())
        ax.set_xlim(lo - 0.1 * (hi - lo), hi + 0.45 * (hi - lo))  # room for the ratios on the right
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(f"{label} (data units)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    if pairs:
        ax = axes[-1]
        (_, lx, _, dx), (_, ly, _, dy) = table[0], table[1]
        for k, name in enumerate(_draw_order(names)):
            if name not in dx or name not in dy:
                continue
            color = method_color(name, names.index(name))
            line = _ellipse(ax, dx[name], dy[name], color, lw=2 if name != reference else 1.2, label=name)
            if name == reference:
                xy = line.get_xydata()
                ax.fill(xy[:, 0], xy[:, 1], color="0.85", zorder=0)
        ax.set_xlabel(lx, fontsize=8)
        ax.set_ylabel(ly, fontsize=8)
        ax.set_title(f"{INTERVAL:.0%} ellipses of the draws", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    _suptitle(fig, title, caption)
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- predictive checks


def ppc_plot(ppc: dict, path: str, title: str):
    """Posterior predictive checks: the replicated column means against the observed
    ones (with 90% intervals over the draws), and for each statistic its replicated
    distribution with the observed value and the posterior predictive p-value."""
    stats = ppc["statistics"]
    n_panels = 1 + len(stats)
    n_cols = min(3, n_panels)
    n_rows = -(-n_panels // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.5 * n_rows + 0.6), squeeze=False,
                             layout="constrained")
    axes = axes.ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    ax = axes[0]
    obs, rep = ppc["column_means"]["observed"], ppc["column_means"]["replicated"]  # (D,), (draws, D)
    lo, mid, hi = np.quantile(rep, [0.05, 0.5, 0.95], axis=0)  # the median lies inside its interval
    ax.errorbar(obs, mid, yerr=[mid - lo, hi - mid], fmt="o", ms=2, lw=0.6, alpha=0.7, color="C0")
    edge = [min(obs.min(), lo.min()), max(obs.max(), hi.max())]
    ax.plot(edge, edge, color="0.3", lw=0.8, ls="--", label="replicated = observed")
    ax.set_xlabel("observed column mean (data units)")
    ax.set_ylabel("replicated column mean (median, 90% interval)")
    ax.set_title("column means", fontsize=9)
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
        lo_x, hi_x = ax.get_xlim()  # the observed value inside the axis, however far out
        ax.set_xlim(min(lo_x, s["observed"]), max(hi_x, s["observed"]))
        ax.set_xlabel(f"{key.replace('_', ' ')} (data units)")
        ax.set_ylabel("draws")
        ax.set_title(f"{key.replace('_', ' ')}; p = {s['p_value']:.3f}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: posterior predictive checks ({ppc['n_draws']} draws, {ppc['n_rows']} rows)\n"
                 "p = P(T(replicated) >= T(observed)): near 0 or 1 is a misfit", fontsize=9)
    save_figure(fig, path)
    return fig
