"""MNIST from its standard gzipped IDX files, and a tensor batch iterator without DataLoader overhead.

Files (the standard names, in ``<data_root>/mnist/``): ``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``.

IDX format (big-endian): a 4-byte magic number ``0x00 0x00 <dtype code> <number of dims>`` (0x08 =
unsigned byte), then one 4-byte size per dimension, then the raw data.  Images are ``(N, 28, 28)``
(magic 0x00000803), labels ``(N,)`` (magic 0x00000801).

Normalisation: the official LCP code feeds MNIST through ``transforms.ToTensor()`` only, i.e. pixels are
scaled to ``[0, 1]`` and not standardised; that is the default here (``normalize="unit"``).
``normalize="standard"`` additionally applies ``(x - 0.1307) / 0.3081`` (training-set mean and std).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils import find_data_root
from ..utils.paths import DataNotFoundError
from ..utils.errors import DataFormatError, UserInputError

__all__ = ["MNIST_FILES", "MNIST_MEAN", "MNIST_STD", "IDXFormatError", "read_idx", "load_mnist", "TensorBatches"]

MNIST_FILES: Dict[str, Tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_SIZES = {"train": 60000, "test": 10000}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801

# raw uint8 arrays, keyed by (absolute path, size, mtime): a second load of the same file costs nothing
_CACHE: Dict[Tuple[str, int, float], np.ndarray] = {}


class IDXFormatError(DataFormatError):
    """An IDX file whose header or size does not match what MNIST should contain."""


def read_idx(path: "str | os.PathLike", magic: int, dims: Optional[Sequence[Optional[int]]] = None) -> np.ndarray:
    """Read a (gzipped when the name ends in ``.gz``) IDX file of unsigned bytes and check its header.

    Args:
        path: the file.
        magic: the expected magic number (``0x803`` for 3-d image stacks, ``0x801`` for label vectors).
        dims: expected size of each dimension (``None`` entries are not checked).
    Returns:
        a read-only ``uint8`` array of the shape stored in the header.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime)
    if key in _CACHE:
        return _CACHE[key]
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises these for truncated, corrupt or non-gzip content
        raise IDXFormatError(f"{path}: cannot read as {'gzip ' if opener is gzip.open else ''}IDX file ({exc})") from exc
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise IDXFormatError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} "
                             f"({'images' if magic == _IMAGES_MAGIC else 'labels'} of unsigned bytes)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes, expected at least {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims is not None:
        if len(dims) != ndim or any(d is not None and d != s for d, s in zip(dims, shape)):
            want = tuple("*" if d is None else d for d in dims)
            raise IDXFormatError(f"{path}: header shape {shape}, expected {want}")
    payload = len(raw) - header
    if payload != math.prod(shape):
        raise IDXFormatError(f"{path}: {payload} data bytes after the header, expected {math.prod(shape)} "
                             f"for shape {shape} (file truncated or corrupt)")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    _CACHE[key] = arr
    return arr


def _download(folder: Path) -> None:
    """Fetch the four gzipped files into ``folder`` through torchvision's mirrors (never used in tests)."""
    try:
        from torchvision.datasets import MNIST
        from torchvision.datasets.utils import download_url
    except ImportError as exc:
        raise DataNotFoundError("download=True needs torchvision; install it or place the MNIST files yourself") from exc
    folder.mkdir(parents=True, exist_ok=True)
    for filename, md5 in MNIST.resources:
        if (folder / filename).is_file():
            continue
        errors = []
        for mirror in MNIST.mirrors:
            try:
                download_url(f"{mirror}{filename}", root=str(folder), filename=filename, md5=md5)
                break
            except Exception as exc:  # try the next mirror; report all failures together
                errors.append(f"{mirror}: {exc}")
        else:
            raise DataNotFoundError(f"could not download {filename}: " + "; ".join(errors))


def load_mnist(data_root: Optional[str] = None, split: str = "train", *, normalize: str = "unit",
               device: "str | torch.device | None" = None, download: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST images and labels as tensors.

    Args:
        data_root: folder holding ``mnist/`` (else ``$LCP_META_DATA``).
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        normalize: ``"unit"`` -- pixels in ``[0, 1]`` as in the official code; ``"standard"`` --
            additionally ``(x - 0.1307) / 0.3081``; ``"none"`` -- raw 0..255 values as floats.
        device: where the returned tensors live (the whole set is moved once).
        download: fetch missing files with torchvision first (needs the network).
    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` and int64 ``(N,)``.
    """
    if split not in MNIST_FILES:
        raise UserInputError(f"unknown MNIST split {split!r}; expected 'train' or 'test'")
    if normalize not in ("unit", "standard", "none"):
        raise UserInputError(f"unknown normalize={normalize!r}; expected 'unit', 'standard' or 'none'")
    names = MNIST_FILES[split]
    if download:
        root = data_root or os.environ.get("LCP_META_DATA")
        if not root:
            raise DataNotFoundError("download=True needs a data root (pass data_root or set LCP_META_DATA)")
        _download(Path(root).expanduser() / "mnist")
    folder = find_data_root(data_root, "mnist", names)
    n = MNIST_SIZES[split]
    images = read_idx(folder / names[0], _IMAGES_MAGIC, (n, 28, 28))
    labels = read_idx(folder / names[1], _LABELS_MAGIC, (n,))
    if labels.max() > 9:
        raise IDXFormatError(f"{folder / names[1]}: label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images.copy()).to(device=device, dtype=torch.float32).unsqueeze(1)
    if normalize != "none":
        x = x / 255.0
    if normalize == "standard":
        x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return x, y


class TensorBatches:
    """Mini-batches of in-memory tensors, shuffled reproducibly, with no DataLoader worker overhead.

    The tensors are moved to ``device`` once; each batch is an index into them, so on a GPU an epoch
    never copies from the host.  The shuffle of epoch ``e`` is drawn from a generator seeded with
    ``(seed, e)`` alone, so it does not depend on the global RNG or on what ran before: a resumed run
    sees exactly the batches of an uninterrupted one.

    Args:
        x, y: inputs and targets with the same first dimension.
        batch_size: samples per batch (64 in the paper's experiments).
        shuffle: draw a new permutation every epoch (otherwise the stored order).
        drop_last: drop a final batch smaller than ``batch_size``.
        seed: base seed of the per-epoch shuffles.
        device: where batches live (default: where ``x`` already is).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, *, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0, device: "str | torch.device | None" = None):
        if x.shape[0] != y.shape[0]:
            raise UserInputError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
        if int(batch_size) < 1:
            raise UserInputError(f"batch_size must be a positive integer, got {batch_size}")
        self.x = x.to(device) if device is not None else x
        self.y = y.to(self.x.device)
        self.batch_size, self.shuffle, self.drop_last, self.seed = int(batch_size), shuffle, drop_last, int(seed)

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (on the data's device)."""
        n = self.x.shape[0]
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))  # CPU generator: same on every device
        return torch.randperm(n, generator=g).to(self.device)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start+1, ...`` of ``epoch`` (``start`` > 0 resumes in the middle of an epoch)."""
        idx = self.order(epoch)
        for b in range(int(start), len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[sel], self.y[sel]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch 0 (``batches(epoch)`` for any other)."""
        return self.batches(0)
