"""The training driver: steps, history, non-finite stops, checkpoints, SIGKILL resume."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pyro
import pytest
import torch

from elbolab import models
from elbolab.models import datasources as loaders
from elbolab.inference.errors import NonFiniteError, UsageError
from elbolab.inference.checkpoints import CHECKPOINT, load_checkpoint
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
from conftest import ROOT


def digits(n=None):
    d = loaders.load_dataset("digits")
    if n:
        d = loaders.DataSplits("digits", d.train[:n], d.val[:50], d.test[:50], image_shape=(8, 8))
    return d


def ppca(data, k=3, guide="amortized-full"):
    torch.manual_seed(0)
    return models.build_model("ppca", {"latent_dim": k, "guide": guide}, data.data_dim, data.n_train)


def test_fit_counts_steps_and_records_history():
    data = digits(250)
    m = ppca(data)
    res = fit(m, data, TrainConfig(epochs=3, batch_size=60, lr=0.05, progress=False))
    assert res.steps == 3 * 5 and len(res.history) == 15  # ceil(250/60) = 5 batches per epoch
    assert [r["step"] for r in res.history] == list(range(1, 16))
    assert res.history[-1]["loss"] < res.history[0]["loss"]  # it learns
    assert res.validations and all("val_elbo" in v for v in res.validations)


def test_lr_decays_to_lr_final():
    data = digits(200)
    m = ppca(data)
    seen = []

    class Spy(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_batch_end(self, trainer, module, *a):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(m, data, TrainConfig(steps=20, batch_size=50, lr=0.1, lr_final=0.001, progress=False), callbacks=[Spy()])
    assert seen[0] < 0.1 and abs(seen[-1] - 0.001) < 1e-9


class PoisonedPPCA(models.ppca.PPCA):
    """PPCA whose log density turns NaN at one step (counting model calls in training)."""

    poison_at = None
    calls = 0
    static_steps = False  # its steps read a Python counter: a recorded step would not see the poison

    def model(self, x):
        if torch.is_grad_enabled():  # training steps only (checks and evaluations run without grad)
            type(self).calls += 1
            if type(self).calls == self.poison_at:
                with pyro.validation_enabled(False):  # validation would refuse the NaN itself
                    pyro.factor("poison", torch.tensor(float("nan")))
        return super().model(x)


def test_nonfinite_loss_stops_before_the_update(tmp_path):
    data = digits(200)
    cfg = TrainConfig(steps=30, batch_size=40, lr=0.05, progress=False, val_every=1000)

    def run(poison_at):
        torch.manual_seed(0)
        m = PoisonedPPCA(models.ppca.PPCAConfig(latent_dim=3), data.data_dim, data.n_train)
        m.batch, PoisonedPPCA.poison_at, PoisonedPPCA.calls = 40, poison_at, 0
        return m

    bad = run(poison_at=1 + 12)  # grad-enabled call 1 is the driver's warm-up: step 12 is call 13
    with pytest.raises(NonFiniteError, match="step 12: the loss is nan; parameters not updated") as e:
        fit(bad, data, cfg)
    assert e.value.step == 12
    good = run(poison_at=None)
    fit(good, data, TrainConfig(**{**cfg.to_dict(), "steps": 11}))
    for (n, p), (_, q) in zip(bad.named_parameters(), good.named_parameters()):
        assert torch.equal(p, q), n  # exactly the state after 11 good steps


def test_checkpoint_round_trip_and_resume_in_process(tmp_path):
    data = digits(200)
    cfg = TrainConfig(epochs=6, batch_size=50, lr=0.05, progress=False, checkpoint_every=1)
    full = ppca(data)
    fit(full, data, cfg, out_dir=str(tmp_path / "a"))
    part = ppca(data)
    fit(part, data, TrainConfig(**{**cfg.to_dict(), "epochs": 3}), out_dir=str(tmp_path / "b"))
    resumed = ppca(data)
    res = fit(resumed, data, cfg, out_dir=str(tmp_path / "b"), resume=True)
    assert res.steps == 24 and len(res.history) == 24
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert float((p - q).detach().abs().max()) <= 1e-6, n
    ck = load_checkpoint(str(tmp_path / "b" / CHECKPOINT))
    assert ck["global_step"] == 24 and "torch_rng" in ck["elbolab"]


def test_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f, protocol=2)
    with pytest.raises(UsageError, match="refused to load the checkpoint"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_bad_train_config():
    for kw, msg in [({"lr": 0.0}, "lr must be"), ({"lr": -1.0}, "lr must be"), ({"n_particles": 0}, "n_particles"),
                    ({"objective": "renyi", "alpha": 1.0}, "alpha 1"), ({"objective": "nope"}, "unknown"),
                    ({"batch_size": 0}, "batch_size"), ({"epochs": 0}, "epochs")]:
        with pytest.raises(UsageError, match=msg):
            TrainConfig(**kw)
    data = digits(30)  # a batch larger than the training set is the whole set: one step an epoch
    assert fit(ppca(data), data, TrainConfig(batch_size=31, epochs=2, progress=False)).steps == 2


def _final_params(run_dir):
    return load_checkpoint(os.path.join(run_dir, CHECKPOINT))["state_dict"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """Kill a run with SIGKILL part-way, resume it, and end where an uninterrupted run ends."""
    args = ["--model", "ppca", "--latent-dim", "4", "--epochs", "16", "--batch-size", "25",
            "--lr", "0.02", "--checkpoint-every", "1", "--threads", "1", "--seed", "7", "--no-progress",
            "--eval-particles", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    a = str(tmp_path / "a")
    done = subprocess.run([sys.executable, "-m", "elbolab.scripts.fit", *args, "--out", a], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    b = str(tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-m", "elbolab.scripts.fit", *args, "--out", b], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(b, CHECKPOINT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(ckpt):
            step = load_checkpoint(ckpt)["global_step"]
            if step >= 5 * 51:  # well into the run (51 steps an epoch)
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_killed = load_checkpoint(ckpt)["global_step"]
    assert 0 < step_killed < 16 * 51, "the kill must land part-way"
    assert not os.path.exists(os.path.join(b, "metrics.json"))
    res = subprocess.run([sys.executable, "-m", "elbolab.scripts.fit", "--resume", b, "--no-progress"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    pa, pb = _final_params(a), _final_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert float((pa[k] - pb[k]).abs().max()) <= 1e-6, k
    assert load_checkpoint(ckpt)["global_step"] == 16 * 51


def test_optimizer_state_takes_its_parameters_layout():
    """A checkpoint's Adam moments laid out column-major, loaded for a row-major
    parameter: fused Adam pairs elements by memory, so without the re-layout the step
    differs from the same step taken with matching layouts."""
    from elbolab.inference.lightning_module import adam, match_state_layouts

    torch.manual_seed(0)
    w0, g1, g2 = torch.randn(7, 3), torch.randn(7, 3), torch.randn(7, 3)

    def run(transposed_state: bool, fix: bool):
        p = torch.nn.Parameter(w0.clone())
        opt = adam([p], lr=0.1)
        p.grad = g1.clone()
        opt.step()
        if transposed_state:  # as a checkpoint written by a run whose W was column-major
            for k, v in list(opt.state[p].items()):
                if v.dim() == 2:
                    opt.state[p][k] = v.t().contiguous().t()
        if fix:
            match_state_layouts(opt)
        p.grad = g2.clone()
        opt.step()
        return p.detach()

    reference = run(False, False)
    assert torch.equal(run(True, True), reference)
    # the unfixed case shows what the re-layout prevents (where the kernel is fused)
    if torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True).defaults.get("fused"):
        assert not torch.allclose(run(True, False), reference)


def test_validating_does_not_change_the_training_path():
    """How often the validation ELBO is computed must not move the training draws: the
    same steps with validation every 5 steps and only at the end end in the same state
    (a DataLoader built for validation once drew its seed from torch's global stream)."""
    data = digits(300)
    states = []
    for every in (5, 26):
        m = ppca(data, k=2)
        fit(m, data, TrainConfig(batch_size=25, epochs=2, lr=0.02, val_every=every, val_particles=1, seed=3,
                                 progress=False))
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_the_fit():
    """SIGINT while an object's finalizer runs (Lightning's profiler has one): Python's
    own handler raised KeyboardInterrupt inside the finalizer, where it is printed as
    "Exception ignored" and dropped, and the fit went on to its end. The fit's handler
    notes it, and the next step stops the fit."""
    import lightning.pytorch as pl

    class SignalsInItsFinalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):  # the handler runs in here, between these bytecodes
                pass

    seen = []

    class AtStep5(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(trainer.global_step)
            if trainer.global_step == 5:
                SignalsInItsFinalizer()  # no reference kept: finalized at once

    data = digits(200)
    with pytest.raises(KeyboardInterrupt):
        fit(ppca(data, k=2), data, TrainConfig(batch_size=25, epochs=50, progress=False), callbacks=[AtStep5()])
    assert max(seen) <= 6  # stopped at the next step, not after 400
