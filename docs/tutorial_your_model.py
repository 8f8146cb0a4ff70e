"""Bring your own model: a literate script (the test suite runs it, so it cannot rot).

Run it with ``python docs/tutorial_your_model.py`` (about a minute on one thread). It
fits two models written the way Pyro users write them, through elbolab's Python API:

1. a Bayesian linear regression (plain functions, ``AutoMultivariateNormal``), whose
   posterior we also know in closed form;
2. a variational autoencoder of our own design (a ``PyroModule`` with ``model`` and
   ``guide`` methods) on the built-in 8x8 digits: evaluated on held-out rows by
   importance sampling (with the Pareto k of every row's weights), diagnosed with ArviZ,
   and its amortized guide compared with a per-datapoint one (the inference gap).

Nothing here is special to elbolab: the model and guide are the ones you would pass to
``pyro.infer.SVI``; elbolab finds the plate over the data, mini-batches the arguments
with that many rows, and scales the sites inside the plate by N/B.
"""

import torch
import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch import nn

import elbolab

torch.set_num_threads(1)
torch.manual_seed(0)

# ----------------------------------------------------------------------------- 1. linear regression
#
# y_i = x_i . w + b + noise, w ~ N(0, I), b ~ N(0, 2^2), noise ~ N(0, 0.5^2): the
# observations sit in pyro.plate("data", len(X)); w and b are global latents.

N, P, NOISE = 200, 3, 0.5
X = torch.randn(N, P)
y = X @ torch.tensor([1.5, -2.0, 0.5]) + 1.0 + NOISE * torch.randn(N)
X_test = torch.randn(100, P)
y_test = X_test @ torch.tensor([1.5, -2.0, 0.5]) + 1.0 + NOISE * torch.randn(100)


def regression(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(P), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(X)):
        pyro.sample("y", dist.Normal(X @ w + b, NOISE), obs=y)


guide = AutoMultivariateNormal(regression)
run = elbolab.fit(regression, guide, X, y, batch_size=50, steps=3000, lr=0.05, lr_final=5e-4, progress=False)
elbo = run.metrics["quantities"]["train_elbo"]  # every number: value, se, method, bound, ...
print(f"regression: train ELBO {elbo['value']:.3f} ± {elbo['se']:.3f} nats per datapoint; "
      f"{run.metrics['run']['convergence']['verdict']}")

# After the fit the guide holds the posterior, as after SVI.step; compare it with the
# conjugate posterior N(S X^T y / noise^2, S), S = (prior precision + X^T X / noise^2)^-1.
q = guide.get_posterior()
Xa = torch.cat([X, torch.ones(N, 1)], 1).double()
S = torch.linalg.inv(torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.25], dtype=torch.float64)) + Xa.T @ Xa / NOISE**2)
exact_mean = S @ Xa.T @ y.double() / NOISE**2
print("posterior mean, q:    ", [round(v, 3) for v in q.loc.tolist()])
print("posterior mean, exact:", [round(v, 3) for v in exact_mean.tolist()])
print("posterior sd, q / exact:", [round(v, 2) for v in (q.covariance_matrix.diagonal().double()
                                                          / S.diagonal()).sqrt().tolist()])

# Held-out rows: the posterior predictive log density of each test row,
# log (1/S) sum_s p(y_i | w_s, b_s) with (w_s, b_s) ~ q.
held_out = run.evaluate(X_test, y_test, num_samples=1000)
lp = held_out["log_predictive"]
print(f"held-out log predictive density: {lp['value']:.3f} ± {lp['se']:.3f} nats per row")
REGRESSION = {"q_loc": q.loc.detach().double(), "exact_mean": exact_mean, "exact_cov": S,
              "q_cov": q.covariance_matrix.detach().double(), "held_out": lp}

# ----------------------------------------------------------------------------- 2. a VAE of our own
#
# x_i | z_i ~ Bernoulli(decoder(z_i)), z_i ~ N(0, I); the guide an encoder q(z | x).

from elbolab.models.datasources import load_dataset  # noqa: E402  (the built-in 8x8 digits)

digits = load_dataset("digits", binarize="threshold")
K = 4


class TinyVAE(pyro.nn.PyroModule):
    def __init__(self, d: int, k: int = K, hidden: int = 64):
        super().__init__()
        self.k = k
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2 * k))
        self.decoder = nn.Sequential(nn.Linear(k, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.k), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        h = self.encoder(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(h[:, :self.k], nn.functional.softplus(h[:, self.k:]) + 1e-4).to_event(1))


vae = TinyVAE(digits.data_dim)
run = elbolab.fit(vae.model, vae.guide, digits.train, batch_size=100, steps=1500, lr=3e-3, progress=False)
print(f"VAE: train ELBO {run.metrics['quantities']['train_elbo']['value']:.2f} nats per image")

# Held-out images: importance-sampled log-likelihood, K = 500 draws per image; Pareto k
# says whether each image's weights have a tail the estimate can be trusted with.
ev = run.evaluate(digits.test, num_samples=500)
ll = ev["log_likelihood"]
print(f"test log-likelihood {ll['value']:.2f} ± {ll['se']:.2f} nats per image; "
      f"{100 * ll['pareto_k_share']:.1f}% of images with k > 0.7 "
      f"({'reliable' if ll['reliable'] else 'UNRELIABLE'})")

# An ArviZ InferenceData of the guide on 20 test images: posterior draws of z (dims
# chain, draw, row, ...), pointwise log-likelihoods, replicated images.
idata = run.diagnose(digits.test[:20], draws=50)
print("InferenceData groups:", ", ".join(idata.groups()))

# The inference gap: the encoder (amortized) against one Gaussian per training image
# (AutoNormal over z: per-datapoint), each trained from the same initial decoder;
# q* is the best Gaussian per row for the fixed model (Cremer, Li & Duvenaud 2018).
torch.manual_seed(0)
vae = TinyVAE(digits.data_dim)
gaps = elbolab.compare_guides(vae.model, {"encoder": vae.guide, "per-datapoint": AutoNormal(vae.model)},
                              digits.train, heldout=(digits.test,), n_rows=40, num_samples=200,
                              fit_options={"steps": 600, "lr": 3e-3, "batch_size": 100, "progress": False})
for name, r in gaps.items():
    t = r["train"]
    print(f"{name:>13}: training rows: inference gap {t['inference_gap']['mean']:.2f} = approximation "
          f"{t['approximation_gap']['mean']:.2f} + amortization {t['amortization_gap']['mean']:.2f} nats")
VAE_RESULTS = {"test": ev, "gaps": {name: {k: v for k, v in r.items() if k != "run"} for name, r in gaps.items()},
               "groups": list(idata.groups())}
