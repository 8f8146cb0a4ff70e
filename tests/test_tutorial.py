"""The tutorial docs/tutorial_your_model.py, run as a user runs it: its numbers checked."""

import os
import runpy

import pytest

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # (about a minute: it fits, evaluates, diagnoses and compares several models)
def test_bring_your_own_model_tutorial_runs_and_its_numbers_hold():
    g = runpy.run_path(os.path.join(ROOT, "docs", "tutorial_your_model.py"), run_name="__main__")
    r = g["REGRESSION"]
    sd = r["exact_cov"].diagonal().sqrt()
    # the regression's guide against the conjugate posterior: measured within 0.05 sd and sd ratios
    # 0.96-1.06 (3000 steps); 0.3 sd and [0.8, 1.5] leave room for SVI's noise (test_api.py likewise)
    assert float(((r["q_loc"] - r["exact_mean"]) / sd).abs().max()) < 0.3
    ratio = (r["q_cov"].diagonal() / r["exact_cov"].diagonal()).sqrt()
    assert float(ratio.min()) > 0.8 and float(ratio.max()) < 1.5
    # held-out rows of y = x.w + b + N(0, 0.5^2): the predictive density is at most that of the true
    # noise, -log(0.5 sqrt(2 pi e)) = -0.726 per row, up to 3 standard errors
    assert r["held_out"]["value"] < -0.726 + 3 * r["held_out"]["se"]
    v = g["VAE_RESULTS"]
    ll, elbo = v["test"]["log_likelihood"], v["test"]["elbo"]
    assert ll["value"] >= elbo["value"]  # IWAE_K >= ELBO on the same draws (Jensen)
    assert -40.0 < ll["value"] < -15.0  # a 4-d VAE on the binarized 8x8 digits: about -20 nats measured
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data"} <= set(v["groups"])
    for name, r in v["gaps"].items():
        t = r["train"]
        # q* starts at q and keeps only improving steps: L[q*] >= L[q] within 3 standard errors
        assert t["amortization_gap"]["mean"] >= -3 * t["amortization_gap"]["se"], name
        assert torch.isfinite(torch.tensor(t["inference_gap"]["mean"]))
    # one Gaussian per training image trained for 600 steps of 100 images (48 updates each) is far
    # from its q*: its amortization gap exceeds the encoder's (measured 3.2 against 0.09 nats)
    assert v["gaps"]["per-datapoint"]["train"]["amortization_gap"]["mean"] > \
        v["gaps"]["encoder"]["train"]["amortization_gap"]["mean"]
