"""The main job's report: every stage runs, and the HTML is self-contained with
figures that decode as images."""

import base64
import html.parser
import io
import json
import os
import re

import matplotlib.image
import pytest

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


def test_html_is_self_contained_and_every_figure_decodes(quick_report):
    page = (quick_report / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    md = (quick_report / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) >= 8 and len(parser.srcs) == len(linked)  # one embedded image per figure
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]  # embedded, nothing fetched
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(io.BytesIO(raw), format="png")
        assert img.ndim == 3 and min(img.shape[:2]) > 50  # a real picture, not a stub
    for path in linked:  # the Markdown's links resolve beside it
        assert (quick_report / path).is_file(), path
    assert "src=\"http" not in page and "<script" not in page


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
