"""Which rows of a data split a command works on (``traces.split_rows``): diagnose,
sample, the fit's pictures and metrics, and evaluate read the same training rows of a
dynamically binarized data set, the one fixed draw (``traces.FIXED_DRAW_SEED``), whatever
their own seeds; the rule's choices and refusals."""

import types

import pytest
import torch

import elbolab
from elbolab.inference import diagnosis, plots, runs, traces
from elbolab.inference.errors import UsageError
from elbolab.inference.generate import generate
from elbolab.models.datasources import load_dataset


class Caught(Exception):
    """Raised by a wrapped function once it has seen the rows (the rest is not needed)."""


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small tensors: threads only contend (the conftest restores the count)


@pytest.fixture(scope="module")
def case():
    d = load_dataset("digits", binarize="dynamic")
    models = {guide: elbolab.models.build_model("vae", {"latent_dim": 2, "hidden": [8], "guide": guide},
                                                d.data_dim, d.n_train).eval()
              for guide in ("amortized", "per-datapoint")}
    return d, models


def _catch(monkeypatch, module, name: str, position: int = 1) -> dict:
    """Wrap ``module.name`` so that its call records its ``position``-th argument (the
    rows x) and stops the caller with :class:`Caught`."""
    seen = {}

    def wrapped(*args, **kwargs):
        seen["x"] = args[position]
        raise Caught

    monkeypatch.setattr(module, name, wrapped)
    return seen


def _training_rows_read(d, model, monkeypatch, tmp_path, seed: int) -> dict:
    """The training rows each caller reads for the per-datapoint guide (whose default split
    is train), every caller given ``seed`` where it takes one."""
    spec = runs.RunSpec("vae", {"latent_dim": 2, "hidden": [8], "guide": "per-datapoint"},
                        train=runs.TrainConfig(seed=seed), data=runs.DataSpec(binarize="dynamic"))
    run = runs.LoadedRun(str(tmp_path / "run"), spec, d, model, 0)
    out = {}
    out["diagnose"] = diagnosis._rows(run, None, d.n_train, global_latents=False)[1]
    out["sample"] = torch.from_numpy(generate(model, d, n=2, n_reconstructions=1, steps=2, seed=seed)["data"])
    with monkeypatch.context() as m:
        seen = _catch(m, traces, "guide_posterior")
        with pytest.raises(Caught):
            plots.model_pictures(model, d, str(tmp_path), seed=seed)
        out["pictures"] = seen["x"]
    with monkeypatch.context() as m:
        seen = _catch(m, runs, "test_log_likelihood")
        with pytest.raises(Caught):
            runs.evaluate_split(run, "train", n_samples=2, seed=seed)
        out["evaluate"] = seen["x"]
    with monkeypatch.context() as m:
        seen = _catch(m, runs.distributed, "estimate_rows")  # the training rows come first
        result = types.SimpleNamespace(history=[], final_loss=0.0, steps=0, epochs=0, seconds=0.0,
                                       stopped_early=False)
        with pytest.raises(Caught):
            runs.evaluate_run(model, d, spec, result)
        out["fit metrics"] = seen["x"]
    return out


def test_every_command_reads_the_one_fixed_draw_of_the_training_rows(case, monkeypatch, tmp_path):
    """Diagnose, sample, the pictures, evaluate and the fit's metrics read the same
    training rows, torch.equal: the draw seeded FIXED_DRAW_SEED, not their own seed (7 here;
    a caller that drew with it, or with any other seed, would differ: the grey levels make
    another draw another tensor)."""
    d, models = case
    assert traces.FIXED_DRAW_SEED == 0
    fixed = torch.bernoulli(d.train, generator=torch.Generator().manual_seed(traces.FIXED_DRAW_SEED))
    for other in (1, 7):  # the test can tell the draws apart
        assert not torch.equal(fixed, torch.bernoulli(d.train, generator=torch.Generator().manual_seed(other)))
    read = _training_rows_read(d, models["per-datapoint"], monkeypatch, tmp_path, seed=7)
    assert set(read) == {"diagnose", "sample", "pictures", "evaluate", "fit metrics"}
    for name, x in read.items():
        assert torch.equal(x, fixed), name
    # and one caller's own seed does not move it
    again = _training_rows_read(d, models["per-datapoint"], monkeypatch, tmp_path, seed=3)
    for name, x in again.items():
        assert torch.equal(x, fixed), name


def test_split_rows_rule(case):
    d, models = case
    enc, table = models["amortized"], models["per-datapoint"]
    s = traces.split_rows(enc, d)  # an encoder: the test rows, as they are
    assert s.split == "test" and s.rows is None and torch.equal(s.x, d.test) and torch.equal(s.labels, d.test_labels)
    s = traces.split_rows(table, d)  # a per-datapoint table: the training rows with their positions
    assert s.split == "train" and torch.equal(s.rows, torch.arange(d.n_train))
    assert torch.equal(s.x, traces.training_rows(d)[0]) and torch.equal(s.labels, d.train_labels)
    assert set(s.x.unique().tolist()) == {0.0, 1.0}
    no_test = type(d)(d.name, d.train, d.val, d.test[:0], d.binarize)
    assert traces.split_rows(enc, no_test).split == "train"  # no test rows: the training rows
    with pytest.raises(UsageError, match="^r: the run's guide is per-datapoint and cannot infer val rows; "
                                         "evaluate the train split$"):
        traces.split_rows(table, d, "val", where="r", verb="evaluate")
    with pytest.raises(UsageError, match="^split must be one of train, val, test, got 'nope'$"):
        traces.split_rows(enc, d, "nope")
    with pytest.raises(UsageError, match=r"^r: the test split has no rows \(hint\)$"):
        traces.split_rows(enc, no_test, "test", where="r", empty_hint=" (hint)")
