"""MNIST (IDX) and CIFAR-10 (python pickle) loaders, and the tensor batch iterator."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from lcp_meta.data.cifar import CIFARFormatError, load_cifar10, read_cifar_batch
from lcp_meta.data.mnist import IDXFormatError, TensorBatches, load_mnist, read_idx
from lcp_meta.utils import DataNotFoundError

from conftest import SHARED_DATA as DATA
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"offline MNIST not found in {DATA}")

# canonical MNIST label counts
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_mnist
def test_mnist_shapes_counts_and_pixel_statistics():
    x, y = load_mnist(str(DATA), "train", normalize="unit")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == TRAIN_COUNTS
    assert 0.0 == x.min() and x.max() == 1.0
    mean = x.mean(dtype=torch.float64).item()
    assert mean == pytest.approx(0.1307, abs=5e-5)
    assert (x.square().mean(dtype=torch.float64).item() - mean**2) ** 0.5 == pytest.approx(0.3081, abs=5e-5)
    xt, yt = load_mnist(str(DATA), "test")
    assert xt.shape == (10000, 1, 28, 28) and torch.bincount(yt).tolist() == TEST_COUNTS
    # standardised: the training set has mean 0 and std 1 to the precision of the published constants
    xs, _ = load_mnist(str(DATA), "train", normalize="standard")
    assert xs.mean(dtype=torch.float64).item() == pytest.approx(0.0, abs=5e-4)
    assert xs.square().mean(dtype=torch.float64).item() == pytest.approx(1.0, abs=5e-4)
    raw, _ = load_mnist(str(DATA), "test", normalize="none")
    torch.testing.assert_close(raw / 255.0, xt)


def _write_idx(path, magic, shape, payload, compress=True):
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in shape)
    (gzip.open if compress else open)(path, "wb").write(header + payload)


def _fake_mnist(folder, n_train=60000, n_test=10000, train_images=None):
    folder.mkdir(parents=True, exist_ok=True)
    for n, img, lab in ((n_train, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                        (n_test, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        _write_idx(folder / img, 0x803, (n, 28, 28), bytes(n * 784))
        _write_idx(folder / lab, 0x801, (n,), bytes(np.arange(n, dtype=np.uint8) % 10))


def test_mnist_missing_files_are_named(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataNotFoundError, match="missing train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"):
        load_mnist(str(tmp_path), "train")
    with pytest.raises(ValueError, match="expected 'train' or 'test'"):
        load_mnist(str(tmp_path), "validation")


def test_mnist_malformed_files_give_clear_errors(tmp_path):
    _fake_mnist(tmp_path / "mnist", n_test=10000)
    x, y = load_mnist(str(tmp_path), "test")  # a well-formed file loads
    assert x.shape == (10000, 1, 28, 28) and y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    f = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    _write_idx(f, 0x801, (10000, 28, 28), bytes(10000 * 784))  # label magic on an image file
    with pytest.raises(IDXFormatError, match="magic number 0x00000801, expected 0x00000803"):
        load_mnist(str(tmp_path), "test")
    _write_idx(f, 0x803, (10000, 28, 28), bytes(1000))  # truncated payload
    with pytest.raises(IDXFormatError, match="1000 data bytes after the header, expected 7840000"):
        load_mnist(str(tmp_path), "test")
    _write_idx(f, 0x803, (9999, 28, 28), bytes(9999 * 784))  # wrong count for the split
    with pytest.raises(IDXFormatError, match=r"header shape \(9999, 28, 28\), expected \(10000, 28, 28\)"):
        load_mnist(str(tmp_path), "test")
    f.write_bytes(b"not gzip at all")
    with pytest.raises(IDXFormatError, match="cannot read as gzip IDX"):
        load_mnist(str(tmp_path), "test")
    raw = tmp_path / "labels.idx"  # uncompressed IDX with a label > 9 is caught by the MNIST loader only
    _write_idx(raw, 0x801, (3,), bytes([1, 2, 3]), compress=False)
    assert read_idx(raw, 0x801, (3,)).tolist() == [1, 2, 3]


def test_batches_are_seeded_complete_and_resumable():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    b = TensorBatches(x, y, batch_size=4, seed=7)
    assert len(b) == 3 and len(TensorBatches(x, y, 4, drop_last=True)) == 2
    ep0 = [yb.tolist() for _, yb in b.batches(0)]
    assert [len(e) for e in ep0] == [4, 4, 2] and sorted(sum(ep0, [])) == list(range(10))
    assert ep0 == [yb.tolist() for _, yb in TensorBatches(x, y, 4, seed=7).batches(0)]  # same seed, same order
    assert ep0 != [yb.tolist() for _, yb in b.batches(1)]  # a new shuffle each epoch
    assert [yb.tolist() for _, yb in b.batches(0, start=1)] == ep0[1:]  # resuming inside an epoch
    for xb, yb in b.batches(2):
        assert torch.equal(xb[:, 0].long(), yb)  # inputs stay paired with their targets
    assert [yb.tolist() for _, yb in TensorBatches(x, y, 4, shuffle=False)][0] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="same number of samples"):
        TensorBatches(x, y[:5])


def _cifar_file(path, n, seed, labels=None, data=None, key_type=bytes):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"training batch", b"labels": list(labels if labels is not None else rng.integers(0, 10, n)),
         b"data": data if data is not None else rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [b"img%d.png" % i for i in range(n)]}
    if key_type is str:
        d = {k.decode(): v for k, v in d.items()}
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    return d


def test_cifar_loader_reads_the_pickle_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = [_cifar_file(folder / f"data_batch_{i}", 5, i) for i in range(1, 6)]
    test = _cifar_file(folder / "test_batch", 4, 9, key_type=str)
    x, y = load_cifar10(str(tmp_path), "train", normalize="none")
    assert x.shape == (25, 3, 32, 32) and y.dtype == torch.int64
    assert y.tolist() == sum([list(map(int, w[b"labels"])) for w in written], [])
    # row layout: 1024 red, then green, then blue values, each a 32x32 image in row-major order
    row = written[2][b"data"][1]
    img = x[11]
    assert img[0, 0, 0] == row[0] and img[0, 0, 1] == row[1] and img[0, 1, 0] == row[32]
    assert img[1, 0, 0] == row[1024] and img[2, 31, 31] == row[3071]
    xs, yt = load_cifar10(str(tmp_path), "test")  # standardised per channel with the official constants
    raw = torch.from_numpy(test["data"]).float().view(4, 3, 32, 32) / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    torch.testing.assert_close(xs, (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    assert yt.tolist() == list(map(int, test["labels"]))


def test_cifar_bad_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with pytest.raises(DataNotFoundError, match="missing data_batch_1, data_batch_2"):
        load_cifar10(str(tmp_path), "train")
    f = folder / "test_batch"
    _cifar_file(f, 3, 0, labels=[1, 2, 10])
    with pytest.raises(CIFARFormatError, match="labels outside 0..9"):
        read_cifar_batch(f)
    _cifar_file(f, 3, 0, data=np.zeros((3, 100), np.uint8))
    with pytest.raises(CIFARFormatError, match=r"expected uint8 \(N, 3072\)"):
        read_cifar_batch(f)
    with open(f, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)
    with pytest.raises(CIFARFormatError, match="missing key"):
        read_cifar_batch(f)

    class Evil:  # a pickle that would call a function on load is refused, not executed
        def __reduce__(self):
            return (print, ("pwned",))

    with open(f, "wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(CIFARFormatError, match="builtins.print is not allowed"):
        read_cifar_batch(f)
    f.write_bytes(b"\x00garbage")
    with pytest.raises(CIFARFormatError, match="not a CIFAR-10 python batch file"):
        read_cifar_batch(f)
