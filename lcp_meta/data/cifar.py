"""CIFAR-10 from its python pickles (the ``cifar-10-python.tar.gz`` layout).

Files (in ``<data_root>/cifar-10-batches-py/``, the folder the official archive unpacks to and the
one torchvision uses): ``data_batch_1`` ... ``data_batch_5`` (training, 10,000 images each) and
``test_batch``.  Each is a pickled dict with ``b"data"``: a ``(10000, 3072)`` uint8 array, rows laid out
as 1024 red, 1024 green, 1024 blue values of a 32x32 image in row-major order, and ``b"labels"``: a
list of ints in 0..9.

Pickles can run code when loaded; the files are read with an unpickler that only admits the numpy
array and dtype constructors these files need, so a tampered file fails instead of executing.

Normalisation: the official LCP code standardises each channel with mean (0.4914, 0.4822, 0.4465) and
std (0.2023, 0.1994, 0.2010); that is the default (``normalize="standard"``); ``"unit"`` only scales to
``[0, 1]``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..utils import find_data_root
from ..utils.paths import DataNotFoundError
from ..utils.errors import DataFormatError, UserInputError

__all__ = ["CIFAR10_FOLDER", "CIFAR10_TRAIN_FILES", "CIFAR10_TEST_FILES", "CIFAR10_MEAN", "CIFAR10_STD",
           "CIFARFormatError", "read_cifar_batch", "load_cifar10"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# the only globals a CIFAR pickle references (numpy moved core -> _core in 2.0; both spellings occur)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how python 3 writes byte strings into protocol-2 pickles
}


class CIFARFormatError(DataFormatError):
    """A CIFAR batch file that is not a pickle of the expected dict, shapes or labels."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


def read_cifar_batch(path: "str | os.PathLike") -> Tuple[np.ndarray, np.ndarray]:
    """One batch file as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``, with its format checked."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CIFARFormatError(f"{path}: not a CIFAR-10 python batch file ({exc})") from exc
    if not isinstance(batch, dict):
        raise CIFARFormatError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    # files written by python 3 tools may use str keys; the official ones use bytes
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise CIFARFormatError(f"{path}: missing key(s) {missing}; expected 'data' and 'labels'")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CIFARFormatError(f"{path}: 'data' is {data.dtype} of shape {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise CIFARFormatError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CIFARFormatError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(data_root: Optional[str] = None, split: str = "train", *, normalize: str = "standard",
                 device: "str | torch.device | None" = None, download: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images and labels as tensors.

    Args:
        data_root: folder holding ``cifar-10-batches-py/`` (else ``$LCP_META_DATA``).
        split: ``"train"`` (five batch files) or ``"test"``.
        normalize: ``"standard"`` (per-channel mean/std of the official code), ``"unit"`` ([0, 1])
            or ``"none"`` (raw 0..255 values as floats).
        device: where the returned tensors live.
        download: fetch and unpack the archive through torchvision first (needs the network).
    Returns:
        ``(images, labels)``: float32 ``(N, 3, 32, 32)`` and int64 ``(N,)``.
    """
    if split not in ("train", "test"):
        raise UserInputError(f"unknown CIFAR-10 split {split!r}; expected 'train' or 'test'")
    if normalize not in ("unit", "standard", "none"):
        raise UserInputError(f"unknown normalize={normalize!r}; expected 'standard', 'unit' or 'none'")
    names = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    if download:
        root = data_root or os.environ.get("LCP_META_DATA")
        if not root:
            raise DataNotFoundError("download=True needs a data root (pass data_root or set LCP_META_DATA)")
        try:
            from torchvision.datasets import CIFAR10
        except ImportError as exc:
            raise DataNotFoundError("download=True needs torchvision; install it or unpack the archive yourself") from exc
        CIFAR10(str(Path(root).expanduser()), train=(split == "train"), download=True)
    folder = find_data_root(data_root, CIFAR10_FOLDER, names)
    parts = [read_cifar_batch(folder / name) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(images).to(device=device, dtype=torch.float32)
    if normalize != "none":
        x = x / 255.0
    if normalize == "standard":
        mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x, torch.from_numpy(labels).to(x.device)
