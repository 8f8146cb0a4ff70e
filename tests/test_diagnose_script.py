"""scripts/diagnose.py on a tiny run of every model (ppca, gaussian, vae with a
per-datapoint guide, gmvae), the Pareto k that fit.py and evaluate.py now report, and
diagnose.py's answers to bad input."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import read_metrics

from elbolab.inference import diagnostics as D
from elbolab.scripts import diagnose as diagnose_script
from elbolab.scripts import evaluate as evaluate_script
from elbolab.scripts import fit as fit_script

TINY = ["--epochs", "1", "--n-samples", "40", "--no-progress", "--threads", "1"]
RUNS = {
    "ppca": ["--model", "ppca", "--latent-dim", "3", "--lr", "0.03", *TINY],
    "gaussian": ["--model", "gaussian", "--guide", "full-rank", "--steps", "60", "--batch-size", "48", "--lr", "0.05",
                 "--no-progress", "--threads", "1"],
    "vae": ["--model", "vae", "--guide", "per-datapoint", "--latent-dim", "2", "--hidden", "16", *TINY],
    "gmvae": ["--model", "gmvae", "--latent-dim", "2", "--hidden", "16", "--n-components", "3", *TINY],
}
SMALL = ["--draws", "25", "--n-samples", "30", "--max-rows", "25", "--nuts-samples", "25", "--nuts-warmup", "25",
         "--threads", "1"]
OUTPUTS = ("diagnostics.nc", "summary.csv", "summary.md", "diagnostics.json", "loo_pareto_k.png", "ppc.png",
           "forest.png", "pair.png", "posterior.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diag")
    rng = np.random.default_rng(0)
    np.save(root / "g.npy", rng.normal(size=(60, 2)) @ np.array([[1.0, 0.8], [0.0, 0.6]]) + np.array([1.0, -0.5]))
    out = {}
    for name, argv in RUNS.items():
        extra = ["--data", str(root / "g.npy")] if name == "gaussian" else []
        assert fit_script.main([*argv, *extra, "--out", str(root / name)]) == 0, name
        before = {f: (root / name / f).read_bytes() for f in ("metrics.json", "checkpoint.ckpt", "config.json")}
        assert diagnose_script.main([str(root / name), *SMALL]) == 0, name
        out[name] = (root / name, before)
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
def test_diagnose_writes_every_output_and_leaves_the_run_alone(runs, name):
    run, before = runs[name]
    for f in OUTPUTS:
        assert (run / f).stat().st_size > 500, f
    for f, content in before.items():
        assert (run / f).read_bytes() == content, f  # the run's own files are untouched
    idata = D.load_netcdf(str(run / "diagnostics.nc"))
    assert set(idata.groups()) >= {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                   "observed_data", "replicated_log_likelihood"}
    assert list(idata.log_likelihood.data_vars) == ["x"]  # one variable: az.loo needs no var_name
    n = json.loads((run / "diagnostics.json").read_text())
    ll = idata.log_likelihood["x"]
    assert ll.dims == ("chain", "draw", "row") and ll.shape[:2] == (2, 25) and ll.shape[2] == n["n_rows"]  # 2 chains
    assert idata.observed_data["x"].dims == ("row", "feature")
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "row", "feature")
    md = (run / "summary.md").read_text()
    for heading in ("## Importance weights (Pareto k)", "## Leave-one-out (PSIS-LOO) and WAIC",
                    "## Posterior predictive checks", "## Posteriors"):
        assert heading in md
    table = pd.read_csv(run / "summary.csv", index_col=0)
    assert {"posterior", "mean", "sd", "hdi_3%", "hdi_97%"} <= set(table.columns)
    # the loo numbers in the json are az.loo's on the netCDF's log_likelihood group
    assert n["loo"]["variational"]["elpd_loo"] == pytest.approx(D.loo_waic(idata)["elpd_loo"], rel=1e-9)
    for s in n["ppc"].values():
        assert 0 <= s["p_value"] <= 1
    if name == "gaussian":
        assert n["latents"] == "global" and n["n_rows"] == 48  # all training rows
        assert idata.posterior["precision"].dims == ("chain", "draw", "feature", "feature_bis")
        assert idata.posterior["precision"].shape == (2, 25, 2, 2)
        assert idata.posterior["loc"].dims == ("chain", "draw", "feature")
        np.testing.assert_array_equal(idata.log_likelihood["row"].values, np.arange(48))  # the training rows' indices
        assert math.isfinite(n["guide_pareto_k"]["k"])
        assert set(table["posterior"]) == {"variational", "exact", "NUTS"}
        nuts = table[table["posterior"] == "NUTS"]
        assert nuts["ess_bulk"].notna().all() and nuts["r_hat"].notna().all()  # 2 chains
        assert table[table["posterior"] == "variational"]["r_hat"].isna().all()  # meaningless for VI draws
        assert (run / "diagnostics_nuts.nc").is_file() and n["nuts"]["chains"] == 2
    else:
        assert n["latents"] == "per row" and n["n_rows"] == 25
        assert idata.posterior["z"].dims == ("chain", "draw", "row", "latent")
        # the rows the figures show: those with the highest, median and lowest Pareto k, the
        # highest being the maximum k of the json's summary
        shown = n["figures_show"]
        assert shown["why_rows"] == "the rows with the highest, median and lowest Pareto k of their importance weights"
        assert len(set(shown["rows"])) == 3 and set(shown["rows"]) <= set(idata.posterior["row"].values.tolist())
        caption = re.search(rf"The figures show {shown['variables'][0]} of rows ([\d, ]+) \(k = ([^)]+)\) of 25:", md)
        assert [int(r) for r in caption.group(1).split(", ")] == shown["rows"]
        ks = caption.group(2).split(", ")
        assert ks[0] == f"{n['importance_log_likelihood']['pareto_k']['max']:.2f}"
        assert [float(v) for v in ks] == sorted((float(v) for v in ks), reverse=True)
        # the digits' rows carry their class labels as a coordinate along row
        assert idata.posterior["label"].dims == ("row",) and set(idata.posterior["label"].values) <= set(range(10))
        pk = n["importance_log_likelihood"]["pareto_k"]
        assert pk["n_rows"] == 25 and pk["n_samples"] == 30 and isinstance(pk["reliable"], bool)
        assert (run / "pareto_k.png").stat().st_size > 500
        assert n["split"] == ("train" if name == "vae" else "test")  # per-datapoint: training rows
        assert ("exact" in set(table["posterior"])) == (name == "ppca")  # PPCA's exact posterior of z


@pytest.mark.parametrize("name", ["ppca", "gmvae"])
def test_fit_reports_pareto_k_for_its_importance_estimate(runs, name):
    run, _ = runs[name]
    m = read_metrics(run)
    est = m["quantities"]["test_importance_log_likelihood"]  # PPCA reports its exact one too
    pk = m["diagnostics"]["test_pareto_k"]
    assert est["pareto_k_share"] == pk["share_above_0.7"] and est["reliable"] == pk["reliable"]
    assert pk["n_rows"] == m["data"]["n_test"] == est["n"] and pk["n_samples"] == 40 == est["K"]
    assert 0 <= pk["share_above_0.7"] <= pk["share_above_0.5"] <= 1
    assert pk["quantiles"]["0.5"] <= pk["quantiles"]["0.9"] <= pk["max"]
    assert pk["reliable"] == (pk["share_above_0.7"] <= D.MAX_UNRELIABLE_SHARE)
    assert (run / "pareto_k.png").stat().st_size > 500


def test_evaluate_flags_its_estimate(runs, tmp_path, capsys):
    run, _ = runs["gmvae"]
    assert evaluate_script.main([str(run), "--n-samples", "30", "--out", str(tmp_path)]) == 0
    ev = json.loads((tmp_path / "evaluation.json").read_text())
    pk = ev["pareto_k"]
    assert pk["n_samples"] == 30 and pk["n_rows"] == ev["n_rows"]
    assert ev["quantities"]["log_likelihood"]["pareto_k_share"] == pk["share_above_0.7"]
    assert D.reliability_note(pk) in capsys.readouterr().out
    assert (tmp_path / "evaluation_pareto_k.png").is_file()


def test_diagnose_bad_input(runs, tmp_path, capsys):
    def bad(argv, message):
        code = diagnose_script.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert message in err, err

    out = tmp_path / "out"
    vae, _ = runs["vae"]
    bad([str(tmp_path / "nope"), "--out", str(out)], "no such run directory")
    bad([str(vae), "--split", "test", "--out", str(out)], "per-datapoint and cannot infer test rows")
    bad([str(runs["gaussian"][0]), "--split", "test", "--out", str(out)], "the guide's latents are global")
    bad([str(vae), "--n-samples", "5", "--out", str(out)], "--n-samples: must be at least 21")
    bad([str(vae), "--nuts-samples", "1", "--out", str(out)], "--nuts-samples: must be 0 (no NUTS) or at least 2")
    bad([str(vae), "--draws", "0", "--out", str(out)], "--draws: must be >= 1")
    (tmp_path / "file").write_text("x")
    bad([str(vae), "--out", str(tmp_path / "file")], "exists and is not a directory")
    assert not out.exists()  # nothing written for any of them
