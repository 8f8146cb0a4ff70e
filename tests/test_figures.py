"""Figures show what they must: read back from the matplotlib objects each plotting
function returns (not only that a file exists). Data inside the axis limits a function
sets (where matplotlib autoscales, the limits always hold the data: not checked), a
reference line inside the y range, the points plotted being the draws or means they
stand for, one panel per variable where scales differ, legend entries present, labels
carrying the variable's name on every row. The posteriors are built from closed-form
Gaussian draws, so the numbers the figures print (variance ratios) are checked against
1 - rho^2 too."""

import math

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection, PolyCollection

from elbolab.inference import diagnostic_plots as P
from elbolab.inference import diagnostics as D
from elbolab.inference import plots
from elbolab.inference.diagnosis import plot_selection

RHO = 0.94  # the digits' two most correlated pixels
N = 4000  # draws per posterior (2 chains x 2000)
DECLARED = {"loc": ("feature",), "precision": ("feature", "feature_bis")}


def gaussian_posteriors(seed: int = 0) -> dict:
    """Draws of loc (2,) and a symmetric precision (2, 2) as the Bayesian Gaussian has them:
    the exact posterior of loc with correlation RHO and sd 0.03; a mean-field guide with
    the exact conditional sds (sd ratio sqrt(1 - RHO^2)); a full-rank guide equal to the
    exact one; NUTS, the exact one again. The precision is near 8 on the diagonal, -7.5 off
    it: a scale 250 times loc's."""
    g = torch.Generator().manual_seed(seed)
    sd = 0.03
    cov = sd**2 * torch.tensor([[1.0, RHO], [RHO, 1.0]], dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)

    def precision(n):
        a = 8.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        b = -7.5 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        return torch.stack([torch.stack([a, b], -1), torch.stack([b, a], -1)], -2)

    def idata(loc):
        return D.samples_to_inference_data({"loc": loc, "precision": precision(N)}, 2, declared=DECLARED)

    exact = torch.randn(N, 2, generator=g, dtype=torch.float64) @ chol.T
    mf = torch.randn(N, 2, generator=g, dtype=torch.float64) * sd * math.sqrt(1 - RHO**2)
    full = torch.randn(N, 2, generator=g, dtype=torch.float64) @ chol.T
    nuts = torch.randn(N, 2, generator=g, dtype=torch.float64) @ chol.T
    return {"mean-field": idata(mf), "full-rank": idata(full), "exact": idata(exact), "NUTS": idata(nuts)}


@pytest.fixture(scope="module")
def posteriors():
    return gaussian_posteriors()


def _inside(inner: tuple, outer: tuple) -> bool:
    lo, hi = sorted(outer)
    return lo <= min(inner) and max(inner) <= hi


def _line_data(ax):
    """Every plotted line's x and y values in an axis."""
    xs = np.concatenate([np.asarray(line.get_xdata(), dtype=float) for line in ax.lines]) if ax.lines else np.empty(0)
    ys = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines]) if ax.lines else np.empty(0)
    return xs, ys


def test_samples_have_named_dims(posteriors):
    post = posteriors["exact"].posterior
    assert post["loc"].dims == ("chain", "draw", "feature")
    assert post["precision"].dims == ("chain", "draw", "feature", "feature_bis")


def test_interval_comparison_shows_the_mean_field_under_estimate(posteriors, tmp_path):
    fig = P.interval_comparison_plot(posteriors, "loc", str(tmp_path / "loc.png"), "loc", reference="exact")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3  # loc[0], loc[1], and the ellipses
    names = list(posteriors)
    for ax, i in zip(axes[:2], range(2)):
        assert ax.get_title() == f"loc[{i}]"
        assert [t.get_text() for t in ax.get_yticklabels()] == names[::-1]  # every method has a row
        xs, ys = _line_data(ax)
        assert _inside((xs.min(), xs.max()), ax.get_xlim()) and _inside((ys.min(), ys.max()), ax.get_ylim())
        # each method's variance against the exact one is printed beside it: mean-field 1 - rho^2
        ratios = {t.get_text(): t for t in ax.texts}
        mf = next(float(t.split()[-1]) for t in ratios if t.startswith("var ratio") and
                  ratios[t].get_color() == P.method_color("mean-field"))
        # the ratio of two sample variances of N draws each has a relative standard error of
        # about sqrt(4/N): 0.116 x 0.032 = 0.0037; 0.02 is more than 5 of them
        assert mf == pytest.approx(1 - RHO**2, abs=0.02)
        assert ax.patches  # the exact posterior's interval, shaded
    # the panels keep their own scales: each x range is that coordinate's
    ell = axes[2]
    labels = [t.get_text() for t in ell.get_legend().get_texts()]
    assert set(labels) == set(names)
    # the reference's ellipse filled underneath every outline, holding 94% of the reference's draws
    (shade,) = ell.patches
    ref = next(line for line in ell.lines if line.get_label() == "exact")
    np.testing.assert_allclose(shade.get_xy()[:len(ref.get_xydata())], ref.get_xydata())
    assert shade.get_zorder() < min(line.get_zorder() for line in ell.lines)
    draws = posteriors["exact"].posterior["loc"].values.reshape(-1, 2)
    inside = ref.get_path().contains_points(draws).mean()
    assert inside == pytest.approx(P.INTERVAL, abs=0.02)  # binomial s.e. over 4000 draws: 0.004
    # the mean-field ellipse is axis-aligned: its points' correlation is ~0; the exact one's is RHO
    for line in ell.lines:
        c = np.corrcoef(line.get_xdata(), line.get_ydata())[0, 1]
        if line.get_label() == "mean-field":
            assert abs(c) < 0.1  # 4000 independent draws: sample correlation within 0.1 of 0
        elif line.get_label() == "exact":
            assert c > 0.8  # an ellipse outline at correlation 0.94 (its points' correlation is ~0.94)


def test_forest_has_one_panel_per_variable_and_full_labels(posteriors, tmp_path):
    fig = P.forest_plot(posteriors, ["loc", "precision"], str(tmp_path / "forest.png"), "t")
    loc_ax, *prec_axes = fig.axes
    assert "loc" in loc_ax.get_xlabel() and all("precision" in ax.get_xlabel() for ax in prec_axes)
    # every interval inside the y range each panel sets; loc (sd 0.03) and precision (about
    # +-8) on separate axes, each fitted to its own draws
    for ax in fig.axes:
        _, ys = _line_data(ax)
        assert _inside((ys.min(), ys.max()), ax.get_ylim())
    assert np.ptp(loc_ax.get_xlim()) < 1 < max(abs(np.mean(ax.get_xlim())) for ax in prec_axes)
    assert [t.get_text() for t in loc_ax.get_yticklabels()] == ["loc[0]", "loc[1]"]
    # every row names its variable; the symmetric precision shows its lower triangle only, and its
    # elements (diagonal about +8, off-diagonal about -7, intervals about 1 wide) a panel each: on
    # one axis 16 units wide each interval would be a speck
    assert [[t.get_text() for t in ax.get_yticklabels()] for ax in prec_axes] == [
        ["precision[0, 0]"], ["precision[1, 0]"], ["precision[1, 1]"]]
    for ax in prec_axes:
        xs, _ = _line_data(ax)
        assert np.ptp(ax.get_xlim()) < 2 * np.ptp(xs)  # the intervals fill their panel's width
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == list(posteriors)


def test_pair_plot_draws_every_posterior_visibly(posteriors, tmp_path):
    fig = P.pair_plot(posteriors, ["loc", "precision"], str(tmp_path / "pair.png"), "t")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    n = 5  # loc[0], loc[1], precision[0, 0], precision[1, 0], precision[1, 1]: no [0, 1] twin
    assert len(visible) == n * (n + 1) // 2  # the lower triangle and the diagonal
    assert "precision[0, 1]" not in " ".join(ax.get_xlabel() + ax.get_ylabel() for ax in visible)
    off = [ax for ax in visible if ax.collections]  # scatter panels
    assert len(off) == n * (n - 1) // 2
    for ax in off:
        # one 94% ellipse outline per posterior, drawn over the points: none is hidden
        assert len(ax.lines) == len(posteriors) and min(line.get_zorder() for line in ax.lines) > max(
            c.get_zorder() for c in ax.collections)
        # the references' ellipses (exact, NUTS) dashed, the guides' solid
        assert sorted(line.get_linestyle() for line in ax.lines) == ["-", "-", "--", "--"]
        # the references (exact, NUTS) underneath the guides
        z = {tuple(np.round(c.get_facecolor()[0][:3], 3)): c.get_zorder() for c in ax.collections
             if isinstance(c, PathCollection)}
        assert len(set(z.values())) == 2
    assert {t.get_text() for t in fig.legends[0].get_texts()} == set(posteriors)


@pytest.mark.parametrize("max_points", [7, 300])
def test_pair_plot_shows_at_most_max_points_per_posterior(posteriors, tmp_path, max_points):
    """Each posterior's scatter is thinned to at most ``max_points`` draws, and to more
    than half of them (a step rounded down drew up to twice as many: 308 of 4000 at 300)."""
    fig = P.pair_plot(posteriors, ["loc"], str(tmp_path / "pair.png"), "t", max_points=max_points)
    sizes = [len(c.get_offsets()) for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection)]
    assert N > 2 * max_points  # (every posterior has N draws: thinning applies)
    assert len(sizes) == len(posteriors) and all(max_points // 2 < size <= max_points for size in sizes), sizes


def test_posterior_plot_one_panel_per_element(posteriors, tmp_path):
    fig = P.posterior_plot(posteriors, ["loc", "precision"], str(tmp_path / "post.png"), "t")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loc[0]", "loc[1]", "precision[0, 0]", "precision[1, 0]",
                                                  "precision[1, 1]"]
    for ax in visible:  # every density and interval bar inside the y range the panel sets
        _, ys = _line_data(ax)
        assert _inside((ys.min(), ys.max()), ax.get_ylim())
    # the suptitle sits above every panel (constrained layout: no overlap)
    fig.canvas.draw()
    title_box = fig._suptitle.get_window_extent()
    assert all(title_box.y0 >= ax.get_window_extent().y1 - 1 for ax in visible)


def test_loss_curve_band_and_reference_inside(tmp_path):
    history = [{"step": s, "loss": -(17.4 - 30 * math.exp(-s / 30)) + 0.3 * math.sin(s)} for s in range(1, 601)]
    validations = [{"step": s, "val_elbo": 17.2 - 30 * math.exp(-s / 30), "val_elbo_se": 0.8}
                   for s in range(2, 601, 2)]
    fig = plots.loss_curve(history, validations, str(tmp_path / "c.png"), "t", reference=17.48,
                           reference_label="closed-form optimum")
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    ref = next(line for line in ax.lines if line.get_label() == "closed-form optimum")
    assert lo < ref.get_ydata()[0] < hi  # the optimum is inside the y range
    val = next(line for line in ax.lines if line.get_label() == "validation ELBO")
    tail = np.asarray(val.get_ydata())[len(validations) // 10:]
    assert lo <= tail.min() and tail.max() <= hi  # the validation line's last nine tenths are inside
    assert any(isinstance(c, PolyCollection) for c in ax.collections)  # a shaded band, not error bars
    assert not ax.containers  # no errorbar containers
    legend = fig.legends[0]  # below the axes, over no curve
    assert legend.get_window_extent().y1 <= ax.get_window_extent().y0
    labels = {t.get_text() for t in legend.get_texts()}
    assert {"closed-form optimum", "validation ELBO", "training bound (mini-batch)"} <= labels
    # the band (2 s.e. = 1.6) is wider than the curves' range here: its width is in the legend
    assert any("±1.6;" in label for label in labels)


def test_pareto_k_plot_thresholds_and_points_inside(tmp_path):
    k = np.array([0.1, 0.4, 0.6, 0.9, 1.4, -np.inf, np.nan])
    fig = P.pareto_k_plot(k, str(tmp_path / "k.png"), "t", 100, row_index=np.arange(100, 107))
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    for line in ax.lines:
        assert lo < line.get_ydata()[0] < hi  # the 0.5 and 0.7 thresholds
    for c in ax.collections:
        off = c.get_offsets()
        assert off[:, 1].min() >= lo and off[:, 1].max() <= hi
        assert off[:, 0].min() >= 100  # rows by their index in the data set
    assert len(ax.get_legend().get_texts()) == 3  # the constant-weights row and the two thresholds


def test_plot_selection_names_rows_by_pareto_k():
    """Per-row latents: the rows with the highest, median and lowest k, and the latent dims
    whose guide means vary most over the rows (dim 2 here, then dim 0)."""
    g = torch.Generator().manual_seed(0)
    b = 9
    means = torch.zeros(b, 3)
    means[:, 2] = torch.linspace(-3, 3, b)  # dim 2 varies most, then dim 0, dim 1 not at all
    means[:, 0] = torch.linspace(-1, 1, b)
    z = means + 0.1 * torch.randn(40, b, 3, generator=g)
    idata = D.samples_to_inference_data({"z": z}, 2, local={"z"}, row_index=np.arange(50, 59),
                                        labels=np.arange(b) % 3)
    k = np.array([0.2, 0.9, 0.1, 0.5, np.nan, 0.3, 0.4, 0.6, 0.0])
    variables, caption, shown = plot_selection(idata, frozenset({"z"}), k)
    assert shown["rows"] == [51, 56, 58]  # k 0.9 (highest), 0.4 (the median of the eight known), 0.0 (lowest)
    assert shown["latent"] == [0, 2]
    assert "highest, median and lowest Pareto k" in caption and "51, 56, 58" in caption
    labels = [label for label, _, _ in P.elements(idata, *variables[0])]
    assert labels[0] == "z[row 51 (label 1), latent 0]"


def test_latent_scatter_and_image_grids(tmp_path):
    rng = np.random.default_rng(0)
    means = rng.normal(size=(200, 2)) * [3.0, 0.5] + [10.0, -4.0]
    labels = np.arange(200) % 4
    fig = plots.latent_scatter(means, labels, str(tmp_path / "m.png"), "t")
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), means)  # two latents: the means themselves
    assert fig.axes[1].get_ylabel() == "class label"  # the colour bar says what the colours are
    images = rng.uniform(size=(25, 64))
    fig = plots.labelled_grid([("data", images[:12]), ("recon.", images[12:24])], (8, 8), str(tmp_path / "g.png"),
                              "t", ncols=10, interleave=True)
    assert [ax.get_ylabel() for ax in fig.axes] == ["data", "recon.", "data", "recon."]  # 12 images: 2 lines each


def test_pair_plot_of_per_row_latents_pairs_within_each_row(tmp_path):
    """z of different rows are independent a posteriori: one panel per row, its two latents."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 3, 2, generator=g) * torch.tensor([1.0, 0.2]) + torch.tensor([[5.0, -2.0]])
    idata = D.samples_to_inference_data({"z": z}, 2, local={"z"}, row_index=np.array([4, 9, 20]))
    fig = P.pair_plot({"variational": idata}, [("z", {"row": [4, 9, 20]})], str(tmp_path / "p.png"), "t",
                      max_points=400)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3
    for i, (ax, row) in enumerate(zip(axes, (4, 9, 20))):
        assert ax.get_xlabel() == f"z[row {row}, latent 0]" and ax.get_ylabel() == f"z[row {row}, latent 1]"
        # its points are that row's draws (all 400: max_points), latent 0 against latent 1
        np.testing.assert_array_equal(ax.collections[0].get_offsets(), z[:, i].numpy())
