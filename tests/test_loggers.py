"""Lightning loggers on `elbolab fit --logger`: the CSV logger writes its metrics file in
the run directory (lightning_logs/version_0/metrics.csv) with the numbers history.csv
has; tensorboard without its package is refused in one line, exit 2, nothing written."""

import csv
import importlib.util

import pytest

from elbolab.scripts import fit as fit_script

TINY = ["--model", "vae", "--latent-dim", "2", "--hidden", "16", "--epochs", "3", "--n-samples", "30",
        "--no-progress", "--threads", "1"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_csv_logger_writes_the_history_into_the_run_directory(tmp_path):
    out = tmp_path / "run"
    assert fit_script.main([*TINY, "--logger", "csv", "--out", str(out)]) == 0
    logged = _rows(out / "lightning_logs" / "version_0" / "metrics.csv")
    assert (out / "lightning_logs" / "version_0" / "hparams.yaml").is_file()  # the TrainConfig
    history = {int(r["step"]): r for r in _rows(out / "history.csv")}
    bounds = {int(r["step"]): float(r["train_bound"]) for r in logged if r["train_bound"]}
    vals = {int(r["step"]): float(r["val_elbo"]) for r in logged if r["val_elbo"]}
    # 39 steps (3 epochs of 13 batches): a fit that short logs every step; every validation
    assert sorted(bounds) == list(range(1, 40))
    for step, value in bounds.items():
        # history.csv rounds to 6 decimals
        assert value == pytest.approx(float(history[step]["train_bound"]), abs=1e-6)
    assert sorted(vals) == [13, 26, 39]
    for step, value in vals.items():
        assert value == pytest.approx(float(history[step]["val_elbo"]), abs=1e-6)


def test_a_logger_keeps_the_runs_of_steps_and_logs_the_same_rows(tmp_path):
    """The metrics callback follows runs of several steps per Lightning batch: the fit
    keeps them, and the loggers receive the rows a fit of single steps sends."""
    import lightning.pytorch as pl
    import torch

    from elbolab import models
    from elbolab.inference import lightning_module
    from elbolab.inference.train import fit
    from elbolab.inference.train_config import TrainConfig
    from elbolab.models import datasources as loaders

    d = loaders.load_dataset("digits", binarize="threshold")
    data = loaders.DataSplits("digits", d.train[:400], d.val[:0], d.test[:0], binarize="threshold")
    runs = []

    class Runs(pl.Callback):  # (an epoch hook only: it does not ask for single steps itself)
        def on_train_epoch_end(self, trainer, module):
            runs.append(module.steps_per_batch)

    logged = {}
    for per_batch in (lightning_module.STEPS_PER_BATCH, 1):
        saved, lightning_module.STEPS_PER_BATCH = lightning_module.STEPS_PER_BATCH, per_batch
        try:
            torch.manual_seed(0)
            m = models.build_model("vae", {"latent_dim": 2, "hidden": [16]}, data.data_dim, data.n_train)
            out = tmp_path / str(per_batch)
            fit(m, data, TrainConfig(steps=300, batch_size=50, progress=False, logger="csv"), callbacks=[Runs()],
                out_dir=str(out))
        finally:
            lightning_module.STEPS_PER_BATCH = saved
        logged[per_batch] = [(r["step"], r["train_bound"]) for r in
                             _rows(out / "lightning_logs" / "version_0" / "metrics.csv") if r["train_bound"]]
    assert runs[0] == lightning_module.STEPS_PER_BATCH > 1  # the logger did not turn the runs off
    assert logged[lightning_module.STEPS_PER_BATCH] == logged[1]  # the same rows at the same steps
    assert [int(s) for s, _ in logged[1]] == list(range(3, 301, 3))  # every 3rd step of 300


def test_without_a_logger_nothing_but_history(tmp_path):
    out = tmp_path / "run"
    assert fit_script.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert not (out / "lightning_logs").exists() and (out / "history.csv").is_file()


def test_overwrite_replaces_the_loggers_directory(tmp_path):
    """--overwrite on a run fit with --logger csv removes its lightning_logs: the new
    run's logger starts again at version_0, and a new run without a logger leaves none."""
    out = tmp_path / "run"
    assert fit_script.main([*TINY, "--logger", "csv", "--out", str(out)]) == 0
    (out / "lightning_logs" / "version_0" / "old.txt").write_text("the old run's")
    assert fit_script.main([*TINY, "--epochs", "1", "--logger", "csv", "--overwrite", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "lightning_logs").iterdir()) == ["version_0"]
    assert not (out / "lightning_logs" / "version_0" / "old.txt").exists()
    logged = _rows(out / "lightning_logs" / "version_0" / "metrics.csv")
    assert max(int(r["step"]) for r in logged) == 13  # the new run's 1 epoch, not the old run's 3
    assert fit_script.main([*TINY, "--epochs", "1", "--overwrite", "--out", str(out)]) == 0
    assert not (out / "lightning_logs").exists() and (out / "history.csv").is_file()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None
                    or importlib.util.find_spec("tensorboardX") is not None,
                    reason="tensorboard is installed here: the refusal cannot be seen")
def test_tensorboard_without_its_package_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert fit_script.main([*TINY, "--logger", "tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'elbolab[tensorboard]'" in err and "--logger" in err
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_logger_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert fit_script.main([*TINY, "--logger", "tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "lightning_logs" / "version_0"))
    events.Reload()
    assert {"train_bound", "val_elbo", "val_elbo_se"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val_elbo")] == [13, 26, 39]
