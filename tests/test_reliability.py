"""Reliability and security, attacked systematically through the real entry points.

* Bad input (hypothesis-generated IDX directories, matrices, flags; corrupt run
  configs and checkpoints): ``scripts.fit.main`` returns 2 with one line on stderr
  naming the problem, no traceback, and --out is neither created nor changed.
* Faults: SIGKILL inside and around every step of an atomic checkpoint write and at
  random instants of whole runs (resumed runs end where uninterrupted ones do); a
  full disk during each kind of write; a non-finite loss through the CLI.
* Locks: a live run's directory is refused to a second writer; a killed run's lock
  is taken over.
* Numerics: log weights, IWAE and Renyi bounds stay finite and exact with decoder
  logits at +-1e4.

Valid inputs are told apart from refused ones without running a fit: the data tests
pass ``--batch-size 100000``, so data the loader accepts ends at the (later)
batch-size check, whose message states how many training rows were loaded; the flag
tests pass an existing non-empty --out, so valid flags end at the run-directory check.
"""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import re
import select
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pyro import poutine
from pyro.nn import PyroModule

import _faults
from elbolab import models
from elbolab.inference import files, runs
from elbolab.models import datasources as loaders
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import elbo_terms
from elbolab.inference.objectives import build_objective
from elbolab.inference.traces import log_weights, logmeanexp, model_log_weights
from elbolab.inference.checkpoints import CHECKPOINT, load_checkpoint
from elbolab.models.common import data_plate
from elbolab.scripts import _cli, cli
from elbolab.scripts import evaluate as evaluate_script
from elbolab.scripts import fit as fit_script
from conftest import read_metrics

# more particles than one tensor may hold with any data set: accepted data stops at the memory
# check, whose refusal names the rows loaded (a batch as large as the training set)
BIG_PARTICLES = str(2**27 + 1)
F32_MAX = float(np.finfo(np.float32).max)
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ============================================================================ helpers


def snapshot(path) -> dict | None:
    """Every file under ``path`` with its bytes (None if ``path`` does not exist)."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def refused(capsys, argv, out=None, watch=None, code=2) -> str:
    """Run fit.main(argv [+ --out out]); assert exit ``code``, exactly one stderr line,
    no traceback, and ``out`` (or ``watch``) neither created nor changed. Returns the line."""
    watch = out if watch is None else watch
    before = snapshot(watch)
    got = fit_script.main([*argv, "--out", str(out)] if out is not None else argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("elbolab fit: error: "), err
    assert "Traceback" not in err
    assert snapshot(watch) == before  # not created if absent; byte-for-byte unchanged if present
    return lines[0]


def rows_loaded(line: str) -> int | None:
    """The training-row count from the memory refusal, or None if it is another error."""
    m = re.match(rf"elbolab fit: error: n_particles {BIG_PARTICLES} x batch_size (\d+) x \d+ data dimensions", line)
    return int(m.group(1)) if m else None


def train_rows(n: int, val: float = 0.1, test: float = 0.1) -> int:
    return n - int(round(val * n)) - int(round(test * n))


def out_dir(base, existing: bool):
    """A --out that does not exist, or one that holds a previous run's file."""
    out = os.path.join(base, "out")
    if existing:
        os.makedirs(out)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write('{"precious": 1}\n')
    return out


# ============================================================================ IDX directories

IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dt = loaders._IDX_DTYPES[code]
    return (struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
            + np.ascontiguousarray(arr, dtype=dt).tobytes())


@st.composite
def idx_cases(draw):
    """Four IDX files (maybe gzip), one of them damaged one way; and what to expect:
    the number of training rows if the set must load, else the file the refusal names."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = {"train": draw(st.integers(2, 12)), "t10k": draw(st.integers(1, 5))}
    side = draw(st.integers(1, 4))
    arrays = {}
    for split in ("train", "t10k"):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n[split], side, side))
        arrays[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, n[split])
    raw = {name: idx_bytes(a) for name, a in arrays.items()}
    gz = draw(st.booleans())
    target = draw(st.sampled_from(IDX))
    images = "images" in target
    damage = draw(st.sampled_from(
        ["none", "truncate", "garbage", "empty", "extra", "magic", "count", "absurd-dims", "zero-dim", "dtype"]
        + (["gzip-flip", "gzip-truncate"] if gz else [])))
    data = raw[target]
    must_load = False
    if damage == "none":
        must_load = True
    elif damage == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "garbage":
        data = draw(st.binary(min_size=1, max_size=64))
        assume(data[:2] != b"\x00\x00")  # never a valid magic number
    elif damage == "empty":
        data = b""
    elif damage == "extra":
        data += draw(st.binary(min_size=1, max_size=16))
    elif damage == "magic":
        magic = draw(st.binary(min_size=4, max_size=4))
        assume(magic != data[:4])
        zero, code, ndim = struct.unpack(">HBB", magic)
        # still a readable file of the same layout: 1-byte values, same rank; labels of
        # any 1-byte type are fine, images must stay unsigned bytes
        must_load = (zero == 0 and code in (0x08, 0x09) and ndim == data[3] and (code == 0x08 or not images))
        data = magic + data[4:]
    elif damage == "count":  # labels of another length than the images
        split = target.split("-")[0]
        m = draw(st.integers(0, 20).filter(lambda m: m != n[split]))
        raw[f"{split}-labels-idx1-ubyte"] = idx_bytes(rng.integers(0, 10, m))
        target = f"{split}-images-idx3-ubyte"  # the refusal names the images file
        data = raw[target]
    elif damage == "absurd-dims":
        dims = draw(st.lists(st.integers(2**20, 2**32 - 1), min_size=data[3], max_size=data[3]))
        data = data[:4] + struct.pack(">" + "I" * len(dims), *dims) + data[4 + 4 * len(dims):]
    elif damage == "zero-dim":
        target = target.replace("labels-idx1", "images-idx3")  # zero labels would be a count mismatch
        shape = list(arrays[target].shape)
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        data = idx_bytes(np.zeros(shape, dtype=np.uint8))
        if shape[0] == 0:  # no images at all; labels to match, so only the images are wrong
            lab = target.replace("images-idx3", "labels-idx1")
            raw[lab] = idx_bytes(np.zeros(0, dtype=np.uint8))
    elif damage == "dtype":
        code = draw(st.sampled_from([0x09, 0x0B, 0x0C, 0x0D, 0x0E]))
        data = idx_bytes(arrays[target], code)
        must_load = not images  # labels of any integer or float type are read as labels
    raw[target] = data
    blobs = {name: (gzip.compress(b, mtime=0) if gz else b) for name, b in raw.items()}
    if damage == "gzip-flip":
        b = bytearray(blobs[target])
        i = draw(st.integers(0, len(b) - 1))
        b[i] ^= draw(st.integers(1, 255))
        blobs[target] = bytes(b)
        must_load = None  # a flipped timestamp or OS byte is harmless: load correctly or refuse
    elif damage == "gzip-truncate":
        blobs[target] = blobs[target][:draw(st.integers(0, len(blobs[target]) - 1))]
    expect = train_rows(n["train"], 0.1, 0.0) if must_load is not False else None
    return {"blobs": blobs, "gz": gz, "target": target, "damage": damage, "must_load": must_load,
            "train_rows": expect, "images": {k: v for k, v in arrays.items() if "images" in k},
            "existing_out": draw(st.booleans())}


@settings(max_examples=120, **FUZZ)
@given(case=idx_cases())
def test_idx_fuzz_through_fit(case, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        ddir = os.path.join(tmp, "idx")
        os.makedirs(ddir)
        sfx = ".gz" if case["gz"] else ""
        for name, blob in case["blobs"].items():
            with open(os.path.join(ddir, name + sfx), "wb") as f:
                f.write(blob)
        out = out_dir(tmp, case["existing_out"])
        line = refused(capsys, ["--dataset", "mnist", "--data-dir", ddir, "--n-particles", BIG_PARTICLES,
                                "--threads", "1"], out)
        got = rows_loaded(line)
        if case["must_load"] is True or (case["must_load"] is None and got is not None):
            assert got == case["train_rows"], line
            if case["damage"] == "none":  # and the pixels are the file's bytes / 255
                d = loaders.load_dataset("mnist", data_dir=ddir, val_fraction=0.0)
                want = case["images"]["t10k-images-idx3-ubyte"].reshape(d.test.shape[0], -1) / 255.0
                assert torch.equal(d.test, torch.as_tensor(want, dtype=torch.float32))
        else:
            assert got is None and os.path.join(ddir, case["target"] + sfx) in line, (case["damage"], line)


# ============================================================================ users' matrices

NUMERIC = [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64]
OTHER = [np.complex64, np.dtype("<U3")]


def _elements(dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":  # extremes, NaN and infinities included; float64 up to 1e308 (past float32)
        return st.floats(width=8 * dtype.itemsize, allow_nan=True, allow_infinity=True)
    return None


def matrix_verdict(arr: np.ndarray):
    """(True, training rows) if the array must load, else (False, a word the refusal contains)."""
    if arr.dtype.kind not in "biuf":
        return False, ("complex" if arr.dtype.kind == "c" else "must be numbers")
    if arr.ndim not in (1, 2, 3):
        return False, f"rank {arr.ndim}"
    if arr.size == 0:
        return False, "empty data"
    x = arr.astype(np.float64)
    if not np.isfinite(x).all():
        return False, "non-finite"
    if np.abs(x).max() > F32_MAX:
        return False, "too large for float32"
    rows = train_rows(arr.shape[0])
    return (True, rows) if rows >= 1 else (False, "leave none for training")


@st.composite
def matrix_cases(draw):
    fmt = draw(st.sampled_from(["npy", "npz", "bytes"]))
    dtype = draw(st.sampled_from(NUMERIC + OTHER))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    arr = draw(hnp.arrays(dtype, shape, elements=_elements(dtype)))
    case = {"fmt": fmt, "arr": arr, "existing_out": draw(st.booleans())}
    if fmt == "bytes":  # a valid file cut short, raw garbage, a pickled object array, the other format
        case["ext"] = draw(st.sampled_from([".npy", ".npz"]))
        case["how"] = draw(st.sampled_from(["truncate", "garbage", "pickle", "renamed"]))
        case["cut"] = draw(st.floats(0.0, 0.999))
        case["garbage"] = draw(st.binary(max_size=200))
    return case


def write_matrix(case, tmp) -> tuple[str, tuple]:
    arr = case["arr"]
    if case["fmt"] == "npy":
        path = os.path.join(tmp, "x.npy")
        np.save(path, arr)
        return path, matrix_verdict(arr)
    if case["fmt"] == "npz":
        path = os.path.join(tmp, "x.npz")
        np.savez_compressed(path, x=arr)
        return path, matrix_verdict(arr)
    path = os.path.join(tmp, "x" + case["ext"])
    save = np.save if case["ext"] == ".npy" else lambda p, a: np.savez_compressed(p, x=a)
    if case["how"] == "pickle":
        save(path, np.array([1.0, "a", None], dtype=object))
        return path, (False, "Python objects")
    if case["how"] == "renamed":  # .npy bytes named .npz and the other way round
        other = os.path.join(tmp, "y" + (".npz" if case["ext"] == ".npy" else ".npy"))
        (np.save if other.endswith(".npy") else lambda p, a: np.savez(p, x=a))(other, np.ones((4, 2)))
        os.replace(other, path)
        return path, (False, "")
    if case["how"] == "garbage":
        blob = case["garbage"]
    else:
        save(path, arr)
        with open(path, "rb") as f:
            full = f.read()
        blob = full[:int(case["cut"] * len(full))]
    with open(path, "wb") as f:
        f.write(blob)
    return path, (False, "")


@settings(max_examples=160, **FUZZ)
@given(case=matrix_cases())
def test_matrix_fuzz_through_fit(case, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path, (ok, what) = write_matrix(case, tmp)
        out = out_dir(tmp, case["existing_out"])
        line = refused(capsys, ["--data", path, "--n-particles", BIG_PARTICLES, "--threads", "1"], out)
        if ok:
            assert rows_loaded(line) == what, line
            x = loaders.load_matrix(path)  # the values, exactly, as float64 (N, D)
            want = case["arr"].astype(np.float64).reshape(case["arr"].shape[0], -1)
            assert x.dtype == np.float64 and np.array_equal(x, want)
        else:
            assert rows_loaded(line) is None and path in line and what in line, line


@st.composite
def csv_cases(draw):
    """A numeric CSV (repr'd floats: exact), maybe a header, maybe blank lines and padding,
    maybe one defect at a known line and column."""
    n_rows, n_cols = draw(st.integers(0, 6)), draw(st.integers(1, 4))
    values = draw(st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**6, 10**6)
                                    .map(float), min_size=n_cols, max_size=n_cols),
                           min_size=n_rows, max_size=n_rows))
    header = draw(st.booleans())
    cells = [[repr(v) for v in row] for row in values]
    defect = draw(st.sampled_from(["none", "text", "blank", "ragged", "bytes"]))
    # a defect never goes in the first line (an all-text first line is a header)
    if defect in ("text", "blank", "ragged") and (len(cells) < 2 - header or (defect != "text" and n_cols < 2)):
        defect = "none"
    at = draw(st.integers(1 - header, len(cells) - 1)) if defect in ("text", "blank", "ragged") else None
    col = draw(st.integers(0, n_cols - 1))
    if defect == "text":
        cells[at][col] = draw(st.sampled_from(["abc", "x1", "1e", "--", "0x10", "1.2.3", "nan?", "1,5"]))
        if cells[at][col] == "1,5":  # a comma: now one field too many
            defect = "ragged"
    elif defect == "blank":
        cells[at][col] = " "
    elif defect == "ragged":
        del cells[at][col]
    lines = ([",".join(f"c{j}" for j in range(n_cols))] if header else []) + [",".join(r) for r in cells]
    blank_after = draw(st.sets(st.integers(0, len(lines)), max_size=2))  # blank lines, skipped
    text, line_of = [], {}
    for i, ln in enumerate(lines):
        if i in blank_after:
            text.append("")
        text.append(ln)
        line_of[i] = len(text)  # 1-based line number in the file
    body = "\n".join(text) + "\n"
    data = body.encode()
    if defect == "bytes":
        k = draw(st.integers(0, len(data)))
        data = data[:k] + b"\xff\xfe" + data[k:]
    return {"data": data, "values": values, "defect": defect, "header": header, "n_cols": n_cols,
            "line": None if at is None else line_of[at + header], "col": col, "existing_out": draw(st.booleans())}


def csv_verdict(case):
    d, line, col = case["defect"], case["line"], case["col"]
    if d == "text":
        return False, f"not a number at row {line}, column {col + 1}"
    if d == "blank":
        return False, f"empty cell at row {line}, column {col + 1}"
    if d == "ragged":
        return False, f"row {line} has"
    if d == "bytes":
        return False, "cannot read it"
    if not case["values"]:
        return False, "no data rows" if case["header"] else "empty CSV file"
    return matrix_verdict(np.array(case["values"], dtype=np.float64))


@settings(max_examples=150, **FUZZ)
@given(case=csv_cases())
def test_csv_fuzz_through_fit(case, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.csv")
        with open(path, "wb") as f:
            f.write(case["data"])
        ok, what = csv_verdict(case)
        out = out_dir(tmp, case["existing_out"])
        line = refused(capsys, ["--data", path, "--n-particles", BIG_PARTICLES, "--threads", "1"], out)
        if ok:
            assert rows_loaded(line) == what, line
            assert np.array_equal(loaders.load_matrix(path), np.array(case["values"], dtype=np.float64))
        else:
            assert rows_loaded(line) is None and path in line and what in line, (line, what)


@pytest.mark.parametrize("shape, high", [((100_000, 1), 10), ((2_000, 64), 17)])
def test_csv_parsing_stays_within_its_memory_factor(tmp_path, shape, high):
    """The memory checked before a CSV is parsed (CSV_MEMORY_FACTOR times the file)
    covers what parsing takes: small integers, the most values per byte of text."""
    import tracemalloc

    x = np.random.default_rng(0).integers(0, high, shape)
    path = tmp_path / "x.csv"
    np.savetxt(path, x, fmt="%d", delimiter=",")
    tracemalloc.start()
    try:
        got = loaders._read_csv(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, x)
    assert peak <= loaders.CSV_MEMORY_FACTOR * os.path.getsize(path)


# ---------------------------------------------------------------- the audit: each path by name


def test_unreadable_data_file(tmp_path, capsys, monkeypatch):
    """chmod 000 (root reads anyway, so the open itself is made to fail as it would)."""
    x = tmp_path / "x.csv"
    x.write_text("1,2\n3,4\n")
    x.chmod(0)
    real_open = os.open

    def denying_open(file, *a, **kw):
        if os.fspath(file) == str(x):
            raise PermissionError(errno.EACCES, "Permission denied", str(x))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(os, "open", denying_open)
    line = refused(capsys, ["--data", str(x)], tmp_path / "out")
    assert line == f"elbolab fit: error: {x}: cannot read it ([Errno 13] Permission denied: '{x}')"


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d), "is a directory"),  # a directory as --data
    (lambda d: (d / "x.npy").mkdir() or str(d / "x.npy"), "is a directory"),
    (lambda d: np.save(d / "h.npy", np.float16([[6e4, 7e4]] * 9)) or str(d / "h.npy"), "non-finite"),  # f16 overflow
    (lambda d: (d / "one.csv").write_text("1,2,3\n") and str(d / "one.csv"), "x batch_size 1 x 3 data dimensions"),
    (lambda d: np.save(d / "b.npy", np.eye(12, dtype=bool)) or str(d / "b.npy"), "x batch_size 10 x 12 data dimensions"),
    (lambda d: np.save(d / "i.npy", np.arange(-60, 60).reshape(20, 6)) or str(d / "i.npy"),
     "x batch_size 16 x"),
])
def test_audit_data_paths(tmp_path, capsys, make, message):
    line = refused(capsys, ["--data", make(tmp_path), "--n-particles", BIG_PARTICLES], tmp_path / "out")
    assert message in line


def test_idx_absurd_header_allocates_nothing(tmp_path, capsys):
    """A plain IDX file claiming 2**32-1 images of 2**32-1 x 2**32-1 pixels is refused from
    its size alone; a gzip one from the declared size; neither allocates what it claims."""
    import tracemalloc

    for gz in (False, True):
        d = tmp_path / f"gz{gz}"
        d.mkdir()
        for name in IDX:
            blob = (struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2**32 - 1, 2**32 - 1, 2**32 - 1)
                    if "images" in name else idx_bytes(np.zeros(3, np.uint8)))
            (d / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(blob) if gz else blob)
        tracemalloc.start()
        line = refused(capsys, ["--dataset", "mnist", "--data-dir", str(d)], tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert "train-images-idx3-ubyte" in line and ("does not match its header" in line or "declares" in line)
        assert peak < 64 << 20, peak  # far below what the header claims (~8e28 bytes)


# ============================================================================ flags

INT_FLAGS = {  # flag -> (lowest valid, highest valid) on the digits (1257 training rows, 64 pixels)
    "--n-particles": (1, (1 << 27) // (100 * 64)), "--latent-dim": (1, 64), "--batch-size": (1, None),  # larger than the training set: the whole set
    "--epochs": (1, None), "--steps": (1, None), "--seed": (0, 2**62 - 1), "--threads": (1, 1024),
    "--eval-particles": (1, (1 << 27) // 64), "--val-every": (1, None), "--patience": (1, None),
}
FLOAT_FLAGS = {"--lr": "positive", "--lr-final": "positive", "--clip-norm": "positive",
               "--val-fraction": "unit", "--alpha": "renyi"}


def flag_ok(flag: str, text: str) -> bool:
    """Whether a value must be accepted: the documented ranges, from the flag's text."""
    if flag in INT_FLAGS:
        try:
            v = int(text)
        except ValueError:
            return False
        lo, hi = INT_FLAGS[flag]
        return lo <= v and (hi is None or v <= hi)
    try:
        v = float(text)
    except ValueError:
        return False
    kind = FLOAT_FLAGS[flag]
    if kind == "positive":
        return v > 0 and math.isfinite(v)
    if kind == "unit":
        return 0 <= v < 1
    return math.isfinite(v) and v != 1.0


flag_values = st.one_of(
    st.integers(-10, 10).map(str), st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(-2, 2).map(repr),
    st.sampled_from(["", "abc", "1.5", "1e3", "0x10", "1_000", " 7 ", "-0", "1e-320", "inf", "-inf", "nan", "1"]))


@settings(max_examples=50, **FUZZ)
@given(flag=st.sampled_from(sorted(INT_FLAGS) + sorted(FLOAT_FLAGS)), text=flag_values)
def test_flag_fuzz_refused_before_any_work(flag, text, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        out = out_dir(tmp, existing=True)  # valid flags end at the --out check: nothing ran
        extra = ["--objective", "renyi"] if flag == "--alpha" else []
        line = refused(capsys, [*extra, f"{flag}={text}"], out)
        if flag_ok(flag, text):
            assert "the directory is not empty" in line, line
        else:
            param = flag.lstrip("-").replace("-", "_")  # the flag, or the parameter the library names
            assert (flag in line or param in line) and "not empty" not in line, line


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "nope"], "invalid strategy name"),
    (["--accelerator", "tpu"], "accelerator tpu"),
    (["--n-particles", "5000", "--batch-size", "1000"], "n_particles 5000 x batch_size 1000 x 64"),
    (["--objective", "renyi", "--alpha", "nan"], "--alpha: must be a finite number"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**62)"),
])
def test_flags_needing_more_than_argparse(tmp_path, capsys, argv, message):
    assert message in refused(capsys, [*argv, "--epochs", "1"], tmp_path / "out")


def test_help_and_argparse_errors_return_their_status(capsys):
    """In-process, main() returns argparse's status instead of raising SystemExit."""
    assert fit_script.main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out
    assert fit_script.main(["--no-such-flag"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ============================================================================ run configs and checkpoints

TINY = ["--model", "ppca", "--latent-dim", "2", "--batch-size", "100", "--lr", "0.02", "--threads", "1",
        "--seed", "5", "--no-progress", "--eval-particles", "1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete 2-epoch run (26 steps) to copy and attack."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert fit_script.main([*TINY, "--epochs", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    return out


def copy_run(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["pickle", "torch-zip", "in-state-dict"])
def test_hostile_checkpoint_refused_through_resume(finished_run, tmp_path, capsys, kind):
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    ck = run / CHECKPOINT
    if kind == "pickle":
        ck.write_bytes(pickle.dumps({"state_dict": Evil(marker)}, protocol=2))
    elif kind == "torch-zip":
        torch.save({"state_dict": Evil(marker)}, ck)
    else:  # a real checkpoint with one hostile entry inside
        good = load_checkpoint(str(ck))
        good["elbolab"]["history"] = Evil(marker)
        torch.save(good, ck)
    line = refused(capsys, ["--resume", str(run), "--epochs", "3"], watch=run)
    assert "refused to load the checkpoint" in line and str(ck) in line
    assert not marker.exists()  # the payload did not run


@pytest.mark.parametrize("tamper, message", [
    (lambda ck: {k: v for k, v in ck.items() if k != "elbolab"}, "not a checkpoint of this program (no elbolab)"),
    (lambda ck: {**ck, "state_dict": {**ck["state_dict"], "model.W": torch.zeros(3, 3)}}, "do not match the model"),
    (lambda ck: [1, 2, 3], "not a checkpoint of this program"),
])
def test_foreign_checkpoint_refused(finished_run, tmp_path, capsys, tamper, message):
    run = copy_run(finished_run, tmp_path)
    ck = run / CHECKPOINT
    torch.save(tamper(load_checkpoint(str(ck))), ck)
    assert message in refused(capsys, ["--resume", str(run)], watch=run)


@pytest.mark.parametrize("content, message", [
    (b"", "unreadable"), (b"{\"model\": ", "unreadable"), (b"\xff\xfe", "unreadable"), (b"[]", "must be an object"),
    (b"null", "must be an object"), (b"{}", "not an elbolab"),
    (None, "model must be one of"), (None, "train: lr must be a positive number"),
    (None, "train: lr must be a number, got \"fast\""), (None, "data: val_fraction must be a number, got \"most\""),
])
def test_corrupt_config_json_refused(finished_run, tmp_path, capsys, content, message):
    run = copy_run(finished_run, tmp_path)
    if content is None:
        spec = json.loads((run / "config.json").read_text())
        if "model" in message:
            spec["model"] = "nope"
        elif "positive" in message:
            spec["train"]["lr"] = -1
        elif "fast" in message:
            spec["train"]["lr"] = "fast"
        else:
            spec["data"]["val_fraction"] = "most"
        content = json.dumps(spec).encode()
    (run / "config.json").write_bytes(content)
    line = refused(capsys, ["--resume", str(run)], watch=run)
    assert message in line and "config.json" in line


def test_resume_of_a_finished_run_changes_nothing(finished_run, tmp_path, capsys):
    """A kill after the last checkpoint (during evaluation) is resumed to the same end."""
    run = copy_run(finished_run, tmp_path)
    (run / "metrics.json").unlink()
    assert fit_script.main(["--resume", str(run), "--no-progress"]) == 0
    a, b = json.loads((finished_run / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert a["run"]["steps"] == b["run"]["steps"] == 26
    assert a["quantities"]["train_elbo"] == b["quantities"]["train_elbo"]  # seeded evaluation: the same numbers
    assert (finished_run / "history.csv").read_bytes().split(b"\n")[1].split(b",")[:3] == \
        (run / "history.csv").read_bytes().split(b"\n")[1].split(b",")[:3]


def test_resume_with_a_smaller_budget_than_done_trains_nothing(finished_run, tmp_path):
    """--resume --epochs 1 on a run that has done 2 epochs: finished, nothing trained, the
    same parameters (Lightning alone refuses a checkpoint past max_epochs)."""
    run = copy_run(finished_run, tmp_path)
    assert fit_script.main(["--resume", str(run), "--epochs", "1", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["run"]["steps"] == 26
    assert_same_params(finished_run, run, tol=0.0)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(finished_run, tmp_path):
    """Only config.json (and a dead run's lock) on disk: --resume runs from the start and
    ends exactly where the uninterrupted run ended."""
    run = copy_run(finished_run, tmp_path)
    for name in os.listdir(run):
        if name != "config.json":
            (run / name).unlink()
    (run / runs.LOCK).write_text("999999999")  # the killed run's pid: no such process
    assert fit_script.main(["--resume", str(run), "--no-progress"]) == 0
    assert_same_params(finished_run, run, tol=0.0)


# ============================================================================ full disk

def _fail_writes(monkeypatch, which):
    """os.fsync raises ENOSPC for the atomic write of the file ``which`` (told by its
    temporary's suffix and, for JSON, content): the disk is full at that write."""
    real = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        base = os.path.basename(name)
        if base.startswith(files.TMP_PREFIX) and base.endswith(os.path.splitext(which)[1]):
            with open(name, "rb") as f:
                is_metrics = b'"units"' in f.read()
            if not which.endswith(".json") or is_metrics == (which == "metrics.json"):
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("which", ["checkpoint.ckpt", "history.csv", "metrics.json", "config.json",
                                   "loss_curve.png"])
def test_full_disk_loses_nothing(finished_run, tmp_path, capsys, monkeypatch, which):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    _fail_writes(monkeypatch, which)
    got = fit_script.main(["--resume", str(run), "--epochs", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert got == 1 and len(err) == 1, err  # a runtime fault: exit 1, one line
    assert err[0] == f"elbolab fit: error: {run / which}: cannot write it (No space left on device); " \
                     "its previous version is kept"
    after = snapshot(run)
    assert after[which] == before[which]  # the file being written is its old self
    assert not [f for f in after if f.startswith(files.TMP_PREFIX) or f == runs.LOCK]  # no debris, no lock
    ck = load_checkpoint(str(run / CHECKPOINT))  # whatever else was saved is complete
    assert ck["global_step"] in (26, 39)
    monkeypatch.undo()
    if which == "checkpoint.ckpt":  # space again: the resumed run ends where a straight one does
        assert fit_script.main(["--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
        straight = tmp_path / "straight"
        assert fit_script.main([*TINY, "--epochs", "3", "--checkpoint-every", "1", "--out", str(straight)]) == 0
        assert_same_params(straight, run)


def assert_same_params(a, b, tol=1e-6):
    pa, pb = (load_checkpoint(str(d / CHECKPOINT))["state_dict"] for d in (a, b))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert float((pa[k] - pb[k]).abs().max()) <= tol, k


# ============================================================================ non-finite loss through the CLI


class PoisonedPPCA(models.ppca.PPCA):
    """PPCA whose training-step log density is NaN at the ``poison_at``-th training call."""

    poison_at = 0
    calls = 0
    static_steps = False  # (a Python value read at every step)

    def model(self, x):
        if torch.is_grad_enabled():  # training steps only (checks and evaluations run without grad)
            type(self).calls += 1
            if type(self).calls == self.poison_at:
                with pyro.validation_enabled(False):
                    pyro.factor("poison", torch.tensor(float("nan")))
        return super().model(x)


def test_nonfinite_loss_through_cli_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(models.REGISTRY, "poisoned", (models.ppca.PPCAConfig, PoisonedPPCA))
    # grad-enabled call 1 is the driver's warm-up pass (with a backward): step 30 is call 31
    monkeypatch.setattr(PoisonedPPCA, "poison_at", 1 + 30)
    monkeypatch.setattr(PoisonedPPCA, "calls", 0)
    argv = [a if a != "ppca" else "poisoned" for a in TINY] + ["--epochs", "5", "--checkpoint-every", "1"]
    out = tmp_path / "bad"
    got = fit_script.main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert got == 1 and err == ["elbolab fit: error: step 30: the loss is nan; parameters not updated "
                                "(the last checkpoint is the last good state)"]
    assert sorted(os.listdir(out)) == ["checkpoint.ckpt", "config.json"]  # no metrics, no lock, no debris
    assert load_checkpoint(str(out / CHECKPOINT))["global_step"] == 26  # the end of epoch 2 (13 steps each)
    good = tmp_path / "good"
    assert fit_script.main([*TINY, "--epochs", "2", "--checkpoint-every", "1", "--out", str(good)]) == 0
    assert_same_params(good, out, tol=0.0)  # exactly the state of 26 good steps


# ============================================================================ SIGKILL


@pytest.fixture(scope="module", autouse=True)
def _forkserver_started():
    """Start the forkserver with the module: it imports while the in-process tests run."""
    return _faults.forkserver()


@pytest.fixture(scope="module")
def forks(_forkserver_started):
    """A forkserver with torch, Pyro, Lightning and the scripts imported once (see _faults)."""
    ctx = _forkserver_started
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_faults.report_preloaded, args=(w,))
    p.start()
    p.join()
    assert r.recv(), "the forkserver did not preload tests/_faults.py: every child would import torch anew"
    return ctx


def _drain(conn) -> list:
    got = []
    while conn.poll():
        try:
            got.append(conn.recv())
        except EOFError:
            break
    return got


@pytest.mark.parametrize("point", _faults.PAUSE_POINTS)
def test_sigkill_at_each_point_of_an_atomic_write(forks, tmp_path, point):
    """Killed at each step of atomic_write: the file is the old state (before the
    rename) or the new one (after), complete, never a mixture."""
    path = str(tmp_path / CHECKPOINT)
    _faults.atomic_torch_save(_faults.state(0), path)
    r, w = forks.Pipe(duplex=False)
    p = forks.Process(target=_faults.write_loop, args=(path, w, point))
    p.start()
    assert r.poll(60), "the child never reached the pause"
    msgs = [r.recv(), r.recv()]
    assert msgs == [("begin", 1), ("paused", point)]
    p.kill()
    p.join()
    ck = load_checkpoint(path)
    n = 1 if point == "renamed" else 0
    assert int(ck["n"]) == n and torch.equal(ck["payload"], _faults.state(n)["payload"])
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(files.TMP_PREFIX)]
    assert len(leftovers) == (1 if point in ("mkstemp", "fsync", "replace") else 0)


def test_sigkill_at_random_instants_of_checkpoint_writes(forks, tmp_path):
    """Thirty kills at random instants of a loop of 1 MiB checkpoint writes: after each the
    file loads and holds the state last begun or the one before, never anything else."""
    path = str(tmp_path / CHECKPOINT)
    rnd = random.Random(0)
    last = -1
    for _ in range(30):
        r, w = forks.Pipe(duplex=False)
        p = forks.Process(target=_faults.write_loop, args=(path, w))
        p.start()
        assert r.poll(60)
        time.sleep(rnd.uniform(0.0, 0.08))
        p.kill()
        p.join()
        begun = [n for kind, n in _drain(r) if kind == "begin"]
        if not os.path.exists(path):
            assert begun == [0]  # killed inside the very first write
            continue
        ck = load_checkpoint(path)
        n = int(ck["n"])
        assert n in (begun[-1] - 1, begun[-1]) and n >= last
        assert torch.equal(ck["payload"], _faults.state(n)["payload"])  # all of one state
        last = n
    assert last > 0  # the children wrote on, each from the state the last one left
    # debris of writes cut short: only .tmp-* files, removed when a run takes the directory
    assert set(os.listdir(tmp_path)) - {CHECKPOINT} <= {f for f in os.listdir(tmp_path)
                                                         if f.startswith(files.TMP_PREFIX)}
    with runs.RunDir(str(tmp_path), resume=True):
        assert sorted(os.listdir(tmp_path)) == [runs.LOCK, CHECKPOINT]


FIT_ARGS = [*TINY, "--epochs", "10", "--checkpoint-every", "1"]
STEPS_PER_EPOCH = 13  # ceil(1257 / 100)


def _step_on_disk(ck) -> int:
    return int(load_checkpoint(str(ck))["global_step"]) if ck.exists() else 0


def test_sigkill_at_random_points_of_fits_then_resume(forks, tmp_path):
    """Kill a run three times (resuming after each) at random instants: a random time
    after a random epoch's checkpoint, so kills fall in training steps, validation,
    checkpoint writes or before the first checkpoint; then let it finish. The final
    parameters match an uninterrupted run's to 1e-6; every checkpoint seen on disk
    loads, sits at an epoch boundary, and never goes back."""
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    p = forks.Process(target=_faults.run_fit, args=([*FIT_ARGS, "--out", str(ref)],))
    p.start()
    p.join()
    epoch_seconds = (time.perf_counter() - t0) / 10
    assert p.exitcode == 0
    run, ck = tmp_path / "run", tmp_path / "run" / CHECKPOINT
    rnd = random.Random(1)
    argv = [*FIT_ARGS, "--out", str(run)]
    seen, kills = 0, 0
    for epoch in sorted(rnd.sample(range(0, 9), 3)):  # 0: not waiting for any checkpoint
        log = str(tmp_path / "child.log")
        p = forks.Process(target=_faults.run_fit, args=(argv, log))
        p.start()
        deadline = time.time() + 300
        while p.is_alive() and _step_on_disk(ck) < epoch * STEPS_PER_EPOCH and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 1.2) * epoch_seconds)
        p.kill()
        p.join()
        if p.exitcode == 0:  # it finished first: nothing left to resume
            break
        assert p.exitcode == -9, open(log).read()
        kills += 1
        step = _step_on_disk(ck)
        assert step % STEPS_PER_EPOCH == 0 and step >= seen
        seen = step
        if (run / "config.json").exists():
            argv = ["--resume", str(run), "--threads", "1", "--no-progress"]
        else:  # killed before it wrote anything: start again (the directory holds only a lock)
            argv = [*FIT_ARGS, "--out", str(run), "--overwrite"]
    assert kills >= 1
    (run / ".tmp-left-by-a-kill.ckpt").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves
    p = forks.Process(target=_faults.run_fit, args=(["--resume", str(run), "--threads", "1", "--no-progress"],))
    p.start()
    p.join()
    assert p.exitcode == 0
    assert_same_params(ref, run)
    assert load_checkpoint(str(ck))["global_step"] == 10 * STEPS_PER_EPOCH
    assert not [f for f in os.listdir(run) if f.startswith(files.TMP_PREFIX) or f == runs.LOCK]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert abs(a["quantities"]["train_elbo"]["value"] - b["quantities"]["train_elbo"]["value"]) < 1e-4  # same draws


# ============================================================================ --out and the lock


def test_live_run_locks_its_directory_until_killed(forks, tmp_path, capsys):
    """While a run writes DIR, neither --overwrite nor --resume may touch it; once the
    run is SIGKILLed (its flock gone with it) --resume takes the directory over."""
    run = tmp_path / "run"
    p = forks.Process(target=_faults.run_fit, args=([*TINY, "--epochs", "100000", "--checkpoint-every", "1",
                                                     "--out", str(run)],))
    p.start()
    deadline = time.time() + 120
    while not (run / CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert (run / runs.LOCK).read_text() == str(p.pid)
        for argv in ([*TINY, "--epochs", "1", "--overwrite", "--out", str(run)], ["--resume", str(run)]):
            assert fit_script.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"elbolab fit: error: {run}: another run (pid {p.pid}) is writing this directory"]
    finally:  # a failed assertion must not leave a 100000-epoch run behind
        p.kill()
        p.join()
    assert (run / runs.LOCK).exists()  # a kill leaves the lock file, but not its flock
    step = load_checkpoint(str(run / CHECKPOINT))["global_step"]
    assert fit_script.main(["--resume", str(run), "--epochs", "1", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["run"]["steps"] == step  # taken over; nothing lost
    assert not (run / runs.LOCK).exists()


def test_run_that_finished_meanwhile_is_not_overwritten(tmp_path, capsys):
    """The emptiness check is repeated under the lock: a directory filled between a run's
    first check and its lock is refused, not overwritten."""
    run = tmp_path / "run"
    rd = runs.RunDir(str(run))
    rd.check()  # empty (absent): fine
    run.mkdir()
    (run / "metrics.json").write_text("finished meanwhile")
    with pytest.raises(UsageError, match="not empty"):
        rd.__enter__()
    assert sorted(os.listdir(run)) == ["metrics.json"]  # its lock released, nothing else touched


# ============================================================================ numerics: logits at +-1e4


class ExtremeBernoulli(PyroModule):
    """z ~ N(0, I_k) (B, k); x | z ~ Bernoulli(logits = z W^T + bias) (B, D); guide
    q(z) = N(q_loc, q_scale^2) per row. W and bias set the decoder's confidence."""

    max_plate_nesting = 1
    data_plate = "data"

    def __init__(self, W, bias, q_loc, q_scale):
        super().__init__()
        self.data_dim, self.n_data = W.shape[0], 1
        self.W, self.bias = torch.nn.Parameter(W), torch.nn.Parameter(bias)  # (D, k), (D,)
        self.q_loc, self.q_scale = torch.nn.Parameter(q_loc), torch.nn.Parameter(q_scale)  # (k,), (k,)

    def model(self, x):
        with data_plate(x):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([self.W.shape[1]]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ self.W.T + self.bias).to_event(1), obs=x)  # (..., B, D)

    def guide(self, x):
        with data_plate(x):
            loc = self.q_loc.expand(x.shape[0], -1)
            pyro.sample("z", dist.Normal(loc, self.q_scale.expand_as(loc)).to_event(1))  # (..., B, k)


def _reference_log_w(m, x, z):
    """log p(x, z) - log q(z) per particle and row, in numpy float64, the stable way:
    log p(x_d | l) = x_d l - log(1 + e^l) with logaddexp (never log of a sigmoid)."""
    W, b, mu, s = (t.detach().double().numpy() for t in (m.W, m.bias, m.q_loc, m.q_scale))
    z, x = z.detach().double().numpy(), x.double().numpy()  # (K, B, k), (B, D)
    logits = z @ W.T + b  # (K, B, D)
    log_lik = (x * logits - np.logaddexp(0.0, logits)).sum(-1)
    log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_q = (-0.5 * ((z - mu) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return log_lik, log_lik + log_prior - log_q


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_at_1e4_exact_log_likelihood(dtype):
    """A decoder certain of the wrong answer (logits exactly -+1e4 against x = 1/0) and a
    guide equal to the prior: log w = -1e4 per wrong pixel, exactly; every bound too."""
    D, k, K, B = 64, 2, 16, 5
    signs = torch.where(torch.arange(D) % 2 == 0, 1.0, -1.0).to(dtype)
    m = ExtremeBernoulli(torch.zeros(D, k, dtype=dtype), 1e4 * signs, torch.zeros(k, dtype=dtype),
                         torch.ones(k, dtype=dtype))
    x = (signs > 0).to(dtype).expand(B, D).clone()  # every pixel as the decoder is sure it is ...
    x[:, : D // 2] = 1 - x[:, : D // 2]  # ... but the first half the other way: 32 pixels wrong by 1e4
    lw = model_log_weights(m, x, None, K)
    exact = -1e4 * (D // 2)
    assert torch.equal(lw.log_lik, torch.full((K, B), exact, dtype=dtype))  # log-sigmoid(-1e4) = -1e4 exactly
    assert torch.equal(lw.log_w, lw.log_lik)  # log p(z) - log q(z) = 0 exactly (q is the prior)
    naive = torch.log(torch.exp(lw.log_w).mean(0))
    assert torch.isinf(naive).all()  # the naive log-mean-exp underflows: the stable form is needed
    ulp = abs(float(np.spacing((np.float64 if dtype == torch.float64 else np.float32)(exact))))
    for name, alpha in (("iwae", None), ("renyi", 0.5), ("renyi", -20.0), ("iwae-dreg", None), ("elbo", None)):
        pyro.set_rng_seed(0)
        loss = build_objective(name, K, alpha).loss(m, x, None)
        # -loss / B is the bound per row: exact up to the rounding of logsumexp + log K - log K (2 ulp)
        assert abs(float(-loss.detach()) / B - exact) <= 2 * ulp * (1 if name != "renyi" else 1 + abs(1 - alpha)), name


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_logits_near_1e4_match_a_float64_reference(dtype, rtol):
    """Logits of about +-1e4 that vary with z: log weights, the IWAE bound and its
    gradients stay finite and agree with an independent float64 computation.
    Tolerances: float64 round-off of 64-term sums of size 1e4 (rel. ~1e-15, 1e-12
    allowed); float32 keeps 24 bits (rel. 6e-8 per operation, 2e-6 allowed)."""
    D, k, K, B = 64, 2, 32, 7
    g = torch.Generator().manual_seed(3)
    W = 1e4 * torch.where(torch.rand(D, k, generator=g) < 0.5, 1.0, -1.0).to(dtype)
    m = ExtremeBernoulli(W, torch.zeros(D, dtype=dtype), torch.tensor([1.0, 0.0], dtype=dtype),
                         torch.full((k,), 1e-3, dtype=dtype))
    x = (torch.rand(B, D, generator=g) < 0.5).to(dtype)
    pyro.set_rng_seed(1)
    lw = model_log_weights(m, x, None, K)
    z = lw.guide_trace.nodes["z"]["value"]  # (K, B, k)
    logits = z @ m.W.T + m.bias
    assert float(logits.abs().min()) > 9e3 and float(logits.abs().max()) < 2.1e4  # at about +-1e4
    ref_lik, ref_w = _reference_log_w(m, x, z)
    np.testing.assert_allclose(lw.log_lik.detach().double().numpy(), ref_lik, rtol=rtol)
    np.testing.assert_allclose(lw.log_w.detach().double().numpy(), ref_w, rtol=rtol)
    from scipy.special import logsumexp

    ref_iwae = logsumexp(ref_w, axis=0) - math.log(K)  # (B,)
    assert np.isfinite(ref_iwae).all() and ref_iwae.max() < -1e4  # the weights are tiny: exp() underflows
    np.testing.assert_allclose(logmeanexp(lw.log_w, 0).detach().double().numpy(), ref_iwae, rtol=rtol)
    for name, alpha in (("iwae", None), ("renyi", 0.5), ("iwae-dreg", None)):
        m.zero_grad()
        pyro.set_rng_seed(1)
        loss = build_objective(name, K, alpha).loss(m, x, None)
        loss.backward()
        assert torch.isfinite(loss)
        for pname, p in m.named_parameters():
            assert torch.isfinite(p.grad).all(), (name, pname)
    terms = elbo_terms(m, x, None, n_particles=K)
    assert all(torch.isfinite(v).all() for v in terms.values())


def test_logmeanexp_extremes_and_masked_minus_inf():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert float(logmeanexp(t(-1e4, -1e4))) == -1e4
    assert float(logmeanexp(t(1e4, -1e4))) == 1e4 - math.log(2)  # e^-2e4 is below float64 resolution
    assert float(logmeanexp(t(0.0, -math.inf))) == -math.log(2)
    assert float(logmeanexp(t(-math.inf, -math.inf))) == -math.inf  # not NaN

    def model(x):  # a masked-out site whose log density is -inf must count 0, not NaN
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with poutine.mask(mask=torch.tensor([True, False])):
                pyro.sample("x", dist.Bernoulli(logits=torch.tensor([0.0, -math.inf])), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pyro.validation_enabled(False):
        lw = log_weights(model, guide, torch.tensor([1.0, 1.0]), 3)
    assert torch.equal(lw.log_lik[:, 1], torch.zeros(3))
    assert torch.allclose(lw.log_lik[:, 0], torch.full((3,), -math.log(2)))


# ============================================================================ round two: Ctrl-C


def _wait_for(path, p, seconds=120) -> None:
    deadline = time.time() + seconds
    while p.is_alive() and not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.02)


def test_ctrl_c_during_a_fit_exits_130_naming_the_checkpoint(forks, tmp_path):
    """A real SIGINT to ``elbolab fit`` after its first checkpoint: status 130 (not
    Lightning's 1), one line naming the checkpoint and the command that continues the
    run, the lock released; the resumed run ends where an uninterrupted one does."""
    run, log = tmp_path / "run", str(tmp_path / "fit.log")
    p = forks.Process(target=_faults.run_cli, args=(["fit", *TINY, "--epochs", "100000", "--checkpoint-every", "1",
                                                     "--out", str(run)], log))
    p.start()
    try:
        _wait_for(run / CHECKPOINT, p)
        time.sleep(0.05)  # into the next epoch's steps
        os.kill(p.pid, signal.SIGINT)
        p.join(60)
    finally:
        if p.is_alive():  # a failed assertion must not leave a 100000-epoch run behind
            p.kill()
            p.join()
    step = load_checkpoint(str(run / CHECKPOINT))["global_step"]
    lines = open(log).read().splitlines()
    assert p.exitcode == 130, lines
    assert lines == [f"elbolab fit: interrupted; the last checkpoint is {run / CHECKPOINT} (step {step}); "
                     f"continue with: elbolab fit --resume {run}"]
    assert step % STEPS_PER_EPOCH == 0 and not (run / runs.LOCK).exists()
    epochs = step // STEPS_PER_EPOCH + 1
    assert fit_script.main(["--resume", str(run), "--epochs", str(epochs), "--n-samples", "10"]) == 0
    straight = tmp_path / "straight"
    assert fit_script.main([*TINY, "--epochs", str(epochs), "--checkpoint-every", "1", "--n-samples", "10",
                            "--out", str(straight)]) == 0
    assert_same_params(straight, run)


def _as_from_a_terminal() -> None:
    """SIGINT delivered and at its default in a child, as an interactive shell starts a
    command (a child inherits a blocked or ignored SIGINT from the test's process)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_an_evaluation_exits_130(finished_run, tmp_path):
    """A real SIGINT to ``elbolab evaluate`` (a process of its own, as from a shell) during
    its estimate, after its modules have loaded (a SIGINT while they load is the
    command's own handler: test_scripts.py): status 130 and one line, from the program's
    interrupt handling. (Sent to a forkserver's child two seconds after its start, it was
    lost in full suites under load: the evaluation ran on until killed.)"""
    code = ("import sys; import elbolab.scripts.evaluate; print('loaded', flush=True); "
            "from elbolab.scripts.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.Popen([sys.executable, "-c", code, "evaluate", str(finished_run), "--n-samples", "1000000",
                          "--threads", "1", "--out", str(tmp_path / "eval")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 120)
        assert ready and p.stdout.readline().strip() == "loaded", "the child did not load its modules"
        time.sleep(2.0)  # loading the run takes well under a second; the estimate at K = 10^6, minutes
        assert p.poll() is None, "the evaluation ended before the SIGINT"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130 and err.splitlines() == ["elbolab evaluate: interrupted"], err[-500:]


class InterruptedPPCA(models.ppca.PPCA):
    """PPCA whose ``stop_at``-th training call is interrupted (as Ctrl-C would be there)."""

    stop_at = 0
    calls = 0
    static_steps = False  # (a Python value read at every step)

    def model(self, x):
        if torch.is_grad_enabled():
            type(self).calls += 1
            if type(self).calls == self.stop_at:
                raise KeyboardInterrupt
        return super().model(x)


def test_interrupt_before_the_first_checkpoint(tmp_path, capsys, monkeypatch):
    """Lightning's handler turns the interrupt into sys.exit(1) and ignores SIGINT from
    then on: the fit reports 130 and one line, and SIGINT's handler is put back."""
    monkeypatch.setitem(models.REGISTRY, "interrupted", (models.ppca.PPCAConfig, InterruptedPPCA))
    monkeypatch.setattr(InterruptedPPCA, "stop_at", 1 + 5)  # call 1 is the warm-up pass: step 5
    monkeypatch.setattr(InterruptedPPCA, "calls", 0)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    argv = [a if a != "ppca" else "interrupted" for a in TINY]
    assert fit_script.main([*argv, "--epochs", "3", "--out", str(out)]) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"elbolab fit: interrupted; no checkpoint was written yet in {out}; continue with: elbolab fit --resume {out}"]
    assert signal.getsignal(signal.SIGINT) is handler
    assert sorted(os.listdir(out)) == ["config.json"]


# ============================================================================ round two: inherited rank variables


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def clean_launch_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env", [
    {"LOCAL_RANK": "1"},  # a shell inside a launched process
    {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
    {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "GROUP_RANK": "1"},  # torchrun
])
def test_inherited_rank_variables_keep_the_run_directory_rules(finished_run, tmp_path, capsys, clean_launch_env,
                                                               env):
    """One process is rank 0 whatever rank variables it inherits: an existing run is
    refused without --overwrite (nothing replaced), a new one gets its config.json and
    its lock (released at the end), exactly as without the variables."""
    for k, v in env.items():
        clean_launch_env.setenv(k, v)
    run = copy_run(finished_run, tmp_path)
    assert "the directory is not empty" in refused(capsys, [*TINY, "--epochs", "1"], run)
    fresh = tmp_path / "fresh"
    assert fit_script.main([*TINY, "--epochs", "1", "--n-samples", "10", "--out", str(fresh)]) == 0
    assert {"config.json", "checkpoint.ckpt", "metrics.json", "history.csv"} <= set(os.listdir(fresh))
    assert not (fresh / runs.LOCK).exists()
    spec = json.loads((fresh / "config.json").read_text())
    assert spec["train"]["epochs"] == 1 and read_metrics(fresh)["run"]["steps"] == 13


@pytest.mark.parametrize("env, argv, message", [
    ({"LOCAL_RANK": "1"}, ["--devices", "2", "--strategy", "ddp"], "LOCAL_RANK=1 in the environment but no WORLD_SIZE"),
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "4"}, ["--devices", "2", "--strategy", "ddp"],
     "WORLD_SIZE=4 in the environment, but devices 2 x num_nodes 1 = 2 processes"),
    ({"LOCAL_RANK": "3", "WORLD_SIZE": "2"}, ["--devices", "2", "--strategy", "ddp"], "LOCAL_RANK=3, NODE_RANK=0"),
    ({}, ["--num-nodes", "2", "--strategy", "ddp"], "MASTER_ADDR, MASTER_PORT, NODE_RANK are not set"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, ["--num-nodes", "2", "--strategy", "ddp"],
     "NODE_RANK is not set"),
    ({}, ["--devices", "100000", "--strategy", "ddp"], "devices 100000: more CPU processes than this machine's"),
])
def test_rank_variables_that_do_not_describe_the_run_are_refused(tmp_path, capsys, clean_launch_env, env, argv,
                                                                 message):
    """A process told it is not rank 0 by variables that do not belong to this run, and a
    multi-node run with no launcher (it would wait forever for the other node), are
    refused up front: nothing created."""
    for k, v in env.items():
        clean_launch_env.setenv(k, v)
    assert message in refused(capsys, [*TINY, "--epochs", "1", *argv], tmp_path / "out")


# ============================================================================ round two: checkpoints, part by part


def _ck_set(path, value):
    """A tamper that sets the entry at ``path`` (keys and indices) to ``value``."""
    def tamper(ck):
        node = ck
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
        return ck
    return tamper


MC = "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, " \
     "'train_time_interval': None}"
OPT = ("optimizer_states", 0)
FIT_LOOP = ("loops", "fit_loop")
CHECKPOINT_TAMPERS = [  # (what, tamper, the field the refusal names)
    ("no param groups", _ck_set((*OPT, "param_groups"), []), "optimizer_states[0].param_groups: 0 parameter groups"),
    ("history a list", _ck_set(("elbolab", "history"), [1, 2]), "elbolab.history: must be a tensor"),
    ("history short", _ck_set(("elbolab", "history"), lambda h: h[1:]), "elbolab.history: must have shape (26, 4)"),
    ("history steps", _ck_set(("elbolab", "history"), lambda h: h.flip(0)), "elbolab.history: its step column"),
    ("torch rng size", _ck_set(("elbolab", "torch_rng"), torch.zeros(10, dtype=torch.uint8)),
     "elbolab.torch_rng: must have shape (5056,)"),
    ("torch rng bytes", _ck_set(("elbolab", "torch_rng"), torch.zeros(5056, dtype=torch.uint8)),
     "elbolab.torch_rng: not a torch generator state"),
    ("torch rng ranks", _ck_set(("elbolab", "torch_rng_ranks"), torch.zeros(1, 7, dtype=torch.uint8)),
     "elbolab.torch_rng_ranks: must have shape (ranks, 5056)"),
    ("python rng", _ck_set(("elbolab", "python_rng"), (3, tuple(range(624)), None)), "elbolab.python_rng"),
    ("python rng index", _ck_set(("elbolab", "python_rng"), lambda s: (3, s[1][:-1] + (10**6,), None)),
     "elbolab.python_rng: not a state of Python's random"),
    ("validations", _ck_set(("elbolab", "validations"), torch.zeros(2, 2, dtype=torch.float64)),
     "elbolab.validations: must have shape (validations, 3)"),
    ("seconds nan", _ck_set(("elbolab", "seconds"), float("nan")), "elbolab.seconds"),
    ("seconds text", _ck_set(("elbolab", "seconds"), "1"), "elbolab.seconds: must be a number"),
    ("global step huge", _ck_set(("global_step",), 10**20), "global_step: must be in [0, 9007199254740992]"),
    ("global step bool", _ck_set(("global_step",), True), "global_step: must be an integer"),
    ("epoch", _ck_set(("epoch",), 10**6), "epoch: must be in [0, 26]"),
    ("loop steps", _ck_set((*FIT_LOOP, "epoch_loop.manual_optimization.optim_step_progress", "total", "completed"),
                           25), "optim_step_progress.total.completed: 25, but the checkpoint's global_step is 26"),
    ("loop extra", _ck_set((*FIT_LOOP, "state_dict"), {"x": 1}), "loops: not the loop state this Lightning writes"),
    ("loop order", _ck_set((*FIT_LOOP, "epoch_progress", "total", "started"), 1), "loops.fit_loop.epoch_progress.total"),
    ("adam shape", _ck_set((*OPT, "state", 0, "exp_avg"), torch.zeros(3)), "optimizer_states[0].state[0].exp_avg"),
    ("adam step", _ck_set((*OPT, "state", 0, "step"), torch.tensor(-1.0)), "optimizer_states[0].state[0].step"),
    ("adam moment", _ck_set((*OPT, "state", 1, "exp_avg_sq"), lambda t: -t - 1), "exp_avg_sq: holds negative values"),
    ("lr", _ck_set((*OPT, "param_groups", 0, "lr"), 0.5), "param_groups[0].lr: 0.5 is not the run's lr 0.02"),
    ("betas", _ck_set((*OPT, "param_groups", 0, "betas"), (2.0, 0.999)), "param_groups[0].betas: must be (0.9, 0.999)"),
    ("params", _ck_set((*OPT, "param_groups", 0, "params"), [0, 1]), "param_groups[0].params"),
    ("nan weight", _ck_set(("state_dict", "model.unit_W_unconstrained"), lambda t: t * float("nan")),
     "state_dict[model.unit_W_unconstrained]: holds non-finite values"),
    ("weight dtype", _ck_set(("state_dict", "model.unit_W_unconstrained"), lambda t: t.double()),
     "state_dict[model.unit_W_unconstrained]: must be a torch.float32 tensor"),
    ("best path", None, "best_model_path: must name a checkpoint.ckpt"),  # the run's own config.json (below)
    ("version", _ck_set(("pytorch-lightning_version",), "banana"), "pytorch-lightning_version: not a version"),
    ("schedulers", _ck_set(("lr_schedulers",), [{}]), "lr_schedulers: 1 schedulers, expected 0"),
    ("unknown entry", _ck_set(("hyper_parameters",), {"lr": 1}), "unknown entries 'hyper_parameters'"),
    ("unknown callback", _ck_set(("callbacks", "Timer"), {}), "the state of an unknown callback 'Timer'"),
]


def _tamper_checkpoint(run, tamper):
    ck = run / CHECKPOINT
    torch.save(tamper(load_checkpoint(str(ck))), ck)
    return ck


@pytest.mark.parametrize("what, tamper, field", CHECKPOINT_TAMPERS, ids=[c[0] for c in CHECKPOINT_TAMPERS])
def test_every_part_of_a_checkpoint_is_checked_before_resuming(finished_run, tmp_path, capsys, what, tamper, field):
    """Each part of an edited checkpoint (types, shapes, ranges, agreement of the
    counters) is refused by --resume with one line naming the file and the field,
    before anything is trained or written."""
    run = copy_run(finished_run, tmp_path)
    if what == "best path":  # Lightning would delete the "previous best" file: here, the run's config.json
        tamper = _ck_set(("callbacks", MC, "best_model_path"), str(run / "config.json"))
    ck = _tamper_checkpoint(run, tamper)
    line = refused(capsys, ["--resume", str(run), "--epochs", "3"], watch=run)
    assert line.startswith(f"elbolab fit: error: {ck}: ") and field in line, line


@pytest.mark.parametrize("what", ["no param groups", "history a list", "torch rng size"])
@pytest.mark.parametrize("program", ["evaluate", "diagnose"])
def test_evaluate_and_diagnose_check_the_checkpoint_too(finished_run, tmp_path, capsys, what, program):
    _, tamper, field = next(c for c in CHECKPOINT_TAMPERS if c[0] == what)
    run = copy_run(finished_run, tmp_path)
    ck = _tamper_checkpoint(run, tamper)
    line = run_program(capsys, program, [str(run), "--n-samples", "30", "--max-rows", "3"], watch=run)
    assert line.startswith(f"elbolab {program}: error: {ck}: ") and field in line, line


def run_program(capsys, program, argv, watch, code=2) -> str:
    """``elbolab PROGRAM ARGV``: exit ``code``, one line on stderr, ``watch`` unchanged."""
    before = snapshot(watch)
    got = cli.main([program, *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith(f"elbolab {program}: error: "), err
    assert snapshot(watch) == before
    return lines[0]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model_config"].update(latent_dim=2.0), "model_config: latent_dim must be an integer, got 2.0"),
    (lambda d: d["eval"].update(n_samples=0), "eval: n_samples must be >= 1, got 0"),
    (lambda d: d.update(model=["ppca"]), "model must be a string"),
    (lambda d: d["data"].update(val_fraction="x"), "data: val_fraction must be a number"),
    (lambda d: d["train"].update(seed=2**64), "seed must be an integer in [0, 2**62)"),
    (lambda d: d["data"].update(data_path="/dev/zero"), "/dev/zero: is a character device, not a regular file"),
])
@pytest.mark.parametrize("program", ["fit", "evaluate", "diagnose"])
def test_an_edited_config_json_is_refused_by_every_program(finished_run, tmp_path, capsys, edit, message, program):
    run = copy_run(finished_run, tmp_path)
    spec = json.loads((run / "config.json").read_text())
    edit(spec)
    (run / "config.json").write_text(json.dumps(spec))
    argv = ["--resume", str(run)] if program == "fit" else [str(run), "--n-samples", "30", "--max-rows", "3"]
    line = run_program(capsys, program, argv, watch=run)
    assert message in line, line


# ---------------------------------------------------------------- fuzz: run specs and checkpoints


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, 1, 2, -1, 0.5, 1.0, 2.0, 1e300, "", "ppca", "vae", "digits", "mnist", "none", "dynamic",
                       "elbo", "iwae", "ddp", "auto", "cpu", "gpu", "/dev/zero", "x.py:NAME"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(obj, prefix=()):
    """Every (path, value) of a nested dict / list (a tuple is one value)."""
    out = [(prefix, obj)]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def spec_edits(draw):
    """Up to three edits of a run's config.json: a value replaced (by any JSON value),
    an entry deleted, or an entry added."""
    return [(draw(st.sampled_from(["replace", "replace", "delete", "add"])), draw(st.integers(0, 10**6)),
             draw(JSON_VALUES), draw(st.text(max_size=6))) for _ in range(draw(st.integers(1, 3)))]


def _edit_json(spec, edits):
    for how, pick, value, key in edits:
        paths = [p for p, _ in _paths(spec) if p]
        if not paths:
            return spec
        path = paths[pick % len(paths)]
        parent = spec
        for k in path[:-1]:
            parent = parent[k]
        if how == "replace":
            parent[path[-1]] = value
        elif how == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[key] = value
    return spec


@settings(max_examples=30, **FUZZ)
@given(edits=spec_edits())
def test_config_json_fuzz_no_traceback(finished_run, edits, capsys):
    """Edited config.json files through evaluate: refused with one line naming the file,
    or evaluated; never a traceback, and the run directory never changed."""
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(finished_run, __import__("pathlib").Path(tmp))
        spec = _edit_json(json.loads((run / "config.json").read_text()), edits)
        (run / "config.json").write_text(json.dumps(spec))
        before = snapshot(run)
        got = evaluate_script.main([str(run), "--n-samples", "5", "--max-rows", "3", "--threads", "1",
                                    "--out", os.path.join(tmp, "eval")])
        err = capsys.readouterr().err.strip().splitlines()
        assert snapshot(run) == before
        assert got in (0, 2), err
        if got == 2:
            assert len(err) == 1 and err[0].startswith("elbolab evaluate: error: "), err


def _leaf_edits(draw, ck):
    """One edit of a checkpoint's tree: a tensor of another shape, dtype or with NaN; a
    number changed, negated, huge or of another type; an entry deleted or added."""
    top = draw(st.sampled_from(sorted(ck)))  # each part as likely as any other, whatever its size
    paths = [p for p, _ in _paths(ck) if p and p[0] == top]
    path = paths[draw(st.integers(0, len(paths) - 1))]
    parent = ck
    for k in path[:-1]:
        parent = parent[k]
    old = parent[path[-1]]
    how = draw(st.sampled_from(["value", "value", "delete", "type"]))
    if how == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
        return ck
    if isinstance(old, torch.Tensor):
        new = draw(st.sampled_from([
            old.flatten()[:-1] if old.numel() else torch.zeros(1), old.double() if old.dtype != torch.float64
            else old.float(), old.float() * float("nan") if old.numel() else torch.zeros(1),
            -old.float() - 1, old.float() * 1e30, torch.zeros(())]))
    elif isinstance(old, bool):
        new = not old
    elif isinstance(old, (int, float)):
        new = draw(st.sampled_from([-1, 0, old + 1, -old, 10**18, float("nan"), float("inf"), 0.5, "1", None,
                                    old * 2]))
    elif isinstance(old, str):
        new = draw(st.sampled_from(["", "x", "/etc/passwd", old + "x", "checkpoint.ckpt", None]))
    elif isinstance(old, tuple):
        new = old[:-1] if old else (1,)
    elif isinstance(old, list):
        new = old[:-1] + old[-1:] * 2 if old else [0]
    elif isinstance(old, dict):
        new = {**old, draw(st.text(max_size=4)): 0}
    else:
        new = 0
    parent[path[-1]] = new
    return ck


@settings(max_examples=25, **FUZZ)
@given(data=st.data())
def test_checkpoint_fuzz_no_traceback(finished_run, data, capsys):
    """Edited checkpoints through fit --resume: refused with one line naming the
    checkpoint (the run directory unchanged) or resumed to the end (or, for finite
    parameters too large to train from, stopped at the non-finite loss with its one
    line); never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(finished_run, __import__("pathlib").Path(tmp))
        ck = load_checkpoint(str(run / CHECKPOINT))
        for _ in range(data.draw(st.integers(1, 2))):
            ck = _leaf_edits(data.draw, ck)
        torch.save(ck, run / CHECKPOINT)
        before = snapshot(run)
        got = fit_script.main(["--resume", str(run), "--epochs", "3", "--n-samples", "5"])
        err = capsys.readouterr().err.strip().splitlines()
        assert got in (0, 1, 2), err
        if got == 2:
            assert len(err) == 1 and err[0].startswith(f"elbolab fit: error: {run / CHECKPOINT}"), err
            assert snapshot(run) == before
        elif got == 1:  # legal parameters the model cannot train from (W at 1e30): the run-time fault's line
            assert len(err) == 1 and re.match(r"elbolab fit: error: step \d+: the (loss is|gradient of)", err[0]), err


# ============================================================================ round two: resource limits


def test_wide_ppca_log_likelihood_never_forms_the_d_by_d_matrix(forks, tmp_path):
    """20 rows of 20000 dimensions under an address-space cap of 1.5 GiB above what the
    process maps: a D x D float64 matrix (3.2 GB) cannot be made, yet the run writes
    its metrics with the exact log-likelihoods (Woodbury identity and determinant
    lemma; the closed-form maximum from the rows' SVD)."""
    x = np.random.default_rng(0).normal(size=(20, 20000)).astype(np.float32)
    np.save(tmp_path / "wide.npy", x)
    out, log = tmp_path / "run", str(tmp_path / "log")
    p = forks.Process(target=_faults.run_cli, args=(["fit", "--model", "ppca", "--data", str(tmp_path / "wide.npy"),
                                                     "--latent-dim", "2", "--epochs", "1", "--threads", "1",
                                                     "--no-progress", "--n-samples", "10", "--out", str(out)],
                                                    log, 1536 << 20))
    p.start()
    p.join(300)
    assert p.exitcode == 0, open(log).read()[-2000:]
    m = read_metrics(out)["quantities"]
    for key in ("train_log_likelihood", "test_log_likelihood", "mle_log_likelihood"):
        assert math.isfinite(m[key]["value"]), key
    # the closed-form maximum on the training rows is above what training reached
    assert m["mle_log_likelihood"]["value"] > m["train_log_likelihood"]["value"]


def _dense_log_marginal(x, W, loc, noise_scale):
    C = W @ W.T + noise_scale**2 * torch.eye(W.shape[0], dtype=W.dtype)
    return torch.distributions.MultivariateNormal(loc, covariance_matrix=C).log_prob(x)


@pytest.mark.parametrize("n, d, k, noise", [(5, 7, 3, 0.7), (40, 12, 12, 1.3), (9, 30, 4, 1e-2), (3, 50, 1, 5.0)])
def test_woodbury_log_marginal_equals_the_dense_one(n, d, k, noise):
    """log N(x; loc, W W^T + s^2 I) without the d x d matrix equals the dense
    evaluation. Tolerance 1e-9 relative: float64 round-off of sums of d ~ 50 terms of
    size up to |x|^2 / s^2 ~ 1e4 (2e-16 relative each), with margin."""
    g = torch.Generator().manual_seed(n * d)
    F64 = torch.float64
    W, loc = torch.randn(d, k, generator=g, dtype=F64) * 2, torch.randn(d, generator=g, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) * 3
    s = torch.tensor(noise, dtype=F64)
    ours, dense = models.ppca.log_marginal(x, W, loc, s), _dense_log_marginal(x, W, loc, s)
    torch.testing.assert_close(ours, dense, rtol=1e-9, atol=0)


@pytest.mark.parametrize("n, d, k", [(8, 12, 3), (6, 40, 2), (5, 9, 7)])  # k may exceed the rank (n - 1)
def test_mle_of_wide_data_from_the_svd_equals_the_eigendecomposition(n, d, k):
    """d > n: the closed-form maximum from the rows' SVD is the one from the d x d
    covariance's eigendecomposition (the same W W^T, mean, noise; the same likelihood).
    Tolerance 1e-9: float64 eigen- and singular-value round-off at condition ~1e3."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    W, loc, s = models.ppca.mle(x, k)
    mean, cov = models.ppca.sample_covariance(x)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    noise = evals[k:].mean().clamp_min(1e-12)
    W_eig = evecs[:, :k] * (evals[:k] - noise).clamp_min(0.0).sqrt()
    torch.testing.assert_close(W @ W.T, W_eig @ W_eig.T, rtol=0, atol=1e-9)
    torch.testing.assert_close(loc, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(s**2, noise, rtol=1e-9, atol=1e-12)


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(forks, tmp_path):
    """--latent-dim 1000000 on a VAE (0.9 billion parameters) under a 3 GiB address-space
    cap: refused from its shapes with one line, before any tensor is allocated (it was a
    torch allocation traceback)."""
    out, log = tmp_path / "run", str(tmp_path / "log")
    p = forks.Process(target=_faults.run_cli, args=(["fit", "--model", "vae", "--latent-dim", "1000000", "--epochs",
                                                     "1", "--threads", "1", "--out", str(out)], log, 3 << 30))
    p.start()
    p.join(120)
    lines = open(log).read().splitlines()
    assert p.exitcode == 2 and len(lines) == 1, lines
    assert re.match(r"elbolab fit: error: vae with 902,219,664 parameter and buffer values .* needs about "
                    r"[\d.]+ GiB of memory, more than the [\d.]+ [GM]iB available", lines[0]), lines
    assert not out.exists()


def test_memory_estimate_counts_parameters_and_steps(tmp_path):
    """The estimate of a PPCA fit: 4 copies of its 392 values (4 bytes each: 327
    parameters, W 64 x 2, loc 64, noise 1 and the encoder's 2 x 64 + 2 + 2 x 2 = 134,
    and 65 buffers, the data's location 64 and scale 1) and 8 tensors of particles x
    batch x the widest layer (the 64 pixels)."""
    data = loaders.load_dataset("digits")
    spec = runs.RunSpec("ppca", {"latent_dim": 2}, runs.TrainConfig(n_particles=3, batch_size=50))
    need, n_values, width = runs.fit_memory(spec, data)
    assert (n_values, width) == (392, 64)
    assert need == 4 * 392 * 4 + 8 * 3 * 50 * 64 * 4


# ============================================================================ round two: only regular files


def _fifo(path):
    os.mkfifo(path)
    return str(path)


SPECIAL_FILES = {  # what -> (make it in a directory, the words of the refusal)
    "fifo csv": (lambda d: _fifo(d / "x.csv"), "is a FIFO (named pipe), not a regular file"),
    "fifo npy": (lambda d: _fifo(d / "x.npy"), "is a FIFO (named pipe), not a regular file"),
    "dev zero npy": (lambda d: os.symlink("/dev/zero", d / "x.npy") or str(d / "x.npy"), "is a character device"),
    "dev urandom csv": (lambda d: os.symlink("/dev/urandom", d / "x.csv") or str(d / "x.csv"), "is a character device"),
    "dev zero": (lambda d: "/dev/zero", "is a character device"),
}


def _cli_child_or_fail(forks, argv, log, hung):
    """``elbolab ARGV`` in a child process that must end within 60 s (a hang fails the
    test with ``hung`` instead of stalling it); returns the ended process."""
    p = forks.Process(target=_faults.run_cli, args=(argv, log))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(hung)
    return p


@pytest.mark.parametrize("what", sorted(SPECIAL_FILES))
def test_data_that_is_not_a_regular_file_is_refused_without_reading(forks, tmp_path, what):
    """A FIFO would block open() forever, a device never ends: refused by name before a
    byte is read (in a child, so that a hang fails the test instead of stalling it)."""
    make, words = SPECIAL_FILES[what]
    path = make(tmp_path)
    out, log = tmp_path / "out", str(tmp_path / "log")
    p = _cli_child_or_fail(forks, ["fit", "--data", path, "--out", str(out)], log, f"--data {what} hung")
    lines = open(log).read().splitlines()
    assert p.exitcode == 2 and lines == [f"elbolab fit: error: {path}: {words}" + lines[0].split(words, 1)[1]], lines
    assert not out.exists()


@pytest.mark.parametrize("name", ["config.json", CHECKPOINT, "idx"])
def test_run_files_and_idx_files_that_are_fifos_do_not_hang(forks, finished_run, tmp_path, name):
    run = copy_run(finished_run, tmp_path)
    if name == "idx":
        ddir = tmp_path / "idx"
        ddir.mkdir()
        for stem in IDX:
            _fifo(ddir / stem)
        argv, target = ["fit", "--dataset", "mnist", "--data-dir", str(ddir), "--out", str(tmp_path / "o")], \
            ddir / IDX[0]
    else:
        (run / name).unlink()
        _fifo(run / name)
        argv, target = ["evaluate", str(run), "--n-samples", "10", "--out", str(tmp_path / "o")], run / name
    log = str(tmp_path / "log")
    p = _cli_child_or_fail(forks, argv, log, f"a FIFO {name} hung")
    lines = open(log).read().splitlines()
    assert p.exitcode == 2 and len(lines) == 1 and f"{target}: is a FIFO" in lines[0], lines


def test_data_files_have_a_size_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loaders, "MAX_CSV_BYTES", 16)
    x = tmp_path / "x.csv"
    x.write_text("1,2\n3,4\n5,6\n7,8\n9,10\n")
    line = refused(capsys, ["--data", str(x)], tmp_path / "out")
    assert line == f"elbolab fit: error: {x}: 21 bytes, more than the 16 bytes a CSV file may hold here"


# ============================================================================ round two: shared flags


def _argv_for(module, flag_argv, tmp_path):
    """flag_argv plus placeholders for the program's required arguments."""
    p = module.build_parser()
    extra = []
    for a in p._actions:
        if not a.option_strings and a.dest != "help":
            extra.append(str(tmp_path / "nope"))
        elif a.required:
            extra += [a.option_strings[0], str(tmp_path / "o")]
    return extra + flag_argv


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "argument --seed: seed must be an integer in [0, 2**62), got -1"),
    ("--seed", str(2**64), "argument --seed: seed must be an integer in [0, 2**62), got 18446744073709551616"),
    ("--threads", "5000", "argument --threads: threads must be in 1..1024, got 5000"),
    ("--out", "FILE", "argument --out: FILE exists and is not a directory"),
])
def test_every_program_checks_the_shared_flags_alike(tmp_path, capsys, command, flag, value, message):
    import importlib

    module = importlib.import_module(f"elbolab.scripts.{cli.COMMANDS[command][0]}")
    if not any(flag in a.option_strings for a in module.build_parser()._actions):
        pytest.skip(f"elbolab {command} has no {flag}")
    if value == "FILE":
        value = str(tmp_path / "a-file")
        (tmp_path / "a-file").write_text("x")
        message = message.replace("FILE", value)
    argv = _argv_for(module, [flag, value], tmp_path)
    before = snapshot(tmp_path)
    assert cli.main([command, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"elbolab {command}: error: {message} (see --help)"]
    assert snapshot(tmp_path) == before


def test_diagnose_and_evaluate_refuse_bad_seeds_of_a_real_run(finished_run, capsys):
    """The outside tester's two cases: a ValueError traceback and a seed recorded as -1."""
    line = run_program(capsys, "diagnose", [str(finished_run), "--seed", str(2**64)], watch=finished_run)
    assert "seed must be an integer in [0, 2**62)" in line
    line = run_program(capsys, "evaluate", [str(finished_run), "--seed", "-1"], watch=finished_run)
    assert "seed must be an integer in [0, 2**62), got -1" in line


# ============================================================================ round two: the seed and the data order


class BatchSpy(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
    """Records each training batch's row indices and values as the model receives them."""

    def __init__(self):
        self.rows, self.values = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rows.append(batch[1].clone())
        self.values.append(batch[0].clone())


def _seeded_fit(seed, outer_seed, binarize="dynamic"):
    """A 2-epoch fit of a Bernoulli VAE on the digits (grey levels, binarized per batch)
    with TrainConfig.seed = ``seed``, the process's RNG seeded ``outer_seed`` before."""
    from elbolab.inference.train import fit
    from elbolab.inference.train_config import TrainConfig

    torch.manual_seed(outer_seed)
    random.seed(outer_seed)
    data = loaders.load_dataset("digits", binarize=binarize)
    data = dataclasses_replace(data, train=data.train[:300])
    torch.manual_seed(seed)  # as fit_run seeds the initialization
    model = models.build_model("vae", {"latent_dim": 2, "hidden": [16]}, data.data_dim, data.n_train)
    spy = BatchSpy()
    config = TrainConfig(seed=seed, epochs=2, batch_size=100, lr=0.01, threads=1, progress=False)
    fit(model, data, config, callbacks=[spy])
    return spy, {k: v.detach().clone() for k, v in model.state_dict().items()}


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_batch_order_binarization_and_parameters_depend_on_the_seed_only():
    """Same seed, whatever else the process drew before: the very same batches (rows and
    their binarized values) and bitwise the same parameters. Another seed: another
    batch order, other binarization draws, other parameters."""
    a, pa = _seeded_fit(seed=3, outer_seed=0)
    b, pb = _seeded_fit(seed=3, outer_seed=99)
    c, pc = _seeded_fit(seed=4, outer_seed=0)
    assert len(a.rows) == len(c.rows) == 6  # 2 epochs of 3 batches
    assert all(torch.equal(u, v) for u, v in zip(a.rows, b.rows))
    assert all(torch.equal(u, v) for u, v in zip(a.values, b.values))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # another seed: every batch holds other rows, and the same row is binarized otherwise
    assert all(not torch.equal(u, v) for u, v in zip(a.rows, c.rows))
    row = int(a.rows[0][0])
    where_c = [(i, int((r == row).nonzero()[0])) for i, r in enumerate(c.rows[:3]) if (r == row).any()][0]
    x_a, x_c = a.values[0][0], c.values[where_c[0]][where_c[1]]
    assert not torch.equal(x_a, x_c)  # 64 Bernoulli draws of grey levels: equal by chance with prob. < 1e-6
    assert all(not torch.equal(pa[k], pc[k]) for k in pa)
    # and within one run, each epoch its own order
    assert not torch.equal(torch.cat(a.rows[:3]), torch.cat(a.rows[3:]))


# ============================================================================ round two: one run per directory


def test_resume_with_a_smaller_budget_keeps_the_records_consistent(finished_run, tmp_path):
    """--resume --epochs 1 on a 2-epoch run trains nothing: config.json keeps its
    2 epochs (the budget actually run), and metrics.json agrees with it."""
    run = copy_run(finished_run, tmp_path)
    before = (run / "config.json").read_bytes()
    assert fit_script.main(["--resume", str(run), "--epochs", "1"]) == 0
    assert (run / "config.json").read_bytes() == before
    m, spec = read_metrics(run), json.loads(before)
    assert (m["run"]["steps"], m["run"]["epochs"], m["config"]["train"]["epochs"]) == (26, 2, 2)
    assert m["config"] == {k: v for k, v in spec.items() if k != "data_info"}
    assert fit_script.main(["--resume", str(run), "--epochs", "3", "--n-samples", "10"]) == 0  # a larger one: run
    m, spec = read_metrics(run), json.loads((run / "config.json").read_text())
    assert (m["run"]["steps"], m["run"]["epochs"], spec["train"]["epochs"]) == (39, 3, 3)


def test_overwrite_removes_the_old_runs_files_first(finished_run, tmp_path):
    """An old run's pictures and evaluations do not survive --overwrite with another
    model: the directory holds exactly what the new run writes."""
    run = copy_run(finished_run, tmp_path)
    for leftover in ("prior_samples.png", "reconstructions.png", "evaluation.json", ".tmp-x.ckpt"):
        (run / leftover).write_bytes(b"the old run's")
    fresh = tmp_path / "fresh"
    argv = ["--model", "ppca", "--guide", "amortized-diag", "--epochs", "1", "--n-samples", "10", "--threads", "1",
            "--no-progress"]
    assert fit_script.main([*argv, "--out", str(fresh)]) == 0
    assert fit_script.main([*argv, "--out", str(run), "--overwrite"]) == 0
    assert sorted(os.listdir(run)) == sorted(os.listdir(fresh))
    assert json.loads((run / "config.json").read_text())["model_config"]["guide"] == "amortized-diag"


def test_overwrite_never_removes_the_runs_own_data(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "x.csv").write_text("1,2\n3,4\n5,6\n7,8\n9,10\n11,12\n13,14\n15,16\n17,18\n19,20\n")
    line = refused(capsys, ["--data", str(run / "x.csv"), "--latent-dim", "1", "--epochs", "1", "--overwrite"], run)
    assert line == (f"elbolab fit: error: {run}: holds x.csv, which this run reads; overwriting would remove it: "
                    "move it, or choose another directory")


@pytest.mark.parametrize("foreign", ["notes.txt", "README.md", "figure.svg"])
def test_overwrite_keeps_a_users_notes(finished_run, tmp_path, capsys, foreign):
    """Only the files elbolab writes are an old run's: a user's notes or a figure of
    a kind elbolab never draws make --overwrite refuse, and survive it."""
    run = copy_run(finished_run, tmp_path)
    (run / foreign).write_text("mine")
    before = sorted(os.listdir(run))
    line = refused(capsys, [*TINY, "--epochs", "1", "--overwrite"], run)
    assert line == (f"elbolab fit: error: {run}: holds {foreign}, which no elbolab run writes; overwriting replaces "
                    "a run's files only: remove it, or choose another directory")
    assert sorted(os.listdir(run)) == before and (run / foreign).read_text() == "mine"


@pytest.mark.parametrize("foreign", ["notes.txt/", "thesis.docx", "link.png@", "lightning_logs@"])
def test_overwrite_refuses_a_directory_holding_more_than_a_run(finished_run, tmp_path, capsys, foreign):
    """--overwrite removes a run's files only: a subdirectory, a file of another kind or a
    symbolic link is refused (one line, nothing touched)."""
    run = copy_run(finished_run, tmp_path)
    name = foreign.rstrip("/@")
    if foreign.endswith("/"):
        (run / name).mkdir()
    elif foreign.endswith("@"):
        os.symlink(tmp_path, run / name)
    else:
        (run / name).write_text("mine")
    line = refused(capsys, [*TINY, "--epochs", "1", "--overwrite"], run)
    assert line == (f"elbolab fit: error: {run}: holds {name}, which no elbolab run writes; overwriting replaces a "
                    "run's files only: remove it, or choose another directory")
