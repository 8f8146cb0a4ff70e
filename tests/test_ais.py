"""Annealed importance sampling and bidirectional Monte Carlo (inference/ais.py), against
PPCA's exact log p(x) and, on a trained VAE, against importance sampling.

PPCA (k = 2) at its closed-form maximum on the digits' grey levels (d = 64): log p(x) is
exact, so AIS's error is measured row by row. Each error below is a mean over rows of
per-row differences (paired), with the standard error of that mean.
"""

import math

import pytest
import torch

from elbolab import models
from elbolab.inference.ais import (Budget, ais_log_likelihood, bdmc, log_mean_exp_se, model_latent, reverse_ais,
                                   schedule, simulate)
from elbolab.inference.diagnostics import ParetoK
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import Estimate, importance_estimates
from elbolab.inference.guides import materialize
from elbolab.models import datasources, ppca
from test_guides import digits_vae  # noqa: F401  (a fixture: a small VAE trained on the digits)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the machine is shared (conftest restores the count)


def digits_ppca(k: int = 2):
    """PPCA with k latent dimensions at its closed-form MLE on the digits' training rows,
    float64: (model, 50 test rows)."""
    data = datasources.load_dataset("digits", binarize="none")
    x = data.train.double()
    torch.manual_seed(0)
    m = models.build_model("ppca", {"latent_dim": k}, x.shape[1], x.shape[0]).double()
    m.set_parameters(*ppca.mle(x, k))
    return m, data.test[:50].double()


def errors(estimate: torch.Tensor, exact: torch.Tensor) -> Estimate:
    return Estimate.of(estimate - exact)


# ----------------------------------------------------------------------------- pieces


def test_schedules():
    for kind in ("linear", "sigmoid"):
        b = schedule(kind, 50)
        assert b.shape == (51,) and float(b[0]) == 0.0 and float(b[-1]) == 1.0 and bool((b.diff() > 0).all())
        torch.testing.assert_close(b + b.flip(0), torch.ones(51, dtype=F64), rtol=0, atol=1e-12)  # symmetric
    s = schedule("sigmoid", 100)
    # Grosse et al.'s sigmoid: beta_1 = (sigmoid(4 (2/100 - 1)) - sigmoid(-4)) / (sigmoid(4) - sigmoid(-4))
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = (sig(4 * (0.02 - 1)) - sig(-4)) / (sig(4) - sig(-4))
    assert abs(float(s[1]) - expected) < 1e-12 and float(s[1]) < 0.01 / 5  # small steps at the ends
    torch.testing.assert_close(schedule([0.0, 0.3, 1.0], 7), torch.tensor([0.0, 0.3, 1.0], dtype=F64))
    for bad in ([0.0, 0.5], [0.0, 0.6, 0.4, 1.0]):
        with pytest.raises(UsageError, match="schedule"):
            schedule(bad, 2)
    with pytest.raises(UsageError, match="schedule"):
        schedule("cosine", 10)


def test_log_mean_exp_se_is_the_delta_method():
    # equal weights: no spread; two weights 1 and 3: sd 2^0.5, mean 2 -> sd / (sqrt 2 mean) = 0.5
    assert float(log_mean_exp_se(torch.zeros(1, 8, dtype=F64))) == 0.0
    lw = torch.log(torch.tensor([[1.0, 3.0]], dtype=F64)) + 700.0  # shifted: no overflow
    assert abs(float(log_mean_exp_se(lw)) - 0.5) < 1e-12


def test_arguments_are_checked():
    m, x = digits_ppca()
    for kw, name in (({"steps": 0}, "steps"), ({"chains": 0}, "chains"), ({"leapfrog": 1.5}, "leapfrog"),
                     ({"init": "uniform"}, "init"), ({"target_acceptance": 1.0}, "target_acceptance"),
                     ({"step_size": -1.0}, "step_size")):
        with pytest.raises(UsageError, match=name):
            ais_log_likelihood(m, x[:2], **kw)
    gauss = models.build_model("gaussian", {}, 2, 10)  # global latents: no per-row path
    with pytest.raises(UsageError):
        model_latent(gauss, torch.zeros(3, 2))


def test_one_step_is_importance_sampling_with_the_right_weights():
    """T = 1 is importance sampling from the base: the mean log weight of a row is its ELBO
    under the base, in closed form on PPCA for the guide and for the prior."""
    m, x = digits_ppca()
    x = x[:10]
    for init, q in (("guide", m.guide_dist(x)), ("prior", torch.distributions.MultivariateNormal(
            torch.zeros(10, 2, dtype=F64), torch.eye(2, dtype=F64)))):
        r = ais_log_likelihood(m, x, steps=1, chains=4000, init=init, seed=1)
        exact_elbo = m.exact_elbo_of(x, q)  # E_q[log p(x, z) - log q(z)]
        diff = r.log_weights.mean(1) - exact_elbo
        se = r.log_weights.std(1) / math.sqrt(4000)
        assert bool((diff.abs() < 4 * se).all()), (init, diff, se)  # 4 standard errors (10 rows: ~no false alarm)
        assert float(r.acceptance.sum()) == 0.0  # no transitions at T = 1


# ----------------------------------------------------------------------------- AIS against the exact log p(x)


@pytest.fixture(scope="module")
def ppca_runs():
    """Forward AIS from the prior on 50 test rows, 16 chains, T = 3, 30, 300 (~7 s)."""
    torch.set_num_threads(1)
    m, x = digits_ppca()
    exact = m.exact_log_likelihood(x)
    runs = {T: ais_log_likelihood(m, x, steps=T, chains=16, leapfrog=5, init="prior", seed=0) for T in (3, 30, 300)}
    return m, x, exact, runs


def test_ais_reaches_the_exact_log_likelihood(ppca_runs):
    m, x, exact, runs = ppca_runs
    r = runs[300]
    err = errors(r.log_likelihood.values, exact)
    print(f"\nPPCA digits, AIS T=300 M=16: error {err.mean:+.4f} ± {err.se:.4f} nats "
          f"(Monte Carlo se over chains {r.mc_se_of_mean:.4f}); acceptance {float(r.acceptance.mean()):.2f}, "
          f"{r.seconds:.1f} s")
    assert abs(err.mean) < 3 * err.se  # 3 standard errors
    assert err.se < 0.03  # the check has power: a bias of 0.1 nats would fail it
    # the delta-method Monte Carlo se describes the rows' scatter about the truth: each
    # row's error is within a few of its own se (it misses heavy tails; 5 se for 50 rows)
    assert float(((r.log_likelihood.values - exact).abs() / r.mc_se).median()) < 2.0
    assert 0.5 < float(r.acceptance.mean()) < 0.8  # adapted towards the target 0.65


def test_ais_error_shrinks_as_the_schedule_grows(ppca_runs):
    _, _, exact, runs = ppca_runs
    rmse = {T: float((r.log_likelihood.values - exact).pow(2).mean().sqrt()) for T, r in runs.items()}
    bias = {T: errors(r.log_likelihood.values, exact) for T, r in runs.items()}
    print("\nPPCA digits, AIS from the prior, 16 chains: " + "; ".join(
        f"T={T}: error {bias[T].mean:+.3f} ± {bias[T].se:.3f}, rmse {rmse[T]:.3f}" for T in runs))
    # measured rmse 1.44, 0.31, 0.12 nats: each at least halves (the noise of an rmse over
    # 50 rows is ~10% of it)
    assert rmse[3] > 2 * rmse[30] > 4 * rmse[300]
    for T, b in bias.items():
        assert b.mean < 3 * b.se, T  # a stochastic lower bound: never above log p(x) beyond 3 standard errors


def near_exact_guide():
    """Digits PPCA with its exact-posterior guide slightly perturbed: the mean shifted by 0.2
    posterior standard deviations, the scale widened 20%. (model, 50 test rows)"""
    m, x = digits_ppca()
    m.set_guide_optimal()
    with torch.no_grad():
        scale = torch.diagonal(m.encoder.scale_tril).clone()
        m.encoder.linear.bias.add_(0.2 * scale)
        m.encoder.scale_tril = m.encoder.scale_tril * 1.2
    return m, x


def test_rows_in_chunks_keep_their_own_estimates():
    """Memory is bounded by running the rows in chunks (here 3 rows per chunk): each row's
    estimate still belongs to that row. From a near-exact guide every row's error is
    below 0.5 nats (measured at most 0.16), far less than the spread of log p(x) over
    rows (sd 9.7 nats), so a row given another's estimate would fail."""
    m, x = near_exact_guide()
    exact = m.exact_log_likelihood(x)
    r = ais_log_likelihood(m, x, steps=10, chains=8, init="guide", seed=2, max_elements=3 * 12 * 64)
    assert r.log_weights.shape == (50, 8) and r.step_sizes.shape == (50, 9)
    assert float((r.log_likelihood.values - exact).abs().max()) < 0.5
    assert float(exact.std()) > 5.0


def test_ais_agrees_with_importance_sampling_where_pareto_k_is_small():
    """The exact-posterior guide, slightly perturbed (its mean shifted by 0.2 posterior
    standard deviations, its scale widened 20%): a proposal good enough that every row's
    Pareto k is below 0.5. There IS-1000 is reliable, and AIS from that guide agrees."""
    m, x = near_exact_guide()
    exact = m.exact_log_likelihood(x)
    k = ParetoK()
    is_est = importance_estimates(m, x, 1000, seed=0, on_log_weights=k)["log_likelihood"]
    assert float(k.values.max()) < 0.5
    r = ais_log_likelihood(m, x, steps=30, chains=16, init="guide", seed=1)
    diff = Estimate.of(r.log_likelihood.values - is_est.values)
    print(f"\nPPCA, perturbed exact guide: max Pareto k {k.values.max():.2f}; AIS - IS {diff.mean:+.5f} ± "
          f"{diff.se:.5f}; AIS - exact {errors(r.log_likelihood.values, exact).mean:+.5f}")
    assert abs(diff.mean) < 3 * diff.se + 1e-4  # 3 standard errors (+ 1e-4: both nearly exact, se ~1e-3)
    assert diff.se < 0.01  # power: a difference of 0.03 nats would fail (measured se 0.0055)
    for est in (r.log_likelihood.values, is_est.values):
        e = errors(est, exact)
        assert abs(e.mean) < 3 * e.se + 1e-4


# ----------------------------------------------------------------------------- simulation and BDMC


def test_simulate_draws_from_the_model():
    """PPCA's x ~ N(loc, C): the mean log density of simulated rows is -(d log 2 pi +
    log|C| + d) / 2, and z is N(0, I)."""
    m, _ = digits_ppca()
    x, z = simulate(m, 4000, seed=0)
    assert x.shape == (4000, 64) and z.shape == (4000, 2)
    W, _, noise_scale = m.params64()
    C = ppca.marginal_covariance(W, noise_scale)
    expected = -0.5 * (64 * math.log(2 * math.pi) + float(torch.logdet(C)) + 64)
    lp = Estimate.of(m.exact_log_likelihood(x))
    assert abs(lp.mean - expected) < 3 * lp.se  # 3 standard errors
    torch.testing.assert_close(z.T @ z / 4000, torch.eye(2, dtype=F64), rtol=0, atol=0.1)  # 4000 draws: se ~0.02
    x2, _ = simulate(m, 5, seed=0)
    torch.testing.assert_close(x2, simulate(m, 5, seed=0)[0])  # seeded


def test_bdmc_brackets_the_exact_log_likelihood_and_its_gap_shrinks():
    m, _ = digits_ppca()
    res = {T: bdmc(m, 50, steps=T, chains=16, init="prior", seed=0) for T in (10, 100)}
    line = []
    for T, b in res.items():
        exact = m.exact_log_likelihood(b.x)
        below = errors(exact, b.lower.values)  # exact - lower
        above = errors(b.upper.values, exact)  # upper - exact
        line.append(f"T={T}: exact - lower {below.mean:.3f} ± {below.se:.3f}, upper - exact {above.mean:.3f} ± "
                    f"{above.se:.3f}, gap {b.gap.mean:.3f} ± {b.gap.se:.3f}")
        assert below.mean > -3 * below.se and above.mean > -3 * above.se  # bracketed, within 3 standard errors
    print("\nPPCA digits, BDMC on 50 simulated rows, 16 chains: " + "; ".join(line))
    assert torch.equal(res[10].x, res[100].x)  # the same simulated rows (same seed): paired
    shrink = Estimate.of(res[10].gap.values - res[100].gap.values)
    assert shrink.mean > 3 * shrink.se  # the gap shrinks with T, beyond 3 standard errors
    assert res[100].gap.mean < 0.15  # measured 0.04 ± 0.04 at T = 100


def test_one_step_reverse_is_the_posterior_expectation_of_the_log_weight():
    """T = 1 in reverse, from exact posterior draws z_i: -log w'_i = log p(x_i, z_i) -
    log pi_0(z_i), whose expectation is log p(x_i) + KL(p(z | x_i) || pi_0): in closed form
    on PPCA for the prior and for the (untrained) guide as pi_0. The sign and direction of
    the reverse weights, checked without any transition."""
    m, _ = digits_ppca()
    x, z = simulate(m, 2000, seed=3)
    exact = m.exact_log_likelihood(x)
    post_loc, post_cov = m.exact_posterior(x)  # (N, k), (k, k)
    k = post_loc.shape[1]
    prior_kl = 0.5 * (torch.trace(post_cov) + post_loc.pow(2).sum(1) - k - torch.logdet(post_cov))
    q_loc, q_cov = m.guide_moments(x)
    guide_kl = ppca.kl_gaussians(post_loc, post_cov.expand(2000, k, k), q_loc, q_cov.expand(2000, k, k))
    for init, kl in (("prior", prior_kl), ("guide", guide_kl)):
        r = reverse_ais(m, x, z, steps=1, chains=1, init=init)
        d = Estimate.of(r.log_likelihood.values - exact - kl)
        assert abs(d.mean) < 3 * d.se, init  # 3 standard errors
        assert float(kl.mean()) > 30 * d.se  # the KL term is resolved: the check has power


def test_bdmc_from_a_proposal_fitted_to_the_simulated_rows():
    """``proposal``: both directions start from a guide made for the simulated rows. With
    PPCA's exact posterior as that guide (a full-covariance table per row) every AIS log
    weight is log p(x_i) whatever z, so both bounds equal the exact log p(x_i) row by row
    (float64 round-off), for any schedule; the proposal sees the simulated rows themselves."""
    m, _ = digits_ppca()
    m.set_guide_optimal()  # the full-covariance encoder at the exact posterior
    seen = []

    def exact_table(x):
        seen.append(x)
        return materialize(m, x)

    b = bdmc(m, 20, steps=5, chains=4, init="guide", proposal=exact_table, seed=3)
    assert len(seen) == 1 and torch.equal(seen[0], b.x)
    exact = m.exact_log_likelihood(b.x)
    torch.testing.assert_close(b.lower.values, exact, rtol=0, atol=1e-6)  # round-off of the table's Cholesky
    torch.testing.assert_close(b.upper.values, exact, rtol=0, atol=1e-6)
    assert float(b.forward.acceptance.mean()) > 0.5  # the transitions ran (and moved on a flat log weight)
    with pytest.raises(UsageError, match="init must be 'guide'"):
        bdmc(m, 5, steps=2, chains=2, init="prior", proposal=exact_table)


def test_budget_and_run_evaluate_with_ais():
    """``Budget`` checks its numbers; ``Run.evaluate(estimator="ais")`` is
    ``ais_log_likelihood`` with the run's model (the same numbers under the same seed), and
    on PPCA at its maximum from a perturbed exact guide its per-row estimates sit within
    3 standard errors of the exact log p(x_i) (paired)."""
    from elbolab import Run

    for bad in ({"steps": 0}, {"chains": 1.5}, {"leapfrog": True}):
        with pytest.raises(UsageError, match="AIS"):
            Budget(**bad)
    assert Budget(30, 8).kwargs() == {"steps": 30, "chains": 8, "leapfrog": 5}
    m, x_test = near_exact_guide()
    train = datasources.load_dataset("digits", binarize="none").train.double()
    run = Run(m, datasources.DataSplits("digits", train, train[:0], train[:0]))
    got = run.evaluate(x_test, estimator="ais", steps=30, chains=8, seed=4)
    ll = got["log_likelihood"]
    assert ll["method"] == "ais" and ll["K"] == 8 and ll["bound"] == "lower"
    assert (got["ais"]["steps"], got["ais"]["chains"], got["ais"]["leapfrog"]) == (30, 8, 5)
    direct = ais_log_likelihood(run.model, x_test, steps=30, chains=8, seed=4)
    assert ll["value"] == pytest.approx(direct.log_likelihood.mean, abs=1e-12)  # the same draws
    assert got["ais"]["mc_se"] == pytest.approx(direct.mc_se_of_mean, abs=1e-12) and got["ais"]["mc_se"] > 0
    err = errors(direct.log_likelihood.values, m.exact_log_likelihood(x_test))
    assert abs(err.mean) < 3 * err.se and err.se < 0.03  # 3 standard errors; power: 0.1 nats would fail
    assert run.evaluate(x_test, num_samples=20)["log_likelihood"]["method"] == "importance"
    with pytest.raises(UsageError, match="estimator must be"):
        run.evaluate(x_test, estimator="smc")


# ----------------------------------------------------------------------------- a trained VAE


def test_bdmc_brackets_importance_sampling_on_a_trained_vae(digits_vae):
    """log p(x) of a VAE is unknown; on data it simulates, BDMC brackets it, and every
    importance-sampled estimate (a stochastic lower bound) lies below the upper bound."""
    m, _ = digits_vae
    res = {T: bdmc(m, 50, steps=T, chains=16, init="prior", seed=0) for T in (10, 100)}
    b = res[100]
    est = {K: importance_estimates(m, b.x, K, seed=1) for K in (1, 10, 1000)}
    iwae = {K: e["log_likelihood"] for K, e in est.items()}
    print("\ndigits VAE, BDMC on 50 simulated rows (M=16): " + "; ".join(
        f"T={T}: lower {r.lower.mean:.3f}, upper {r.upper.mean:.3f}, gap {r.gap.mean:.3f} ± {r.gap.se:.3f}"
        for T, r in res.items()) + "; IS-K " + ", ".join(f"K={K}: {e.mean:.3f}" for K, e in iwae.items()))
    assert b.gap.mean > -3 * b.gap.se  # lower <= upper within 3 standard errors
    assert b.gap.mean < 0.3  # the bracket is informative (measured 0.04 at T = 100)
    for K, e in iwae.items():
        d = Estimate.of(b.upper.values - e.values)
        assert d.mean > -3 * d.se, K  # IS-K below the upper bound, within 3 standard errors
    # and the ELBO clearly below it: the check can fail the other way. The ELBO of each row is
    # the mean of its 1000 log-weights (a single draw's noise, 0.12 nats of s.e. over 50 rows,
    # hid a gap of 0.2 nats)
    d1 = Estimate.of(b.upper.values - est[1000]["elbo"].values)
    assert d1.mean > 3 * d1.se
    shrink = Estimate.of(res[10].gap.values - b.gap.values)  # the same simulated rows (same seed): paired
    assert shrink.mean > 3 * shrink.se  # the gap shrinks with T (measured 0.64 -> 0.04)


def test_ais_on_held_out_rows_of_a_trained_vae_matches_large_importance_sampling(digits_vae):
    m, data = digits_vae
    x = data.test[:50]
    r = ais_log_likelihood(m, x, steps=100, chains=16, init="guide", seed=0)
    k = ParetoK()
    is_est = importance_estimates(m, x, 1000, seed=0, on_log_weights=k)["log_likelihood"]
    diff = Estimate.of(r.log_likelihood.values - is_est.values)
    print(f"\ndigits VAE, 50 test rows: AIS(T=100) - IS-1000 {diff.mean:+.4f} ± {diff.se:.4f}; "
          f"share of rows with Pareto k > 0.7: {float((k.values > 0.7).mean()):.2f}")
    assert abs(diff.mean) < 3 * diff.se + 0.01  # 3 standard errors, + 0.01: IS-1000's own small downward bias
    assert diff.se < 0.05


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_ais_long_schedule_on_many_rows_is_exact_to_a_hundredth():
    data = datasources.load_dataset("digits", binarize="none")
    m, _ = digits_ppca()
    x = data.test[:200].double()
    exact = m.exact_log_likelihood(x)
    r = ais_log_likelihood(m, x, steps=1000, chains=32, init="prior", seed=5)
    err = errors(r.log_likelihood.values, exact)
    print(f"\nPPCA digits, 200 rows, AIS T=1000 M=32: error {err.mean:+.4f} ± {err.se:.4f} ({r.seconds:.0f} s)")
    assert err.mean < 3 * err.se  # a stochastic lower bound: not above log p(x) beyond 3 standard errors
    assert err.mean > -0.02 and err.se < 0.01  # and within 0.02 nats below it (measured -0.008 ± 0.003)


@pytest.mark.slow
def test_bdmc_on_a_trained_vae_with_a_long_schedule(digits_vae):
    m, _ = digits_vae
    b = bdmc(m, 200, steps=1000, chains=16, init="prior", seed=0)
    is_est = importance_estimates(m, b.x, 1000, seed=1)["log_likelihood"]
    d = Estimate.of(b.upper.values - is_est.values)
    print(f"\ndigits VAE, BDMC on 200 simulated rows, T=1000 M=16: lower {b.lower.mean:.4f}, upper "
          f"{b.upper.mean:.4f}, gap {b.gap.mean:.4f} ± {b.gap.se:.4f}; upper - IS-1000 {d.mean:.4f} ± {d.se:.4f} "
          f"({b.forward.seconds + b.reverse.seconds:.0f} s)")
    assert b.gap.mean > -3 * b.gap.se and b.gap.mean < 0.05  # bracketed to 0.05 nats
    assert d.mean > -3 * d.se  # IS-1000 below the upper bound within 3 standard errors
