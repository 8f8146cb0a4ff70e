"""ArviZ diagnostics against closed forms.

* Pareto k of importance weights: exactly Pareto weights give k = 1/alpha; on PPCA the
  exact-posterior guide gives k < 0.5 for (nearly) every row, and a guide narrowed by s
  gives k near 1 - s^2 (the tail of exp(c chi^2), inference/diagnostics.py), rising as
  s falls; the callback sees every chunk and composes with IWAELadder.
* InferenceData of the Bayesian Gaussian: netCDF round trip; az.loo on its
  log_likelihood group against the exact leave-one-out predictive densities; az.summary
  means against the closed-form posterior; the sample_stats log weights against the
  exact evidence.
* Per-row latents (PPCA): what az.loo computes there, the harmonic-mean estimator,
  whose Pareto k is lambda / (lambda + noise_scale^2) (its tail, derived in the module).
* Posterior predictive p-values: unremarkable on data drawn from the model, extreme
  under a wrong noise scale.
"""

import math

import numpy as np
import pytest
import torch

from elbolab import models
from elbolab.inference import diagnostics as D
from elbolab.models import datasources as loaders
from elbolab.inference.evaluate import IWAELadder, importance_estimates
from elbolab.models import ppca as P

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the machine is shared (the conftest restores the count)


# ----------------------------------------------------------------------------- Pareto k


def test_pareto_k_of_exactly_pareto_weights_is_one_over_the_shape():
    """w = U^(-k) is Pareto with shape alpha = 1/k: PSIS's k per row (the last axis) must
    recover k. The fit uses the top n = 3 sqrt(4000) = 190 weights of each row, so a row's k
    has a standard error of about (1 + k) / sqrt(n) (the GPD's asymptotic one); the median
    of 40 rows is held to 3 standard errors of a median (1.25 sd / sqrt(40))."""
    rng = np.random.default_rng(0)
    n_tail = math.ceil(3 * math.sqrt(4000))
    for k_true in (0.3, 0.8):
        log_w = -k_true * np.log(rng.uniform(size=(40, 4000)))  # (rows, draws)
        k = D.pareto_k(log_w)
        assert k.shape == (40,)
        se_row = (1 + k_true) / math.sqrt(n_tail)
        assert abs(np.median(k) - k_true) < 3 * 1.25 * se_row / math.sqrt(40)
        assert 0.5 * se_row < k.std() < 2 * se_row  # the spread over rows is the fit's own


def test_pareto_k_summary_counts_and_degenerate_rows():
    k = np.array([0.1, 0.6, 0.8, -np.inf, np.nan])  # good, usable, bad, constant weights, undetermined
    s = D.pareto_k_summary(k, n_samples=100)
    assert (s["n_rows"], s["n_undetermined"], s["n_constant_weights"]) == (5, 1, 1)
    assert s["share_above_0.7"] == 0.25 and s["share_above_0.5"] == 0.5  # of the 4 determined rows
    assert s["max"] == 0.8 and s["reliable"] is False  # 25% of rows above 0.7 > 1%
    assert D.pareto_k_summary(np.array([0.1, 0.69]), 100)["reliable"] is True
    # all weights equal: a point mass (k = -inf), not psislw's +inf for an empty tail
    assert D.pareto_k(np.full((2, 50), -3.0)).tolist() == [-np.inf, -np.inf]
    # too few draws for the tail fit: undetermined, and so is the flag
    few = D.pareto_k(np.random.default_rng(0).normal(size=(3, D.MIN_PARETO_SAMPLES - 1)))
    assert np.isnan(few).all()
    assert D.pareto_k_summary(few, D.MIN_PARETO_SAMPLES - 1)["reliable"] is None
    assert "undetermined" in D.reliability_note(D.pareto_k_summary(few, 20))


@pytest.fixture(scope="module")
def ppca_mle():
    """PPCA (k = 5) at its closed-form maximum on the digits, the full-covariance guide at
    the exact posterior, float64; 100 test rows."""
    data = loaders.load_dataset("digits")
    W, loc, s = P.mle(data.train, 5)
    m = models.build_model("ppca", {"latent_dim": 5}, data.data_dim, data.n_train).double()
    m.set_parameters(W, loc, s)
    m.set_guide_optimal()
    return m, data.test[:100].double()


def test_pareto_k_of_ppca_is_small_for_the_exact_guide_and_rises_as_it_narrows(ppca_mle):
    m, x = ppca_mle
    exact_tril = m.encoder.scale_tril.detach().clone()
    medians = []
    for s in (1.0, 0.99, 0.9, 0.7, 0.5):
        with torch.no_grad():
            m.encoder.scale_tril = exact_tril * s
        pk = D.ParetoK()
        importance_estimates(m, x, 1000, seed=0, on_log_weights=pk, batch_size=30)  # 4 chunks of rows
        k = pk.values
        assert k.shape == (100,) and pk.n_samples == 1000
        summary = pk.summary()
        if s == 1.0:
            # every weight is p(x_i) up to float64 round-off: a point mass, k = -inf
            assert np.isneginf(k).all() and summary["n_constant_weights"] == 100 and summary["reliable"] is True
        elif s == 0.99:
            # nearly exact (k = 0.02, log weights spread over ~0.05 nats): the bar,
            # k below 0.5 for nearly every row (measured: all 270 test rows, max 0.28)
            assert np.isfinite(k).all() and float((k < 0.5).mean()) >= 0.95 and summary["reliable"] is True
        else:
            # closed form: k = 1 - s^2; the fit of the top 3 sqrt(K) weights reads the tail
            # of exp(c chi^2_5) with its log factor: medians measured 0.03-0.06 above (0.15 allowed)
            assert abs(np.median(k) - (1 - s**2)) < 0.15, (s, np.median(k))
        medians.append(float(np.median(k)))
    assert medians == sorted(medians) and medians[-1] - medians[1] > 0.5  # rises as the guide narrows
    assert summary["reliable"] is False and summary["share_above_0.7"] > 0.5  # s = 0.5: k = 0.75


def test_pareto_k_callback_composes_and_sees_every_chunk(ppca_mle):
    """ParetoK beside IWAELadder (as in fit.py) gives, chunk by chunk, the k of the full
    N x K weight matrix that a collecting callback sees, and leaves the ladder unchanged."""
    m, x = ppca_mle
    x = x[:40]
    kept = {}
    ladder, pk = IWAELadder(40, (1, 10, 100)), D.ParetoK()
    importance_estimates(m, x, 100, seed=3, batch_size=16, particle_chunk=30,
                         on_log_weights=D.compose(ladder, pk, lambda s, lw: kept.__setitem__(s, lw.clone()), None))
    full = torch.cat([kept[s] for s in sorted(kept)])  # (40, 100)
    np.testing.assert_array_equal(pk.values, D.pareto_k(full))
    alone = IWAELadder(40, (1, 10, 100))
    importance_estimates(m, x, 100, seed=3, batch_size=16, particle_chunk=30, on_log_weights=alone)
    for size in (1, 10, 100):
        torch.testing.assert_close(ladder.values[size], alone.values[size], rtol=0, atol=0)


# ----------------------------------------------------------------------------- the Bayesian Gaussian


def gaussian_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=F64)
    return torch.randn(n, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T + torch.tensor([1.0, -0.5])


@pytest.fixture(scope="module")
def exact_gaussian():
    """The Normal-Wishart model (d = 2, 60 rows) with its structured guide set to the exact
    posterior, and the guide's InferenceData: 2 chains x 2000 draws."""
    torch.manual_seed(0)
    x = gaussian_rows(60)
    m = models.build_model("gaussian", {"guide": "structured"}, 2, 60).double()
    m.approx.set(m.exact_posterior(x))
    idata = D.to_inference_data(m, x, None, draws=2000, chains=2, seed=1)
    return m, x, idata


def test_inference_data_of_global_latents_round_trips_through_netcdf(exact_gaussian, tmp_path):
    m, x, idata = exact_gaussian
    assert set(idata.groups()) >= {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                   "observed_data"}
    post = idata.posterior
    # named dims (the model's variable_dims; the data's columns are features)
    assert post["loc"].dims == ("chain", "draw", "feature") and post["loc"].shape == (2, 2000, 2)
    assert post["precision"].dims == ("chain", "draw", "feature", "feature_bis")
    assert post["precision"].shape == (2, 2000, 2, 2)  # the model's quantities(...) of the Bartlett draws
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "row") and idata.log_likelihood["x"].shape[-1] == 60
    assert list(idata.log_likelihood.data_vars) == ["x"]  # the replicated side lives in a group of its own
    assert idata.replicated_log_likelihood["x"].dims == ("chain", "draw", "row")
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "row", "feature")
    assert idata.posterior_predictive["x"].shape == (2, 2000, 60, 2)
    assert idata.observed_data["x"].dims == ("row", "feature")
    np.testing.assert_array_equal(idata.observed_data["x"].values, x.numpy())
    path = tmp_path / "d.nc"
    D.save_netcdf(idata, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["d.nc"]  # no temporary left
    back = D.load_netcdf(str(path))
    for group in idata.groups():
        for name, var in getattr(idata, group).data_vars.items():
            np.testing.assert_array_equal(getattr(back, group)[name].values, var.values)
            assert getattr(back, group)[name].dims == var.dims
    assert back.attrs["local_latents"] == "" and back.attrs["quantities"] == "loc,precision"


def test_sample_stats_log_weight_of_the_exact_guide_is_the_evidence(exact_gaussian):
    """log p(X, theta) - log q(theta) = log p(X) for every draw when q is the posterior."""
    m, x, idata = exact_gaussian
    lw = idata.sample_stats["log_weight"].values
    assert lw.shape == (2, 2000)
    np.testing.assert_allclose(lw, m.log_evidence(x), rtol=0, atol=1e-7)  # float64 round-off over 60 rows


def test_loo_of_global_latents_matches_the_exact_leave_one_out_densities(exact_gaussian):
    """az.loo on the log_likelihood group against log p(x_i | X without x_i), the Student-t
    predictive of the Normal-Wishart posterior of the other 59 rows, row by row."""
    m, x, idata = exact_gaussian
    r = D.loo_waic(idata)
    prior = m.prior()
    exact = np.array([float(prior.update(torch.cat([x[:i], x[i + 1:]])).predictive().log_prob(x[i]))
                      for i in range(60)])
    ll = idata.log_likelihood["x"].values.reshape(-1, 60)  # (draws, rows)
    # Monte Carlo error of each row's estimate -log mean_s 1/p(x_i | theta_s) (delta method)
    ratio = np.exp(-(ll - ll.min(0)))
    se = ratio.std(0) / (math.sqrt(ll.shape[0]) * ratio.mean(0))
    assert r["loo_pareto_k"]["max"] < 0.5  # the ratios' variance is finite: the delta method holds
    assert np.all(np.abs(r["pointwise_loo"] - exact) < 4 * se + 1e-3)  # 4 s.e. (+ PSIS's smoothing)
    assert abs(r["elpd_loo"] - exact.sum()) < 4 * math.sqrt((se**2).sum()) + 0.01
    assert r["elpd_waic"] == pytest.approx(r["elpd_loo"], abs=0.2)  # both estimate the same elpd


def test_summary_means_match_the_closed_form_posterior(exact_gaussian):
    m, x, idata = exact_gaussian
    exact = m.exact_posterior(x).summary()
    table = D.summary_table({"variational": idata, "exact": D.exact_inference_data(m, x, 2000, 2, seed=2)},
                            var_names=["loc", "precision"])
    assert list(table.columns[:5]) == ["posterior", "mean", "sd", "hdi_3%", "hdi_97%"]
    for label in ("variational", "exact"):
        t = table[table["posterior"] == label]
        for i in range(2):
            # independent draws: the mean is within 4 standard errors sd / sqrt(4000)
            loc_mean, loc_sd = float(exact["loc_mean"][i]), float(exact["loc_sd"][i])
            assert abs(t.loc[f"loc[{i}]", "mean"] - loc_mean) < 4 * loc_sd / math.sqrt(4000)
            # a sample sd's standard error is about sd / sqrt(2 x 4000), 1.1%: 10% is loose (loc's
            # marginal is a Student-t, whose sd is estimated less well than a Gaussian's)
            assert t.loc[f"loc[{i}]", "sd"] == pytest.approx(loc_sd, rel=0.1)
            for j in range(2):
                mean, sd = float(exact["precision_mean"][i, j]), float(exact["precision_sd"][i, j])
                assert abs(t.loc[f"precision[{i}, {j}]", "mean"] - mean) < 4 * sd / math.sqrt(4000)


# ----------------------------------------------------------------------------- per-row latents


def test_loo_of_per_row_latents_is_the_harmonic_mean_with_its_closed_form_tail():
    """PPCA with one latent at its exact posterior: az.loo's ratios are 1 / p(x_i | z), whose
    Pareto tail has k = lambda / (lambda + noise_scale^2), lambda = W^T W: rising with the
    signal, past 0.7 when lambda > 2.3 noise_scale^2 (the harmonic mean's known failure)."""
    g = torch.Generator().manual_seed(0)
    direction = torch.tensor([[0.5], [0.3], [-0.4]], dtype=F64)
    direction = direction / direction.norm()
    medians = []
    for lam in (0.25, 1.0, 4.0):
        W = direction * math.sqrt(lam)
        x = torch.randn(150, 1, generator=g, dtype=F64) @ W.T + torch.randn(150, 3, generator=g, dtype=F64)
        m = models.build_model("ppca", {"latent_dim": 1}, 3, 150).double()
        m.set_parameters(W, torch.zeros(3, dtype=F64), 1.0)
        m.set_guide_optimal()
        idata = D.to_inference_data(m, x, None, draws=2000, chains=1, seed=0, predictive=False)
        k = D.loo_waic(idata)["pointwise_k"]
        # the GPD fit on the top 3 sqrt(S) ratios: rows far from the mean are pre-asymptotic
        # (their ratios look log-normal); measured medians within 0.08 of the closed form
        assert abs(np.median(k) - lam / (lam + 1)) < 0.12, (lam, np.median(k))
        medians.append(np.median(k))
    assert medians == sorted(medians)


def test_posterior_predictive_p_values_flag_a_wrong_noise_scale():
    g = torch.Generator().manual_seed(1)
    W = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, -1.0], [0.3, 0.3]], dtype=F64)
    x = torch.randn(300, 2, generator=g, dtype=F64) @ W.T + 0.5 * torch.randn(300, 4, generator=g, dtype=F64)
    m = models.build_model("ppca", {"latent_dim": 2}, 4, 300).double()
    for noise_scale, fits in ((0.5, True), (1.0, False)):
        m.set_parameters(W, torch.zeros(4, dtype=F64), noise_scale)
        m.set_guide_optimal()
        ppc = D.posterior_predictive_checks(D.to_inference_data(m, x, None, draws=200, seed=0))
        p = {k: s["p_value"] for k, s in ppc["statistics"].items()}
        assert set(p) == {"mean", "sd_of_row_means", "mean_of_column_sd", "log_likelihood"}
        if fits:  # the data came from this model: no statistic is extreme (measured p 0.24-0.84)
            assert all(0.01 < v < 0.99 for v in p.values()), p
        else:  # twice the noise: replicates spread more and fit their own draws worse
            assert p["mean_of_column_sd"] > 0.99 and p["log_likelihood"] < 0.01, p


def test_inference_data_of_per_row_latents_matches_a_hand_built_reference(ppca_mle):
    """The SVI conversion (the project's own; az.from_pyro takes MCMC only) against the same
    groups built by hand from PPCA's formulas at the draws it holds: z ~ q(z | x_i),
    log p(x_i | z) = log N(x_i; W z + loc, noise_scale^2 I), log p(z), log q(z | x_i), and
    replicates x_rep = W z + loc + noise."""
    import arviz as az

    m, x = ppca_mle
    x = x[:30]
    # the mean-field guide at its best scales: log q differs from log p(z | x) (a real check)
    diag = models.build_model("ppca", {"latent_dim": 5, "guide": "amortized-diag"}, x.shape[1], 10).double()
    diag.set_parameters(*m.params64())
    diag.set_guide_optimal()
    idata = D.to_inference_data(diag, x, None, draws=300, chains=2, seed=4,
                                max_elements=6 * 600 * 64)  # chunks of 6 rows: 5 chunks joined
    z = torch.as_tensor(idata.posterior["z"].values)  # (2, 300, 30, 5)
    with torch.no_grad():
        W, loc, s = (t.detach() for t in diag.params64())
        q = diag.guide_dist(x)
        mean = z @ W.T + loc  # (2, 300, 30, 64)
        log_lik = torch.distributions.Normal(mean, s).log_prob(x).sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_q = q.log_prob(z)
    reference = az.from_dict(
        posterior={"z": z.numpy()},
        sample_stats={"log_joint": (log_lik + log_prior).numpy(), "log_q": log_q.numpy(),
                      "log_weight": (log_lik + log_prior - log_q).numpy()},
        observed_data={"x": x.numpy()},
        dims={"z": ["row", "latent"], "x": ["row", "feature"], "log_joint": ["row"], "log_q": ["row"],
              "log_weight": ["row"]})
    reference.add_groups(log_likelihood=az.from_dict(posterior={"x": log_lik.numpy()}, dims={"x": ["row"]}).posterior)
    for group in ("posterior", "log_likelihood", "sample_stats", "observed_data"):
        for name, var in getattr(reference, group).data_vars.items():
            got = getattr(idata, group)[name]
            assert got.dims == var.dims, (group, name)
            np.testing.assert_allclose(got.values, var.values, rtol=1e-12, atol=1e-9)  # float64 round-off
    # the draws are q's: each row's mean within 4 standard errors (sd / sqrt(600)) of q's mean
    sd = q.base_dist.scale
    assert float(((z.reshape(600, 30, 5).mean(0) - q.mean) / (sd / math.sqrt(600))).abs().max()) < 4.5
    # the replicates are p(x | z): standardized residuals N(0, 1), and their log density is stored
    rep = torch.as_tensor(idata.posterior_predictive["x"].values)
    resid = (rep - mean) / s
    assert abs(float(resid.mean())) < 4 / math.sqrt(resid.numel())  # 4 standard errors
    assert abs(float(resid.std()) - 1) < 4 / math.sqrt(2 * resid.numel())
    np.testing.assert_allclose(idata.replicated_log_likelihood["x"].values,
                               torch.distributions.Normal(mean, s).log_prob(rep).sum(-1).numpy(), rtol=1e-12)


def test_one_mcmc_chain_gets_ess_but_no_r_hat():
    """R-hat compares chains: a one-chain NUTS posterior's summary has ESS and no R-hat
    column (rather than NaN and a shape warning); two chains have both. The draws are
    independent N(0, 1), so ESS is near the number of draws and R-hat near 1."""
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(1000, 2, generator=g, dtype=F64)
    one = D.samples_to_inference_data({"loc": draws}, 1, inference="NUTS (pyro MCMC)")
    two = D.samples_to_inference_data({"loc": draws}, 2, inference="NUTS (pyro MCMC)")
    t1, t2 = D.summary_table({"NUTS": one}), D.summary_table({"NUTS": two})
    assert "r_hat" not in t1.columns and (t1["ess_bulk"] > 700).all()  # 1000 independent draws
    # split R-hat of independent draws is 1 + O(1/n): measured within 0.005 of 1 here
    assert "r_hat" in t2.columns and (t2["r_hat"] - 1).abs().max() < 0.01
