"""Data loading: the built-in digits, IDX files, users' matrices, binarization, batches."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from elbolab.inference import batches
from elbolab.inference.errors import DataError
from elbolab.models import datasources as loaders


def test_digits_fixed_split_and_range():
    a = loaders.load_dataset("digits")
    b = loaders.load_dataset("digits", split_seed=123)  # the digits split does not move
    assert (a.n_train, a.val.shape[0], a.test.shape[0]) == (1257, 270, 270)
    assert a.data_dim == 64 and a.image_shape == (8, 8)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    allx = torch.cat([a.train, a.val, a.test])
    assert float(allx.min()) == 0.0 and float(allx.max()) == 1.0
    # no row is in two splits (rows are distinct images up to duplicates; compare counts)
    assert allx.shape[0] == 1797


def test_digits_threshold_is_raw_level_eight():
    raw, _ = loaders.load_digits()  # levels / 16
    splits = loaders.load_dataset("digits", binarize="threshold")
    cont = loaders.load_dataset("digits")
    assert torch.equal(splits.train, (cont.train * 16 >= 8).float())
    assert set(torch.unique(splits.train).tolist()) == {0.0, 1.0}
    assert np.isclose(raw.max() * 16, 16)


def test_static_binarization_is_seeded_and_dynamic_draws_per_epoch():
    s1 = loaders.load_dataset("digits", binarize="static")
    s2 = loaders.load_dataset("digits", binarize="static")
    assert torch.equal(s1.train, s2.train)
    d = loaders.load_dataset("digits", binarize="dynamic")
    assert not torch.equal(d.train, (d.train > 0.5).float())  # grey levels kept for training
    assert set(torch.unique(d.test).tolist()) <= {0.0, 1.0}
    loader = batches.batch_loader(d.train, 2000, seed=3, shuffle=False, dynamic=True)
    loader.sampler.set_epoch(0)
    e0, _ = next(iter(loader))
    e0_again, _ = next(iter(loader))
    loader.sampler.set_epoch(1)
    e1, _ = next(iter(loader))
    assert torch.equal(e0, e0_again)  # same epoch, same draw (resumable)
    assert not torch.equal(e0, e1)  # a fresh draw per epoch
    # the draws are Bernoulli(grey level): the mean over many epochs approaches it
    acc = torch.zeros_like(d.train)
    for ep in range(200):
        loader.sampler.set_epoch(ep)
        acc += next(iter(loader))[0]
    # 200 draws: s.e. of a frequency <= 0.5/sqrt(200) = 0.035; 6 s.e. = 0.21
    assert float((acc / 200 - d.train).abs().max()) < 0.21


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_batches_cover_rows_and_shard(world_size):
    n, bs = 23, 4
    seen = []
    for rank in range(world_size):
        s = batches.EpochBatches(n, bs, seed=1, rank=rank, world_size=world_size)
        s.set_epoch(5)
        listed = list(s)
        assert len(listed) == len(s)
        seen.append(torch.cat([b for b, _ in listed]))
    allrows = torch.cat(seen)
    assert set(allrows.tolist()) == set(range(n))  # global indices, every row
    assert len({len(r) for r in seen}) == 1  # every rank the same number of rows
    s = batches.EpochBatches(n, bs, seed=1)
    s.set_epoch(0)
    a = torch.cat([b for b, _ in s])
    s.set_epoch(1)
    b = torch.cat([b for b, _ in s])
    assert not torch.equal(a, b) and sorted(a.tolist()) == list(range(n))


# ---------------------------------------------------------------- IDX files


def write_idx(path, arr, gz=False, magic=None):
    arr = np.asarray(arr, dtype=np.uint8)
    head = magic if magic is not None else struct.pack(">HBB", 0, 0x08, arr.ndim)
    raw = head + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def make_idx_dir(tmp_path, n_train=12, n_test=5, gz=True, side=4):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_train, side, side)), gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_train), gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, side, side)), gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_test), gz)
    return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    make_idx_dir(tmp_path, gz=gz)
    d = loaders.load_dataset("mnist", data_dir=str(tmp_path), val_fraction=0.25)
    assert (d.n_train, d.val.shape[0], d.test.shape[0], d.data_dim) == (9, 3, 5, 16)
    assert d.image_shape == (4, 4)
    raw = loaders.read_idx(str(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))))
    assert raw.shape == (12, 4, 4)
    assert float(d.train.max()) <= 1.0


def test_idx_bad_magic(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 4, 4)), gz=True, magic=b"\x08\x03\x00\x00")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: bad IDX magic"):
        loaders.load_dataset("mnist", data_dir=str(tmp_path))


def test_idx_truncated(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(DataError, match="does not match its header"):
        loaders.load_dataset("mnist", data_dir=str(tmp_path))


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11), gz=True)
    with pytest.raises(DataError, match="12 images but 11 labels"):
        loaders.load_dataset("mnist", data_dir=str(tmp_path))


def test_idx_missing(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[.gz\]: no such file"):
        loaders.load_dataset("fashion-mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="no such directory"):
        loaders.load_dataset("mnist", data_dir=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="needs data_dir"):
        loaders.load_dataset("mnist")


# ---------------------------------------------------------------- user matrices


def test_user_formats_agree(tmp_path):
    x = np.random.default_rng(1).normal(size=(40, 3))
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x)
    np.savetxt(tmp_path / "c.csv", x, delimiter=",", header="u,v,w", comments="")
    got = [loaders.load_matrix(str(tmp_path / f)) for f in ("a.npy", "b.npz", "c.csv")]
    for g in got:
        np.testing.assert_allclose(g, x, rtol=1e-12, atol=1e-15)
    d = loaders.load_dataset(data_path=str(tmp_path / "a.npy"))
    assert d.n_train + d.val.shape[0] + d.test.shape[0] == 40


@pytest.mark.parametrize("content, message", [
    ("1,2\n3,nan\n", "non-finite value.*NaN at row 1, column 1"),
    ("1,2\n3,inf\n", "non-finite.*infinite"),
    ("1,2\n3,abc\n", "not a number at row 2, column 2"),
    ("1,2\n3,\n", "empty cell at row 2, column 2"),
    ("1,2\n3\n", "row 2 has 1 fields, expected 2"),
    ("", "empty CSV file"),
    ("a,b\n", "no data rows"),
])
def test_bad_csv(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        loaders.load_matrix(str(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arr, message", [
    (np.zeros((2, 2, 2, 2)), "rank 4"),
    (np.array(3.0), "rank 0"),
    (np.zeros((0, 3)), "empty data"),
    (np.array(["a", "b"]), "must be numbers"),
    (np.array([1 + 2j, 3j]), "complex"),
])
def test_bad_npy(tmp_path, arr, message):
    p = tmp_path / "bad.npy"
    np.save(p, arr)
    with pytest.raises(DataError, match=message):
        loaders.load_matrix(str(p))


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        loaders.load_matrix(str(tmp_path / "missing.npy"))
    (tmp_path / "x.txt").write_text("1,2")
    with pytest.raises(DataError, match="unknown file type .txt"):
        loaders.load_matrix(str(tmp_path / "x.txt"))
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot read it"):
        loaders.load_matrix(str(tmp_path / "x.npy"))
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.ones(3))
    with pytest.raises(DataError, match="several arrays"):
        loaders.load_matrix(str(tmp_path / "two.npz"))


def test_bernoulli_checks():
    grey = torch.tensor([[0.0, 0.5], [1.0, 1.0]])
    with pytest.raises(DataError, match="binarize them"):
        loaders.check_binary(grey, "x.npy")
    with pytest.raises(DataError, match=r"values in \[0, 1\]"):
        loaders.check_binary(torch.tensor([[2.0]]), "x.npy")
    loaders.check_binary(torch.tensor([[0.0, 1.0]]), "x.npy")
