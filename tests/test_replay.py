"""The training loss recorded once and replayed (``inference.replay``): the same numbers
as the loss Pyro builds at every step, bit for bit, and the eager loss wherever a
recording could not stand for it."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule

import elbolab
from elbolab import models
from elbolab.inference import lightning_module, replay
from elbolab.inference.objectives import build_objective
from elbolab.inference.traces import batch
from elbolab.models import common
from elbolab.models import datasources as loaders


@pytest.fixture(scope="module")
def digits() -> loaders.DataSplits:
    return loaders.load_dataset("digits", binarize="none")  # grey levels in [0, 1]


def _batches(x: torch.Tensor, sizes: list[int], seed: int = 3):
    """Mini-batches (rows, positions) of the given sizes drawn from x (two shapes: two graphs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        rows = torch.randperm(x.shape[0], generator=g)[:b]
        out.append((x[rows], rows))
    return out


def _run(make, objective, batches, replayed: bool, after_step=None, with_model: bool = False):
    """Losses and gradients of consecutive Adam steps on ``batches``, from one seed, the
    loss replayed (``ReplayedLoss``, refreshed before each step as the driver does) or
    built by Pyro at every step; and the replayer (and the model)."""
    torch.manual_seed(0)
    m = make()
    obj = build_objective(*objective)
    obj.loss(m, *batches[0])  # (lazily built parameters made, as the driver's warm-up pass does)
    params = list(m.parameters())
    opt = torch.optim.Adam(params, lr=0.01)
    r = replay.ReplayedLoss(obj, m) if replayed else None
    out = []
    torch.manual_seed(1)
    with pyro.validation_enabled(False), common.checked_rows(binary=True):
        for i, (x, rows) in enumerate(batches):
            params = list(m.parameters())
            for p in params:
                p.grad = None
            if r is not None:
                r.refresh()
                loss = r(x, rows)
            else:
                with batch(m, x, rows):
                    loss = obj(m.model, m.guide, x)
            loss.backward()
            out.append((loss.detach().clone(), [None if p.grad is None else p.grad.clone() for p in params]))
            opt.step()
            if after_step is not None:
                after_step(m, i)
    return (out, r, m) if with_model else (out, r)


def _same(a, b) -> bool:
    return all(torch.equal(la, lb) and all((u is None and v is None) or torch.equal(u, v) for u, v in zip(ga, gb))
               for (la, ga), (lb, gb) in zip(a, b, strict=True))


CASES = {
    "vae elbo": ("vae", {"latent_dim": 3, "hidden": [16]}, ("elbo", 1), "binary"),
    "vae per-datapoint elbo-analytic": ("vae", {"latent_dim": 3, "hidden": [16], "guide": "per-datapoint"},
                                        ("elbo-analytic", 1), "binary"),
    "gmvae iwae K=3": ("gmvae", {"latent_dim": 3, "hidden": [16], "n_components": 4}, ("iwae", 3), "binary"),
    "vae gaussian renyi": ("vae", {"latent_dim": 3, "hidden": [16], "likelihood": "gaussian"}, ("renyi", 4, 0.5),
                           "real"),
    "vae continuous-bernoulli": ("vae", {"latent_dim": 3, "hidden": [16], "likelihood": "continuous-bernoulli"},
                                 ("elbo", 2), "grey"),
    "ppca elbo-analytic": ("ppca", {"latent_dim": 2}, ("elbo-analytic", 1), "real"),
    "ppca per-datapoint iwae": ("ppca", {"latent_dim": 2, "guide": "per-datapoint"}, ("iwae", 2), "real"),
    "gaussian structured elbo": ("gaussian", {"guide": "structured"}, ("elbo", 1), "real"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_steps_are_the_eager_steps_bit_for_bit(digits, case):
    name, config, objective, kind = CASES[case]
    x = {"binary": (digits.train[:120] > 0.5).float(), "grey": digits.train[:120],
         "real": digits.train[:120, 20:24] * 4.0 + 1.0}[kind]
    if name == "gaussian":
        x = x[:, :2]
    make = lambda: models.build_model(name, config, x.shape[1], x.shape[0])  # noqa: E731
    sizes = [40, 40, 25, 40, 25, 25, 40, 40, 25, 40]  # two shapes: each recorded, checked, then replayed
    eager, _ = _run(make, objective, _batches(x, sizes), replayed=False)
    replayed, r = _run(make, objective, _batches(x, sizes), replayed=True)
    assert r.refused == {} and r.replays == len(sizes) - 2  # all but each shape's first (recorded) batch
    # the same operations on the same numbers, the same draws in the same order: equal floats
    assert _same(eager, replayed)


def test_iwae_dreg_keeps_the_eager_loss_its_hooks_cannot_be_replayed(digits):
    # DReG reweights the gradient by a hook on the draws: a recording holds the operations,
    # not the hook, so the check finds a different gradient and the eager loss stays
    x = (digits.train[:60] > 0.5).float()
    make = lambda: models.build_model("vae", {"latent_dim": 3, "hidden": [16]}, 64, 60)  # noqa: E731
    batches = _batches(x, [30] * 5)
    eager, _ = _run(make, ("iwae-dreg", 4), batches, replayed=False)
    replayed, r = _run(make, ("iwae-dreg", 4), batches, replayed=True)
    assert r.replays == 0 and "gradient" in next(iter(r.refused.values()))
    assert _same(eager, replayed)


# ------------------------------------------------------------------ what the recording refuses


class RoundStraightThrough(torch.autograd.Function):
    """round(h) forward, the identity backward: an autograd function of its own."""

    @staticmethod
    def forward(ctx, h):
        return h.round()

    @staticmethod
    def backward(ctx, g):
        return g


class Toy(PyroModule):
    """z_i ~ N(0, I), x_i ~ N(z_i + loc, w^2), q(z_i | x_i) = N(A x_i + b, I); ``quirk`` adds
    what a recording cannot replay."""

    data_plate, max_plate_nesting, static_steps = "data", 1, True

    def __init__(self, quirk: str | None, n_data: int = 60, d: int = 3):
        super().__init__()
        self.quirk, self.n_data, self.data_dim = quirk, n_data, d
        self.loc = torch.nn.Parameter(torch.zeros(d))
        self.enc = torch.nn.Linear(d, d)
        self.calls = 0
        if quirk == "batchnorm":
            self.bn = torch.nn.BatchNorm1d(d)
        if quirk == "no-grad-average":
            self.register_buffer("average", torch.zeros(d))

    def model(self, x):
        w = 1.0
        if self.quirk == "branch" and x.sum() > 0:  # a tensor's value read into Python
            w = 2.0
        if self.quirk == "tolist" and x.sum().tolist() > 0:  # a value read without an ATen operation
            w = 2.0
        if self.quirk == "mask":  # a shape that depends on values
            w = 1.0 + (x > 0).nonzero().shape[0] / 1000
        if self.quirk == "counter":  # a Python value that changes between steps
            self.calls += 1
            w = 1.0 + self.calls / 10
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.data_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + self.loc, w).to_event(1), obs=x)

    def guide(self, x):
        h = self.enc(x)
        if self.quirk == "numpy":  # random numbers that are not torch's
            h = h + torch.as_tensor(np.random.randn(), dtype=h.dtype)
        if self.quirk == "straight-through":  # a backward of its own
            h = RoundStraightThrough.apply(h)
        if self.quirk == "batchnorm":  # its statistics updated in place at every step
            h = self.bn(h)
        if self.quirk == "no-grad-average":  # a running average kept without gradients
            with torch.no_grad():
                self.average.mul_(0.9).add_(0.1 * h.mean(0))
        if self.quirk == "generator":  # a generator of its own, which the check cannot rewind
            h = h + 0.1 * torch.randn(h.shape, generator=GEN)
        if self.quirk == "foreign":  # a tensor with a gradient that is not the model's parameter
            h = h + FOREIGN
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h, 1.0).to_event(1))


FOREIGN = torch.zeros(3, requires_grad=True)
GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("quirk,why", [(None, None), ("batchnorm", None), ("branch", "reads a tensor's value"),
                                       ("tolist", "Tensor.tolist"), ("mask", "shape depends on values"),
                                       ("no-grad-average", "without gradients"),
                                       ("counter", "is not the eager loss"), ("numpy", "is not the eager loss"),
                                       ("generator", "is not the eager loss"),
                                       ("straight-through", "gradient"), ("foreign", "not a parameter")])
def test_a_recording_that_cannot_stand_for_the_loss_is_refused(quirk, why):
    x = torch.randn(60, 3)
    batches = _batches(x, [20] * 6)
    np.random.seed(0)
    eager, _, m_eager = _run(lambda: Toy(quirk), ("elbo", 1), batches, replayed=False, with_model=True)
    np.random.seed(0)
    replayed, r, m_replayed = _run(lambda: Toy(quirk), ("elbo", 1), batches, replayed=True, with_model=True)
    if why is None:  # the plain toy is replayed
        assert r.replays == 5 and not r.refused
    else:
        assert r.replays == 0 and why in next(iter(r.refused.values()))
    if quirk not in ("counter", "numpy", "generator"):  # (these count their calls: the check adds some)
        assert _same(eager, replayed)
        for (n, a), (_, b) in zip(m_eager.named_buffers(), m_replayed.named_buffers(), strict=True):
            assert torch.equal(a, b), n  # (the check's own runs leave a BatchNorm's statistics as they were)


def test_a_replaced_parameter_drops_the_recordings():
    x = torch.randn(60, 3)
    batches = _batches(x, [20] * 8)

    def replace_loc(m, step):
        if step == 3:  # (as a callback between batches might)
            m.loc = torch.nn.Parameter(m.loc.detach() + 1.0)

    eager, _ = _run(lambda: Toy(None), ("elbo", 1), batches, replayed=False, after_step=replace_loc)
    replayed, r = _run(lambda: Toy(None), ("elbo", 1), batches, replayed=True, after_step=replace_loc)
    assert _same(eager, replayed)
    assert r.replays == 8 - 2  # recorded at the first step and again at the fifth (after the replacement)


def test_a_nan_in_the_check_is_a_difference_not_a_crash():
    assert not replay._close(torch.tensor(float("nan")), torch.tensor(3.0))
    assert replay._close(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))


def test_the_checked_rows_statement_holds_in_its_own_thread_only():
    import threading

    grey = torch.rand(4, 5)
    d = common.BernoulliLogits(logits=torch.randn(3, 4, 5), validate_args=False)
    general = grey * d.logits - torch.nn.functional.softplus(d.logits)
    inside, seen = threading.Event(), []

    def other():
        inside.wait()
        seen.append(torch.allclose(d.log_prob(grey), general))

    t = threading.Thread(target=other)
    t.start()
    with common.checked_rows(binary=True):
        inside.set()
        t.join()
    assert seen == [True]  # the other thread read its values: the statement was not its own


def test_batch_shapes_beyond_the_limit_keep_the_eager_loss(digits):
    x = (digits.train[:100] > 0.5).float()
    make = lambda: models.build_model("vae", {"latent_dim": 2, "hidden": [8]}, 64, 100)  # noqa: E731
    sizes = [10 + s for s in range(replay.MAX_GRAPHS + 2)] * 3
    eager, _ = _run(make, ("elbo", 1), _batches(x, sizes), replayed=False)
    replayed, r = _run(make, ("elbo", 1), _batches(x, sizes), replayed=True)
    assert sum(g is not None for g in r.graphs.values()) == replay.MAX_GRAPHS
    assert r.replays == 2 * replay.MAX_GRAPHS  # the recorded shapes' second (checked) and third rounds
    assert _same(eager, replayed)


# ------------------------------------------------------------------ in the driver


def test_the_driver_replays_a_users_model_only_when_it_declares_static_steps(monkeypatch):
    made = []

    class Counting(replay.ReplayedLoss):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self)

    monkeypatch.setattr(lightning_module, "ReplayedLoss", Counting)
    torch.manual_seed(0)
    X = torch.randn(300, 2) * 3 + 5

    def model(X):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("obs", dist.Normal(loc, 3.0).to_event(1), obs=X)

    def fitted(static: bool):
        model.static_steps = static
        pyro.clear_param_store()
        torch.manual_seed(1)
        run = elbolab.fit(model, AutoNormal(model), X, steps=40, batch_size=100, progress=False)
        return [h["loss"] for h in run.history]

    plain = fitted(False)
    assert made == []  # not declared: every step's loss built by Pyro
    declared = fitted(True)
    assert len(made) == 1 and made[0].replays == 40 - 2 and not made[0].refused
    assert declared == plain  # the same steps


def test_checked_rows_skip_the_checks_not_the_numbers():
    logits = torch.randn(3, 4, 5)
    binary = (torch.rand(4, 5) < 0.5).float()
    grey = torch.rand(4, 5)
    d = common.BernoulliLogits(logits=logits, validate_args=False)
    general = grey * logits - torch.nn.functional.softplus(logits)
    plain = d.log_prob(binary)
    assert torch.allclose(d.log_prob(grey), general)  # the values read: grey levels get the general formula
    with common.checked_rows(binary=True):
        assert torch.equal(d.log_prob(binary), plain)  # the same formula, without reading the values
        assert not torch.allclose(d.log_prob(grey), general)  # (the caller's word is taken: nothing read)
    with common.checked_rows(binary=False):  # not known binary: read, as outside
        assert torch.allclose(d.log_prob(grey), general)
    table = common.PerDatapointNormal(10, 2)
    with pytest.raises(ValueError, match="row index 12"):
        table.dist(torch.tensor([1, 12]))
    with common.checked_rows(binary=False):  # the driver's rows: positions in its training set
        assert table.dist(torch.tensor([1, 9])).batch_shape == (2,)


def test_binary_rows_are_decided_from_the_whole_training_set(digits):
    d = loaders.load_dataset("digits", binarize="threshold")
    assert lightning_module.binary_rows(d.train, dynamic=False)
    assert lightning_module.binary_rows(digits.train, dynamic=True)  # grey levels, drawn to 0/1 per batch
    assert not lightning_module.binary_rows(digits.train, dynamic=False)
    one_grey = d.train.clone()
    one_grey[-1, -1] = 0.5  # in the last chunk
    assert not lightning_module.binary_rows(one_grey, dynamic=False, chunk=100)
