"""Flow guides (inference/flows.py): the amortized IAF guide and the per-datapoint flow
q*, against PPCA's closed forms (a Gaussian posterior with correlated coordinates, which
a diagonal Gaussian cannot match but an autoregressive flow can) and on a trained VAE.
"""

import math

import pytest
import torch

from elbolab import models
from elbolab.inference.ais import ais_log_likelihood
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import Estimate, importance_estimates
from elbolab.inference.flows import IAFGuide, PerDatapointFlowGuide, made_masks, optimize_local_flow
from elbolab.inference.gaps import decompose
from elbolab.inference.guides import local_elbo, materialize, optimize_local
from elbolab.inference.objectives import OBJECTIVES, build_objective
from elbolab.inference.traces import reads_row_indices
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
from elbolab.models import datasources
from test_guides import best_mean_field_kl, digits_vae, ppca_problem  # noqa: F401  (digits_vae: a fixture)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the machine is shared (conftest restores the count)


def perturbed_row_flow(m, x, scale=0.3, seed=0):
    """A PerDatapointFlowGuide over the rows of x started at the model's guide, its output
    layers moved off the identity by N(0, scale^2) draws."""
    q = PerDatapointFlowGuide(m, n_rows=x.shape[0], layers=2, hidden=8)
    q.initialize_from(materialize(m, x, full=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(q.w2) + list(q.b2):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return q


def perturbed_iaf(m, scale=0.1, seed=0):
    g = IAFGuide(m, layers=2, hidden=(16,))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.flows.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return g


# ----------------------------------------------------------------------------- the flows themselves


def test_made_masks_make_each_output_depend_on_earlier_inputs_only():
    k = 4
    for order in (torch.arange(k), torch.arange(k).flip(0)):
        mask_in, mask_out = made_masks(k, 8, order)
        conn = (mask_out @ mask_in)[:k] > 0  # (k, k): output j reaches input i through some hidden unit
        position = torch.empty(k, dtype=torch.long)
        position[order] = torch.arange(k)
        earlier = position[None, :] < position[:, None]  # input i comes before output j
        assert torch.equal(conn, earlier)  # exactly the earlier inputs: autoregressive and no connection lost


def test_row_flow_is_autoregressive_per_row_and_its_inverse_matches_its_draws():
    m, x = ppca_problem(n=5, d=6, k=3)
    q = perturbed_row_flow(m, x)
    dist_ = q.guide_dist(x)
    z = dist_.rsample((4,))  # (4, 5, 3)
    # log q at the draw (one pass) against log q by inverting the steps (k passes each)
    torch.testing.assert_close(dist_.log_prob(z.clone()), dist_.log_prob(z), rtol=0, atol=1e-10)  # float64
    # the Jacobian of step 0's (shift, log scale) for row 2: each output reads earlier coordinates only
    zz = torch.randn(5, 3, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda v: torch.cat(dist_._shift_log_scale(v, 0), -1)[2], zz)  # (6, 5, 3)
    assert float(jac[:, [0, 1, 3, 4], :].abs().max()) == 0.0  # other rows' inputs: rows are independent
    row = jac[:, 2, :]  # (2k, k), order 0, 1, 2
    for j in range(3):
        for i in range(3):
            for out in (j, 3 + j):
                assert (row[out, i] != 0) == (i < j), (out, i)


@pytest.mark.parametrize("family", ["per-datapoint", "amortized"])
def test_flow_density_integrates_to_one(family):
    """Importance sampling of the integral of q from a wide Gaussian r: (1/S) sum q(z)/r(z)
    = 1, with the density at arbitrary points (the inverse) in float64."""
    m, x = ppca_problem(n=3, d=6, k=2)
    q = (perturbed_row_flow(m, x) if family == "per-datapoint" else perturbed_iaf(m)).guide_dist(x)
    with torch.no_grad():
        check_normalized(q)


def check_normalized(q):
    draws = q.rsample((2000,))  # where q lives
    loc, scale = draws.mean(0), draws.std(0)  # (3, 2)
    r = torch.distributions.Independent(torch.distributions.Normal(loc, 3 * scale), 1)
    torch.manual_seed(1)
    z = r.sample((200_000,))
    ratio = (q.log_prob(z) - r.log_prob(z)).exp()  # (S, 3)
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(z.shape[0])
    assert bool(((mean - 1).abs() < 3 * se).all()), (mean, se)  # 3 standard errors
    assert float(se.max()) < 0.01  # power: a density off by 5% would fail (measured se 0.004-0.007)
    torch.testing.assert_close(q.log_prob(draws.clone()), q.log_prob(draws), rtol=0, atol=1e-8)  # float64


def test_iaf_guide_starts_as_its_encoder_and_checks_its_arguments():
    m, x = ppca_problem(n=10)
    g = IAFGuide(m, layers=3, hidden=(8,))
    q, q0 = g.guide_dist(x), m.guide_dist(x)
    z = q0.sample((5,))
    torch.testing.assert_close(q.log_prob(z), q0.log_prob(z), rtol=0, atol=1e-12)  # each step the identity
    with pytest.raises(NotImplementedError):
        q.entropy()
    with pytest.raises(AttributeError):
        g.exact_elbo  # noqa: B018  (a flow's ELBO has no closed form; the model's Gaussian one must not be used)
    for kw, name in (({"layers": 0}, "layers"), ({"hidden": (1,)}, "hidden"), ({"context": "y"}, "context")):
        with pytest.raises(UsageError, match=name):
            IAFGuide(m, **kw)


def test_local_elbo_of_a_flow_uses_the_monte_carlo_entropy():
    """A flow has no closed-form entropy; local_elbo then estimates it from its draws. At
    the identity the flow is its Gaussian base, whose ELBO PPCA gives in closed form."""
    m, x = ppca_problem(n=40)
    q = IAFGuide(m).guide_dist(x)
    torch.manual_seed(2)
    mc = local_elbo(m, x, q, 4000).detach()
    exact = m.exact_elbo(x)
    d = Estimate.of(mc - exact)
    assert abs(d.mean) < 3 * d.se and d.se < 0.02  # 3 standard errors over rows; the check has power


# ----------------------------------------------------------------------------- the amortized guide with objectives


def test_dreg_gradient_of_the_guide_vanishes_at_the_exact_posterior():
    """iwae-dreg with a flow guide: at the exact posterior every log weight is log p(x),
    whatever z, so DReG's guide gradient (w^2 d log w / dz dz/dphi, with log q's
    parameters detached) is 0, while IWAE's carries the score term; the model's gradient
    is the same under both (same draws)."""
    m, x = ppca_problem(n=30, dtype=F64)
    # the problem's encoder is diagonal and cannot be exact: a full-covariance one at the same parameters
    full = models.build_model("ppca", {"latent_dim": 2, "guide": "amortized-full"}, 6, 30).double()
    full.set_parameters(*m.params64())
    full.set_guide_optimal()
    g = IAFGuide(full, layers=2, hidden=(8,))
    grads = {}
    for name in ("iwae", "iwae-dreg"):
        g.zero_grad()
        torch.manual_seed(3)
        build_objective(name, 10, max_plate_nesting=1).loss(g, x, torch.arange(30)).backward()
        grads[name] = {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}
    guide = [n for n in grads["iwae"] if n.startswith(("flows.", "base.encoder."))]
    model = [n for n in grads["iwae"] if n not in guide]
    assert guide and model and set(grads["iwae-dreg"]) == set(grads["iwae"])
    assert max(float(grads["iwae-dreg"][n].abs().max()) for n in guide) < 1e-8  # float64 round-off
    assert max(float(grads["iwae"][n].abs().max()) for n in guide) > 1e-3  # IWAE's score term
    for n in model:
        torch.testing.assert_close(grads["iwae-dreg"][n], grads["iwae"][n], rtol=1e-9, atol=1e-9)


def test_iaf_guide_trains_with_every_objective():
    data = datasources.load_dataset("digits", binarize="threshold")
    small = datasources.DataSplits("digits", data.train[:200], data.val[:50], data.test[:0], binarize="threshold")
    for name in OBJECTIVES:
        torch.manual_seed(0)
        vae = models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, data.data_dim, 200)
        g = IAFGuide(vae, layers=2, hidden=(8,))
        before = [p.detach().clone() for p in g.flows.parameters()]
        res = fit(g, small, TrainConfig(objective=name, n_particles=3, steps=30, batch_size=50, lr=1e-2,
                                        progress=False, threads=1))
        losses = [r["loss"] for r in res.history]
        assert all(math.isfinite(v) for v in losses), name
        assert sum(losses[-5:]) < sum(losses[:5]), name  # it learns
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(g.flows.parameters(), before))
        assert moved > 1e-3, name  # the flows are trained, not only the encoder and decoder


def test_iaf_guide_trained_with_its_model_beats_the_best_mean_field():
    """PPCA whose posterior has correlated coordinates: the best diagonal Gaussian stays
    KL(q* || p(z|x)) > 0.1 nats from it; the IAF on the diagonal encoder, trained jointly
    with the model by the training driver, closes nearly all of it."""
    m, x = ppca_problem(n=300)
    g = IAFGuide(m, layers=2, hidden=(16,))
    data = datasources.DataSplits("synthetic", x, x[:0], x[:0])
    torch.manual_seed(0)
    fit(g, data, TrainConfig(steps=600, batch_size=100, lr=0.03, lr_final=1e-3, n_particles=8, progress=False,
                             threads=1))
    exact = m.exact_log_likelihood(x)
    kl = Estimate.of(exact - importance_estimates(g, x, 200, torch.arange(300), seed=1)["elbo"].values)
    mean_field = best_mean_field_kl(m)  # at the fitted parameters
    print(f"\nPPCA, IAF guide after 600 steps: KL(q || p(z|x)) {kl.mean:.4f} ± {kl.se:.4f}; best diagonal "
          f"Gaussian {mean_field:.4f}")
    assert mean_field > 0.1
    assert kl.mean < 0.1 * mean_field  # measured 0.001 against 0.144
    assert kl.mean > -3 * kl.se  # a KL: not negative beyond 3 standard errors


# ----------------------------------------------------------------------------- q* of the flow family


def test_per_datapoint_flow_reads_its_rows():
    m, x = ppca_problem(n=8)
    q = PerDatapointFlowGuide(m, n_rows=8)
    assert reads_row_indices(q, x)
    with pytest.raises(ValueError, match="cannot infer rows"):
        q.guide_dist(x[:2], torch.tensor([3, 8]))


def test_flow_q_star_closes_the_mean_field_gap_on_ppca():
    """q* per row on PPCA with a correlated posterior: the diagonal Gaussian's approximation
    gap is the best mean-field KL (closed form); the flow's, started from it, nearly 0."""
    m, x = ppca_problem(n=60)
    gauss = optimize_local(m, x, full=False, lr=0.03, decay=0.5, n_particles=10, window=25, patience=3, seed=1)
    flow = optimize_local_flow(m, x, init=gauss.model, lr=0.01, decay=0.5, n_particles=10, window=25, patience=3,
                               seed=1)
    exact = m.exact_log_likelihood(x)
    gap_g = Estimate.of(exact - m.exact_elbo_of(x, gauss.model.guide_dist(x)))
    gap_f = Estimate.of(exact - importance_estimates(flow.model, x, 500, torch.arange(60), seed=2)["elbo"].values)
    mean_field = best_mean_field_kl(m)
    print(f"\nPPCA q*: diagonal Gaussian gap {gap_g.mean:.4f} (best mean field {mean_field:.4f}), flow gap "
          f"{gap_f.mean:.4f} ± {gap_f.se:.4f}; flow q* {flow.steps} steps, {flow.seconds:.1f} s")
    assert abs(gap_g.mean - mean_field) < 0.01  # the Gaussian q* is the best mean field (noise of a constant rate)
    assert gap_f.mean < 0.1 * mean_field and gap_f.mean > -3 * gap_f.se  # measured 0.0025 against 0.144
    assert flow.describe()["full"] is None and flow.settings["family"] == "flow"


def test_flow_q_star_has_a_smaller_approximation_gap_than_the_gaussian_on_a_trained_vae(digits_vae):
    """Cremer et al.'s approximation gap log p(x) - L[q*] on 60 test rows of a trained VAE,
    for the diagonal Gaussian family and for the flow family (started from the Gaussian
    q*), log p(x) by AIS from the flow q* (the best proposal at hand). The bounds come from
    ``gaps.decompose`` with the Gaussian q* as "q" and the flow q* as "q*": its amortization
    gap is L[flow q*] - L[Gaussian q*], paired row by row."""
    m, data = digits_vae
    x = data.test[:60]
    rows = torch.arange(60)
    gauss = optimize_local(m, x, lr=0.03, decay=0.5, n_particles=10, window=25, patience=3, seed=1)
    flow = optimize_local_flow(m, x, init=gauss.model, lr=0.01, decay=0.5, n_particles=10, window=25, patience=3,
                               seed=1)
    res = decompose(gauss.model, flow.model, x, n_samples=500, seed=2)
    ais = ais_log_likelihood(flow.model, x, rows, steps=100, chains=16, init="guide", seed=3)
    log_px = ais.log_likelihood.values
    gap_g = Estimate.of(log_px - res["elbo"].values)
    gap_f = Estimate.of(log_px - res["elbo_star"].values)
    better = res["amortization_gap"]  # L[flow q*] - L[Gaussian q*] per row
    print(f"\ndigits VAE, 60 test rows, log p(x) by AIS {ais.log_likelihood.mean:.3f} (IS-500 from the flow q* "
          f"{res['iwae_star'].mean:.3f}): approximation gap, diagonal Gaussian {gap_g.mean:.4f} ± {gap_g.se:.4f}, "
          f"flow {gap_f.mean:.4f} ± {gap_f.se:.4f}; difference {better.mean:.4f} ± {better.se:.4f}; "
          f"q* {gauss.seconds:.1f} s and {flow.seconds:.1f} s, AIS {ais.seconds:.1f} s")
    assert better.mean > 3 * better.se  # the flow's q* is better, beyond 3 paired standard errors
    for gap in (gap_g, gap_f):
        assert gap.mean > -3 * gap.se  # gaps are not negative beyond 3 standard errors
    d = Estimate.of(log_px - res["iwae_star"].values)
    assert abs(d.mean) < 3 * d.se + 0.01  # AIS and IS-500 from the same proposal agree (3 se + IS's small bias)
