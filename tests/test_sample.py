"""`elbolab sample` and `Run.sample`: generating from a trained VAE (prior samples,
reconstructions, interpolation, latent traversal, latent means by label), checked
against what they are by construction: the interpolation's ends are the two rows'
reconstructions, every traversal passes through the decoded mean latent point at its
middle; a model without a decoder is refused in one line with nothing written."""

import io
import json

import matplotlib.image
import numpy as np
import pytest
import torch

import elbolab
from elbolab.models.datasources import load_dataset
from elbolab.scripts import fit as fit_script
from elbolab.scripts import sample as sample_script

TINY = ["--latent-dim", "3", "--hidden", "16", "--epochs", "2", "--n-samples", "30", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) * 7.0 + 40.0  # real values, far from 0 and 1
    np.save(root / "x.npy", x)
    assert fit_script.main(["--model", "vae", *TINY, "--out", str(root / "vae")]) == 0
    assert fit_script.main(["--model", "vae", "--likelihood", "gaussian", "--data", str(root / "x.npy"), *TINY,
                            "--out", str(root / "gauss")]) == 0
    assert fit_script.main(["--model", "ppca", "--latent-dim", "2", "--steps", "5", "--no-progress", "--threads", "1",
                            "--out", str(root / "ppca")]) == 0
    return root


def test_sample_writes_grids_and_arrays_that_are_what_they_say(runs, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample_script.main([str(runs / "vae"), "--steps", "11", "--n", "30", "--out", str(out)]) == 0
    assert "interpolation between test rows 0 and 1" in capsys.readouterr().out
    for name in ("prior_samples.png", "reconstructions.png", "interpolation.png", "traversal.png",
                 "latent_means.png"):
        img = matplotlib.image.imread(io.BytesIO((out / name).read_bytes()), format="png")
        assert img.ndim == 3 and min(img.shape[:2]) > 50, name
    s = np.load(out / "samples.npz")
    assert s["prior"].shape == (30, 64) and s["prior"].min() >= 0 and s["prior"].max() <= 1  # Bernoulli means
    assert s["interpolation"].shape == (11, 64) and s["traversal"].shape == (3, 11, 64)
    # the interpolation runs from row 0's reconstruction to row 1's (decode of each one's E_q[z|x]),
    # float32 round-off of (1 - t) m_a + t m_b at t = 0 and 1
    np.testing.assert_allclose(s["interpolation"][0], s["reconstructions"][0], atol=1e-6)
    np.testing.assert_allclose(s["interpolation"][-1], s["reconstructions"][1], atol=1e-6)
    # every traversal has the mean latent point at its middle (offset 0): the same image for each dim
    assert s["traversal_offsets"][5] == 0
    np.testing.assert_allclose(s["traversal"][:, 5], np.broadcast_to(s["traversal"][0, 5], (3, 64)), atol=1e-6)
    # ... and moves away from it: the decoded images differ along the traversal
    assert np.abs(s["traversal"][:, 0] - s["traversal"][:, -1]).max() > 1e-3
    # the latent means are of the test rows, with the digits' labels
    test = load_dataset("digits")
    np.testing.assert_array_equal(s["labels"], test.test_labels.numpy())
    assert s["means"].shape == (270, 3)
    info = json.loads((out / "samples.json").read_text())
    assert info["split"] == "test" and info["arrays"]["prior"] == [30, 64]


def test_sample_of_non_image_data_plots_columns(runs, tmp_path):
    out = tmp_path / "g"
    assert sample_script.main([str(runs / "gauss"), "--out", str(out)]) == 0
    assert (out / "columns.png").is_file() and not (out / "prior_samples.png").exists()
    s = np.load(out / "samples.npz")
    # a Gaussian decoder in the data's units: decoded prior samples sit near the data (mean 40, sd ~ 7 x 2)
    assert abs(s["prior"].mean() - s["data"].mean()) < 0.5 * s["data"].std()


def test_run_sample_from_python(runs, tmp_path):
    run = elbolab.load_run(str(runs / "vae"))
    r = run.sample(n=5, pair=(3, 7), steps=4)
    assert r["prior"].shape == (5, 64) and r["pair"] == [3, 7] and r["interpolation"].shape == (4, 64)
    again = run.sample(n=5, pair=(3, 7), steps=4, out=str(tmp_path / "py"))  # seeded: the same draws
    np.testing.assert_array_equal(r["prior"], again["prior"])
    assert (tmp_path / "py" / "traversal.png").is_file()


def test_sample_refuses_a_model_without_decoder_and_bad_input(runs, tmp_path, capsys):
    def bad(argv, message):
        code = sample_script.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err

    out = tmp_path / "o"
    bad([str(runs / "ppca"), "--out", str(out)], "has no decoder")
    bad([str(runs / "vae"), "--pair", "0,500", "--out", str(out)], "pair must be two different rows")
    bad([str(runs / "vae"), "--pair", "2,2", "--out", str(out)], "--pair")
    bad([str(runs / "vae"), "--steps", "1", "--out", str(out)], "--steps: must be at least 2")
    assert not out.exists()  # nothing written for any of them
    with pytest.raises(elbolab.inference.errors.UsageError, match="has no decoder"):
        elbolab.load_run(str(runs / "ppca")).sample()
    torch.set_num_threads(1)
