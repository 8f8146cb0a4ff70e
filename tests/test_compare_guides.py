"""scripts/compare_guides.py: its table, numbers and chart on the digits (tiny budgets
here; the default run is the slow test), and its answers to bad input."""

import json
import math

import pytest
import torch

from elbolab.scripts import compare_guides

TINY = ["--epochs", "1", "--n-rows", "20", "--n-samples", "50", "--local-window", "10", "--local-patience", "1",
        "--local-max-steps", "100", "--semi-steps", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _check_run(out, families, n_rows):
    m = json.loads((out / "metrics.json").read_text())
    assert m["units"] == "nats per datapoint" and sorted(m["models"]) == sorted(families)
    md = (out / "compare.md").read_text()
    assert (out / "gaps.png").stat().st_size > 20_000  # a real figure
    for fam in families:
        guides = m["models"][fam]["guides"]
        assert list(guides) == list(compare_guides.GUIDES[fam])
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
                if fam == "ppca":  # exact: q* cannot beat the best member of its family (round-off)
                    assert s["exact"] and s["approximation_gap"]["mean"] >= s["approximation_gap_closed_form"] - 1e-9
                else:  # IWAE_K >= ELBO draw by draw, and log p(x) is the larger IWAE estimate
                    assert not s["exact"] and s["inference_gap"]["mean"] >= 0 and s["approximation_gap"]["mean"] >= 0
            if guide.startswith("per-datapoint"):  # no encoder: test rows are inferred by the optimization
                t = r["test"]
                assert t["inference"] == "local optimization" and t["amortization_gap"]["mean"] == 0.0
            else:
                assert r["test"]["inference"] == "guide"
    return m


def test_compare_guides_all_models_on_digits(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_guides.main(["--model", "all", *TINY, "--out", str(out)]) == 0
    m = _check_run(out, ("ppca", "vae", "gmvae"), 20)
    full = m["models"]["ppca"]["guides"]["per-datapoint-full"]["train"]
    assert full["approximation_gap_closed_form"] == 0.0 and full["local"]["full"]
    assert "| guide | training steps |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
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
    for guide, r in m["models"]["ppca"]["guides"].items():
        for split in ("train", "test"):
            s = r[split]
            # q*'s optimizer residual: measured 0.004-0.014 nats with the default settings
            assert s["approximation_gap"]["mean"] - s["approximation_gap_closed_form"] < 0.02, (guide, split)
