"""fit.py on the VAEs (test log-likelihood, active units, pictures) and evaluate.py
re-evaluating a run from its checkpoint; their answers to bad input."""

import json

import pytest
import torch
from conftest import read_metrics

from elbolab.scripts import evaluate as evaluate_script
from elbolab.scripts import fit as fit_script

PICTURES = ("loss_curve.png", "prior_samples.png", "reconstructions.png", "latent_means.png")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gmvae_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "gmvae"
    code = fit_script.main(["--model", "gmvae", "--latent-dim", "3", "--hidden", "32", "--activation", "tanh",
                            "--n-components", "5", "--objective", "iwae", "--n-particles", "3", "--epochs", "4",
                            "--lr", "0.003", "--n-samples", "40", "--seed", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_fit_vae_writes_likelihood_active_units_and_pictures(gmvae_run):
    m = read_metrics(gmvae_run)
    ll, same = m["quantities"]["test_log_likelihood"], m["diagnostics"]["test_importance"]
    assert ll["K"] == 40 and ll["n"] == 270 and ll["se"] > 0 and ll["method"] == "importance"
    assert same["elbo"]["value"] <= same["iwae"]["10"]["value"] <= ll["value"]  # same draws: row by row
    assert same["iwae"]["1"]["value"] == pytest.approx(same["elbo"]["value"], abs=1e-9)
    assert sorted(same["iwae"], key=int) == ["1", "10"]  # the m = 10^i dividing K = 40
    # ELBO = recon - KL, each from float32 log densities: agreement to float32 round-off
    assert same["elbo"]["value"] == pytest.approx(same["recon"]["value"] - same["kl"]["value"], rel=1e-6)
    au = m["diagnostics"]["test_active_units"]
    assert au["latent_dim"] == 3 and 0 <= au["active_units"] <= 3
    assert m["config"]["eval"]["n_samples"] == 40
    for f in PICTURES:
        assert (gmvae_run / f).stat().st_size > 5000, f  # a real figure, not an empty file


def test_evaluate_rebuilds_the_run_and_never_touches_its_metrics(gmvae_run, capsys):
    before = (gmvae_run / "metrics.json").read_bytes()
    m = json.loads(before)
    # the fit drew its test estimate with seed (train seed + 2); the same seed and K again
    # must give the same number from the checkpoint's parameters
    assert evaluate_script.main([str(gmvae_run), "--n-samples", "40", "--seed", "5"]) == 0
    ev = json.loads((gmvae_run / "evaluation.json").read_text())
    assert ev["quantities"]["log_likelihood"]["value"] == pytest.approx(
        m["quantities"]["test_log_likelihood"]["value"], abs=1e-9)
    assert ev["split"] == "test" and ev["n_samples"] == 40 and ev["active_units"]["latent_dim"] == 3
    assert (gmvae_run / "metrics.json").read_bytes() == before
    assert "log-likelihood (K = 40)" in capsys.readouterr().out


def test_evaluate_bad_input(tmp_path, gmvae_run, capsys):
    def bad(argv):
        code = evaluate_script.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    assert "no such run directory" in bad([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "no config.json there" in bad([str(tmp_path / "empty")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((gmvae_run / "config.json").read_text())
    assert "no checkpoint there" in bad([str(broken)])
    (broken / "checkpoint.ckpt").write_bytes(b"not a checkpoint")
    assert "refused to load the checkpoint" in bad([str(broken)])
    assert not (broken / "evaluation.json").exists()


def test_per_datapoint_run_evaluates_training_rows_only(tmp_path, capsys):
    out = tmp_path / "pd"
    assert fit_script.main(["--model", "vae", "--guide", "per-datapoint", "--latent-dim", "2", "--hidden", "16",
                            "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    q = read_metrics(out)["quantities"]
    assert "test_log_likelihood" not in q and "train_elbo" in q  # it cannot infer test rows
    code = evaluate_script.main([str(out), "--n-samples", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "per-datapoint and cannot infer test rows; evaluate the train split" in err
    assert evaluate_script.main([str(out), "--n-samples", "5", "--split", "train", "--max-rows", "50"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["n_rows"] == 50


def test_fit_ppca_reports_both_exact_and_importance_sampled_likelihood(tmp_path):
    out = tmp_path / "ppca"
    assert fit_script.main(["--model", "ppca", "--latent-dim", "4", "--epochs", "20", "--lr", "0.03",
                            "--n-samples", "200", "--out", str(out), "--no-progress"]) == 0
    m = read_metrics(out)
    exact, est = m["quantities"]["test_log_likelihood"], m["quantities"]["test_importance_log_likelihood"]
    assert exact["method"] == "exact" and est["method"] == "importance" and est["K"] == 200
    # the estimate sits below the exact value in expectation (a bound) and within a few standard
    # errors of it (the standard error is over rows; the guide is near the exact posterior)
    assert exact["value"] - 3 * est["se"] <= est["value"] <= exact["value"] + 3 * est["se"]


@pytest.fixture(scope="module")
def ppca_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "ppca"
    assert fit_script.main(["--model", "ppca", "--latent-dim", "4", "--guide", "amortized-diag", "--epochs", "20",
                            "--lr", "0.03", "--n-samples", "200", "--out", str(out), "--no-progress"]) == 0
    return out


def test_evaluate_with_ais_matches_the_exact_log_likelihood_of_a_ppca_run(ppca_run, tmp_path, capsys):
    """elbolab evaluate --estimator ais on a PPCA run (its diagonal guide is not the exact
    posterior, so AIS has work to do): the AIS test log-likelihood within 3 standard
    errors of the exact one the run reports, and, row by row against the exact log p(x_i),
    within 3 standard errors of the paired differences (a much sharper check)."""
    from elbolab.inference.runs import evaluate_split, read_run
    from elbolab.inference.ais import Budget

    exact_reported = read_metrics(ppca_run)["quantities"]["test_log_likelihood"]
    assert exact_reported["method"] == "exact"
    out = tmp_path / "ais"
    assert evaluate_script.main([str(ppca_run), "--estimator", "ais", "--steps", "30", "--chains", "8",
                                 "--out", str(out)]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    ll = ev["quantities"]["log_likelihood"]
    assert ev["estimator"] == "ais" and "n_samples" not in ev and ev["n_rows"] == 270
    assert ll["method"] == "ais" and ll["K"] == 8 and ll["bound"] == "lower"
    assert (ev["ais"]["steps"], ev["ais"]["chains"], ev["ais"]["leapfrog"]) == (30, 8, 5)
    # the chains' noise of the mean, far below the spread of log p(x) over rows
    assert 0 < ev["ais"]["mc_se_of_mean"] < ll["se"]
    assert abs(ll["value"] - exact_reported["value"]) < 3 * ll["se"]  # 3 standard errors over rows
    assert not (out / "evaluation_pareto_k.png").exists()  # no importance weights, no Pareto k
    printed = capsys.readouterr().out
    assert "AIS log-likelihood (T = 30, M = 8, L = 5)" in printed and "Monte Carlo s.e. over chains" in printed
    # paired, row by row: the same estimate (same seed) against each row's exact log p(x_i)
    run = read_run(str(ppca_run))
    again = evaluate_split(run, "test", seed=ev["seed"], per_row=True, estimator="ais", ais=Budget(30, 8))
    assert again["quantities"]["log_likelihood"]["value"] == pytest.approx(ll["value"], abs=1e-9)  # seeded
    exact = run.model.exact_log_likelihood(run.data.test).double()
    diff = torch.tensor(again["log_likelihood_per_row"], dtype=torch.float64) - exact
    se = float(diff.std() / diff.numel() ** 0.5)
    assert abs(float(diff.mean())) < 3 * se  # 3 standard errors of the paired differences
    assert se < 0.02  # power: a bias of 0.06 nats would fail (measured se ~0.005)
    gap = float((exact - run.model.exact_elbo(run.data.test)).mean())
    assert gap > 10 * se  # the guide's own ELBO is far below: AIS closed that gap, not the guide


def test_evaluate_refuses_the_other_estimators_flags(ppca_run, tmp_path, capsys):
    for argv, message in ((["--steps", "10"], "--steps apply to --estimator ais"),
                          (["--estimator", "ais", "--n-samples", "10"], "--n-samples applies to --estimator is"),
                          (["--estimator", "smc"], "invalid choice")):
        out = tmp_path / "o"
        code = evaluate_script.main([str(ppca_run), *argv, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_fit_vae_rejects_bad_model_flags(tmp_path, capsys):
    out = tmp_path / "o"
    assert fit_script.main(["--model", "vae", "--activation", "gelu", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "elbolab fit: error: activation must be one of relu, elu, tanh, softplus, got 'gelu'"]
    assert fit_script.main(["--model", "vae", "--binarize", "none", "--out", str(out)]) == 2
    assert "binarize them (threshold, static or dynamic)" in capsys.readouterr().err
    assert not out.exists()


def test_vae_likelihood_matches_the_data(tmp_path, capsys):
    """Real-valued data with a Gaussian likelihood are used as they are (not binarized);
    a continuous Bernoulli refuses values outside [0, 1] in one line."""
    import numpy as np

    g = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", 10.0 + 5.0 * g.normal(size=(200, 6)))
    out = tmp_path / "g"
    assert fit_script.main(["--model", "vae", "--likelihood", "gaussian", "--hidden", "none", "--latent-dim", "2",
                            "--data", str(tmp_path / "x.npy"), "--steps", "5", "--out", str(out),
                            "--no-progress"]) == 0
    m = read_metrics(out)
    assert m["config"]["data"]["binarize"] == "none" and m["config"]["model_config"]["hidden"] == []
    capsys.readouterr()
    code = fit_script.main(["--model", "vae", "--likelihood", "continuous-bernoulli", "--data",
                            str(tmp_path / "x.npy"), "--out", str(tmp_path / "cb")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "continuous-Bernoulli likelihood needs values in [0, 1]" in err[0]
    assert not (tmp_path / "cb").exists()


# ----------------------------------------------------------------------------- reproduction scripts


def test_burda_schedule():
    from elbolab.scripts.reproduce_iwae import burda_lr, runs_to_train

    # 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7: 1 + 3 + ... + 3^7 = 3280 epochs in all
    assert burda_lr(1) == 1e-3
    assert burda_lr(2) == burda_lr(4) == pytest.approx(1e-3 * 10 ** (-1 / 7), rel=1e-12)
    assert burda_lr(5) == burda_lr(13) == pytest.approx(1e-3 * 10 ** (-2 / 7), rel=1e-12)
    assert burda_lr(3280) == burda_lr(5000) == pytest.approx(1e-4, rel=1e-12)
    assert runs_to_train((1, 5)) == [("vae-k1", "elbo", 1), ("vae-k5", "elbo", 5), ("iwae-k5", "iwae", 5)]


@pytest.mark.parametrize("script", ["reproduce_cs236", "reproduce_iwae"])
def test_reproduction_scripts_bad_input(tmp_path, capsys, script):
    import importlib

    main = importlib.import_module(f"elbolab.scripts.{script}").main
    out = tmp_path / "out"
    assert main(["--data-dir", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("no such directory") and len(err.splitlines()) == 1 and not out.exists()
    out.mkdir()
    (out / "table.md").write_text("old")
    assert main(["--data-dir", str(tmp_path), "--out", str(out)]) == 2
    assert "not empty; pass --reuse" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "--out", str(out), "--reuse", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert (out / "table.md").read_text() == "old"
