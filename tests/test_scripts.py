"""Every script, run tiny: its outputs, its --help, and its answers to bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import read_metrics, run_elbolab
from elbolab.scripts import fit as fit_script
from elbolab.scripts.cli import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help(name):
    r = run_elbolab(name, "--help", timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"usage: elbolab {name}" in r.stdout and "--seed" in r.stdout


def test_command_overview_and_unknown_command():
    r = run_elbolab("--help")
    assert r.returncode == 0 and all(name in r.stdout for name in COMMANDS)
    r = run_elbolab("fitt")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown command 'fitt'" in r.stderr
    r = run_elbolab("compare_guides", "--help")  # the module's name for the command: a hint, not a guess
    assert r.returncode == 2 and "compare-guides" in r.stderr


def test_import_elbolab_and_the_command_overview_leave_torch_unimported():
    """``import elbolab`` and ``elbolab --help`` load no torch (the API is imported on
    first use); the API is there when asked for."""
    code = ("import sys, elbolab; from elbolab.scripts import cli; cli.main(['--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(elbolab.fit) and 'torch' in sys.modules; "
            "from elbolab import load_run, models; "
            "print([n for n in elbolab.__all__ if getattr(elbolab, n, None) is None])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("[]"), r.stderr[-500:]


def test_ctrl_c_while_the_command_starts_is_one_line_and_130():
    """A SIGINT while ``elbolab evaluate`` still imports torch and Pyro ends it with its
    one ``interrupted`` line and status 130, not a traceback."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; from elbolab.scripts.cli import main; "
                          "sys.exit(main(['evaluate', 'no-such-run']))"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # the interpreter is up (tens of ms); importing torch takes seconds
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.splitlines() == ["elbolab evaluate: interrupted"], err[-500:]


def test_fit_ppca_writes_a_run(tmp_path):
    out = tmp_path / "run"
    code = fit_script.main(["--model", "ppca", "--latent-dim", "5", "--epochs", "15", "--lr", "0.03",
                            "--batch-size", "100", "--out", str(out), "--no-progress"])
    assert code == 0
    for f in ("metrics.json", "history.csv", "checkpoint.ckpt", "loss_curve.png", "config.json"):
        assert (out / f).is_file(), f
    assert not (out / ".lock").exists()
    m = read_metrics(out)
    q = m["quantities"]
    assert m["run"]["steps"] == 15 * 13 and m["schema"] == "elbolab-metrics/1"
    # The ELBO is a lower bound of the exact log-likelihood at the same parameters:
    # allow 3 standard errors of the Monte Carlo ELBO mean.
    assert q["train_elbo"]["value"] <= q["train_log_likelihood"]["value"] + 3 * q["train_elbo"]["se"]
    assert (q["train_elbo"]["bound"], q["train_log_likelihood"]["method"]) == ("lower", "exact")
    # and the exact log-likelihood cannot exceed the closed-form maximum (1e-6: float64 round-off)
    assert q["train_log_likelihood"]["value"] <= q["mle_log_likelihood"]["value"] + 1e-6
    rows = (out / "history.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,train_bound") and len(rows) == 1 + 15 * 13


def test_fit_user_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 6)) + 0.1 * rng.normal(size=(300, 6))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    out = tmp_path / "run"
    assert fit_script.main(["--model", "ppca", "--data", str(tmp_path / "x.csv"), "--latent-dim", "2",
                            "--epochs", "3", "--out", str(out), "--no-progress"]) == 0
    m = read_metrics(out)
    assert m["data"]["n_train"] == 240 and m["data"]["data_dim"] == 6


def _bad(capsys, argv):
    code = fit_script.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/x.npy"], "/nonexistent/x.npy: no such file"),
    (["--latent-dim", "100"], "latent_dim 100 is larger than the data dimension 64"),
    (["--objective", "renyi", "--alpha", "1"], "alpha 1 is not a Renyi bound"),
    (["--alpha", "0.5"], "alpha applies to the objective renyi only"),
    (["--n-components", "3"], "--n-components does not apply to --model ppca"),
    (["--guide", "nope"], "guide for ppca must be one of"),
    (["--dataset", "mnist"], "dataset mnist needs data_dir"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code, err = _bad(capsys, argv + ["--out", str(out), "--epochs", "1"])
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing created


def test_bad_data_file_contents(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("1,2,3\n4,nan,6\n")
    code, err = _bad(capsys, ["--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o")])
    assert code == 2 and "x.csv: 1 non-finite value(s); first is NaN at row 1, column 1" in err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("precious")
    code, err = _bad(capsys, ["--out", str(out), "--epochs", "1"])
    assert code == 2 and "not empty; pass --overwrite" in err
    assert (out / "metrics.json").read_text() == "precious"
    assert fit_script.main(["--out", str(out), "--epochs", "1", "--overwrite", "--no-progress"]) == 0
    assert read_metrics(out)["run"]["steps"] == 1  # PPCA's default batch: the whole training set


def test_locked_run_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))  # a live process holds it
    code, err = _bad(capsys, ["--out", str(out), "--epochs", "1", "--overwrite"])
    assert code == 2 and "another run (pid" in err
    (out / ".lock").write_text("999999999")  # a dead one: stale, taken over
    assert fit_script.main(["--out", str(out), "--epochs", "1", "--overwrite", "--no-progress"]) == 0


def test_resume_refuses_changed_flags(tmp_path, capsys):
    code, err = _bad(capsys, ["--resume", str(tmp_path), "--lr", "0.1"])
    assert code == 2 and "cannot change it: --lr" in err
    code, err = _bad(capsys, ["--resume", str(tmp_path / "nope")])
    assert code == 2 and "no such run directory" in err


def test_bad_flag_in_a_real_process(tmp_path):
    r = run_elbolab("fit", "--lr", "-3", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lr: must be a positive finite number" in lines[0]
    r = run_elbolab("fit", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"elbolab fit: error: {tmp_path / 'missing.csv'}: no such file"]
    assert not (tmp_path / "o").exists()
