"""The main job's report: every stage runs, and the HTML is self-contained with
figures that decode as images; on a user's own matrix (offsets and scales far from 0
and 1) the stages that apply run with the likelihood the values call for, every number
finite, and the ones that do not apply are skipped with the reason in the report."""

import base64
import html.parser
import io
import json
import os
import re
import sys

import math

import matplotlib.image
import numpy as np
import pytest
import torch

from elbolab.inference import guide_study
from elbolab.models.datasources import DataSplits
from elbolab.scripts import report


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    assert report.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def check_page(quick_report, min_figures: int = 8) -> list[str]:
    """The HTML embeds one decodable PNG per figure the Markdown links, and fetches nothing;
    returns the linked paths."""
    page = (quick_report / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    md = (quick_report / "report.md").read_text()
    linked = re.findall(r"!\[(?:[^\]\\]|\\.)*\]\(([^)]+)\)", md)  # alt text: escaped brackets allowed
    assert len(linked) >= min_figures and len(parser.srcs) == len(linked)  # one embedded image per figure
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]  # embedded, nothing fetched
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(io.BytesIO(raw), format="png")
        assert img.ndim == 3 and min(img.shape[:2]) > 50  # a real picture, not a stub
    for path in linked:  # the Markdown's links resolve beside it
        assert (quick_report / path).is_file(), path
    assert "src=\"http" not in page and "<script" not in page
    return linked


def test_html_is_self_contained_and_every_figure_decodes(quick_report):
    linked = check_page(quick_report)
    # the Bayesian Gaussian's headline (guides against the exact posterior) is in the report
    assert "gaussian/loc.png" in linked and "gaussian/forest.png" in linked


def test_every_stage_reported(quick_report):
    summary = json.loads((quick_report / "summary.json").read_text())
    assert set(summary["stages"]) == set(report.STAGES)
    md = (quick_report / "report.md").read_text()
    for heading in ("Probabilistic PCA", "Bayesian Gaussian", "VAEs", "inference gap", "identities"):
        assert heading in md
    gaps = json.loads((quick_report / "gaps" / "metrics.json").read_text())
    for family, res in gaps["models"].items():
        for r in res["guides"].values():
            t = r["test"]
            if family == "ppca":  # exact ELBOs: no q* of a family beats that family's optimum (closed form)
                assert t["approximation_gap"]["mean"] >= t["approximation_gap_closed_form"] - 1e-6
            # q* starts from q and only climbs: L[q*] >= L[q] within 3 paired standard errors
            assert t["amortization_gap"]["mean"] > -3 * t["amortization_gap"]["se"] - 1e-9
    # the PPCA table carries the closed-form optimum and the SVI fit's exact log-likelihood
    assert summary["stages"]["ppca"]["svi"] <= summary["stages"]["ppca"]["optimum"] + 1e-6


def test_bad_stage_refused(tmp_path, capsys):
    assert report.main(["--stages", "ppca,nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown stage(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _finite_numbers(obj, where="") -> list[str]:
    """Paths of the non-finite floats in a parsed JSON document."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _finite_numbers(v, f"{where}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite_numbers(v, f"{where}/{i}")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where)
    return bad


def own_matrix(path, n: int = 150, d: int = 5, seed: int = 0):
    """Correlated real-valued rows with offsets and scales far from 0 and 1 (and labels)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    x = z @ rng.normal(size=(2, d)) + 0.3 * rng.normal(size=(n, d))
    x = x * np.array([50.0, 0.01, 3.0, 200.0, 7.0])[:d] + np.array([1000.0, -5.0, 30.0, -400.0, 77.0])[:d]
    np.save(path / "x.npy", x)
    np.save(path / "y.npy", (z[:, 0] > 0).astype(np.int64))
    return path / "x.npy", path / "y.npy"


@pytest.mark.slow
def test_report_on_a_users_own_matrix(tmp_path):
    """The whole report on a real-valued matrix: every stage runs (the VAEs Gaussian), every
    number finite, every figure decodes."""
    x, y = own_matrix(tmp_path)
    out = tmp_path / "r"
    assert report.main(["--data", str(x), "--labels", str(y), "--quick", "--out", str(out), "--no-progress"]) == 0
    check_page(out, min_figures=10)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == set(report.STAGES) and not summary["skipped"]
    assert summary["stages"]["vae"]["likelihood"] == "gaussian"
    for metrics in out.rglob("*.json"):
        assert not _finite_numbers(json.loads(metrics.read_text())), metrics
    md = (out / "report.md").read_text()
    assert "Gaussian decoders" in md and "real values" in md
    assert "compare-guides' VAEs have Bernoulli decoders" in md  # the gaps stage says what it leaves out


def test_report_on_own_data_runs_the_stages_that_apply(tmp_path):
    """The cheap stages on a real-valued matrix in the default suite (the whole report on
    it: the slow test above): PPCA's numbers finite, its SVI fit below the closed-form
    optimum, the identities run."""
    x, _ = own_matrix(tmp_path)
    out = tmp_path / "r"
    assert report.main(["--data", str(x), "--quick", "--stages", "ppca,identities", "--out", str(out),
                        "--no-progress"]) == 0
    check_page(out, min_figures=5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["n_train"] == 120 and summary["data"]["data_dim"] == 5  # 150 rows: 10% val, 10% test
    assert not _finite_numbers(summary)
    ppca = summary["stages"]["ppca"]
    assert ppca["svi"] <= ppca["optimum"] + 1e-6  # no fit beats the closed-form maximum
    # the identities ran on the matrix (their verdicts are demos' business; --quick's few groups of
    # gradient estimates can leave a ratio's standard error too wide to call it)
    assert summary["stages"]["identities"]["of"] >= 20 and (out / "identities" / "demos.md").is_file()


def test_report_skips_what_does_not_apply_and_says_why(tmp_path):
    """One column: no PPCA, no pair of columns, no identities, no guide comparison; the
    report says so and summary.json keeps the reasons."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "one.npy", 30.0 + 4.0 * rng.normal(size=(80, 1)))
    out = tmp_path / "r"
    assert report.main(["--data", str(tmp_path / "one.npy"), "--quick", "--stages", "ppca,gaussian,gaps,identities",
                        "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["skipped"]) == {"ppca", "gaussian", "gaps", "identities"}
    md = (out / "report.md").read_text()
    assert md.count("Skipped on one:") == 4 and "at least 2 columns" in md


def test_vae_likelihood_follows_the_values():
    def splits(x):
        x = torch.as_tensor(x, dtype=torch.float32)
        return DataSplits("d", x, x[:0], x[:0])

    binary = (torch.rand(20, 3, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert report.vae_likelihood(splits(binary)) == "bernoulli"
    assert report.vae_likelihood(splits(binary * 0.5 + 0.25)) == "continuous-bernoulli"  # grey levels in [0, 1]
    assert report.vae_likelihood(splits(binary * 3 - 1)) == "gaussian"
    assert report.vae_likelihood(splits(binary * 0.5), binarize="threshold") == "bernoulli"
    assert report.vae_likelihood(splits(binary * 3), "gaussian-diag") == "gaussian-diag"  # as asked


def test_correlated_columns_ignore_scale():
    """The pair with the largest |correlation|, whatever the columns' units."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 1, generator=g)
    x = torch.cat([1000 + 50 * torch.randn(500, 1, generator=g), -0.01 * z + 1e-4 * torch.randn(500, 1, generator=g),
                   torch.randn(500, 1, generator=g), 300 * z + 10 * torch.randn(500, 1, generator=g)], 1)
    i, j, rho = report.correlated_columns(x)
    assert {i, j} == {1, 3} and rho < -0.9


def test_gaps_stage_calls_the_library_and_keeps_the_terminal_quiet(tmp_path, capsys, monkeypatch):
    """The gaps stage runs inference.guide_study in-process with its settings from a plain
    dict (here a tiny one: PPCA's two encoders): the terminal gets the stage's one line
    (no tables on stdout, no training lines on stderr: those go to gaps/log.txt), and the
    report's table carries the study's numbers, its gaps adding up."""
    monkeypatch.setitem(report.QUICK, "gaps", {"families": ("ppca",), "guides": ("amortized", "amortized-full"),
                                               "train": {"epochs": 1}, "n_rows": 10, "local": {"max_steps": 50}})
    streams, study = [], guide_study.run_guide_study

    def spy(*args, **kwargs):  # the streams the library writes to: the terminal's, not a StringIO
        streams.append((sys.stdout, sys.stderr))
        return study(*args, **kwargs)

    monkeypatch.setattr(guide_study, "run_guide_study", spy)
    out = tmp_path / "r"
    assert report.main(["--quick", "--stages", "gaps", "--out", str(out), "--no-progress"]) == 0
    assert streams == [(sys.stdout, sys.stderr)]
    captured = capsys.readouterr()
    lines = captured.out.splitlines()  # the stage's line and the report's path, nothing of the study's own
    assert len(lines) == 2 and lines[0].startswith("[gaps] 2 guides; amortization gap of the encoders: ppca ")
    assert lines[1].startswith(f"report: {out / 'report.md'}")
    assert "| guide |" not in captured.out and "[ppca/amortized]" not in captured.err
    log = (out / "gaps" / "log.txt").read_text()
    assert "[ppca/amortized] training ..." in log and "[ppca/amortized-full] test: ELBO" in log
    metrics = json.loads((out / "gaps" / "metrics.json").read_text())
    assert metrics["n_rows"] == 10 and metrics["n_samples"] == report.QUICK["n_samples"]
    assert metrics["local"]["max_steps"] == 50 and metrics["command"].startswith("elbolab report --quick")
    md = (out / "report.md").read_text()
    rows = {cells[1]: cells for cells in (line.strip("|").split(" | ") for line in md.splitlines()
                                         if line.startswith("| ppca | "))}
    assert list(rows) == ["amortized", "amortized-full"]
    for guide, cells in rows.items():
        t = metrics["models"]["ppca"]["guides"][guide]["test"]
        inference, approx, amort = (float(cells[i].split(" ±")[0]) for i in (3, 4, 5))
        assert inference == pytest.approx(t["inference_gap"]["mean"], abs=5e-4)  # printed to 3 decimals
        assert inference == pytest.approx(approx + amort, abs=1.5e-3)  # three numbers rounded to 3 decimals
        assert f"(exact {t['approximation_gap_closed_form']:.3f})" in cells[4]
    assert "(exact 0.000)" in rows["amortized-full"][4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["gaps"]["amortization_gap"]["ppca"] == \
        metrics["models"]["ppca"]["guides"]["amortized"]["test"]["amortization_gap"]["mean"]
