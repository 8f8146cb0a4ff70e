"""Whether a fit had converged: a trend test on the last part of its history.

SVI's per-step objective is noisy (mini-batches, Monte Carlo draws) and its noise is
correlated from step to step (Adam's moments), so a regression on the raw steps would
call noise a trend. The last ``window`` steps are cut into ``blocks`` consecutive blocks;
the block means are nearly independent, and a least-squares line through them gives the
objective's slope with an honest standard error (t with blocks - 2 degrees of freedom).

The verdict: *still rising* when the line rises over the window by more than ``tol``
nats per datapoint AND that rise is significant (t > ``t_crit``, one-sided); *converged*
otherwise; *too short* when the history has fewer than ``min_steps`` steps. A rising
objective means more steps (or a larger rate) would have given a better fit.
"""

from __future__ import annotations

import math

import torch

WINDOW_FRACTION = 0.1  # the last tenth of the steps (a decaying rate makes earlier steps rise by itself)
MIN_STEPS = 40
BLOCKS = 10
TOL = 0.01  # nats per datapoint over the window
T_CRIT = 2.9  # one-sided 1% point of Student's t with 8 degrees of freedom (2.896)


def verdict(history: list[dict], window_fraction: float = WINDOW_FRACTION, blocks: int = BLOCKS,
            tol: float = TOL, t_crit: float = T_CRIT, min_steps: int = MIN_STEPS) -> dict:
    """The convergence verdict of a fit's history (rows with ``loss``: the negative training
    bound per datapoint): {"converged": bool | None, "verdict": str, "window_steps",
    "rise": the fitted rise of the bound over the window (nats per datapoint), "rise_se",
    "t"}."""
    n = len(history)
    if n < max(min_steps, blocks * 2):
        return {"converged": None, "verdict": f"too short to tell ({n} steps)", "window_steps": n,
                "rise": None, "rise_se": None, "t": None}
    w = max(blocks * 2, int(round(window_fraction * n)))
    w -= w % blocks
    y = -torch.tensor([r["loss"] for r in history[-w:]], dtype=torch.float64)  # the bound, per datapoint
    means = y.reshape(blocks, w // blocks).mean(1)  # (blocks,)
    t_axis = torch.arange(blocks, dtype=torch.float64)
    t_axis = t_axis - t_axis.mean()
    slope = float((t_axis * (means - means.mean())).sum() / (t_axis**2).sum())  # per block
    resid = means - means.mean() - slope * t_axis
    dof = blocks - 2
    s2 = float((resid**2).sum()) / dof
    slope_se = math.sqrt(s2 / float((t_axis**2).sum())) if s2 > 0 else 0.0
    rise, rise_se = slope * blocks, slope_se * blocks  # over the window
    t = slope / slope_se if slope_se > 0 else (math.inf if slope > 0 else 0.0)
    rising = rise > tol and t > t_crit
    text = (f"still rising: +{rise:.3g} ± {rise_se:.2g} nats per datapoint over the last {w} steps"
            if rising else f"converged: {rise:+.3g} ± {rise_se:.2g} nats per datapoint over the last {w} steps")
    return {"converged": not rising, "verdict": text, "window_steps": w, "rise": rise, "rise_se": rise_se,
            "t": t if math.isfinite(t) else None}
