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
* the driver's own share of a step: batches sliced from memory against the DataLoader's
  (the same rows and draws), Lightning's backward and step wrappers left out, several
  steps per Lightning batch: the same history, validations and parameters, bit for bit;
  and where a per-step hook needs single steps, single steps;
* the one-messenger recorder of the sample sites against Pyro's trace and replay;
* the compiled evaluation (decoder and likelihood) against the traced one: the same
  draws, the same estimates up to float round-off; and the switch by the job's size;
* the benchmark's hand-written yardstick: the same loss and gradient as elbolab's
  objectives for the same draws (so its ratios compare the same math).

No timing is asserted anywhere (scripts/benchmark.py prints the ratios).
"""

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import models
import elbolab.models.vae
from elbolab.inference import batches as batching
from elbolab.inference import evaluate
from elbolab.inference import lightning_module as train
from elbolab.inference import traces
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


def test_a_failing_benchmark_section_keeps_the_others(tmp_path, monkeypatch):
    """A section that raises is recorded under ``errors`` and the program exits 1; the
    sections measured before and after it are written (a KeyError in the last section
    once lost a whole run's measurements)."""
    import json

    def broken(args, data):
        raise KeyError("seconds")

    monkeypatch.setitem(benchmark.RUNNERS, "profile", broken)
    out = tmp_path / "bench"
    assert benchmark.main(["--quick", "--sections", "train,profile,eval", "--reps", "1", "--out", str(out)]) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == {"profile": "KeyError: 'seconds'"} and "profile" not in res
    assert res["train"]["digits"]["sides"]["driver"]["median"] > 0 and res["eval"]["share_of_matmul_rate"] > 0
    assert "Section profile failed: KeyError: 'seconds'" in (out / "table.md").read_text()


def test_benchmark_quick_run_writes_its_results(tmp_path):
    out = tmp_path / "bench"
    assert benchmark.main(["--quick", "--sections", "train,profile,eval", "--reps", "1", "--clock", "cpu",
                           "--out", str(out)]) == 0
    import json

    res = json.loads((out / "results.json").read_text())
    tr = res["train"]["digits"]
    assert tr["yardstick_loss_rel_diff"] < 1e-5
    assert set(tr["sides"]) == {"hand", "hand-tuned", "pyro-svi", "objective-eager", "objective", "driver"}
    assert all(v["median"] > 0 and v["ratio_to_hand"] > 0 for v in tr["sides"].values())
    assert 0 < res["eval"]["share_of_matmul_rate"] and res["machine"]["threads"] == 1 and res["clock"] == "cpu"
    assert "the main thread's CPU seconds" in (out / "table.md").read_text()
    assert benchmark._clock[0] is benchmark.time.perf_counter  # (restored: the default is the wall clock)
    assert "| training, s/epoch" in (out / "table.md").read_text()
    pr = res["profile"]["sides"]  # CPU ms a step: the phases add up to the step, the shares are differences
    for who in ("hand-tuned", "objective-eager", "objective"):
        assert all(pr[who][p] > 0 for p in ("rows", "loss", "backward", "adam"))
        assert pr[who]["step"] == pytest.approx(sum(pr[who][p] for p in ("rows", "loss", "backward", "adam")))
    assert res["profile"]["driver_own"] == pytest.approx(pr["driver"]["step"] - pr["objective"]["step"])
    assert res["profile"]["pyro_own_eager"] == pytest.approx(pr["objective-eager"]["step"] - pr["hand-tuned"]["step"])
    assert "| step profile (digits" in (out / "table.md").read_text()
    for bad in (["--sections", "nope"], ["--sections", "baseline"], ["--sections", "train", "--data-dir", "/nope"]):
        assert benchmark.main([*bad, "--out", str(tmp_path / "x")]) == 2  # refused before any work
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ the driver's own share


@pytest.mark.parametrize("world_size", [1, 3])
def test_in_memory_batches_are_the_dataloaders(world_size):
    d = loaders.load_dataset("digits", binarize="dynamic")  # grey levels, drawn afresh per batch
    x = d.train[:230]
    for rank in range(world_size):
        ref = batching.batch_loader(x, 40, seed=7, dynamic=True, rank=rank, world_size=world_size)
        ours = batching.InMemoryBatches(x, 40, seed=7, dynamic=True, rank=rank, world_size=world_size)
        assert len(ours) == len(ref)
        for epoch in (0, 3):
            ref.sampler.set_epoch(epoch)
            ours.sampler.set_epoch(epoch)
            pairs = list(zip(ours, ref, strict=True))
            assert len(pairs) == len(ref)
            for (xa, ia), (xb, ib) in pairs:  # the same rows, the same Bernoulli draws
                assert torch.equal(ia, ib) and torch.equal(xa, xb)
            assert set(torch.unique(torch.cat([a for (a, _), _ in pairs])).tolist()) == {0.0, 1.0}
    rows = batching.InMemoryBatches(x, 40, seed=7)  # no binarization: the rows themselves
    assert all(torch.equal(xb, x[ib]) for xb, ib in rows)


def test_batch_runs_cover_the_epoch_in_order_and_end_where_the_budget_does():
    x = torch.arange(23.0)[:, None]
    single = batching.InMemoryBatches(x, 2, seed=1)  # 12 batches an epoch
    for budget, singles, plan in ((None, False, [5, 5, 2]), (7, False, [5, 2, 3, 2]), (7, True, [1] * 12),
                                  (12, True, [5, 5, 2]), (30, False, [5, 5, 2])):
        runs = batching.BatchRuns(batching.InMemoryBatches(x, 2, seed=1), 5, budget=lambda b=budget: b,
                                  single_at_budget=singles)
        for epoch in (0, 1):
            runs.sampler.set_epoch(epoch)
            single.sampler.set_epoch(epoch)
            got = list(runs)
            assert [len(r) for r in got] == plan
            flat = [b for run in got for b in run]
            assert all(torch.equal(a[1], b[1]) for a, b in zip(flat, single, strict=True))


@contextlib.contextmanager
def _flags(**flags):
    """The driver's switches (module constants of lightning_module) set for the duration."""
    saved = {k: getattr(train, k) for k in flags}
    try:
        for k, v in flags.items():
            setattr(train, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(train, k, v)


def _fit(data, cfg, callbacks=(), fit_kwargs=None, **flags):
    """A small VAE fitted under the driver's flags (the module's switches): its history,
    validations and parameters."""
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, data.data_dim, data.n_train)
    with _flags(**flags):
        res = fit(m, data, TrainConfig(**{"batch_size": 50, "lr": 0.01, "progress": False, **cfg}),
                  callbacks=list(callbacks), **(fit_kwargs or {}))
    return res, {n: p.detach().clone() for n, p in m.named_parameters()}


REFERENCE = {"IN_MEMORY_BATCHES": False, "LEAN_HOOKS": False, "STEPS_PER_BATCH": 1, "REPLAY_STEPS": False}


@pytest.mark.parametrize("cfg", [{"epochs": 3}, {"steps": 17, "lr_final": 1e-3}, {"epochs": 2, "clip_norm": 5.0}],
                         ids=["epochs", "steps-mid-epoch", "clipped"])
def test_driver_fast_paths_leave_the_fit_bit_for_bit(cfg):
    d = loaders.load_dataset("digits", binarize="dynamic")  # draws per batch, validation at each epoch's end
    data = loaders.DataSplits("digits", d.train[:300], d.val[:40], d.test[:20], binarize="dynamic")
    runs = []

    class Runs(__import__("lightning.pytorch").pytorch.Callback):  # (epoch hooks only: runs of steps allowed)
        def on_train_epoch_end(self, trainer, module):
            runs.append(module.steps_per_batch)

        def on_train_end(self, trainer, module):
            runs.append(module.replay.replays)

    fast, p_fast = _fit(data, cfg, [Runs()])
    ref, p_ref = _fit(data, cfg, **REFERENCE)
    replays = runs.pop()
    assert runs and set(runs) == {train.STEPS_PER_BATCH}  # the fast fit ran several steps per Lightning batch
    # every step replayed the recorded loss but the first (validated) and the one recorded
    assert replays == (cfg.get("steps") or 6 * cfg["epochs"]) - 2
    assert fast.steps == ref.steps == (cfg.get("steps") or 6 * cfg["epochs"])
    assert [r["loss"] for r in fast.history] == [r["loss"] for r in ref.history]  # the same steps
    assert [r["step"] for r in fast.history] == list(range(1, fast.steps + 1))
    assert [(v["step"], v["val_elbo"]) for v in fast.validations] == [(v["step"], v["val_elbo"])
                                                                       for v in ref.validations]
    # at each completed epoch's end (6 steps), not where a step budget ends
    assert [v["step"] for v in fast.validations] == list(range(6, fast.steps + 1, 6))
    for n in p_ref:  # bit for bit: the same operations on the same numbers
        assert torch.equal(p_fast[n], p_ref[n]), n


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended")
def test_a_fit_resumed_mid_epoch_goes_on_as_the_reference(tmp_path):
    d = loaders.load_dataset("digits", binarize="threshold")
    data = loaders.DataSplits("digits", d.train[:300], d.val[:40], d.test[:0], binarize="threshold")
    ends = {}
    for name, flags in (("fast", {}), ("reference", REFERENCE)):
        out = str(tmp_path / name)
        for steps, resume in ((9, False), (16, True)):  # 6 steps an epoch: the first fit stops mid-epoch
            ends[name] = _fit(data, {"steps": steps}, fit_kwargs={"out_dir": out, "resume": resume}, **flags)
    (fast, p_fast), (ref, p_ref) = ends["fast"], ends["reference"]
    assert fast.steps == ref.steps == 16
    assert [r["loss"] for r in fast.history] == [r["loss"] for r in ref.history]
    assert [v["val_elbo"] for v in fast.validations] == [v["val_elbo"] for v in ref.validations]
    for n in p_ref:
        assert torch.equal(p_fast[n], p_ref[n]), n


def test_a_per_step_callback_sees_single_steps():
    d = loaders.load_dataset("digits", binarize="threshold")
    data = loaders.DataSplits("digits", d.train[:300], d.val[:0], d.test[:0], binarize="threshold")
    seen = []

    class Steps(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_batch_end(self, trainer, module, *a):
            seen.append((trainer.global_step, module.steps_per_batch))

    _fit(data, {"steps": 8}, [Steps()])
    assert seen == [(s, 1) for s in range(1, 9)]
    res, _ = _fit(data, {"steps": 8, "val_every": 4})  # validation every few steps: single steps too
    assert res.steps == 8


@pytest.mark.parametrize("name,config", [("vae", {"latent_dim": 3, "hidden": [16], "guide": "per-datapoint"}),
                                         ("gmvae", {"latent_dim": 3, "hidden": [16], "n_components": 4}),
                                         ("gaussian", {"guide": "structured"})])
def test_recorded_sites_are_pyros_trace(digits, name, config):
    x = digits.train[IDX] if name != "gaussian" else digits.train[IDX, :3] * 4.0
    torch.manual_seed(0)
    m = models.build_model(name, config, x.shape[1], N_DATA)
    for K in (1, 3):
        with pyro.validation_enabled(False), traces.batch(m, x, IDX):
            torch.manual_seed(4)
            guide_sites, model_sites = traces.trace_pair(m.model, m.guide, (x,), K, m.max_plate_nesting)
            torch.manual_seed(4)
            with traces.particles(K, m.max_plate_nesting):
                guide_tr = pyro.poutine.trace(m.guide).get_trace(x)
                model_tr = pyro.poutine.trace(pyro.poutine.replay(m.model, trace=guide_tr)).get_trace(x)
        for ours, theirs in ((guide_sites, guide_tr), (model_sites, model_tr)):
            sample = [n for n, s in theirs.nodes.items() if s["type"] == "sample"]
            assert list(ours.nodes) == sample and sample
            for n in sample:
                a, b = ours.nodes[n], theirs.nodes[n]
                assert torch.equal(a["value"], b["value"]) and a["scale"] == b["scale"], n
                assert a["is_observed"] == b["is_observed"] and a["cond_indep_stack"] == b["cond_indep_stack"]
                assert type(a["fn"]) is type(b["fn"])
                assert getattr(a["fn"], "batch_shape", None) == getattr(b["fn"], "batch_shape", None)
            # the Trace made of the recorded sites scores as Pyro's does
            assert torch.equal(traces.as_trace(ours).log_prob_sum(), theirs.log_prob_sum())


# ------------------------------------------------------------------ the compiled evaluation


def _compiled_against_traced(digits, backend):
    x = digits.test[:30]
    for name, config in (("vae", {"latent_dim": 3, "hidden": [16]}),
                         ("gmvae", {"latent_dim": 3, "hidden": [16], "n_components": 4})):  # a mixture prior
        torch.manual_seed(0)
        m = models.build_model(name, config, digits.data_dim, digits.n_train)
        assert evaluate.CompiledLogWeights.applies(m)
        ref = importance_estimates(m, x, 64, seed=1, particle_chunk=24, compiled=False)  # chunks of 24, 24, 16
        fast = importance_estimates(m, x, 64, seed=1, particle_chunk=24, compiled=True)
        for key in ref:  # the same draws; per-row sums of 64 float32 log densities in another order: ~1e-6
            torch.testing.assert_close(fast[key].values, ref[key].values, rtol=0, atol=2e-5,
                                       msg=lambda m_, key=key: f"{name} {key} ({backend}): {m_}")


def test_compiled_evaluation_is_the_traced_one(digits, monkeypatch):
    # torch.compile's "eager" backend: the compiled path's draws and formula (the inductor
    # backend's code generation, seconds per shape, is the slow test below)
    monkeypatch.setattr(evaluate, "COMPILE_BACKEND", "eager")
    _compiled_against_traced(digits, "eager")
    torch.manual_seed(0)
    m = models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, digits.data_dim, digits.n_train)
    calls = []
    monkeypatch.setattr(evaluate.CompiledLogWeights, "__call__",
                        lambda self, x, k, f=evaluate.CompiledLogWeights.__call__: calls.append(k) or f(self, x, k))
    grey = loaders.load_dataset("digits").test[:10]  # grey levels: the traced path (Bernoulli refuses them there)
    with pyro.validation_enabled(False):
        a = importance_estimates(m, grey, 16, seed=2, compiled=True)
        b = importance_estimates(m, grey, 16, seed=2, compiled=False)
    assert not calls and torch.equal(a["log_likelihood"].values, b["log_likelihood"].values)
    x = digits.test[:10]
    importance_estimates(m, x, 40, seed=2)  # 400 samples: below the size from which compiling pays
    assert not calls
    monkeypatch.setattr(evaluate, "COMPILE_MIN_SAMPLES", 400)
    importance_estimates(m, x, 40, seed=2)
    assert calls == [40]
    for name, config in (("vae", {"latent_dim": 3, "hidden": [16], "guide": "per-datapoint"}),
                         ("vae", {"latent_dim": 3, "hidden": [16], "likelihood": "gaussian"}),
                         ("ppca", {"latent_dim": 3})):
        assert not evaluate.CompiledLogWeights.applies(models.build_model(name, config, digits.data_dim, 40))


@pytest.mark.slow
def test_compiled_evaluation_with_inductor_is_the_traced_one(digits):
    _compiled_against_traced(digits, "inductor")
