"""The fast paths compute the numbers the reference paths compute.

* the lean ELBO (Pyro's validation off) against the validated path (Pyro's Trace_ELBO,
  and TraceMeanField_ELBO's checked traces): same draws, same value and gradient, for
  every model family and guide, analytic and Monte Carlo KL, 1 and 3 particles,
  and a guide with a site that is not reparameterized (Pyro's estimator);
* BernoulliLogits against torch's Bernoulli: value and gradient, extreme logits,
  values outside {0, 1}; an importance-sampled evaluation with either;
* dynamic binarization as u < x: the very draws torch.bernoulli makes;
* the driver's fused Adam and first-step-only validation against per-tensor Adam and
  validation on every step: the same parameters after the same steps;
* the benchmark's hand-written yardstick: the same loss and gradient as elbolab's
  objectives for the same draws (so its ratios compare the same math).

No timing is asserted anywhere (scripts/benchmark.py prints the ratios).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import models
import elbolab.models.vae
from elbolab.inference import lightning_module as train
from elbolab.models import datasources as loaders
from elbolab.inference.evaluate import importance_estimates
from elbolab.inference.objectives import build_objective
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
from elbolab.models.common import BernoulliLogits
from elbolab.scripts import benchmark

N_DATA = 40
TINY = torch.finfo(torch.float32).tiny  # 1.18e-38: the smallest normal float32
IDX = torch.tensor([3, 7, 8, 15, 22, 30, 31, 39])  # a mini-batch of B = 8 of the N = 40 rows


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors: threads only contend (the conftest restores the count)


@pytest.fixture(scope="module")
def digits():
    return loaders.load_dataset("digits", binarize="threshold")


def loss_and_grads(m, objective, x, idx, validate, seed=5):
    pyro.enable_validation(validate)
    try:
        torch.manual_seed(seed)
        m.zero_grad(set_to_none=True)
        loss = objective.loss(m, x, idx)
        loss.backward()
    finally:
        pyro.enable_validation(True)
    return float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


CASES = [
    ("vae", {"latent_dim": 3, "hidden": [16]}),
    ("vae", {"latent_dim": 3, "hidden": [16], "guide": "per-datapoint"}),
    ("gmvae", {"latent_dim": 3, "hidden": [16], "n_components": 4}),  # mixture prior: Monte Carlo KL
    ("vae", {"latent_dim": 3, "hidden": [16], "likelihood": "gaussian-diag"}),  # SharedScaleNormal
    ("vae", {"latent_dim": 3, "hidden": [], "likelihood": "continuous-bernoulli"}),  # linear, CB
    ("ppca", {"latent_dim": 3, "guide": "amortized-full"}),  # MVN guide, Normal prior: Monte Carlo KL
    ("ppca", {"latent_dim": 3, "guide": "per-datapoint"}),
    ("gaussian", {"guide": "mean-field"}),  # global latents only
    ("gaussian", {"guide": "structured"}),
]


@pytest.mark.parametrize("name,config", CASES, ids=["-".join([n, c.get("guide", "default")] + (
    [c["likelihood"]] if "likelihood" in c else [])) for n, c in CASES])
@pytest.mark.parametrize("objective", ["elbo", "elbo-analytic"])
def test_lean_elbo_equals_pyros(digits, name, config, objective):
    x = digits.train[IDX] if name != "gaussian" else digits.train[IDX, :3] * 4.0
    for K in (1, 3):
        torch.manual_seed(0)
        m = models.build_model(name, config, x.shape[1], N_DATA)
        obj = build_objective(objective, K, max_plate_nesting=m.max_plate_nesting)
        ref, ref_grads = loss_and_grads(m, obj, x, IDX, validate=True)  # Pyro's differentiable_loss
        lean, lean_grads = loss_and_grads(m, obj, x, IDX, validate=False)  # the lean path, same draws
        # float32: the value is summed in another order (Pyro adds Python floats per site),
        # a few units in the last place of a loss of ~1e4
        assert lean == pytest.approx(ref, rel=1e-6), (K, lean, ref)
        assert lean_grads.keys() == ref_grads.keys() and ref_grads
        for n in ref_grads:  # the same operations on the same numbers, up to summation order
            torch.testing.assert_close(lean_grads[n], ref_grads[n], rtol=1e-5, atol=1e-5 * float(
                ref_grads[n].abs().max()), msg=lambda s, n=n: f"{n} (K={K}): {s}")


class DiscreteGuide(pyro.nn.PyroModule):
    """z_i ~ Bernoulli(sigmoid(a)) in the guide and the model, x_i | z_i ~ N(b z_i, 1): a
    site that is not reparameterized, so the ELBO needs Pyro's score-function term."""

    max_plate_nesting = 1
    data_plate, n_data, data_dim = "data", N_DATA, 1

    def __init__(self):
        super().__init__()
        self.a = pyro.nn.PyroParam(torch.tensor(0.3))
        self.b = pyro.nn.PyroParam(torch.tensor(1.5))

    def model(self, x):
        with pyro.plate("data", N_DATA):  # declared with the full size: the driver subsamples it
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(self.b * z, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", len(x)):  # declared with the batch's size: the driver scales it
            pyro.sample("z", dist.Bernoulli(logits=self.a * x))


def test_lean_elbo_keeps_pyros_score_function_estimator():
    m = DiscreteGuide()
    x = torch.linspace(-1.0, 2.0, len(IDX))
    obj = build_objective("elbo", 3)  # (TraceMeanField refuses such a guide under validation)
    ref, ref_grads = loss_and_grads(m, obj, x, IDX, validate=True)
    lean, lean_grads = loss_and_grads(m, obj, x, IDX, validate=False)
    assert lean == pytest.approx(ref, rel=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(lean_grads[n], ref_grads[n], rtol=1e-5, atol=1e-6)


def test_bernoulli_logits_equals_torchs_bernoulli():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((5, 30), 0.3))  # (B, D)
    logits = (3.0 * torch.randn(4, 5, 30)).requires_grad_()  # (K, B, D): particles broadcast over x
    with torch.no_grad():
        logits[0, 0, :4] = torch.tensor([1e4, -1e4, 1e4, -1e4])  # saturated: exact, not cancelled away
    x[0, :4] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    ours = BernoulliLogits(logits=logits).to_event(1).log_prob(x)  # (K, B)
    ref = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    # sums of 30 float32 terms up to 1e4: a few ulp of 1e4 (1e-3), relative 1e-6 elsewhere
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=2e-3)
    assert torch.allclose(BernoulliLogits(logits=logits[:1, :1, :4]).log_prob(x[:1, :4]),
                          torch.tensor([[[0.0, -1e4, -1e4, 0.0]]]))  # a pixel wrong by 1e4 costs exactly 1e4
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)  # x - sigmoid(l) either way
    # values outside {0, 1} (validation off): torch's formula; one particle: torch's kernel itself
    grey = torch.rand(5, 30)
    torch.testing.assert_close(BernoulliLogits(logits=logits, validate_args=False).log_prob(grey),
                               dist.Bernoulli(logits=logits, validate_args=False).log_prob(grey),
                               rtol=1e-5, atol=2e-3)
    assert torch.equal(BernoulliLogits(logits=logits[0]).log_prob(x), dist.Bernoulli(logits=logits[0]).log_prob(x))


def test_fast_dynamic_binarization_makes_torch_bernoullis_draws():
    from elbolab.models.datasources import _bernoulli, bernoulli_draw as _bernoulli_fast

    x = torch.rand(100, 784)
    x[0, :3] = torch.tensor([0.0, 1.0, 0.5])
    for seed in (0, 1, 2**40 + 7):
        assert torch.equal(_bernoulli_fast(x, seed), _bernoulli(x, seed))  # the same uniforms, compared


def test_evaluation_numbers_unchanged_by_the_fast_likelihood(digits, monkeypatch):
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, digits.data_dim, digits.n_train)
    x = digits.test[:30]
    fast = importance_estimates(m, x, 64, seed=1, particle_chunk=16)
    monkeypatch.setattr(models.vae, "BernoulliLogits", dist.Bernoulli)  # the reference likelihood
    ref = importance_estimates(m, x, 64, seed=1, particle_chunk=16)
    for key in ref:  # per-row log-likelihoods of ~-30 nats in float32: 1e-5 relative
        torch.testing.assert_close(fast[key].values, ref[key].values, rtol=1e-5, atol=1e-4)


def _fit_params(data, **cfg):
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, data.data_dim, data.n_train)
    fit(m, data, TrainConfig(**{"steps": 12, "batch_size": 50, "lr": 0.01, "progress": False,
                                "val_every": 10**6, **cfg}))
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_fused_adam_validation_and_denormals_leave_the_fit_as_it_was(digits, monkeypatch):
    data = loaders.DataSplits("digits", digits.train[:300], digits.val[:20], digits.test[:20])
    fast = _fit_params(data)
    assert not train.denormals_flushed()  # the driver restored the mode it found
    monkeypatch.setattr(train, "FUSED_ADAM", False)
    monkeypatch.setattr(train, "VALIDATE_EVERY_STEP", True)
    monkeypatch.setattr(train, "FLUSH_DENORMALS", False)
    ref = _fit_params(data)
    # 12 Adam steps of lr 0.01 from the same start on the same draws; the two paths
    # differ in float32 rounding only (fused kernel, summation order): 1e-5 absolute
    for n in ref:
        torch.testing.assert_close(fast[n], ref[n], rtol=0, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")
    moved = max(float((fast[n] - p).abs().max()) for n, p in _initial(data).items())
    assert moved > 0.05  # the fit moved the parameters far more than the tolerance


def test_flushing_denormals_keeps_the_iwae_gradient(digits):
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, digits.data_dim, digits.n_train)
    with torch.no_grad():  # extreme logits: the log weights spread over hundreds of nats, and the
        m.decoder[-1].weight.mul_(40.0)  # normalized weights of most particles fall below 1.2e-38
    denormal = []

    def count(mod, inp, logits):  # denormal entries of the gradient reaching the logits
        logits.register_hook(lambda g: denormal.append(int(((g != 0) & (g.abs() < TINY)).sum())))

    m.decoder[-1].register_forward_hook(count)
    obj = build_objective("iwae", 32)
    grads = []
    for flush in (False, True):
        with train.flushed_denormals(flush), pyro.validation_enabled(False):
            torch.manual_seed(1)
            m.zero_grad()
            obj.loss(m, digits.train[:20], torch.arange(20)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert not train.denormals_flushed()  # the mode restored
    assert denormal[0] > 100 and denormal[1] == 0  # the reference carried denormals; flushed, none
    for n in grads[0]:  # what was dropped is below 1.2e-38 per term: nothing a float32 sum of these sees
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-30)


def _initial(data):
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, data.data_dim, data.n_train)
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_first_step_is_validated_and_the_callers_setting_restored(digits):
    # the first 50 rows (the driver's warm-up batch) are binary, the others grey levels
    # outside a Bernoulli's support: the warm-up passes and the first step's batch is refused
    rows = torch.cat([digits.train[:50], digits.train[50:150] * 0.5 + 0.25])
    grey = loaders.DataSplits("grey", rows, digits.val[:0], digits.test[:0])
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, grey.data_dim, grey.n_train)
    seen = []

    class Steps(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_batch_end(self, trainer, *a):
            seen.append(trainer.global_step)

    with pytest.raises(ValueError, match="support"):
        fit(m, grey, TrainConfig(steps=3, batch_size=50, progress=False), callbacks=[Steps()])
    assert seen == []  # refused at step 1, after the warm-up
    assert pyro.infer.util.is_validation_enabled() and pyro.distributions.is_validation_enabled()
    with pyro.validation_enabled(False):
        fit(m, grey, TrainConfig(steps=3, batch_size=50, progress=False), callbacks=[Steps()])  # the caller's choice
        assert seen == [1, 2, 3] and not pyro.infer.util.is_validation_enabled()


@pytest.mark.parametrize("objective", ["elbo", "elbo-analytic", "iwae", "iwae-dreg"])
def test_benchmark_yardstick_is_the_same_math(digits, objective):
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 3, "hidden": [16, 12]}, digits.data_dim, digits.n_train)
    hand = benchmark.HandVAE.like(m)
    x, K = digits.train[:20], 4
    obj = build_objective(objective, K)
    with pyro.validation_enabled(False):
        torch.manual_seed(3)
        ours = obj.loss(m, x, torch.arange(20))
        torch.manual_seed(3)
        theirs = hand.loss(x, digits.n_train, objective, K)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)  # float32 sums, another order
    g_ours = torch.autograd.grad(ours, list(m.encoder.net.parameters()) + list(m.decoder.parameters()))
    g_hand = torch.autograd.grad(theirs, list(hand.encoder.parameters()) + list(hand.decoder.parameters()))
    for a, b in zip(g_ours, g_hand):  # DReG's reweighted path gradient included
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_benchmark_quick_run_writes_its_results(tmp_path):
    out = tmp_path / "bench"
    assert benchmark.main(["--quick", "--sections", "train,eval", "--reps", "1", "--out", str(out)]) == 0
    import json

    res = json.loads((out / "results.json").read_text())
    tr = res["train"]["digits"]
    assert tr["yardstick_loss_rel_diff"] < 1e-5
    assert set(tr["sides"]) == {"hand", "hand-tuned", "pyro-svi", "objective", "driver"}
    assert all(v["median"] > 0 and v["ratio_to_hand"] > 0 for v in tr["sides"].values())
    assert 0 < res["eval"]["share_of_matmul_rate"] and res["machine"]["threads"] == 1
    assert "| training, s/epoch" in (out / "table.md").read_text()
    for bad in (["--sections", "nope"], ["--sections", "baseline"], ["--sections", "train", "--data-dir", "/nope"]):
        assert benchmark.main([*bad, "--out", str(tmp_path / "x")]) == 2  # refused before any work
    assert not (tmp_path / "x").exists()
