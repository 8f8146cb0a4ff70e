"""The Python API on users' own models: elbolab.fit, Run, load_run,
importance_log_likelihood, compare_guides, and the one import name."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

import elbolab
from elbolab.inference import traces
from elbolab.inference.errors import UsageError
from elbolab.inference.usermodel import UserModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small models: threads only contend (the conftest restores the count)


# ----------------------------------------------------------------------------- a Bayesian linear regression

BLR = '''
import json, sys
import torch, pyro, pyro.distributions as dist
from pyro.infer.autoguide import AutoMultivariateNormal
import models            # this directory's own package, not elbolab's
import elbolab

torch.manual_seed(0)
N, P, NOISE = 200, 3, 0.5
X = torch.randn(N, P)
y = X @ torch.tensor([1.5, -2.0, 0.5]) + 1.0 + NOISE * torch.randn(N)

def model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(P), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(X)):
        pyro.sample("y", dist.Normal(X @ w + b, NOISE), obs=y)

guide = AutoMultivariateNormal(model)
run = elbolab.fit(model, guide, X, y, batch_size=50, steps=3000, lr=0.05, lr_final=5e-4, progress=False)
post = guide.get_posterior()
json.dump({"loc": post.loc.tolist(), "cov": post.covariance_matrix.tolist(), "X": X.tolist(), "y": y.tolist(),
           "user_models": models.__file__, "elbolab_models": elbolab.models.__file__,
           "steps": run.result.steps}, sys.stdout)
'''


def test_bayesian_linear_regression_from_a_project_with_its_own_models_package(tmp_path):
    """A script in a directory with its own ``models`` package fits a Bayesian linear
    regression written in plain Pyro (AutoMultivariateNormal) through elbolab.fit, on
    mini-batches of 50 of 200 rows; the guide holds the exact conjugate posterior."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("OWN = True\n")
    (tmp_path / "fit_blr.py").write_text(BLR)
    r = subprocess.run([sys.executable, "fit_blr.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["user_models"] == str(tmp_path / "models" / "__init__.py")  # the user's package stays theirs
    assert out["elbolab_models"].startswith(ROOT)
    X, y = torch.tensor(out["X"], dtype=torch.float64), torch.tensor(out["y"], dtype=torch.float64)
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)  # (w, b): prior precisions 1 and 1/4
    precision = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.25], dtype=torch.float64)) + Xa.T @ Xa / 0.5**2
    cov = torch.linalg.inv(precision)
    mean = cov @ Xa.T @ y / 0.5**2
    q_loc, q_cov = torch.tensor(out["loc"], dtype=torch.float64), torch.tensor(out["cov"], dtype=torch.float64)
    sd = cov.diagonal().sqrt()
    # measured at 3000 steps (two seeds, whole and 50-row batches): means within 0.15 posterior
    # sd, sd ratios 0.97-1.37 (the intercept's slowest): 0.3 sd and [0.8, 1.5] leave room for
    # SVI's noise, while a wrong N/B scale (batches of 50 of 200) would put every sd off by 2x
    assert float(((q_loc - mean) / sd).abs().max()) < 0.3
    ratio = (q_cov.diagonal() / cov.diagonal()).sqrt()
    assert float(ratio.min()) > 0.8 and float(ratio.max()) < 1.5, ratio
    kl = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(q_loc, q_cov),
                                           torch.distributions.MultivariateNormal(mean, cov))
    assert float(kl) < 0.3  # measured 0.03-0.15


def test_the_distribution_installs_one_import_name():
    top = importlib.metadata.distribution("elbolab").read_text("top_level.txt")
    assert top is not None and top.split() == ["elbolab"]
    entry = {e.name: e.value for e in importlib.metadata.distribution("elbolab").entry_points}
    assert entry == {"elbolab": "elbolab.scripts.cli:main"}


# ----------------------------------------------------------------------------- mini-batches of a user's model


def _data(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("declared", ["batch", "full"])
def test_a_batch_is_scaled_to_the_data_set_and_indexed_by_its_rows(declared):
    """The loss of a mini-batch is N/B times the batch's log densities inside the plate,
    whether the plate is declared with len(x) (the batch) or with the data set's size N;
    the plate's indices are the rows' positions in the data set; a global site is not
    scaled. A deterministic guide (point masses) makes the loss exact."""
    X, y = _data()
    N = len(X)
    seen = []

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))
        with pyro.plate("data", len(X) if declared == "batch" else N) as rows:
            seen.append(rows.clone())
            z = pyro.sample("z", dist.Normal(torch.zeros(len(X), dtype=torch.float64), 1.0))
            pyro.sample("y", dist.Normal(X @ w + z, 1.0), obs=y)

    table = torch.linspace(-1, 1, N, dtype=torch.float64)  # a per-row value, indexed by the plate

    def guide(X, y):
        pyro.sample("w", dist.Delta(torch.full((3,), 0.5, dtype=torch.float64)).to_event(1))
        with pyro.plate("data", len(X) if declared == "batch" else N) as rows:
            pyro.sample("z", dist.Delta(table[rows]))

    um = UserModel(model, guide, (X, y))
    um.prepare()
    assert um.n_data == N and um.data_dim == 4  # a row: X's 3 columns and y's one
    idx = torch.tensor([3, 7, 8, 15, 22])
    xb = um.rows[idx]
    seen.clear()
    loss = elbolab.inference.objectives.build_objective("elbo").loss(um, xb, idx)
    assert torch.equal(seen[-1], idx)  # the plate's indices: positions in the data set
    w = torch.full((3,), 0.5, dtype=torch.float64)
    z = table[idx]
    local = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(X[idx] @ w + z, 1.0).log_prob(y[idx])
    want = -(dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).log_prob(w).sum() + N / len(idx) * local.sum())
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)  # float64: round-off only


def test_a_model_without_its_plate_or_data_is_refused_in_one_line():
    X, y = _data()

    def no_plate(X, y):
        pyro.sample("y", dist.Normal(X.sum(-1), 1.0).to_event(1), obs=y)

    with pytest.raises(UsageError, match=r"builds no pyro.plate\('data'"):
        UserModel(no_plate, no_plate, (X, y))

    def model(X, y):
        with pyro.plate("obs", len(X)):
            pyro.sample("y", dist.Normal(X.sum(-1), 1.0), obs=y)

    with pytest.raises(UsageError, match=r"no argument of the model has 7 rows"):
        UserModel(lambda X, y: model(X[:7], y[:7]), model, (X, y), plate="obs")
    um = UserModel(model, lambda X, y: None, (X, y), plate="obs")
    assert um.n_data == len(X)
    with pytest.raises(UsageError, match="rows of shape"):
        um.pack(torch.zeros(5, 4), torch.zeros(5))


def test_a_model_that_does_not_vectorize_draws_its_particles_one_at_a_time():
    """``X @ w`` with w a latent breaks under a particles plate (Pyro users write such
    models); several particles are then drawn one at a time, and the IWAE bound is the
    same estimator: ELBO <= IWAE_K, and with a guide equal to the exact posterior every
    weight is log p(y), exactly."""
    X, y = _data(n=30)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))
        with pyro.plate("data", len(X)):
            pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)

    guide = AutoMultivariateNormal(model)
    um = UserModel(model, guide, (X, y))
    um.prepare()
    assert um.sequential_particles
    lw = traces.whole_set_log_weights(um, um.rows, None, 7)
    assert lw["log_q"].shape == (7,) and torch.isfinite(lw["log_q"]).all()
    # set q to the exact posterior N(S X^T y, S), S = (I + X^T X)^-1: log p(y, w) - log q(w) = log p(y)
    S = torch.linalg.inv(torch.eye(3, dtype=torch.float64) + X.T @ X)
    L = torch.linalg.cholesky(S)
    with torch.no_grad():  # AutoMultivariateNormal's scale_tril is unit lower-triangular, rows scaled by scale
        guide.loc.copy_(S @ X.T @ y)  # an nn.Parameter; the other two are PyroParams (set by assignment)
        guide.scale = L.diagonal()
        guide.scale_tril = L / L.diagonal()[:, None]
    lw = traces.whole_set_log_weights(um, um.rows, None, 5)
    log_w = lw["log_lik"] + lw["log_prior"] - lw["log_q"]
    exact = torch.distributions.MultivariateNormal(torch.zeros(30, dtype=torch.float64),
                                                   torch.eye(30, dtype=torch.float64) + X @ X.T).log_prob(y)
    torch.testing.assert_close(log_w, exact.expand(5), rtol=0, atol=1e-8)  # float64 round-off


# ----------------------------------------------------------------------------- Run, save, load


def _ppca_user_model(d=5, k=2):
    """A probabilistic PCA written as Pyro users write it: pyro.param, a plate over the rows."""

    def model(x):
        W = pyro.param("W", lambda: 0.1 * torch.randn(d, k))
        loc = pyro.param("loc", lambda: torch.zeros(d))
        scale = pyro.param("scale", lambda: torch.ones(()), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(k), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + loc, scale).to_event(1), obs=x)

    return model


def test_run_save_load_and_evaluate_round_trip(tmp_path):
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.randn(120, 5) @ torch.randn(5, 5) + 3.0
    model = _ppca_user_model()
    guide = AutoNormal(model)  # a per-datapoint guide: z of each row, indexed by the plate
    run = elbolab.fit(model, guide, x, steps=300, progress=False, out=str(tmp_path / "run"))
    assert set(os.listdir(tmp_path / "run")) >= {"config.json", "checkpoint.ckpt", "metrics.json", "history.csv",
                                                  "arguments.pt"}
    assert run.metrics["quantities"]["train_elbo"]["value"] < 0 and len(run.history) == 300
    trained = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    first = run.evaluate(num_samples=50, seed=3)
    # a fresh session: the store emptied, the model and guide made anew, the run read back
    pyro.clear_param_store()
    loaded = elbolab.load_run(str(tmp_path / "run"), model, AutoNormal(model))
    for name, value in trained.items():
        torch.testing.assert_close(pyro.param(name).detach(), value, rtol=0, atol=0)
    again = loaded.evaluate(num_samples=50, seed=3)
    assert again["log_likelihood"]["value"] == pytest.approx(first["log_likelihood"]["value"], abs=1e-9)
    assert first["log_likelihood"]["value"] >= first["elbo"]["value"]  # Jensen, same draws
    with pytest.raises(UsageError, match="give its model and guide"):
        elbolab.load_run(str(tmp_path / "run"))


def test_a_built_in_model_fit_from_python_saves_loads_and_evaluates(tmp_path):
    """elbolab.fit(PPCA(...), x, out=...) writes a run that load_run rebuilds (its rows
    saved beside it) and the command line evaluates; the numbers are the same model's."""
    from elbolab.models import ppca as ppca_family
    from elbolab.scripts import evaluate as evaluate_script

    torch.manual_seed(0)
    x = torch.randn(200, 5) @ torch.randn(5, 5) * 3 + 10  # offsets and scales far from 0 and 1
    model = elbolab.models.PPCA(elbolab.models.PPCAConfig(latent_dim=2), 5, 200)
    run = elbolab.fit(model, x, steps=200, progress=False, out=str(tmp_path / "run"))
    loaded = elbolab.load_run(str(tmp_path / "run"))
    for k, v in run.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    first = run.evaluate(x[:40], num_samples=300, seed=1)["log_likelihood"]
    again = loaded.evaluate(x[:40], num_samples=300, seed=1)["log_likelihood"]
    assert again["value"] == first["value"]
    with torch.no_grad():
        exact = float(ppca_family.log_marginal(x[:40].double(), loaded.model.W.double(), loaded.model.loc.double(),
                                               loaded.model.noise_scale.double()).mean())
    # the amortized full-covariance guide is near PPCA's exact posterior after 200 steps: the
    # importance estimate is then within a few of its standard errors of the exact value
    assert abs(first["value"] - exact) < 4 * first["se"] + 0.02
    assert evaluate_script.main([str(tmp_path / "run"), "--split", "train", "--n-samples", "50",
                                 "--out", str(tmp_path / "ev"), "--threads", "1"]) == 0
    with open(tmp_path / "ev" / "evaluation.json") as f:
        assert json.load(f)["quantities"]["log_likelihood"]["n"] == 200


def test_importance_log_likelihood_of_a_user_model_is_exact_at_the_posterior():
    """PPCA written in plain Pyro with a hand-written guide equal to the exact posterior:
    every importance weight is p(x_i), so the estimate is the closed-form log-likelihood
    and every row's Pareto k is -inf (a point mass)."""
    from elbolab.models import ppca

    torch.manual_seed(1)
    d, k = 5, 2
    x = (torch.randn(60, k) @ torch.randn(k, d) + 0.3 * torch.randn(60, d)).double()
    W, loc, noise_scale = ppca.mle(x, k)
    gain = torch.linalg.solve(W.T @ W + noise_scale**2 * torch.eye(k, dtype=torch.float64), W.T)
    post_cov = noise_scale**2 * torch.linalg.inv(W.T @ W + noise_scale**2 * torch.eye(k, dtype=torch.float64))

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(k, dtype=torch.float64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + loc, noise_scale).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal((x - loc) @ gain.T, post_cov))

    est = elbolab.importance_log_likelihood(model, guide, x, num_samples=30)
    exact = ppca.log_marginal(x, W, loc, noise_scale)
    torch.testing.assert_close(est["values"], exact, rtol=0, atol=1e-9)  # float64 round-off
    assert est["pareto_k"]["n_constant_weights"] == 60


def test_compare_guides_on_a_user_model():
    """An amortized encoder and a per-datapoint AutoNormal for a plain-Pyro PPCA, each
    trained from the same initial parameters: both are studied on training rows, and q*
    (which starts at q and only keeps steps that improve it) is never worse than q
    beyond 3 standard errors; the model starts each fit where it started the first."""
    pyro.clear_param_store()
    torch.manual_seed(2)
    x = torch.randn(80, 2) @ torch.randn(2, 5) + 0.2 * torch.randn(80, 5)
    model = _ppca_user_model()
    model(x)  # creates the parameters W, loc, scale
    W_initial = pyro.param("W").detach().clone()

    class Encoder(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(5, 4)

        def forward(self, x):
            h = self.net(x)
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Normal(h[:, :2], torch.nn.functional.softplus(h[:, 2:]) + 1e-3).to_event(1))

    out = elbolab.compare_guides(model, {"encoder": Encoder(), "auto-normal": AutoNormal(model)}, x,
                                 n_rows=30, num_samples=200, fit_options={"steps": 200, "progress": False})
    assert set(out) == {"encoder", "auto-normal"}
    for name, r in out.items():
        s = r["train"]
        assert s["n_rows"] == 30 and s["inference"] == "guide"
        # L[q*] >= L[q]: q* starts at q and only takes steps that improve its running loss
        assert s["amortization_gap"]["mean"] >= -3 * s["amortization_gap"]["se"], name
    assert "test" not in out["auto-normal"]  # no held-out rows given
    # the second fit started from the first's initial W, not from where the first ended
    assert not torch.equal(pyro.param("W").detach(), W_initial)


def test_a_built_in_model_refuses_rows_it_cannot_score():
    """elbolab.fit and Run.evaluate check a built-in model's rows as the command line
    does: grey levels for a Bernoulli decoder, values outside [0, 1] for a continuous
    Bernoulli one, a NaN, a wrong width; each one line naming the problem."""
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(40, 6, generator=g)
    vae = lambda likelihood: elbolab.models.VAE(elbolab.models.VAEConfig(latent_dim=2, hidden=(8,),
                                                                         likelihood=likelihood), 6, 40)
    with pytest.raises(UsageError, match="0 and 1|binar"):
        elbolab.fit(vae("bernoulli"), grey, steps=1)
    with pytest.raises(UsageError, match=r"\[0, 1\]|continuous"):
        elbolab.fit(vae("continuous-bernoulli"), grey * 3 - 1, steps=1)
    nan = grey.clone()
    nan[3, 4] = float("nan")
    with pytest.raises(UsageError, match="row 3, column 4"):
        elbolab.fit(vae("gaussian"), nan, steps=1)
    run = elbolab.fit(vae("continuous-bernoulli"), grey, steps=2, progress=False)
    with pytest.raises(UsageError, match="6 columns"):
        run.evaluate(torch.rand(5, 7), num_samples=4)
    assert math.isfinite(run.evaluate(grey[:5], num_samples=4)["log_likelihood"]["value"])
