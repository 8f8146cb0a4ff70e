"""Figures, written as PNG (atomically). Every axis is labelled with its unit."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from inference.files import atomic_write  # noqa: E402


def save_figure(fig, path: str, dpi: int = 110) -> None:
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def loss_curve(history: list[dict], validations: list[dict], path: str, title: str = "",
               reference: float | None = None, reference_label: str = "") -> None:
    """Training bound per datapoint (raw and smoothed) against the step, validation ELBO
    with its standard error, and an optional horizontal reference (e.g. the exact optimum)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        steps = np.array([r["step"] for r in history])
        bound = -np.array([r["loss"] for r in history])
        ax.plot(steps, bound, color="0.75", lw=0.8, label="training bound (mini-batch)")
        w = max(1, len(bound) // 50)
        if w > 1:
            smooth = np.convolve(bound, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, color="C0", lw=1.5, label=f"training bound ({w}-step mean)")
        lo, hi = np.percentile(bound, [5, 100])
        pad = 0.1 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
    if validations:
        vs = np.array([v["step"] for v in validations])
        ve = np.array([v["val_elbo"] for v in validations])
        se = np.array([v["val_elbo_se"] for v in validations])
        ax.errorbar(vs, ve, yerr=2 * se, fmt="o-", ms=3, color="C1", label="validation ELBO (±2 s.e.)")
    if reference is not None:
        ax.axhline(reference, color="C3", ls="--", lw=1, label=reference_label or "reference")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per datapoint (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)
