"""Figures, written as PNG (atomically). Every axis is labelled with its unit."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from elbolab.inference.files import atomic_write  # noqa: E402


def save_figure(fig, path: str, dpi: int = 110) -> None:
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def loss_curve(history: list[dict], validations: list[dict], path: str, title: str = "",
               reference: float | None = None, reference_label: str = ""):
    """Training bound per datapoint (raw and smoothed) against the step, the validation
    ELBO as a line with its ±2 standard-error band (over the validation rows; its width in
    the legend, as it may run beyond the y range), and an optional horizontal reference
    (e.g. the closed-form optimum). The y range holds the smoothed curve's last nine
    tenths, the validation line and the reference (the raw mini-batch bound may run out
    of it). Returns the Figure."""
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    spans = []
    if history:
        steps = np.array([r["step"] for r in history])
        bound = -np.array([r["loss"] for r in history])
        ax.plot(steps, bound, color="0.75", lw=0.8, label="training bound (mini-batch)")
        w = max(1, len(bound) // 50)
        smooth = np.convolve(bound, np.ones(w) / w, mode="valid") if w > 1 else bound
        if w > 1:
            ax.plot(steps[w - 1:], smooth, color="C0", lw=1.5, label=f"training bound ({w}-step mean)")
        spans.append(smooth[len(smooth) // 10:])
    if validations:
        vs = np.array([v["step"] for v in validations])
        ve = np.array([v["val_elbo"] for v in validations])
        se = np.array([v["val_elbo_se"] for v in validations])
        # the s.e. is over the validation rows, the same rows at every step: it says how well the
        # ELBO on those rows estimates the expected ELBO, not how much one step differs from another
        ax.fill_between(vs, ve - 2 * se, ve + 2 * se, color="C1", alpha=0.12, lw=0,
                        label=f"validation ELBO ±2 s.e. over its rows (last: ±{2 * se[-1]:.2g}; the same rows "
                              "at every step)")
        ax.plot(vs, ve, color="C1", lw=1.5, marker="o" if len(vs) <= 30 else None, ms=3, label="validation ELBO")
        spans.append(ve[len(ve) // 10:])
    if reference is not None:
        ax.axhline(reference, color="C3", ls="--", lw=1.2, label=reference_label or "reference")
        spans.append(np.array([reference]))
    if spans:
        values = np.concatenate(spans)
        lo, hi = float(values.min()), float(values.max())
        pad = 0.08 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per datapoint (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, ncols=2)  # below the axes: it hides no curve
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- images and latents


def _tile(images: np.ndarray, image_shape: tuple[int, int], ncols: int, pad: int = 1) -> np.ndarray:
    """(n, H*W) grey levels -> one (rows*(H+pad), ncols*(W+pad)) mosaic, padding at 1 (white)."""
    h, w = image_shape
    n = images.shape[0]
    nrows = int(np.ceil(n / ncols))
    out = np.ones((nrows * (h + pad) - pad, ncols * (w + pad) - pad))
    for i in range(n):
        r, c = divmod(i, ncols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = images[i].reshape(h, w)
    return out


def image_grid(images, image_shape: tuple[int, int], path: str, title: str, ncols: int = 10):
    """A mosaic of images (n, H*W) with values in [0, 1] (black 0, white 1)."""
    images = np.asarray(images, dtype=float)
    fig, ax = plt.subplots(figsize=(0.6 * ncols + 0.5, 0.6 * np.ceil(len(images) / ncols) + 0.8))
    im = ax.imshow(_tile(images, image_shape, ncols), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="pixel value")
    save_figure(fig, path)
    return fig


def labelled_grid(blocks: list[tuple[str, np.ndarray]], image_shape: tuple[int, int], path: str, title: str,
                  ncols: int = 10, interleave: bool = False):
    """Blocks of images (label, (n, H*W) values in [0, 1], black 0, white 1), each laid out
    in lines of ``ncols`` labelled on the left; ``interleave``: the blocks' lines alternate
    (e.g. a line of data images above the line of their reconstructions). Returns the Figure."""
    blocks = [(label, np.clip(np.asarray(images, dtype=float), 0.0, 1.0)) for label, images in blocks]
    lines = []
    longest = max(len(images) for _, images in blocks)
    if interleave:
        for start in range(0, longest, ncols):
            lines += [(label, images[start:start + ncols]) for label, images in blocks if start < len(images)]
    else:
        for label, images in blocks:
            lines += [(label if start == 0 else "", images[start:start + ncols])
                      for start in range(0, len(images), ncols)]
    h, w = image_shape
    cell = 0.6 if h <= 16 else 0.75
    fig, axes = plt.subplots(len(lines), 1, figsize=(cell * ncols + 1.4, cell * h / w * len(lines) + 0.9),
                             squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], lines):
        full = np.ones((ncols, images.shape[1]))
        full[: len(images)] = images
        ax.imshow(_tile(full, image_shape, ncols), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].set_title(title, fontsize=9)
    save_figure(fig, path)
    return fig


def reconstruction_grid(x, recon, image_shape: tuple[int, int], path: str, title: str, ncols: int = 10):
    """Lines of data images above lines of their reconstructions (each (n, H*W) in [0, 1])."""
    return labelled_grid([("data", x), ("recon.", recon)], image_shape, path, title, ncols, interleave=True)


def column_scatter(result: dict, path: str, title: str):
    """Data that are not images: the two columns of the data rows with the largest variance,
    the rows against the decoded prior samples and the reconstructions (means of
    p(x | z)), and the interpolation's path. Returns the Figure."""
    x = np.asarray(result["data"], dtype=float)
    if x.shape[1] < 2:
        cols = [0, 0]
    else:
        cols = list(np.argsort(-x.var(0), kind="stable")[:2])
    i, j = cols
    fig, ax = plt.subplots(figsize=(6.2, 5))
    ax.scatter(x[:, i], x[:, j], s=6, color="0.6", alpha=0.6, lw=0, label=f"data ({len(x)} {result['split']} rows)")
    prior = np.asarray(result["prior"], dtype=float)
    ax.scatter(prior[:, i], prior[:, j], s=8, color="C0", alpha=0.7, lw=0,
               label=f"decoded prior samples ({len(prior)})")
    rec = np.asarray(result["reconstructions"], dtype=float)
    ax.scatter(rec[:, i], rec[:, j], s=10, color="C1", marker="x", lw=0.8, label="reconstructions")
    path_pts = np.asarray(result["interpolation"], dtype=float)
    ax.plot(path_pts[:, i], path_pts[:, j], color="C3", lw=1.2, marker="o", ms=3,
            label=f"interpolation, rows {result['pair'][0]} to {result['pair'][1]}")
    ax.set_xlabel(f"column {i} (data units)")
    ax.set_ylabel(f"column {j} (data units)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return fig


def latent_scatter(means, labels, path: str, title: str):
    """Latent means E_q[z|x] (N, k) in 2-D: the two coordinates when k <= 2, else their
    first two principal components (with the share of variance each explains);
    coloured by class label when given."""
    means = np.asarray(means, dtype=float)
    k = means.shape[1]
    if k == 1:
        xy, names = np.column_stack([means[:, 0], np.zeros(len(means))]), ("z_1", "")
    elif k == 2:
        xy, names = means, ("z_1", "z_2")
    else:
        centred = means - means.mean(0)
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        share = sv**2 / max((sv**2).sum(), 1e-300)
        xy = centred @ vt[:2].T
        names = (f"principal component 1 of E_q[z|x] ({100 * share[0]:.0f}% of variance)",
                 f"principal component 2 ({100 * share[1]:.0f}% of variance)")
    fig, ax = plt.subplots(figsize=(6.2, 5))
    if labels is not None:
        labels = np.asarray(labels)
        classes = np.unique(labels)
        cmap = plt.get_cmap("tab10" if classes.size <= 10 else "tab20" if classes.size <= 20 else "viridis",
                            classes.size if classes.size <= 20 else None)
        index = np.searchsorted(classes, labels)  # colours by class, whatever the labels' values
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=index, cmap=cmap, s=6, alpha=0.8, vmin=-0.5, vmax=classes.size - 0.5)
        bar = fig.colorbar(sc, ax=ax, label="class label")
        if classes.size <= 20:
            bar.set_ticks(np.arange(classes.size), labels=[str(c) for c in classes])
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6)
    ax.set_xlabel(names[0] if k > 2 else f"{names[0]} (latent mean)")
    ax.set_ylabel(names[1] if k > 2 else (f"{names[1]} (latent mean)" if names[1] else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return fig


def model_pictures(model, data, out_dir: str, name: str = "", seed: int = 0, n: int = 100) -> list[str]:
    """The pictures a fitted latent-variable model supports, as PNG in ``out_dir``:
    ``prior_samples.png`` and ``reconstructions.png`` for image data and a model with
    ``sample_prior`` / ``decode`` (pixel probabilities: :class:`models.protocol.Generative`),
    ``latent_means.png`` for any model with one local latent. The rows of
    ``traces.split_rows``: test rows with a guide that infers new rows, training rows
    otherwise, a dynamically binarized training set at its one fixed draw (the one
    ``elbolab diagnose``, ``sample`` and ``evaluate`` read; ``seed`` seeds the prior
    draws, not the rows). Returns the file names written."""
    import os

    import torch

    from elbolab.inference.traces import guide_posterior, latent_names, split_rows
    from elbolab.models.protocol import Generative

    written = []
    local, glob = latent_names(model, data.train[:2])
    if len(local) != 1 or glob:
        return written
    s = split_rows(model, data)
    x, rows, labels = s.x, s.rows, s.labels
    label = f"{name} on {data.name}" if name else data.name
    g = torch.random.fork_rng()
    with g, torch.no_grad():
        torch.manual_seed(seed)
        image = data.image_shape is not None and isinstance(model, Generative)
        if image:
            probs = model.decode(model.sample_prior(n)).cpu().numpy()
            image_grid(probs, data.image_shape, os.path.join(out_dir, "prior_samples.png"),
                       f"{label}: means of p(x | z) for z ~ p(z), {n} draws")
            written.append("prior_samples.png")
        if True:
            sub = slice(0, min(2000, x.shape[0]))
            idx = None if rows is None else rows[sub]
            means = guide_posterior(model, x[sub], idx).mean
            if image:
                m = min(30, means.shape[0])
                image_grid_pairs = model.decode(means[:m]).cpu().numpy()
                reconstruction_grid(x[:m].cpu().numpy(), image_grid_pairs, data.image_shape,
                                    os.path.join(out_dir, "reconstructions.png"),
                                    f"{label}: {'test' if rows is None else 'training'} images (data) and the "
                                    "means of p(x | z = E_q[z|x]) (recon.)")
                written.append("reconstructions.png")
            latent_scatter(means.cpu().numpy(), None if labels is None else labels[sub].cpu().numpy(),
                           os.path.join(out_dir, "latent_means.png"),
                           f"{label}: latent means E_q[z|x] of {means.shape[0]} "
                           f"{'test' if rows is None else 'training'} rows")
            written.append("latent_means.png")
    return written
