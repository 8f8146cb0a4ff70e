"""The reproduction scripts on the real MNIST, at tiny budgets (slow: a few minutes).
They check the plumbing (tables, reuse, paired differences), not the published
numbers; those come from the full runs whose tables are in the README."""

import json

import pytest
import torch

from conftest import MNIST_DIR, needs_mnist
from elbolab.scripts import reproduce_cs236, reproduce_iwae

pytestmark = [pytest.mark.slow, pytest.mark.data, needs_mnist()]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_reproduce_cs236_tiny(tmp_path):
    out = tmp_path / "cs236"
    argv = ["--data-dir", MNIST_DIR, "--out", str(out), "--steps", "40", "--n-samples", "10",
            "--n-components", "20", "--ais-rows", "6", "--ais-steps", "5", "--ais-chains", "2", "--no-progress"]
    assert reproduce_cs236.main(argv) == 0
    table = (out / "table.md").read_text()
    m = json.loads((out / "metrics.json").read_text())
    for name in ("vae", "gmvae"):
        run = json.loads((out / name / "metrics.json").read_text())
        assert run["run"]["steps"] == 40 and run["data"]["n_test"] == 10_000 and run["data"]["n_train"] == 60_000
        ours = m["ours"][name]
        assert m["runs"][name]["steps"] == 40 and m["runs"][name]["seconds"] == run["run"]["seconds"] > 0
        t = run["diagnostics"]["test_importance"]
        assert ours["NELBO"]["mean"] == pytest.approx(-t["elbo"]["value"])
        assert ours["IWAE-10"]["mean"] <= ours["IWAE-1"]["mean"] == pytest.approx(ours["NELBO"]["mean"])
        assert f"{ours['NELBO']['mean']:.2f} ± {ours['NELBO']['se']:.2f}" in table
        for png in ("prior_samples.png", "reconstructions.png", "latent_means.png", "loss_curve.png"):
            assert (out / name / png).is_file()
    assert "| NELBO | 100 |" in table and "| IWAE-1000 | 95 |" in table
    # K = 10 draws are too few for a Pareto fit (21): the table says so rather than guess
    assert table.count("Pareto k of their weights: k undetermined") == 2
    # AIS beside importance sampling on the first 6 test images, paired
    for name in ("vae", "gmvae"):
        a = json.loads((out / name / "ais.json").read_text())
        assert a["n_rows"] == 6 and a["settings"] == {"rows": 6, "steps": 5, "chains": 2, "leapfrog": 5,
                                                      "is_samples": 10}
        assert a["ais"]["method"] == "ais" and a["ais"]["K"] == 2 and a["is"]["K"] == 10
        assert a["ais_minus_is"]["value"] == pytest.approx(a["ais"]["value"] - a["is"]["value"], abs=1e-9)
        assert m["ais"][name] == a
    assert "Annealed importance sampling on the first 6 test images" in table
    # --reuse rebuilds the table from the finished runs without training (or annealing) again
    stamp = (out / "vae" / "checkpoint.ckpt").stat().st_mtime_ns
    ais_stamp = (out / "vae" / "ais.json").stat().st_mtime_ns
    assert reproduce_cs236.main(argv + ["--reuse"]) == 0
    assert (out / "vae" / "checkpoint.ckpt").stat().st_mtime_ns == stamp
    assert (out / "vae" / "ais.json").stat().st_mtime_ns == ais_stamp
    assert json.loads((out / "metrics.json").read_text())["ours"] == m["ours"]


def test_reproduce_iwae_tiny(tmp_path):
    out = tmp_path / "iwae"
    argv = ["--data-dir", MNIST_DIR, "--out", str(out), "--epochs", "1", "--batch-size", "2000", "--ks", "1,3",
            "--test-rows", "40", "--n-samples", "50", "--fit-samples", "10", "--ais-rows", "5", "--ais-steps", "5",
            "--ais-chains", "2", "--no-progress"]
    assert reproduce_iwae.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["ours"]) == {"vae-k1", "vae-k3", "iwae-k1", "iwae-k3", "iwae-minus-vae-k3"}
    assert m["ours"]["iwae-k1"]["run"] == "vae-k1"  # one run serves both K = 1 rows
    for name in ("vae-k1", "vae-k3", "iwae-k3"):
        ev = json.loads((out / name / "evaluation.json").read_text())
        assert ev["n_rows"] == 40 and ev["n_samples"] == 50 and len(ev["log_likelihood_per_row"]) == 40
        assert ev["pareto_k"]["n_rows"] == 40  # the flag's numbers, from the same draws
        assert m["ours"][name]["nll"][0] == pytest.approx(-ev["quantities"]["log_likelihood"]["value"])
    # the paired difference is the mean of the per-row differences
    a = json.loads((out / "iwae-k3" / "evaluation.json").read_text())["log_likelihood_per_row"]
    b = json.loads((out / "vae-k3" / "evaluation.json").read_text())["log_likelihood_per_row"]
    assert m["ours"]["iwae-minus-vae-k3"][0] == pytest.approx(sum(y - x for x, y in zip(a, b)) / 40)
    # AIS on the first 5 of those 40 images, beside their importance estimates from evaluation.json
    for name in ("vae-k1", "vae-k3", "iwae-k3"):
        a = json.loads((out / name / "ais.json").read_text())
        per_row = json.loads((out / name / "evaluation.json").read_text())["log_likelihood_per_row"]
        assert a["n_rows"] == 5 and a["is"]["value"] == pytest.approx(sum(per_row[:5]) / 5, abs=1e-9)
    table = (out / "table.md").read_text()
    assert "| IWAE | 3 |" in table and "| IWAE K = 3 |" in table
    assert table.count("% of rows (reliable)") + table.count("% of rows (UNRELIABLE)") == 4  # every NLL row flagged
