"""scripts/compare_guides.py: its table, numbers and chart on the digits (tiny budgets
here; the default run is the slow test), and its answers to bad input."""

import json
import math
import textwrap

import numpy as np
import pytest
import torch

from elbolab.inference import guide_study
from elbolab.scripts import compare_guides

TINY = ["--epochs", "1", "--n-rows", "20", "--n-samples", "50", "--local-window", "10", "--local-patience", "1",
        "--local-max-steps", "50", "--semi-steps", "2", "--ais-steps", "5", "--ais-chains", "4", "--bdmc-rows", "5",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _check_run(out, families, n_rows, guides_of=None, tables=("per-datapoint", "per-datapoint-full")):
    """The checks every run passes; ``tables``: the guides that cannot infer test rows."""
    m = json.loads((out / "metrics.json").read_text())
    assert m["units"] == "nats per datapoint" and sorted(m["models"]) == sorted(families)
    md = (out / "compare.md").read_text()
    assert (out / "gaps.png").stat().st_size > 20_000  # a real figure
    for fam in families:
        guides = m["models"][fam]["guides"]
        assert list(guides) == list((guides_of or guide_study.GUIDES)[fam])
        for guide, r in guides.items():
            assert r["training"]["steps"] > 0 and r["training"]["seconds"] > 0
            for split in ("train", "test"):
                s = r[split]
                assert s["n_rows"] == n_rows and f"| {guide} | {split} ({n_rows}) |" in md
                # inference gap = approximation gap + amortization gap, row by row, so in the means
                # (float64 sums of per-row values: round-off)
                assert s["inference_gap"]["mean"] == pytest.approx(
                    s["approximation_gap"]["mean"] + s["amortization_gap"]["mean"], abs=1e-9)
                assert all(math.isfinite(s[k]["se"]) for k in ("elbo", "iwae", "inference_gap"))
                assert s["inference_seconds_per_row"] > 0
                ll = s["log_likelihood"]
                assert ll["estimator"] == s["log_likelihood_estimator"] and isinstance(ll["reliable"], bool)
                assert s["reliable"] == all(s[k].get("reliable", True) is not False for k in (
                    "log_likelihood", "elbo", "iwae", "elbo_star", "iwae_star", "inference_gap",
                    "approximation_gap", "amortization_gap"))
                if fam == "ppca":  # exact: q* cannot beat the best member of its family (round-off)
                    assert s["exact"] and s["approximation_gap"]["mean"] >= s["approximation_gap_closed_form"] - 1e-9
                    assert ll["estimator"] == "exact" and ll["reliable"] and "bdmc" not in s
                    continue
                assert not s["exact"]
                if ll["estimator"] == "is":  # IWAE_K >= ELBO draw by draw, and log p(x) is the larger IWAE
                    assert s["inference_gap"]["mean"] >= 0 and s["approximation_gap"]["mean"] >= 0
                    assert ll["reliable"] or m["ais"]["when"] == "never"  # an unreliable IS number is replaced
                else:  # AIS from q*: above L[q*] in expectation (3 standard errors of the paired gap)
                    assert ll["estimator"] == "ais" and s["ais"]["chains"] == m["ais"]["chains"]
                    assert s["approximation_gap"]["mean"] >= -3 * s["approximation_gap"]["se"]
                    assert m["ais"]["when"] == "always" or s["log_likelihood_is"]["reliable"] is False
                    # the AIS number is flagged as its BDMC check says, and so are the gaps drawn from it
                    assert ll["reliable"] == s["bdmc"]["reliable"] == s["approximation_gap"]["reliable"]
                    assert s["bdmc"]["n_rows"] == m["ais"]["bdmc_rows"] and "gap" in s["bdmc"]
                    assert s["ais_minus_is"]["mean"] == pytest.approx(ll["mean"] - s["log_likelihood_is"]["mean"],
                                                                      abs=1e-9)
                    assert f"| {guide} | {split} ({n_rows}) | {ll['mean']:.3f} ± {ll['se']:.3f} |" in md
            if guide in tables:  # no encoder: test rows are inferred by the optimization
                t = r["test"]
                assert t["inference"] == "local optimization" and t["amortization_gap"]["mean"] == 0.0
            else:
                assert r["test"]["inference"] == "guide"
            if guide == "flow":  # q* of the flow family: per-row flows as deep as the guide
                assert r["test"]["local"]["family"] == "flow"
                assert r["test"]["local"]["layers"] == m["flow"]["layers"]
    return m


def test_compare_guides_all_models_on_digits(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_guides.main(["--model", "all", *TINY, "--out", str(out)]) == 0
    m = _check_run(out, ("ppca", "vae", "gmvae"), 20)
    full = m["models"]["ppca"]["guides"]["per-datapoint-full"]["train"]
    assert full["approximation_gap_closed_form"] == 0.0 and full["local"]["full"]
    assert "| guide | training steps |" in capsys.readouterr().out


def test_ais_always_and_never(tmp_path):
    """--ais always: every VAE log p(x) from AIS; --ais never: importance sampling only,
    flagged where its Pareto k says so. The same trained model and draws otherwise."""
    got = {}
    for when in ("always", "never"):
        out = tmp_path / when
        argv = ["--model", "vae", "--guides", "amortized", "--ais", when, *TINY, "--out", str(out)]
        assert compare_guides.main(argv) == 0
        m = _check_run(out, ("vae",), 20, {"vae": ("amortized",)})
        got[when] = m["models"]["vae"]["guides"]["amortized"]
    for split in ("train", "test"):
        a, n = got["always"][split], got["never"][split]
        assert a["log_likelihood_estimator"] == "ais" and n["log_likelihood_estimator"] == "is"
        assert "bdmc" not in n and "log_likelihood_is" not in n
        # the IS number AIS stands beside is --ais never's log p(x) (float64 round-off)
        assert a["log_likelihood_is"]["mean"] == pytest.approx(n["log_likelihood"]["mean"], abs=1e-9)
        assert a["elbo"]["mean"] == pytest.approx(n["elbo"]["mean"], abs=1e-9)


USER_VAE = textwrap.dedent("""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.nn import PyroModule


    class VAE(PyroModule):
        # a small Gaussian VAE as a Pyro user writes it: k = 2, a linear encoder
        def __init__(self, data_dim, n_data):
            super().__init__()
            self.enc = torch.nn.Linear(data_dim, 4)
            self.dec = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, data_dim))

        def model(self, x):
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.dec(z), 0.3).to_event(1), obs=x)

        def guide(self, x):
            h = self.enc(x)
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Normal(h[:, :2], torch.nn.functional.softplus(h[:, 2:]) + 1e-3).to_event(1))


    def model(x):
        # the same kind of generative model as a function (its guide given by --guide)
        dec = pyro.module("dec", torch.nn.Linear(2, x.shape[1]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), 0.3).to_event(1), obs=x)
""")


@pytest.fixture
def user_files(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 2))
    x = np.tanh(z @ rng.normal(size=(2, 6))) + 0.3 * rng.normal(size=(300, 6))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    (tmp_path / "mine.py").write_text(USER_VAE)
    return tmp_path / "mine.py", tmp_path / "x.npy"


def test_compare_guides_on_a_user_model(tmp_path, user_files, capsys):
    """A PyroModule VAE of the user's (model and guide methods) on a .npy matrix: its own
    guide and every generic guide that applies to a Gaussian encoder, the same checks as
    for the built-in models, and the table says what applies."""
    src, data = user_files
    out = tmp_path / "cmp"
    ref = f"{src}:VAE"
    assert compare_guides.main(["--model", ref, "--data", str(data), *TINY, "--out", str(out)]) == 0
    m = _check_run(out, (ref,), 20, {ref: guide_study.USER_GUIDES})
    res = m["models"][ref]
    assert res["model_config"] == {"model": ref, "guide": "its own", "plate": "data"}
    assert res["data"]["n_train"] == 240 and res["data"]["data_dim"] == 6  # 300 rows: 80/10/10
    md = (out / "compare.md").read_text()
    assert f"## {ref} on " in md and "semi-amortized refinement and the flow on it apply" in md
    assert "Gaussian encoder" in capsys.readouterr().err


def test_user_model_function_with_a_per_row_guide_gets_what_applies(tmp_path, user_files, capsys):
    """A model function with AutoNormal (a table over the rows, not an encoder): only its own
    guide and the per-datapoint table apply; asking for the flow is refused before training."""
    src, data = user_files
    ref = f"{src}:model"
    out = tmp_path / "refused"
    assert compare_guides.main(["--model", ref, "--guide", "auto-normal", "--data", str(data), "--guides",
                                "own,flow", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--guides: flow does not apply" in err and "does not infer new rows" in err and len(err.splitlines()) == 1
    assert not out.exists()
    out = tmp_path / "cmp"
    assert compare_guides.main(["--model", ref, "--guide", "auto-normal", "--data", str(data), *TINY,
                                "--out", str(out)]) == 0
    _check_run(out, (ref,), 20, {ref: ("own", "per-datapoint")}, tables=("own", "per-datapoint"))


def test_every_guide_of_a_user_model_starts_from_the_same_parameters(user_files):
    src, data = user_files
    args = compare_guides.build_parser().parse_args(["--model", f"{src}:VAE", "--data", str(data), "--out", "x"])
    sub, = compare_guides.subjects(args)
    first = sub.build("own")
    initial = {k: v.clone() for k, v in first.state_dict().items()}
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)  # as training would move them
    flow = sub.build("flow")
    assert flow.base is first  # the same model, reset
    for k, v in first.state_dict().items():
        assert torch.equal(v, initial[k]), k


@pytest.mark.parametrize("argv, message", [
    (["--guides", "nope"], "unknown guide(s) nope"),
    (["--model", "ppca", "--guides", "flow"], "--guides flow: none applies to ppca"),
    (["--model", "vae", "--guide", "auto-normal"], "--guide applies to a model of yours"),
    (["--model", "nope"], "choose one of ppca, vae, gmvae, all"),
    (["--model", "missing.py:VAE"], "no such file missing.py"),
    (["--model", "vae", "--flow-hidden", "2"], "must be at least the latent dimension 4"),
    (["--ais-steps", "0"], "--ais-steps: must be >= 1"),
    (["--local-decay", "1.5"], "--local-decay must be in (0, 1]"),
    (["--local-patience", "-1"], "--local-patience must be >= 0"),
    (["--model", "vae", "--activation", "gelu"], "activation must be one of"),
    (["--model", "ppca", "--latent-dim", "100"], "latent_dim 100 is larger than the data dimension 64"),
    (["--dataset", "mnist"], "dataset mnist needs data_dir"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "cmp"
    code = compare_guides.main(argv + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing created


def test_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.md").write_text("precious")
    assert compare_guides.main(["--out", str(out), *TINY]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "compare.md").read_text() == "precious"


@pytest.mark.slow
def test_default_run_on_digits(tmp_path):
    """The default command (what the report runs): every gap of the VAEs non-negative within
    3 standard errors; PPCA's q* within 0.02 nats of the closed-form approximation gap; the
    semi-amortized VAE's test ELBO above the amortized one's."""
    out = tmp_path / "cmp"
    assert compare_guides.main(["--out", str(out), "--threads", "1"]) == 0
    m = _check_run(out, ("ppca", "vae", "gmvae"), 100)
    for fam in ("vae", "gmvae"):
        for r in m["models"][fam]["guides"].values():
            for split in ("train", "test"):
                for k in ("inference_gap", "approximation_gap", "amortization_gap"):
                    assert r[split][k]["mean"] >= -3 * r[split][k]["se"], (fam, split, k)
        g = m["models"][fam]["guides"]
        a, t = g["amortized"]["test"]["amortization_gap"], g["amortized"]["test"]
        assert a["mean"] > 3 * a["se"]  # q* improves on the encoder's test ELBO
        assert g["semi-amortized"]["test"]["elbo"]["mean"] > t["elbo"]["mean"]
        # Cremer et al.'s pattern: the flow family's q* is closer to the posterior than the
        # Gaussian's (measured 0.02 against 0.085 nats), beyond 3 standard errors (two models: unpaired)
        fl, ga = g["flow"]["test"]["approximation_gap"], t["approximation_gap"]
        assert ga["mean"] - fl["mean"] > 3 * math.hypot(ga["se"], fl["se"])
        for guide, r in g.items():  # the digits' IS is unreliable: log p(x) by AIS, checked by BDMC
            for split in ("train", "test"):
                s = r[split]
                assert s["log_likelihood_estimator"] == "ais", (fam, guide, split)
                # BDMC's gap at the default budget: measured -0.007 to 0.034 nats
                assert s["bdmc"]["gap"]["mean"] < 0.1, (fam, guide, split)
                # and it vouches for the encoders' models (the per-datapoint models' posteriors are
                # harder: a few simulated rows widen the gap's standard error to ~0.05, and their
                # AIS may be flagged)
                assert s["log_likelihood"]["reliable"] or guide == "per-datapoint", (fam, guide, split)
                # AIS and IS agree to a few hundredths of a nat here (measured |AIS - IS| < 0.04)
                assert abs(s["ais_minus_is"]["mean"]) < 0.06, (fam, guide, split)
    for guide, r in m["models"]["ppca"]["guides"].items():
        for split in ("train", "test"):
            s = r[split]
            # q*'s optimizer residual: measured 0.004-0.014 nats with the default settings
            assert s["approximation_gap"]["mean"] - s["approximation_gap_closed_form"] < 0.02, (guide, split)
