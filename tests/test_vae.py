"""The VAE and the mixture-prior VAE: shapes under vectorized particles, the mixture
prior's log density against torch's, and every objective training both models on the
built-in digits."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import models
from elbolab.models import datasources as loaders
from elbolab.inference.evaluate import importance_estimates
from elbolab.inference.errors import UsageError
from elbolab.inference.traces import reads_row_indices
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
from elbolab.models.common import ConfigError
from elbolab.models.vae import DiagNormalMixture

SMALL = {"latent_dim": 4, "hidden": [64], "activation": "tanh"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small tensors: threads only contend (the conftest restores the count)


@pytest.fixture(scope="module")
def digits():
    return loaders.load_dataset("digits", binarize="threshold")


def build(name, data, **kw):
    cfg = {**SMALL, **({"n_components": 10} if name == "gmvae" else {}), **kw}
    return models.build_model(name, cfg, data.data_dim, data.n_train)


def test_configs_and_defaults():
    vae = models.make_config("vae")
    assert (vae.latent_dim, vae.hidden, vae.activation) == (10, (300, 300), "elu")  # the CS236 protocol
    assert models.make_config("gmvae").n_components == 500
    assert models.make_config("gmvae", {"hidden": [200, 200]}).hidden == (200, 200)  # JSON lists -> tuples
    assert models.make_config("vae", {"hidden": []}).hidden == ()  # no hidden layer: affine encoder and decoder
    for bad, msg in [({"latent_dim": 0}, "latent_dim"), ({"hidden": [64, 0]}, "hidden"),
                     ({"activation": "gelu"}, "activation"), ({"guide": "amortized-full"}, "guide")]:
        with pytest.raises(ConfigError, match=msg):
            models.make_config("vae", bad)
    with pytest.raises(ConfigError, match="n_components"):
        models.make_config("gmvae", {"n_components": 0})


@pytest.mark.parametrize("name", ["vae", "gmvae"])
@pytest.mark.parametrize("guide", ["amortized", "per-datapoint"])
def test_sites_and_shapes_with_vectorized_particles(digits, name, guide):
    m = build(name, digits, guide=guide)
    x = digits.train[:7]
    assert reads_row_indices(m, x) == (guide == "per-datapoint")
    with pyro.plate("particles", 3, dim=-2):
        g = pyro.poutine.trace(m.guide).get_trace(x)
        tr = pyro.poutine.trace(pyro.poutine.replay(m.model, trace=g)).get_trace(x)
    tr.compute_log_prob()
    assert tr.nodes["z"]["value"].shape == (3, 7, 4)
    assert tr.nodes["z"]["log_prob"].shape == (3, 7) and tr.nodes["x"]["log_prob"].shape == (3, 7)
    assert tr.nodes["x"]["fn"].event_shape == (64,)  # the input size comes from the data
    assert m.decode(torch.zeros(5, 4)).shape == (5, 64) and m.sample_prior(6).shape == (6, 4)
    p = m.decode(m.sample_prior(6))
    assert float(p.min()) >= 0 and float(p.max()) <= 1


def test_bernoulli_likelihood_by_hand(digits):
    m = build("vae", digits)
    x = digits.train[:5]
    z = torch.randn(5, 4)
    tr = pyro.poutine.trace(pyro.poutine.condition(m.model, data={"z": z})).get_trace(x)
    p = m.decode(z).double()
    hand = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert torch.allclose(tr.nodes["x"]["fn"].log_prob(x).double(), hand, atol=1e-4)  # float32 round-off


def test_mixture_prior_log_prob_matches_torch():
    torch.manual_seed(0)
    n, k = 50, 6
    loc, scale, logits = 3 * torch.randn(n, k), 0.05 + torch.rand(n, k), torch.randn(n)
    ours = DiagNormalMixture(logits.double(), loc.double(), scale.double())
    ref = dist.MixtureSameFamily(dist.Categorical(logits=logits.double()),
                                 dist.Normal(loc.double(), scale.double()).to_event(1))
    z = torch.cat([3 * torch.randn(40, 7, k), loc[:7].expand(2, 7, k) + 1e-3]).double()  # also at the components
    assert torch.allclose(ours.log_prob(z), ref.log_prob(z), rtol=1e-10, atol=1e-9)  # float64 round-off
    e = ours.expand((42, 7))
    assert isinstance(e, DiagNormalMixture) and e.log_prob(z).shape == (42, 7)
    assert torch.allclose(e.log_prob(z), ref.log_prob(z), rtol=1e-10, atol=1e-9)
    # float32 parameters far from the origin with small scales: the expansion runs in float64,
    # so the error stays at float32 round-off of the result (|log p| ~ 1e4 here)
    far = DiagNormalMixture(logits, loc + 50, scale * 0.01)
    ref32 = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc + 50, scale * 0.01).to_event(1))
    zf = (loc[:5] + 50 + 0.003).float()
    assert torch.allclose(far.log_prob(zf).double(), ref32.log_prob(zf.double()).double(), rtol=1e-5)


def test_mixture_prior_is_learnable_and_equal_weight(digits):
    m = build("gmvae", digits)
    names = {n for n, _ in m.named_parameters()}
    assert {"prior_loc_unconstrained", "prior_scale_unconstrained"} <= names
    p = m.prior()
    assert torch.allclose(p.mixture_distribution.probs, torch.full((10,), 0.1))
    # its density integrates the components: at a component's location, at least 1/n of that component
    with torch.no_grad():
        z = m.prior_loc[0]
        own = dist.Normal(m.prior_loc[0], m.prior_scale[0]).to_event(1).log_prob(z)
        assert float(p.log_prob(z)) >= float(own) - math.log(10) - 1e-5


@pytest.mark.parametrize("name", ["vae", "gmvae"])
@pytest.mark.parametrize("objective", ["elbo", "elbo-analytic", "iwae", "renyi", "iwae-dreg"])
def test_every_objective_trains_both_models(digits, name, objective):
    torch.manual_seed(0)
    m = build(name, digits)
    before = importance_estimates(m, digits.test, 5, seed=0)["log_likelihood"]
    cfg = TrainConfig(objective=objective, n_particles=1 if objective.startswith("elbo") else 5, steps=150,
                      batch_size=100, lr=3e-3, progress=False, val_every=10_000, seed=0)
    res = fit(m, digits, cfg)
    after = importance_estimates(m, digits.test, 5, seed=0)["log_likelihood"]
    # the held-out IWAE_5 bound per datapoint: measured -45.8 at initialization and -22 to -23
    # after 150 steps for every pair; a paired rise of 15 nats is over 50 standard errors
    assert res.steps == 150
    diff = after.values - before.values
    assert float(diff.mean()) > 15.0 and float(diff.mean()) > 10 * float(diff.std() / math.sqrt(len(diff)))
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 10.0


def test_per_datapoint_guide_trains_on_training_rows(digits):
    torch.manual_seed(0)
    m = build("vae", digits, guide="per-datapoint")
    rows = torch.arange(digits.n_train)
    before = importance_estimates(m, digits.train, 5, rows, seed=0)["log_likelihood"].mean
    fit(m, digits, TrainConfig(objective="iwae", n_particles=5, steps=200, batch_size=100, lr=3e-2,
                               progress=False, seed=0))
    after = importance_estimates(m, digits.train, 5, rows, seed=0)["log_likelihood"].mean
    # measured -51.9 -> -20.1 (each row's loc and scale get ~16 updates in 200 steps at a
    # high rate; a per-datapoint guide fits its training rows closely); asserted with margin
    assert after > before + 20.0
    with pytest.raises(UsageError, match="per-datapoint"):  # it has no entries for held-out rows
        importance_estimates(m, digits.test, 5)
