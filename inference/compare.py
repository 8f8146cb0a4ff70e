"""The inference-gap study of one trained model and guide: for some training rows and
some held-out rows, the guide's q (or, for a guide that cannot infer held-out rows, the
local optimization itself), q* the per-row optimum of the same family
(``inference.guides.optimize_local``), and the decomposition of ``inference.gaps``,
with what inferring a row costs. ``elbolab compare-guides`` and ``elbolab.compare_guides``
both run it on each guide they train.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from elbolab.inference.errors import UsageError
from elbolab.inference.gaps import decompose, to_dict
from elbolab.inference.guides import materialize, optimize_local
from elbolab.inference.traces import guide_posterior, infers_new_rows


@dataclass(frozen=True)
class LocalSettings:
    """How q* is found (``optimize_local``): Adam at ``lr`` per row, multiplied by ``decay``
    after each window of ``window`` steps without improvement, ``n_particles`` draws per row
    and step, stop after ``patience`` + 1 windows without improvement or ``max_steps``.
    Cremer, Li & Duvenaud (2018): lr 1e-3, decay 1, 50 draws, windows of 100, patience 10
    (slow); these defaults reach the same L[q*] within 0.005 nats on the digits VAE in a
    twentieth of the time."""

    lr: float = 0.1
    decay: float = 0.5
    n_particles: int = 10
    window: int = 25
    patience: int = 3
    max_steps: int = 20_000

    def __post_init__(self):
        if not self.lr > 0:
            raise UsageError(f"local lr must be positive, got {self.lr}")
        if not 0 < self.decay <= 1:
            raise UsageError(f"local decay must be in (0, 1], got {self.decay}")
        if self.patience < 0:
            raise UsageError(f"local patience must be >= 0, got {self.patience}")
        for name in ("n_particles", "window", "max_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"local {name} must be >= 1, got {getattr(self, name)}")


def eval_rows(data, n_rows: int, seed: int) -> dict:
    """Seeded random subsets of the training and test rows: {split: (x, rows)}; rows are
    training indices for the training split (per-datapoint guides need them)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, x in (("train", data.train), ("test", data.test)):
        if x.shape[0] == 0:
            continue
        idx = torch.randperm(x.shape[0], generator=g)[: min(n_rows, x.shape[0])].sort().values
        xs = x[idx]
        if split == "train" and data.binarize == "dynamic":  # one fixed draw of the grey levels
            xs = torch.bernoulli(xs, generator=torch.Generator().manual_seed(seed))
        out[split] = (xs, idx if split == "train" else None)
    return out


def study(model, train_rows: torch.Tensor, splits: dict, n_samples: int, local: LocalSettings = LocalSettings(),
          seed: int = 0, log=None) -> dict:
    """The gap decomposition of a trained ``model`` (its guide under study) on each split of
    ``splits`` ({split: (x, training-row indices or None)}); ``train_rows``: some training
    rows (to tell whether the guide infers new rows). Returns {split: numbers}, each with
    the decomposition (``inference.gaps.to_dict``), how the rows' q was obtained and
    what it cost, and q*'s run (``LocalFit.describe``)."""
    model.eval()
    local_kw = asdict(local)
    new_rows = infers_new_rows(model, train_rows)
    out, full = {}, None
    for i, (split, (x, rows)) in enumerate(splits.items()):
        split_seed = seed + 10 * i
        if rows is not None or new_rows:
            t0 = time.perf_counter()
            guide_posterior(model, x, rows)  # what inferring these rows costs: one pass of the guide
            infer_seconds = time.perf_counter() - t0
            q = materialize(model, x, rows)  # the guide's q for these rows, fixed (a refinement is random)
            full = q.full
            fit = optimize_local(model, x, init=q, seed=split_seed, **local_kw)  # q* starts from that q
            how = "guide"
        else:  # the guide cannot infer new rows: inferring them is the local optimization
            fit = optimize_local(model, x, init="standard", full=full, seed=split_seed, **local_kw)
            q, infer_seconds, how = fit.model, fit.seconds, "local optimization"
        gaps = decompose(q, fit.model, x, n_samples, seed=split_seed + 1)
        n = int(x.shape[0])
        out[split] = {**to_dict(gaps), "n_rows": n, "inference": how, "inference_seconds": infer_seconds,
                      "inference_seconds_per_row": infer_seconds / n, "local": fit.describe()}
        if log is not None:
            log(f"{split}: ELBO {gaps['elbo'].mean:.3f}, inference gap {gaps['inference_gap'].mean:.3f} = "
                f"approximation {gaps['approximation_gap'].mean:.3f} + amortization "
                f"{gaps['amortization_gap'].mean:.3f} nats (q*: {fit.steps} steps, {fit.seconds:.1f} s)")
    return out
