"""The Bayesian Gaussian against its closed forms.

Maximum likelihood is the moment match; the conjugate posteriors (Normal-Wishart,
Normal-Gamma, known scale) satisfy Bayes' rule exactly; the structured guide at the
exact posterior has constant log weights equal to the log evidence; SVI with each guide
recovers the posterior means within 0.1 exact posterior standard deviations; the
mean-field guide under-estimates the variance of loc by exactly the amount its
coordinate-wise optimum predicts; NUTS agrees with the exact posterior within Monte
Carlo error.
"""

import json
import math

import numpy as np
import pytest
from conftest import read_metrics
import torch

from elbolab import models
from elbolab.models import datasources as loaders
from elbolab.inference.evaluate import elbo_estimate
from elbolab.inference.traces import whole_set_log_weights
from elbolab.inference.mcmc import effective_sample_size, run_nuts
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
from elbolab.models import gaussian as G
from elbolab.scripts import fit as fit_script

F64 = torch.float64
COV2 = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=F64)  # correlation 0.8
LOC2 = torch.tensor([1.0, -0.5], dtype=F64)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the machine is shared (conftest restores the count)


def gaussian_rows(n=500, d=2, seed=0) -> torch.Tensor:
    """Rows of N(LOC2, COV2) for d = 2; for other d a random covariance, float64 (n, d)."""
    g = torch.Generator().manual_seed(seed)
    if d == 2:
        loc, cov = LOC2, COV2
    else:
        A = torch.randn(d, d, generator=g, dtype=F64)
        loc, cov = torch.randn(d, generator=g, dtype=F64), A @ A.T / d + 0.2 * torch.eye(d, dtype=F64)
    return torch.randn(n, d, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T + loc


def build(n, d=2, dtype=F64, **config):
    torch.manual_seed(0)
    return models.build_model("gaussian", config, d, n).to(dtype)


# ----------------------------------------------------------------------------- maximum likelihood


def test_mle_maximizes_the_average_log_likelihood_and_minimizes_kl():
    x = gaussian_rows(300, d=3, seed=1)
    loc_hat, cov_hat = G.mle(x)
    torch.testing.assert_close(cov_hat, torch.cov(x.T, correction=0))  # the 1/N covariance
    entropy = G.gaussian_entropy(cov_hat)
    D = torch.distributions
    p_hat = D.MultivariateNormal(loc_hat, covariance_matrix=cov_hat)
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        loc = loc_hat + 0.3 * torch.randn(3, generator=g, dtype=F64)
        A = torch.randn(3, 3, generator=g, dtype=F64)
        cov = cov_hat + 0.2 * A @ A.T
        kl = D.kl_divergence(p_hat, D.MultivariateNormal(loc, covariance_matrix=cov))
        # the average log-likelihood is -H(p_hat) - KL(p_hat || p_theta), exactly (round-off)
        assert float(G.average_log_likelihood(x, loc, cov)) == pytest.approx(float(-entropy - kl), abs=1e-10)
        assert float(G.average_log_likelihood(x, loc, cov)) < float(G.average_log_likelihood(x, loc_hat, cov_hat))
    # at the MLE the KL term vanishes: the maximum is -H(p_hat)
    assert float(G.average_log_likelihood(x, loc_hat, cov_hat)) == pytest.approx(float(-entropy), abs=1e-10)
    loc = loc_hat.clone().requires_grad_(True)
    tril = torch.linalg.cholesky(cov_hat).clone().requires_grad_(True)
    ll = G.average_log_likelihood(x, loc, tril @ tril.T)
    grads = torch.autograd.grad(ll, (loc, tril))
    assert max(float(t.abs().max()) for t in grads) < 1e-10  # a stationary point (round-off)


# ----------------------------------------------------------------------------- exact posteriors


def _prior(d):
    return G.NormalWishart(torch.full((d,), 0.3, dtype=F64), 0.7, d + 1.5, 0.4 * torch.eye(d, dtype=F64))


@pytest.mark.parametrize("d", [1, 2, 4])
def test_normal_wishart_posterior_is_bayes_rule(d):
    x = gaussian_rows(40, d=d, seed=d)
    prior = _prior(d)
    post = prior.update(x)
    evidence = prior.log_evidence(x)
    D = torch.distributions
    for s in range(3):  # log p(X) = log p(X | theta) + log p(theta) - log p(theta | X) at any theta
        precision = D.Wishart(torch.tensor(post.df, dtype=F64), covariance_matrix=post.scale).sample()
        loc = post.loc + 0.2 * torch.randn(d, dtype=F64)
        log_lik = D.MultivariateNormal(loc, precision_matrix=precision).log_prob(x).sum()
        chib = log_lik + prior.log_prob(loc, precision) - post.log_prob(loc, precision)
        assert float(chib) == pytest.approx(evidence, abs=1e-8)  # float64 round-off
    # and log p(X) = sum_i log p(x_i | x_<i): the posterior predictive (a Student-t) chained
    chained, current = 0.0, prior
    for i in range(x.shape[0]):
        chained += float(current.predictive().log_prob(x[i]))
        current = current.update(x[i:i + 1])
    assert chained == pytest.approx(evidence, abs=1e-8)
    torch.testing.assert_close(current.scale, post.scale)  # sequential updates = one batch update


def test_normal_gamma_is_the_one_dimensional_normal_wishart():
    x = gaussian_rows(50, d=1, seed=3)
    ng = G.NormalGamma(0.2, 0.5, 1.5, 0.8)
    nw = ng.to_normal_wishart()
    post_ng, post_nw = ng.update(x), nw.update(x)
    assert ng.log_evidence(x) == pytest.approx(nw.log_evidence(x), abs=1e-10)  # round-off
    back = post_ng.to_normal_wishart()
    assert back.kappa == pytest.approx(post_nw.kappa) and back.df == pytest.approx(post_nw.df)
    torch.testing.assert_close(back.scale, post_nw.scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(back.loc, post_nw.loc, rtol=1e-12, atol=0)
    for key, value in post_ng.summary().items():
        torch.testing.assert_close(value, post_nw.summary()[key], rtol=1e-10, atol=0)


def test_known_scale_posterior_is_bayes_rule():
    x = gaussian_rows(30, d=2, seed=4)
    prior = G.NormalKnownScale(torch.tensor([0.5, -1.0], dtype=F64), 0.3, 0.7)
    post = prior.update(x)
    D = torch.distributions
    loc = torch.tensor([0.9, -0.4], dtype=F64)
    log_lik = D.Normal(loc, 0.7).log_prob(x).sum()
    log_prior = D.Normal(prior.loc, prior.scale).log_prob(loc).sum()
    log_post = D.Normal(post.loc, post.scale).log_prob(loc).sum()
    assert float(log_lik + log_prior - log_post) == pytest.approx(prior.log_evidence(x), abs=1e-9)


def test_normal_wishart_kl_matches_monte_carlo():
    x = gaussian_rows(100, d=3, seed=5)
    post = _prior(3).update(x)
    q = G.NormalWishart(post.loc + 0.05, post.kappa * 1.3, post.df * 0.9, post.scale * 1.05)
    assert post.kl(post) == pytest.approx(0.0, abs=1e-9)
    D = torch.distributions
    torch.manual_seed(0)
    precision = D.Wishart(torch.tensor(q.df, dtype=F64), covariance_matrix=q.scale).sample((20000,))
    loc = D.MultivariateNormal(q.loc, precision_matrix=q.kappa * precision).sample()
    diff = q.log_prob(loc, precision) - post.log_prob(loc, precision)  # E_q[log q - log p] = KL(q || p)
    se = float(diff.std() / math.sqrt(diff.numel()))
    assert abs(float(diff.mean()) - q.kl(post)) < 4 * se  # 4 standard errors
    assert q.kl(post) > 20 * se  # the check has power


# ----------------------------------------------------------------------------- model and guides


@pytest.mark.parametrize("prior, d", [("normal-wishart", 3), ("normal-wishart", 1), ("normal-gamma", 1),
                                      ("known-scale", 2)])
def test_structured_guide_at_the_exact_posterior_has_constant_log_weights(prior, d):
    """log p(X, theta) - log q(theta) = log p(X) for every draw when q is the exact
    posterior: a check of the Pyro model (Bartlett sites included), the guide and the
    closed-form evidence together."""
    x = gaussian_rows(200, d=d, seed=6)
    m = build(200, d, guide="structured", prior=prior, prior_kappa=0.5, prior_scale=2.0, noise_scale=0.8)
    post = m.exact_posterior(x)
    if prior == "normal-wishart":
        m.approx.set(post)
    elif prior == "normal-gamma":
        with torch.no_grad():
            m.approx.loc = torch.tensor([post.loc], dtype=F64)
            m.approx.kappa = torch.tensor(post.kappa, dtype=F64)
            m.approx.shape = torch.tensor(post.shape, dtype=F64)
            m.approx.precision_mean = torch.tensor(post.shape / post.rate, dtype=F64)
    else:
        with torch.no_grad():
            m.approx.loc, m.approx.kappa = post.loc, torch.tensor(post.kappa, dtype=F64)
    lw = whole_set_log_weights(m, x, torch.arange(200), n_particles=50)
    log_w = lw["log_lik"] + lw["log_prior"] - lw["log_q"]
    torch.testing.assert_close(log_w, torch.full_like(log_w, m.log_evidence(x)), rtol=0, atol=1e-8)
    assert float(lw["n_rows"]) == 200


def test_elbo_estimate_of_a_global_latent_model_matches_the_exact_elbo():
    x = gaussian_rows(300, d=2, seed=7)
    m = build(300, guide="structured")
    post = m.exact_posterior(x)
    q = G.NormalWishart(post.loc + 0.02, post.kappa * 0.7, post.df * 1.2, post.scale / 1.1)
    m.approx.set(q)
    exact_elbo = (m.log_evidence(x) - q.kl(post)) / 300  # nats per datapoint
    est = elbo_estimate(m, x, torch.arange(300), n_particles=4000)
    assert est["elbo"].n == 4000  # the whole set's ELBO, one value per draw
    assert abs(est["elbo"].mean - exact_elbo) < 3 * est["elbo"].se  # 3 standard errors
    assert q.kl(post) / 300 > 10 * est["elbo"].se  # the ELBO is visibly below the evidence: power
    assert est["elbo"].mean == pytest.approx(est["recon"].mean - est["kl"].mean, abs=1e-9)


def _svi(m, x, steps, lr=0.1, lr_final=1e-4, n_particles=16, seed=0):
    data = loaders.DataSplits("gaussian-rows", x.float(), x[:0].float(), x[:0].float())
    cfg = TrainConfig(steps=steps, batch_size=x.shape[0], lr=lr, lr_final=lr_final, n_particles=n_particles,
                      seed=seed, progress=False, threads=1)
    return fit(m, data, cfg)


def _compare(m, x, n_samples=20000):
    """Guide moments (sampled) against the exact posterior's, in exact standard deviations."""
    torch.manual_seed(1)
    exact = m.exact_posterior(x).summary()
    q = m.quantities(m.sample_guide(x.float(), n_samples))
    guide = G.summarize_samples(q["loc"], q["precision"])
    z_loc = (guide["loc_mean"] - exact["loc_mean"]) / exact["loc_sd"]
    z_precision = (guide["precision_mean"] - exact["precision_mean"]) / exact["precision_sd"]
    return exact, guide, q, z_loc, z_precision


GUIDE_STEPS = {"mean-field": (600, 8), "full-rank": (600, 8), "structured": (400, 8)}


@pytest.mark.parametrize("guide", G.GUIDES)
def test_svi_recovers_the_exact_posterior_means(guide):
    n = 500
    x = gaussian_rows(n)
    m = build(n, dtype=torch.float32, guide=guide)
    steps, particles = GUIDE_STEPS[guide]
    res = _svi(m, x, steps, n_particles=particles)
    # after 600 steps the full-rank guide's loc variance is measured 0.84-0.92 of the
    # exact one, still growing (0.98 after 1,000): 25% here, 10% in the long test
    _check_guide(guide, m, x, res, particles, var_tolerance=0.25)


def _check_guide(guide, m, x, res, particles, var_tolerance):
    n, d = x.shape
    exact, q_moments, q, z_loc, z_precision = _compare(m, x)
    var_ratio = (q_moments["loc_sd"] / exact["loc_sd"]) ** 2
    evidence = m.log_evidence(x)
    elbo = elbo_estimate(m, x.float(), torch.arange(n), n_particles=2000)["elbo"]
    kl, kl_se = evidence - elbo.mean * n, elbo.se * n
    print(f"\n{guide}, d={d}: {res.steps} steps x {particles} particles, {res.seconds:.1f} s; posterior means "
          f"off by {z_loc.abs().max():.3f} (loc), {z_precision.abs().max():.3f} (precision) exact sds; "
          f"var_q(loc) / var(loc) = {[round(v, 3) for v in var_ratio.tolist()]}; "
          f"KL(q || p) = {kl:.4f} ± {kl_se:.4f} nats")
    # the bar: posterior means within 0.1 exact posterior standard deviations
    # (the Monte Carlo error of the guide's means from 20,000 draws is below 0.01 of them)
    assert float(z_loc.abs().max()) < 0.1
    assert float(z_precision.abs().max()) < 0.1
    assert kl > -3 * kl_se  # KL >= 0 within 3 standard errors
    if guide == "mean-field":
        # the notes' "variational inference underestimates variance", measured against the
        # exact marginal variances: every coordinate under, by about 1 / (E[precision_ii]
        # E[covariance_ii]) of the exact posterior (1 - rho^2 = 0.36 at correlation 0.8;
        # 10%: the guide's E_q[precision] is not exactly E[precision])
        assert float(var_ratio.max()) < 1
        expected = 1 / (torch.diagonal(exact["precision_mean"]) * torch.diagonal(exact["covariance_mean"]))
        torch.testing.assert_close(var_ratio, expected, rtol=0.1, atol=0)
        # and by exactly the amount the coordinate-wise optimum predicts: the best
        # independent q(loc_i) has variance 1 / (kappa_N E_q[precision_ii]) (5%: Monte
        # Carlo error of 20,000 draws is 1%, the rest is SVI's)
        kappa_n = m.exact_posterior(x).kappa
        predicted = 1.0 / (kappa_n * torch.diagonal(q["precision"].double().mean(0)))
        torch.testing.assert_close(q_moments["loc_sd"] ** 2, predicted, rtol=0.05, atol=0)
        assert kl > 0.3  # nats: the price of the independence
    else:
        # a joint Gaussian (full-rank) or the exact family (structured): no underestimate
        torch.testing.assert_close(var_ratio, torch.ones(d, dtype=F64), rtol=var_tolerance, atol=0)
        assert kl < 0.05 + 3 * kl_se  # nats, total
    if guide == "structured":  # exact KL between two Normal-Wisharts
        assert m.approx.posterior().kl(m.exact_posterior(x)) < 0.02  # nats, total


def test_nuts_agrees_with_the_exact_posterior():
    n = 200
    x = gaussian_rows(n, seed=8)
    m = build(n)
    r = run_nuts(m, x, num_samples=200, warmup_steps=100, seed=0)
    _check_nuts(m, x, r)


def _check_nuts(m, x, r):
    q = m.quantities(r.samples)
    exact = m.exact_posterior(x).summary()
    print(f"\nNUTS: {r.describe()}")
    assert r.divergences == 0
    for key, draws in (("loc", q["loc"]), ("precision", q["precision"])):
        ess = effective_sample_size(draws)
        mean, sd = exact[f"{key}_mean"], exact[f"{key}_sd"]
        # the chain's mean is within 4 Monte Carlo standard errors (sd / sqrt(ESS)) of the exact mean
        z = (draws.double().mean(0) - mean) / (sd / ess.sqrt())
        assert float(z.abs().max()) < 4, (key, z)
        # and its spread matches, within 4 standard errors of the sample standard deviation:
        # sd((x - m)^2) / (2 var sqrt(ESS of (x - m)^2)) (1 / sqrt(2 ESS) for a Gaussian; the
        # squares have their own ESS, far below the mean's for NUTS's antithetic draws)
        sq = (draws.double() - draws.double().mean(0)) ** 2
        rel = draws.double().std(0) / sd - 1
        se_rel = sq.std(0) / (2 * sq.mean(0) * effective_sample_size(sq).sqrt())
        assert bool((rel.abs() < 4 * se_rel).all()), (key, rel, se_rel)


@pytest.mark.slow
def test_nuts_agrees_with_the_exact_posterior_long():
    n = 300
    x = gaussian_rows(n, d=3, seed=9)
    m = build(n, d=3)
    r = run_nuts(m, x, num_samples=1000, warmup_steps=400, seed=1)
    _check_nuts(m, x, r)


@pytest.mark.slow
@pytest.mark.parametrize("guide", G.GUIDES)
def test_svi_recovers_the_exact_posterior_means_d3(guide):
    """The same checks in three dimensions (9 latent coordinates), another data set, run
    longer: the full-rank and structured loc variances within 10% of the exact ones."""
    n = 400
    x = gaussian_rows(n, d=3, seed=10)
    m = build(n, d=3, dtype=torch.float32, guide=guide)
    res = _svi(m, x, 2000, n_particles=16, seed=1)
    _check_guide(guide, m, x, res, 16, var_tolerance=0.1)


# ----------------------------------------------------------------------------- command line


def test_fit_cli_writes_exact_and_variational_moments(tmp_path):
    x = gaussian_rows(600, seed=11).numpy()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    code = fit_script.main(["--model", "gaussian", "--data", str(tmp_path / "x.npy"), "--guide", "structured",
                            "--steps", "400", "--lr", "0.1", "--lr-final", "1e-4", "--n-particles", "8",
                            "--batch-size", "480", "--eval-particles", "500", "--out", str(out), "--no-progress",
                            "--threads", "1"])
    assert code == 0
    m = read_metrics(out)
    q, cf = m["quantities"], m["closed_forms"]
    data = loaders.load_dataset(data_path=str(tmp_path / "x.npy"))
    model = models.build_model("gaussian", {}, 2, data.n_train)
    post = model.exact_posterior(data.train)
    exact = cf["exact_posterior"]
    # the exact moments are the closed form on the same training rows (float64 round-off)
    np.testing.assert_allclose(exact["loc_mean"], post.loc.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(exact["precision_mean"], (post.df * post.scale).numpy(), rtol=1e-12)
    assert q["train_log_evidence"]["value"] == pytest.approx(model.log_evidence(data.train) / data.n_train,
                                                             abs=1e-12)
    # the guide's moments beside them: means within 0.1 exact sds (as in the SVI test)
    guide = cf["guide_posterior"]
    z = (np.array(guide["loc_mean"]) - np.array(exact["loc_mean"])) / np.array(exact["loc_sd"])
    assert np.abs(z).max() < 0.1
    # KL(q || p) two ways: the exact Normal-Wishart KL, and log p(X) - ELBO (3 standard errors)
    kl = q["train_kl_to_posterior"]
    assert abs(kl["value"] - q["guide_kl_to_posterior_exact"]["value"]) < 3 * kl["se"]
    assert kl["better"] == "lower" and q["guide_kl_to_posterior_exact"]["method"] == "exact"
    assert q["train_elbo"]["K"] == 500  # draws of the whole set's ELBO
    assert len(cf["guide_loc_variance_ratio"]) == 2
    for split in ("val", "test"):  # the exact posterior predictive on held-out rows
        rows = getattr(data, split).double()
        assert q[f"{split}_log_predictive"]["value"] == pytest.approx(float(post.predictive().log_prob(rows).mean()),
                                                             abs=1e-9)


@pytest.mark.parametrize("argv, message", [
    (["--prior", "normal-gamma"], "prior normal-gamma is one-dimensional; the data have 2 columns"),
    (["--guide", "amortized-full"], "guide for gaussian must be one of mean-field, full-rank, structured"),
    (["--objective", "iwae"], "outside plate('data')"),
    (["--latent-dim", "3"], "--latent-dim does not apply to --model gaussian"),
])
def test_fit_cli_bad_input_for_gaussian(tmp_path, capsys, argv, message):
    np.save(tmp_path / "x.npy", gaussian_rows(200, seed=12).numpy())  # 160 training rows
    out = tmp_path / "run"
    code = fit_script.main(["--model", "gaussian", "--data", str(tmp_path / "x.npy"), "--steps", "2",
                            "--out", str(out), "--no-progress"] + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # refused before anything is written


def test_fit_cli_ppca_refuses_prior(tmp_path, capsys):
    code = fit_script.main(["--model", "ppca", "--prior", "known-scale", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--prior does not apply to --model ppca" in err


def test_fit_cli_gaussian_on_the_digits(tmp_path):
    """The built-in data: 64 pixels, a Normal-Wishart over 64 means and 2,080 precision
    entries; a short mean-field fit reports the exact posterior beside the guide's."""
    out = tmp_path / "run"
    assert fit_script.main(["--model", "gaussian", "--steps", "30", "--lr", "0.05", "--batch-size", "1257",
                            "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    m = read_metrics(out)
    q, cf = m["quantities"], m["closed_forms"]
    data = loaders.load_dataset("digits")
    post = models.build_model("gaussian", {}, 64, data.n_train).exact_posterior(data.train)
    np.testing.assert_allclose(cf["exact_posterior"]["loc_mean"], post.loc.numpy(), rtol=0, atol=1e-12)
    assert np.array(cf["guide_posterior"]["precision_mean"]).shape == (64, 64)
    # 30 steps are far from the posterior, and the reported KL says so (3 standard errors)
    assert q["train_kl_to_posterior"]["value"] > 3 * q["train_kl_to_posterior"]["se"]
    assert q["train_elbo"]["value"] < q["train_log_evidence"]["value"]
