"""Data: the built-in digits, MNIST-style IDX files, a user's own matrix; splits,
binarization and validation.

Every array that leaves this module is float32 of shape (N, D), finite, non-empty.
Every problem is a :class:`DataError` whose message is one line naming the source.

Binarization (for Bernoulli decoders):

* ``threshold``: a pixel is 1 where its grey level in [0, 1] is >= 0.5 (for the
  8x8 digits, whose levels run 0..16, that is a raw value >= 8);
* ``static``: one Bernoulli draw of the grey levels with a fixed seed, for every split;
* ``dynamic``: a fresh Bernoulli draw of each training mini-batch at every epoch (the
  IWAE paper's protocol); validation and test sets get one seeded static draw so that
  their numbers are comparable across runs;
* ``none``: the values are used as they are (a Bernoulli model then requires them
  to be exactly 0 or 1).
"""

from __future__ import annotations

import array
import csv
import gzip
import io
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from elbolab.models.errors import DataError, UsageError
from elbolab.models.resources import GiB, check_memory, open_regular

BINARIZE = ("none", "threshold", "static", "dynamic")
BUILTIN = ("digits",)
IDX_DATASETS = ("mnist", "fashion-mnist")
DATASETS = BUILTIN + IDX_DATASETS
THRESHOLD = 0.5
# The digits split is fixed: it does not move with a run's --seed, so numbers from
# different runs are on the same rows.
DIGITS_SPLIT_SEED = 0
DIGITS_N_VAL = 270
DIGITS_N_TEST = 270
STATIC_BINARIZE_SEED = 1234  # the seed of the one "static" Bernoulli draw
# A file's header is checked against the bytes actually there before anything is
# allocated; a gzip stream (whose size is unknown until read) is read in chunks and
# may declare at most this many payload bytes (1 GiB: 1.3 million 28x28 images).
MAX_GZIP_PAYLOAD = 1 << 30
# Only regular files are read (a FIFO would block, /dev/zero never ends), of at most
# these sizes; the values they declare must also fit the memory available (each value
# is held as read, as float64 while checked, and as float32).
MAX_FILE_BYTES = 16 * GiB  # .npy, .npz, IDX
MAX_CSV_BYTES = 1 * GiB  # parsed row by row into float64 values: up to CSV_MEMORY_FACTOR times its size
# Bytes of memory per byte of CSV text while it is parsed: 8 bytes of float64 per value,
# and a value takes at least 2 bytes of text (a digit and a separator), so at most 4 and
# the buffer's growth. The tracemalloc peak of _read_csv, measured: 4.1 times the file
# for one-digit integers (20000 x 64, 640000 x 2, 1280000 x 1), 3.4 for integers 0-16
# (20000 x 64), 0.9 for 6-decimal floats in [0, 1) (20000 x 64).
CSV_MEMORY_FACTOR = 5
_CHUNK = 1 << 22
# Errors a corrupt or hostile file can raise while being read.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile, csv.Error,
                NotImplementedError, struct.error)


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test matrices of one data set, float32 (N, D).

    For ``binarize == "dynamic"`` ``train`` holds grey levels and the loader draws
    a fresh binarization per epoch; ``val`` and ``test`` are binarized once.
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    binarize: str = "none"
    image_shape: tuple[int, int] | None = None
    source: str = ""
    # class labels (N,) int64 of each split where the data set has them (digits, IDX sets)
    train_labels: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.train.shape[0])

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "source": self.source,
            "binarize": self.binarize,
            "n_train": self.n_train,
            "n_val": int(self.val.shape[0]),
            "n_test": int(self.test.shape[0]),
            "data_dim": self.data_dim,
            "image_shape": list(self.image_shape) if self.image_shape else None,
        }


# --------------------------------------------------------------------------- checks


def validate_matrix(arr, source: str) -> np.ndarray:
    """Return ``arr`` as a finite, non-empty float64 matrix (N, D) or raise DataError.

    Rank 1 is read as N observations of one variable (N, 1); rank 3 as N images,
    flattened; any other rank is refused.
    """
    arr = np.asarray(arr)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ):
        raise DataError(f"{source}: values must be numbers, found dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise DataError(f"{source}: complex values are not supported")
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim == 3:
        arr = arr.reshape(arr.shape[0], arr.shape[1] * arr.shape[2])
    elif arr.ndim != 2:
        raise DataError(
            f"{source}: expected a matrix (N, D), N images (N, H, W) or a vector, "
            f"got an array of rank {arr.ndim} and shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{source}: empty data, shape {tuple(arr.shape)}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        kind = "NaN" if np.isnan(arr[r, c]) else "an infinite value"
        raise DataError(
            f"{source}: {int(bad.sum())} non-finite value(s); first is {kind} at row {r}, column {c}"
        )
    big = np.abs(arr) > np.finfo(np.float32).max  # finite here, infinite once in float32
    if big.any():
        r, c = np.argwhere(big)[0]
        raise DataError(f"{source}: {int(big.sum())} value(s) too large for float32 (|x| > 3.4e38); "
                        f"first is {arr[r, c]:g} at row {r}, column {c}")
    return arr


def check_unit_interval(x: torch.Tensor, source: str, likelihood: str = "Bernoulli") -> None:
    if x.numel() == 0:  # an empty split (e.g. --val-fraction 0) has nothing to check
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{source}: a {likelihood} likelihood needs values in [0, 1], found [{lo:g}, {hi:g}];"
            " rescale the data, or use the gaussian likelihood for real-valued data"
        )


def check_binary(x: torch.Tensor, source: str) -> None:
    """A Bernoulli decoder needs 0/1 data: say how to get it if it is not."""
    check_unit_interval(x, source)
    nonbinary = (x != 0) & (x != 1)
    if bool(nonbinary.any()):
        n = int(nonbinary.sum())
        raise DataError(
            f"{source}: a Bernoulli likelihood needs binary data, found {n} value(s) strictly"
            " between 0 and 1; binarize them (threshold, static or dynamic), or use the continuous-bernoulli"
            " likelihood for grey levels"
        )


# --------------------------------------------------------------------------- readers


def _values_fit(n_values: int, itemsize: int, source: str) -> None:
    """Refuse data whose values, as read, as float64 and as float32, would not fit in memory."""
    check_memory(n_values * (itemsize + 8 + 4), f"{source}: its {n_values} values")


_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_at_most(f, n: int) -> bytes:
    """Up to ``n`` bytes, in chunks: a false size claim never allocates more than the data."""
    parts, got = [], 0
    while got < n:
        part = f.read(min(_CHUNK, n - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (plain or gzip): magic, dims, then the payload, all checked.

    The header is checked against the data before the payload is read: a plain
    file's size must match it exactly; a gzip stream is read in chunks up to the
    declared size (at most ``MAX_GZIP_PAYLOAD``) and must end there.
    """
    try:
        raw = open_regular(path, MAX_FILE_BYTES, "IDX file")
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        with raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: too short for an IDX file ({len(head)} bytes)")
            zero, code, ndim = struct.unpack(">HBB", head)
            if zero != 0 or code not in _IDX_DTYPES or not 1 <= ndim <= 4:
                raise DataError(f"{path}: bad IDX magic number 0x{head.hex()}")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            dims = struct.unpack(">" + "I" * ndim, raw_dims)
            dtype = _IDX_DTYPES[code]
            header = 4 + 4 * ndim
            expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
            if not gz:
                size = os.fstat(f.fileno()).st_size
                if size != header + expected:
                    raise DataError(f"{path}: size {size} bytes does not match its header "
                                    f"(dims {dims}: {header + expected} bytes)")
            elif expected > MAX_GZIP_PAYLOAD:
                raise DataError(f"{path}: its header declares {expected} bytes (dims {dims}), more than "
                                f"the {MAX_GZIP_PAYLOAD} a gzip IDX file may hold here")
            _values_fit(math.prod(dims), dtype.itemsize, path)
            payload = _read_at_most(f, expected + 1)
    except UsageError:  # DataError, or a refusal for lack of memory
        raise
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read it ({_first_line(e)})") from None
    if len(payload) != expected:
        got = "more" if len(payload) > expected else f"{header + len(payload)} bytes"
        raise DataError(f"{path}: size ({'decompressed, ' if gz else ''}{got}) does not match its header "
                        f"(dims {dims}: {header + expected} bytes)")
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _find(data_dir: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        p = os.path.join(data_dir, name)
        if os.path.exists(p):  # a regular file, or something read_idx refuses by name
            return p
    raise DataError(f"{os.path.join(data_dir, stem)}[.gz]: no such file")


def load_idx_pair(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28*28) in [0, 1] and labels (N,) of ``split`` in {"train", "t10k"}."""
    if not os.path.isdir(data_dir):
        what = "is not a directory" if os.path.exists(data_dir) else "no such directory"
        raise DataError(f"{data_dir}: {what} (the data directory)")
    ipath = _find(data_dir, f"{split}-images-idx3-ubyte")
    lpath = _find(data_dir, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(ipath), read_idx(lpath)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{ipath}: expected unsigned-byte images of rank 3, got {images.dtype.name} "
                        f"values of rank {images.ndim}")
    if labels.ndim != 1:
        raise DataError(f"{lpath}: expected labels of rank 1, got rank {labels.ndim}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{ipath}: {images.shape[0]} images but {labels.shape[0]} labels in {os.path.basename(lpath)}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{ipath}: no images")
    if images.shape[1] * images.shape[2] == 0:
        raise DataError(f"{ipath}: images of {images.shape[1]} x {images.shape[2]} pixels")
    pixels = images.reshape(images.shape[0], images.shape[1] * images.shape[2])
    return pixels.astype(np.float32) / 255.0, labels.astype(np.int64)


def _read_csv(path: str) -> np.ndarray:
    """A numeric CSV in UTF-8 (a byte-order mark is fine; an all-text first row is a
    header; blank lines are skipped). Errors name the file's line and column (1-based).

    Read one row at a time into a flat buffer of float64 values: no row's text is kept
    once it is parsed (see ``CSV_MEMORY_FACTOR``)."""
    with io.TextIOWrapper(open_regular(path, MAX_CSV_BYTES, "CSV file"), newline="", encoding="utf-8-sig") as f:
        check_memory(CSV_MEMORY_FACTOR * os.fstat(f.fileno()).st_size, f"{path}: parsing it")
        reader = csv.reader(f)
        values = array.array("d")
        width = None  # the first row's width (a header's, if there is one)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            if width is None:
                width = len(row)
                if not any(_is_number(c.strip()) for c in row):  # a header row, every field text
                    continue
            elif len(row) != width:
                raise DataError(f"{path}: row {line} has {len(row)} fields, expected {width}")
            try:
                parsed = [float(c) for c in row]  # float() ignores surrounding whitespace
            except ValueError:
                parsed = [_parse_cell(path, c, line, j) for j, c in enumerate(row)]  # raises naming the cell
            values.extend(parsed)
    if width is None:
        raise DataError(f"{path}: empty CSV file")
    if not values:
        raise DataError(f"{path}: no data rows")
    return np.frombuffer(values, dtype=np.float64).reshape(-1, width)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _parse_cell(path: str, cell: str, line: int, j: int) -> float:
    s = cell.strip()
    if s == "":
        raise DataError(f"{path}: empty cell at row {line}, column {j + 1}")
    try:
        return float(s)
    except ValueError:
        raise DataError(f"{path}: not a number at row {line}, column {j + 1}: {s[:40]!r}") from None


def _check_npy_header(f, available: int, source: str) -> None:
    """Read a .npy header from ``f`` and check it against the ``available`` bytes
    (file or archive-member size) before numpy allocates the array it declares."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if dtype.hasobject:
        raise DataError(f"{source}: holds Python objects (a pickled array); only numeric arrays are read")
    need = math.prod(shape) * dtype.itemsize
    if need <= available - f.tell():
        _values_fit(math.prod(shape), dtype.itemsize, source)
    if need > available - f.tell():
        raise DataError(f"{source}: its header declares shape {tuple(shape)} of {dtype} ({need} bytes) "
                        f"but the file holds {max(available - f.tell(), 0)}")


def load_matrix(path: str) -> np.ndarray:
    """A user's matrix from .npy, .npz (one array, or the key ``x``/``X``/``data``) or .csv."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            with open_regular(path, MAX_FILE_BYTES, ".npy, .npz or .csv file") as f:
                _check_npy_header(f, os.fstat(f.fileno()).st_size, path)
                f.seek(0)
                arr = np.load(f, allow_pickle=False)
        elif ext == ".npz":
            with open_regular(path, MAX_FILE_BYTES, ".npy, .npz or .csv file") as f:
                arr = _load_npz(f, path)
        elif ext == ".csv":
            arr = _read_csv(path)
        else:
            open_regular(path, None, ".npy, .npz or .csv file").close()  # absent, a directory, a FIFO: say so
            raise DataError(f"{path}: unknown file type {ext or '(none)'}; use .npy, .npz or .csv")
    except UsageError:  # DataError, or a refusal for lack of memory
        raise
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read it ({_first_line(e)})") from None
    return validate_matrix(arr, path)


def _load_npz(f, path: str) -> np.ndarray:
    """The array of an open .npz archive: the only one, or the one named x, X or data."""
    if not zipfile.is_zipfile(f):
        raise DataError(f"{path}: not a .npz (zip) archive")
    f.seek(0)
    with np.load(f, allow_pickle=False) as z:
        keys = list(z.keys())
        if not keys:
            raise DataError(f"{path}: the .npz archive holds no arrays")
        key = next((k for k in ("x", "X", "data") if k in keys), None)
        if key is None and len(keys) == 1:
            key = keys[0]
        if key is None:
            raise DataError(f"{path}: several arrays {keys}; name one of them x")
        member = key if key in z.zip.namelist() else key + ".npy"
        with z.zip.open(member) as m:
            _check_npy_header(m, z.zip.getinfo(member).file_size, f"{path}[{key}]")
        return z[key]


# --------------------------------------------------------------------------- splits


def _split_rows(n: int, n_val: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _bernoulli(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=g)


def bernoulli_draw(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One Bernoulli(x) draw per entry as (u < x) with u ~ U[0, 1) seeded: the law of
    torch.bernoulli (P(u < x) = x; 0 and 1 stay put), about 3 times faster on a CPU
    (0.38 against 1.1 ms for 100 MNIST images, one thread), where torch.bernoulli
    draws entry by entry. torch's CPU kernel compares the same uniforms, so the draws
    are the very ones ``_bernoulli`` makes (tests/test_perf.py). Used for the
    per-batch draws of dynamic binarization."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape, generator=g, dtype=x.dtype) < x).to(x.dtype)


def _binarize(splits: DataSplits, mode: str) -> DataSplits:
    if mode == "none":
        return splits
    for name in ("train", "val", "test"):
        check_unit_interval(getattr(splits, name), splits.source)
    if mode == "threshold":
        f = lambda x, s: (x >= THRESHOLD).float()  # noqa: E731
    else:
        f = lambda x, s: _bernoulli(x, STATIC_BINARIZE_SEED + s)  # noqa: E731
    train = splits.train if mode == "dynamic" else f(splits.train, 0)
    return replace(splits, train=train, val=f(splits.val, 1), test=f(splits.test, 2), binarize=mode)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as grey levels in [0, 1] (raw 0..16 divided by 16), and labels."""
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    return d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)


def load_labels(path: str, n_rows: int, source: str) -> np.ndarray:
    """Class labels (N,) int64 from a .npy/.npz/.csv vector of ``n_rows`` integers (one per
    row of ``source``)."""
    y = load_matrix(path)
    if y.shape[1] != 1:
        raise DataError(f"{path}: labels must be a vector (one per row), got shape {tuple(y.shape)}")
    y = y[:, 0]
    if y.shape[0] != n_rows:
        raise DataError(f"{path}: {y.shape[0]} labels for the {n_rows} rows of {source}")
    if not np.all(y == np.round(y)):
        raise DataError(f"{path}: labels must be integers (class labels)")
    return y.astype(np.int64)


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | None = None,
    data_path: str | None = None,
    binarize: str = "none",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    test_path: str | None = None,
    labels_path: str | None = None,
    test_labels_path: str | None = None,
) -> DataSplits:
    """Load a data set by name (``digits``, ``mnist``, ``fashion-mnist``) or a user's file.

    ``data_path`` (a .npy/.npz/.csv matrix) wins over ``name``; its rows are split
    into train/val/test (``val_fraction``, ``test_fraction`` of them) with ``split_seed``;
    ``test_path``: a matrix of test rows of its own (the user's split: ``data_path``'s
    rows are then train and val only). ``labels_path`` / ``test_labels_path``: class
    labels, one integer per row of ``data_path`` / ``test_path`` (they colour the latent
    plots). MNIST-style sets keep their own test set and carve the validation rows out
    of the training set with ``split_seed``; the digits' split is fixed.
    """
    if binarize not in BINARIZE:
        raise DataError(f"binarize must be one of {', '.join(BINARIZE)}, got {binarize!r}")
    for label, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{label} must be in [0, 1), got {frac:g}")
    if data_path is None and (test_path or labels_path or test_labels_path):
        raise DataError("test_path, labels_path and test_labels_path go with a data_path of the user's own")
    if test_labels_path is not None and test_path is None:
        raise DataError("test_labels_path labels the rows of a test_path")
    to_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    if data_path is not None:
        x = load_matrix(data_path)
        y = None if labels_path is None else load_labels(labels_path, x.shape[0], data_path)
        n = x.shape[0]
        n_val = int(round(val_fraction * n))
        n_test = 0 if test_path is not None else int(round(test_fraction * n))
        if n - n_val - n_test < 1:
            raise DataError(f"{data_path}: {n} row(s) leave none for training")
        tr, va, te = _split_rows(n, n_val, n_test, split_seed)
        x_test, y_test = x[te], None if y is None else y[te]
        if test_path is not None:
            x_test = load_matrix(test_path)
            if x_test.shape[1] != x.shape[1]:
                raise DataError(f"{test_path}: {x_test.shape[1]} columns, the training rows ({data_path}) have "
                                f"{x.shape[1]}")
            y_test = None if test_labels_path is None else load_labels(test_labels_path, x_test.shape[0], test_path)
        label = (lambda v: None if v is None else torch.as_tensor(v))  # noqa: E731
        splits = DataSplits(
            name=os.path.splitext(os.path.basename(data_path))[0],
            train=to_t(x[tr]), val=to_t(x[va]), test=to_t(x_test), source=data_path,
            train_labels=label(None if y is None else y[tr]), val_labels=label(None if y is None else y[va]),
            test_labels=label(y_test),
        )
    elif name == "digits":
        x, y = load_digits()
        tr, va, te = _split_rows(x.shape[0], DIGITS_N_VAL, DIGITS_N_TEST, DIGITS_SPLIT_SEED)
        splits = DataSplits(
            name="digits", train=to_t(x[tr]), val=to_t(x[va]), test=to_t(x[te]),
            image_shape=(8, 8), source="scikit-learn load_digits (8x8, levels 0..16 / 16)",
            train_labels=torch.as_tensor(y[tr]), val_labels=torch.as_tensor(y[va]), test_labels=torch.as_tensor(y[te]),
        )
    elif name in IDX_DATASETS:
        if data_dir is None:
            raise DataError(f"dataset {name} needs data_dir, the directory holding its IDX files")
        x_train, y_train = load_idx_pair(data_dir, "train")
        x_test, y_test = load_idx_pair(data_dir, "t10k")
        if x_train.shape[1] != x_test.shape[1]:
            raise DataError(f"{data_dir}: train images have {x_train.shape[1]} pixels, test images {x_test.shape[1]}")
        n = x_train.shape[0]
        n_val = int(round(val_fraction * n))
        tr, va, _ = _split_rows(n, n_val, 0, split_seed)
        side = int(math.isqrt(x_train.shape[1]))
        splits = DataSplits(
            name=name, train=to_t(x_train[tr]), val=to_t(x_train[va]), test=to_t(x_test),
            image_shape=(side, side) if side * side == x_train.shape[1] else None, source=data_dir,
            train_labels=torch.as_tensor(y_train[tr]), val_labels=torch.as_tensor(y_train[va]),
            test_labels=torch.as_tensor(y_test),
        )
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or give a data file")
    return _binarize(splits, binarize)
