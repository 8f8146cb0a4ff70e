"""Generic guides (inference/guides.py) and the inference-gap decomposition
(inference/gaps.py), against PPCA's closed forms and a trained VAE.

Checks:
1. PPCA, full-covariance per-datapoint optimum q*: approximation gap 0 within 0.01 nats;
2. PPCA, diagonal family: approximation gap = exact KL of the best diagonal Gaussian;
3. an under-trained encoder shows a positive amortization gap;
4. a trained VAE: every gap non-negative within error bars; q* improves on the
   encoder's ELBO on test rows.
"""

import math

import pytest
import torch

from elbolab import models
from elbolab.models import datasources as loaders
from elbolab.inference.errors import UsageError
from elbolab.inference.gaps import decompose
from elbolab.inference.traces import reads_row_indices
from elbolab.inference.guides import (PerDatapointGuide, RowAdam, SemiAmortizedGuide, local_elbo, local_latent_dim,
                              materialize, optimize_local)
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
from elbolab.models import ppca

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the machine is shared (conftest restores the count)


def ppca_problem(n=100, d=6, k=2, noise_scale=1.0, seed=0, dtype=F64):
    """A PPCA at known parameters whose posterior has correlated coordinates (W's columns
    rotated) and a spread near 0.45: (model with an amortized-diag guide, x (n, d))."""
    g = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0] * torch.linspace(3.0, 1.5, k, dtype=F64)
    W = W @ torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))[0]
    loc = torch.randn(d, generator=g, dtype=F64)
    x = torch.randn(n, k, generator=g, dtype=F64) @ W.T + loc + noise_scale * torch.randn(n, d, generator=g, dtype=F64)
    torch.manual_seed(seed)
    m = models.build_model("ppca", {"latent_dim": k, "guide": "amortized-diag"}, d, n).to(dtype)
    m.set_parameters(W, loc, noise_scale)
    return m, x.to(dtype)


def best_mean_field_kl(m) -> float:
    _, cov = m.exact_posterior(torch.zeros(1, m.data_dim))
    zero = torch.zeros(m.latent_dim, dtype=F64)
    return float(ppca.kl_gaussians(zero, ppca.best_mean_field(cov), zero, cov))


# ----------------------------------------------------------------------------- building blocks


def test_local_latent_is_checked():
    vae = models.build_model("vae", {"latent_dim": 3, "hidden": [8]}, 5, 10)
    assert local_latent_dim(vae) == 3
    gauss = models.build_model("gaussian", {}, 2, 10)  # global latents (mean, precision): no local "z"
    with pytest.raises(UsageError, match="exactly one local latent site"):
        PerDatapointGuide(gauss)


def test_row_adam_is_adam_with_a_rate_per_row():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(5, 3, generator=g, dtype=F64)
    a = torch.zeros(5, 3, dtype=F64, requires_grad=True)
    b = torch.zeros(5, 3, dtype=F64, requires_grad=True)
    rates = torch.full((5,), 0.1, dtype=F64)
    rates[2] = 0.0  # a stopped row
    ours, ref = RowAdam([a], rates), torch.optim.Adam([b], lr=0.1)
    for _ in range(30):
        for p in (a, b):
            p.grad = None
            ((p - target) ** 4).sum().backward()
        ours.step()
        ref.step()
    keep = torch.arange(5) != 2
    torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-12)  # torch's Adam, float64 round-off
    assert bool((a[2] == 0).all()) and not bool((b[2] == 0).any())


def test_local_elbo_is_the_exact_elbo_on_ppca():
    m, x = ppca_problem(n=40)
    q = m.guide_dist(x)  # any Gaussian q: the untrained encoder's
    torch.manual_seed(1)
    mc = torch.stack([local_elbo(m, x, q, 200).detach() for _ in range(5)]).mean(0)  # 1000 draws per row
    exact = m.exact_elbo(x)
    diff = (mc - exact).double().detach()
    se = float(diff.std() / math.sqrt(diff.numel()))
    assert abs(float(diff.mean())) < 3 * se and se < 0.05  # 3 standard errors; the check has power


def test_per_datapoint_guide_reads_its_rows_and_starts_from_an_encoder():
    m, x = ppca_problem(n=30)
    rows = torch.arange(30)
    table = PerDatapointGuide(m, full=True)
    table.initialize_from(m, x, rows)
    # from the diagonal encoder: the same loc, diag(scale) as the Cholesky factor (exact copies)
    enc, tab = m.guide_dist(x), table.guide_dist(x, rows)
    torch.testing.assert_close(tab.loc, enc.base_dist.loc, rtol=0, atol=1e-12)
    torch.testing.assert_close(tab.covariance_matrix, torch.diag_embed(enc.base_dist.scale**2), rtol=0, atol=1e-12)
    perm = torch.randperm(30)  # a mini-batch in another order reads the same rows
    torch.testing.assert_close(table.guide_dist(x[perm], rows[perm]).loc, tab.loc[perm], rtol=0, atol=0)
    torch.testing.assert_close(table.exact_elbo(x, rows), m.exact_elbo(x), rtol=0, atol=1e-9)


def test_per_datapoint_guide_trained_jointly_reaches_the_closed_form():
    """The per-datapoint guide trained with the model by SVI (the training driver, full
    batch): the model reaches the maximum likelihood and each row's Gaussian its exact
    posterior."""
    m, x = ppca_problem(n=150, d=5, k=2, seed=3, dtype=torch.float32)
    W, loc, noise_scale = ppca.mle(x, 2)
    best = float(ppca.log_marginal(x, W, loc, noise_scale).mean())
    torch.manual_seed(0)
    base = models.build_model("ppca", {"latent_dim": 2}, 5, 150)
    guided = PerDatapointGuide(base, full=True)
    data = loaders.DataSplits("synthetic", x, x[:0], x[:0])
    rows = torch.arange(150)
    start = float((base.exact_log_likelihood(x) - guided.exact_elbo(x, rows)).mean())
    fit(guided, data, TrainConfig(steps=600, batch_size=150, lr=0.05, lr_final=1e-3, progress=False, threads=1))
    ll = base.exact_log_likelihood(x)
    gap = float((ll - guided.exact_elbo(x, rows)).mean())
    print(f"\njoint SVI, per-datapoint full guide: log-lik {best - float(ll.mean()):.4f} below the optimum, "
          f"ELBO gap {start:.3f} -> {gap:.4f} nats")
    # joint SVI on PPCA closes in slowly (measured: ~3,000 full-batch steps to 0.01 nats);
    # after 600 steps both are within 0.05 nats per datapoint, from a gap of over a nat
    assert start > 1.0
    assert best - float(ll.mean()) < 0.05 and float(ll.mean()) <= best + 1e-5  # float32 parameters
    assert -1e-5 < gap < 0.05  # the family holds each exact posterior


# ----------------------------------------------------------------------------- q*: checks 1-3


def test_q_star_full_covariance_closes_the_gap():
    """Check 1: from N(0, I), the full-covariance q* reaches each exact posterior."""
    m, x = ppca_problem()
    local = optimize_local(m, x, init="standard", full=True, lr=0.03, decay=0.5, n_particles=10, window=25,
                           patience=3)
    gaps = decompose(local.model, local.model, x, n_samples=20)
    print(f"\nq* (full) from N(0, I): approximation gap {gaps['approximation_gap'].mean:.4f} nats, "
          f"{local.steps} steps, {local.seconds:.1f} s, {local.converged:.0%} of rows stopped by the rule")
    assert gaps["exact"]
    assert -1e-9 < gaps["approximation_gap"].mean < 0.01  # the 0.01 nats (exact ELBO, float64)
    assert local.converged == 1.0 and local.steps < local.settings["max_steps"]  # stopped by the rule
    start = float((m.exact_log_likelihood(x) - ppca.gaussian_elbo(
        x, *m.params64(), torch.zeros(100, 2, dtype=F64), torch.eye(2, dtype=F64))).mean())
    assert start > 1.0  # N(0, I) was far from the posteriors: the check has power


def test_q_star_diagonal_gap_is_the_best_mean_field_kl_and_the_encoder_gap_is_amortization():
    """Checks 2 and 3: an under-trained diagonal encoder (its weights off the optimum) and
    the diagonal q* started from it: q*'s gap is the KL from the best diagonal Gaussian to
    the exact posterior, the encoder's extra gap is the amortization gap."""
    m, x = ppca_problem(n=100)
    m.set_guide_optimal()
    with torch.no_grad():  # an encoder trained too little: gain and scales off
        m.encoder.linear.weight.mul_(0.7)
        m.encoder.scale = 1.5 * m.encoder.scale
    q = materialize(m, x)
    local = optimize_local(m, x, lr=0.03, decay=0.5, n_particles=10, window=25, patience=3)
    gaps = decompose(q, local.model, x, n_samples=50)
    kl_best = best_mean_field_kl(m)
    print(f"\nunder-trained diagonal encoder: inference gap {gaps['inference_gap'].mean:.4f} = approximation "
          f"{gaps['approximation_gap'].mean:.4f} (best mean-field KL {kl_best:.4f}) + amortization "
          f"{gaps['amortization_gap'].mean:.4f} ± {gaps['amortization_gap'].se:.4f} nats; q*: {local.steps} steps")
    assert gaps["exact"] and kl_best > 0.1  # a correlated posterior: the check has power
    approx = gaps["approximation_gap"].mean
    assert kl_best - 1e-9 < approx < kl_best + 0.01  # no diagonal Gaussian does better; 0.01 nats
    amort = gaps["amortization_gap"]
    assert amort.mean > 0.1 and amort.mean > 10 * amort.se  # positive, far beyond its standard error
    # the decomposition is an identity row by row (float64 round-off)
    torch.testing.assert_close(gaps["inference_gap"].values,
                               gaps["approximation_gap"].values + gaps["amortization_gap"].values,
                               rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- check 4: a trained VAE


@pytest.fixture(scope="module")
def digits_vae():
    torch.set_num_threads(1)
    data = loaders.load_dataset("digits", binarize="threshold")
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 4, "hidden": [64], "activation": "elu"}, data.data_dim,
                           data.n_train)
    fit(m, data, TrainConfig(epochs=20, lr=3e-3, batch_size=100, progress=False, threads=1))
    return m, data


def test_trained_vae_gaps_are_nonnegative_and_q_star_beats_the_encoder(digits_vae):
    m, data = digits_vae
    m.eval()
    x = data.test[:80]
    local = optimize_local(m, x, lr=0.03, decay=0.5, n_particles=10, window=25, patience=3, seed=1)
    gaps = decompose(materialize(m, x), local.model, x, n_samples=500, seed=2)
    line = ", ".join(f"{k} {gaps[k].mean:.3f} ± {gaps[k].se:.3f}"
                     for k in ("inference_gap", "approximation_gap", "amortization_gap"))
    print(f"\ndigits VAE, 80 test rows: ELBO {gaps['elbo'].mean:.3f}, L[q*] {gaps['elbo_star'].mean:.3f}; {line}")
    assert not gaps["exact"]
    for k in ("inference_gap", "approximation_gap", "amortization_gap"):
        assert gaps[k].mean > -3 * gaps[k].se  # non-negative within 3 standard errors
    # the inference and approximation gaps are non-negative row by row (IWAE >= ELBO, same draws)
    assert float(gaps["inference_gap"].values.min()) >= 0 and float(gaps["approximation_gap"].values.min()) >= 0
    amort = gaps["amortization_gap"]
    assert amort.mean > 3 * amort.se  # q* improves on the encoder's test ELBO, beyond 3 standard errors
    assert gaps["iwae"].mean >= gaps["elbo"].mean  # the IWAE bound sits above the ELBO (same draws)


# ----------------------------------------------------------------------------- semi-amortized


def test_semi_amortized_with_no_steps_is_the_encoder(digits_vae):
    m, data = digits_vae
    x = data.test[:10]
    sa = SemiAmortizedGuide(m, steps=0)
    torch.testing.assert_close(sa.guide_dist(x).base_dist.loc, m.guide_dist(x).base_dist.loc, rtol=0, atol=0)
    assert not reads_row_indices(sa, x)  # it infers new rows as its encoder does


def test_semi_amortized_refinement_improves_a_poor_encoder():
    m, x = ppca_problem(n=60)
    m.set_guide_optimal()
    with torch.no_grad():
        m.encoder.linear.weight.mul_(0.5)
        m.encoder.scale = 2.0 * m.encoder.scale
    before = m.exact_elbo(x)
    torch.manual_seed(0)
    after = SemiAmortizedGuide(m, steps=5, step_size=0.1, n_particles=8).exact_elbo(x, None)
    gain = after - before
    print(f"\nsemi-amortized, 5 natural-gradient steps: ELBO +{float(gain.mean()):.3f} nats per row "
          f"(of {float((m.exact_log_likelihood(x) - before).mean()):.3f} possible)")
    assert float(gain.mean()) > 1.0 and bool((gain > 0).all())  # every row gains, a nat on average


def _refined_elbo(sa, m, x):
    torch.manual_seed(3)  # the same inner draws at every call: a smooth function of the encoder
    loc, cov = ppca.gaussian_moments(sa.guide_dist(x))
    return ppca.gaussian_elbo(x, *m.params64(), loc, cov).sum()


def test_semi_amortized_gradient_goes_through_the_steps():
    """SA-VAE differentiates the refined ELBO through the S steps: autograd's gradient
    for the encoder matches central finite differences (float64); the first-order variant
    gives the gradient at the refined parameters passed back unchanged."""
    m, x = ppca_problem(n=6, d=4, k=2)
    m.set_guide_optimal()
    with torch.no_grad():
        m.encoder.linear.weight.mul_(0.6)
    weight = m.encoder.linear.weight
    full = SemiAmortizedGuide(m, steps=3, step_size=0.3, n_particles=2)
    grad = torch.autograd.grad(_refined_elbo(full, m, x), weight)[0]
    fd = torch.zeros_like(weight)
    eps = 1e-6
    with torch.no_grad():
        for i in range(weight.shape[0]):
            for j in range(weight.shape[1]):
                weight[i, j] += eps
                up = float(_refined_elbo(full, m, x))
                weight[i, j] -= 2 * eps
                down = float(_refined_elbo(full, m, x))
                weight[i, j] += eps
                fd[i, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6)  # central differences: O(eps^2) + round-off
    first = SemiAmortizedGuide(m, steps=3, step_size=0.3, n_particles=2, differentiable=False)
    grad_first = torch.autograd.grad(_refined_elbo(first, m, x), weight)[0]
    # by hand: the gradient of the ELBO at lambda_S, pulled back through the encoder only
    with torch.no_grad():
        torch.manual_seed(3)
        q_s = first.guide_dist(x)
    lam = [q_s.base_dist.loc.clone().requires_grad_(), q_s.base_dist.scale.log().clone().requires_grad_()]
    elbo_s = ppca.gaussian_elbo(x, *m.params64(), lam[0], torch.diag_embed(lam[1].exp() ** 2)).sum()
    g_s = torch.autograd.grad(elbo_s, lam)
    q0 = m.guide_dist(x)
    by_hand = torch.autograd.grad([q0.base_dist.loc, q0.base_dist.scale.log()], weight, grad_outputs=list(g_s))[0]
    torch.testing.assert_close(grad_first, by_hand, rtol=1e-9, atol=1e-12)
    assert float((grad_first - grad).norm()) > 0.05 * float(grad.norm())  # the second-order terms matter here


def test_semi_amortized_steps_stay_in_the_trust_region():
    """A huge step size: every row's step is cut to length max_step in the Fisher metric of q
    (float64 round-off), and the refined scales stay finite and positive."""
    m, x = ppca_problem(n=40)
    q0 = m.guide_dist(x)
    sa = SemiAmortizedGuide(m, steps=1, step_size=100.0, n_particles=2, natural=False, max_step=0.7)
    with torch.no_grad():
        q1 = sa.guide_dist(x)
    d_loc = q1.base_dist.loc - q0.base_dist.loc
    d_log_scale = q1.base_dist.scale.log() - q0.base_dist.scale.log()
    length = torch.sqrt((d_loc**2 / q0.base_dist.scale**2).sum(-1) + 2 * (d_log_scale**2).sum(-1))
    torch.testing.assert_close(length, torch.full_like(length, 0.7), rtol=0, atol=1e-9)
    assert bool(torch.isfinite(q1.base_dist.scale).all() and (q1.base_dist.scale > 0).all())


def test_q_star_from_a_table_starts_at_its_rows_and_leaves_it_alone():
    m, x = ppca_problem(n=30)
    q = materialize(m, x)
    before = {k: v.clone() for k, v in q.table.state_dict().items()}
    one_step = optimize_local(m, x, init=q, lr=1e-12, window=1, patience=0, max_steps=1)
    rows = torch.arange(30)
    # a rate of 1e-12 moves nothing measurable: q* is q (float64 round-off)
    torch.testing.assert_close(one_step.model.exact_elbo(x, rows), q.exact_elbo(x, rows), rtol=0, atol=1e-9)
    optimize_local(m, x, init=q, lr=0.05, window=5, patience=0, max_steps=20)
    for k, v in q.table.state_dict().items():
        assert torch.equal(v, before[k])  # the starting table is copied, never moved
