"""A multi-process fit for tests/test_distributed.py (not a test module itself).

``python tests/ddp_worker.py OUT --devices 2`` fits PPCA twice (the amortized-full
guide, then the per-datapoint guide with --sparse-rows) under Lightning's "ddp"
strategy on CPU (gloo): Lightning re-runs this file in one more process. Every
rank then writes OUT/<guide>-rank<r>.pt: its parameters, the training-row indices
of every step, the seed it drew with, its history, and a distributed evaluation.

The guide's noise is common random numbers: z_i = loc_i + scale_i * eps(i, step),
eps a function of the row i and the optimizer step only, so a 1-process fit with
the same global batches draws exactly the same numbers and the two fits differ by
float round-off alone (``reference_fit`` is that 1-process fit).
"""

from __future__ import annotations

import argparse
import os
import sys

import pyro
import pyro.distributions as dist
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lightning.pytorch as pl  # noqa: E402

from elbolab import models  # noqa: E402
from elbolab.inference import distributed  # noqa: E402
from elbolab.models import datasources as loaders  # noqa: E402
from elbolab.inference.evaluate import elbo_terms  # noqa: E402
from elbolab.inference.train import fit  # noqa: E402
from elbolab.inference.train_config import TrainConfig  # noqa: E402
from elbolab.models.common import data_plate  # noqa: E402
from elbolab.models.ppca import PPCA, PPCAConfig  # noqa: E402

N_TRAIN = 1200  # a multiple of every global batch used (no padded rows)
STEPS = 24  # two epochs of 12 global batches of 100 rows
EVAL_SEED = 99


def row_noise(idx: torch.Tensor, step: int, width: int) -> torch.Tensor:
    """eps (B, width) ~ N(0, I), a function of (row, step) only."""
    return torch.stack([torch.randn(width, generator=torch.Generator().manual_seed(int(i) * 100_003 + step))
                        for i in idx.tolist()])


class FixedNoise(dist.TorchDistribution):
    """``base`` (a Normal(...).to_event(1) or an MVN) whose reparameterized draw uses
    the given standard-normal noise ``eps`` (B, k) instead of torch's RNG."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, base, eps):
        self.base, self.eps = base, eps
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def rsample(self, sample_shape=torch.Size()):
        if isinstance(self.base, torch.distributions.MultivariateNormal):
            return self.base.loc + (self.base.scale_tril @ self.eps.unsqueeze(-1)).squeeze(-1)
        return self.base.base_dist.loc + self.base.base_dist.scale * self.eps

    def log_prob(self, value):
        return self.base.log_prob(value)


class CommonNoisePPCA(PPCA):
    """PPCA whose training draws are ``row_noise(idx, step)``; ``step`` is set by
    ``StepSetter`` (None: ordinary draws from torch's RNG, as in evaluation)."""

    step: int | None = None
    static_steps = False  # (a Python value read at every step)

    def guide(self, x):
        with data_plate(x) as rows:
            q = self.guide_dist(x, rows)
            if torch.is_grad_enabled() and self.step is not None:  # training steps (evaluation: no grad)
                q = FixedNoise(q, row_noise(rows, self.step, self.latent_dim))
            pyro.sample("z", q)


class StepSetter(pl.Callback):
    """Gives the model its step before each batch; records the batch's row indices."""

    def __init__(self, model):
        self.model, self.seen, self.seed = model, [], None

    def on_train_start(self, trainer, module):
        self.seed = torch.initial_seed()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.model.step = trainer.global_step
        self.seen.append(batch[1].clone())


def data() -> loaders.DataSplits:
    d = loaders.load_dataset("digits")
    return loaders.DataSplits("digits", d.train[:N_TRAIN], d.val[:120], d.test[:10], image_shape=(8, 8))


def build(guide: str, n_data: int, data_dim: int) -> CommonNoisePPCA:
    torch.manual_seed(0)
    return CommonNoisePPCA(PPCAConfig(latent_dim=3, guide=guide), data_dim, n_data)


def config(guide: str, batch_size: int, devices: int) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=batch_size, lr=0.05, seed=5, threads=1, progress=False,
                       val_every=8, devices=devices, strategy="ddp" if devices > 1 else "auto",
                       sparse_rows=guide == "per-datapoint")


def evaluate(model, d) -> torch.Tensor:
    """The per-row training ELBO (N,), 3 particles, rows split over the ranks."""
    model.step = None
    return distributed.map_rows(lambda xb, rb: {"elbo": elbo_terms(model, xb, rb, 3)["elbo"]},
                                d.train, torch.arange(d.n_train), chunk_size=250, seed=EVAL_SEED)["elbo"]


def reference_fit(guide: str, batch_size: int):
    """The same fit in this process (one rank)."""
    d = data()
    model = build(guide, d.n_train, d.data_dim)
    spy = StepSetter(model)
    result = fit(model, d, config(guide, batch_size, 1), callbacks=[spy])
    return model, result, spy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args()
    pyro.enable_validation(True)
    d = data()
    for guide in ("amortized-full", "per-datapoint"):
        model = build(guide, d.n_train, d.data_dim)
        spy = StepSetter(model)
        result = fit(model, d, config(guide, args.batch_size, args.devices), callbacks=[spy])
        rank, world = distributed.rank_and_world()
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "seen": spy.seen, "seed": spy.seed, "history": [r["loss"] for r in result.history],
                    "validations": result.validations, "world_size": world, "steps": result.steps,
                    "rank_param_diff": result.rank_param_diff, "eval": evaluate(model, d)},
                   os.path.join(args.out, f"{guide}-rank{rank}.pt"))


if __name__ == "__main__":
    main()
