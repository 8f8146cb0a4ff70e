"""Generating from a trained model with a decoder (``models.protocol.Generative``:
``decode(z)``, the mean of p(x | z), and ``sample_prior(n)``), for ``elbolab sample`` and
``Run.sample``:

* prior samples: decode(z) for z ~ p(z), n of them (n, D);
* reconstructions: rows x_i and decode(E_q[z | x_i]) (m, D) each;
* an interpolation between two rows a and b: decode((1 - t) m_a + t m_b) for t on a grid
  of [0, 1], m = E_q[z | x] the guide's means (linear in latent space) (steps, D);
* a latent traversal: for each latent dimension d (ordered by how much the guide's means
  vary along it over the rows, the most used first), decode(z) with z at the rows' mean
  latent point except z_d = mean_d + c sd_d, c on a grid of [-2.5, 2.5], sd_d the spread
  of the means along d (dims, steps, D);
* the guide's means of the rows (N, k), with their class labels where the data set has
  them.

The rows are the test split when the guide infers new rows (an encoder), the training
rows otherwise (a per-datapoint guide knows only those): ``traces.split_rows``, which
reads a dynamically binarized training set at its one fixed draw. Images are decoded
as they are; the figures (``inference.plots``) show them as grids when the data set has
an image shape, and as scatters of two columns otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from elbolab.inference.errors import UsageError
from elbolab.inference.files import save_json
from elbolab.inference.traces import guide_posterior, latent_names, split_rows
from elbolab.models.protocol import Generative

TRAVERSAL_SPAN = 2.5  # a traversal runs over mean +- this many standard deviations of the latent means
MAX_TRAVERSAL_DIMS = 10
MAX_MEAN_ROWS = 2000  # latent means of at most this many rows


def check_generative(model, where: str = "the run") -> None:
    """Refuse a model without a decoder (one line, naming ``where``)."""
    if not isinstance(model, Generative):
        raise UsageError(f"{where}: the model ({type(model).__name__}) has no decoder (decode and sample_prior, "
                         "models.protocol.Generative): there is nothing to generate from")


@torch.no_grad()
def generate(model, data, n: int = 100, n_reconstructions: int = 20, pair: tuple[int, int] | None = None,
             steps: int = 10, split: str | None = None, seed: int = 0, where: str = "the run") -> dict:
    """Everything the module docstring lists, as numpy arrays in a dict (seeded; the global
    RNG state is restored): ``prior`` (n, D), ``data`` (N, D: the split's first rows, at
    most MAX_MEAN_ROWS), ``reconstructions`` (m, D) of the first m of them,
    ``interpolation`` (steps, D) with ``pair`` (its two rows' indices in the split,
    default the first two) and ``pair_data`` (2, D), ``traversal`` (dims, steps, D) with
    ``traversal_dims`` and ``traversal_offsets`` (steps,) in units of sd, ``means`` (N, k),
    ``labels`` (N,) or None; and ``split``. ``where``: the run's name in refusals."""
    check_generative(model, where)
    if n < 1 or n_reconstructions < 1 or steps < 2:
        raise UsageError(f"n and n_reconstructions must be >= 1 and steps >= 2, got {n}, {n_reconstructions}, {steps}")
    local, glob = latent_names(model, data.train[:2], torch.arange(min(2, data.n_train)))
    if len(local) != 1 or glob:
        raise UsageError("generation needs one local latent per row and no global ones")
    s = split_rows(model, data, split, where=where)
    split, x, rows, labels = s.split, s.x, s.rows, s.labels
    b = int(x.shape[0])
    pair = (0, 1) if pair is None else tuple(int(i) for i in pair)
    if len(pair) != 2 or b < 2 or not all(0 <= i < b for i in pair) or pair[0] == pair[1]:
        raise UsageError(f"pair must be two different rows of the {split} split's {b}, got {pair}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        prior = model.decode(model.sample_prior(n))
        sub = slice(0, min(MAX_MEAN_ROWS, b))
        means = guide_posterior(model, x[sub], None if rows is None else rows[sub]).mean  # (N, k)
        m = min(n_reconstructions, means.shape[0])
        recon = model.decode(means[:m])
        ends = guide_posterior(model, x[list(pair)], None if rows is None else rows[list(pair)]).mean  # (2, k)
        t = torch.linspace(0, 1, steps, dtype=ends.dtype)[:, None]
        interpolation = model.decode((1 - t) * ends[0] + t * ends[1])
        center, spread = means.mean(0), means.std(0) if means.shape[0] > 1 else torch.ones_like(means[0])
        order = torch.argsort(spread, descending=True, stable=True)[:MAX_TRAVERSAL_DIMS]
        offsets = torch.linspace(-TRAVERSAL_SPAN, TRAVERSAL_SPAN, steps, dtype=means.dtype)
        traversal = []
        for d in order.tolist():
            z = center.expand(steps, -1).clone()
            z[:, d] = center[d] + offsets * spread[d]
            traversal.append(model.decode(z))
    np_ = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return {"split": split, "prior": np_(prior), "data": np_(x[sub]), "reconstructions": np_(recon),
            "pair": list(pair), "pair_data": np_(x[list(pair)]), "interpolation": np_(interpolation),
            "traversal": np_(torch.stack(traversal)), "traversal_dims": order.tolist(),
            "traversal_offsets": np_(offsets), "traversal_spread": np_(spread[order]), "means": np_(means),
            "labels": None if labels is None else np_(labels[sub])}


def write_samples(result: dict, data, out: str, title: str = "") -> list[str]:
    """The figures of :func:`generate`'s result in ``out`` (image grids for image data, else
    scatters of the two most variable columns), the arrays in ``samples.npz`` and a
    ``samples.json`` saying what each holds; returns the file names."""
    from elbolab.inference import plots

    os.makedirs(out, exist_ok=True)
    label = title or data.name
    files = []
    shape = data.image_shape
    split = result["split"]
    if shape is not None:
        plots.labelled_grid([("prior", result["prior"])], shape, os.path.join(out, "prior_samples.png"),
                            f"{label}: means of p(x | z) for {len(result['prior'])} draws z ~ p(z)", ncols=10)
        m = len(result["reconstructions"])
        plots.reconstruction_grid(result["data"][:m], result["reconstructions"], shape,
                                  os.path.join(out, "reconstructions.png"),
                                  f"{label}: {split} rows (data) and the means of p(x | z = E_q[z|x]) (recon.)",
                                  ncols=10)
        a, b = result["pair"]
        row = np.concatenate([result["pair_data"][:1], result["interpolation"], result["pair_data"][1:]])
        plots.labelled_grid([("", row)], shape, os.path.join(out, "interpolation.png"),
                            f"{label}: {split} row {a} (left), row {b} (right), and between them the decoded "
                            f"points of the line from E_q[z|x_{a}] to E_q[z|x_{b}]", ncols=len(row))
        dims = result["traversal_dims"]
        plots.labelled_grid([(f"z_{d}", imgs) for d, imgs in zip(dims, result["traversal"])], shape,
                            os.path.join(out, "traversal.png"),
                            f"{label}: one latent dimension varied (rows; mean ± {TRAVERSAL_SPAN:g} sd of the "
                            f"{split} rows' latent means, left to right), the others at those means",
                            ncols=result["traversal"].shape[1])
        files += ["prior_samples.png", "reconstructions.png", "interpolation.png", "traversal.png"]
    else:
        plots.column_scatter(result, os.path.join(out, "columns.png"),
                             f"{label}: the two most variable columns, data against generated")
        files.append("columns.png")
    plots.latent_scatter(result["means"], result["labels"], os.path.join(out, "latent_means.png"),
                         f"{label}: latent means E_q[z|x] of {len(result['means'])} {split} rows"
                         + (", coloured by label" if result["labels"] is not None else ""))
    files.append("latent_means.png")
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    from elbolab.inference.files import atomic_write

    with atomic_write(os.path.join(out, "samples.npz"), binary=True) as f:
        np.savez_compressed(f, **arrays)
    files.append("samples.npz")
    save_json({"split": split, "pair": result["pair"], "traversal_dims": result["traversal_dims"],
               "arrays": {k: list(v.shape) for k, v in arrays.items()},
               "what": {"prior": "decode(z), z ~ p(z): means of p(x | z)",
                        "data": f"the first {split} rows", "reconstructions": "decode(E_q[z | x]) of the first of them",
                        "interpolation": "decode((1 - t) m_a + t m_b), t evenly spaced in [0, 1]",
                        "traversal": f"per latent dim: decode of the mean latent point with that dim at mean + c sd, "
                                     f"c in [-{TRAVERSAL_SPAN:g}, {TRAVERSAL_SPAN:g}] (traversal_offsets)",
                        "means": "E_q[z | x] of the rows"}}, os.path.join(out, "samples.json"))
    files.append("samples.json")
    return files
