"""torchmeta 1.8.0 on current torch: a runtime patch, and its batches/models as lcp_meta inputs.

torchmeta 1.8.0 (the last release, 2021) pins ``torch<1.10``; installed with ``--no-deps`` (see
``scripts/install_adapters.sh``), the pieces lcp_meta uses (import, ``ClassSplitter`` loaders,
``MetaModule`` models) break on torch 2.x in two places, both fixed by :func:`patch`, which importing
this module runs before torchmeta itself is imported:

1. ``import torchmeta`` fails: ``torchmeta/datasets/utils.py`` imports the private helpers
   ``_get_confirm_token`` and ``_save_response_content`` from ``torchvision.datasets.utils``, which
   current torchvision no longer has (0.29 here).  They only serve torchmeta's Google-Drive downloads; we put back
   equivalent definitions (cookie-token lookup, chunked write) when they are missing.
2. Every task-splitting loader fails: torch's ``Subset.__init__`` now refuses a subclass that
   overrides ``__getitem__`` without ``__getitems__`` (``NotImplementedError``), because the
   DataLoader fetcher batches through ``__getitems__``; torchmeta's ``SubsetTask`` (built by
   ``ClassSplitter`` for every ``batch['train']``/``batch['test']``) overrides only ``__getitem__``
   (to apply its target transforms).  We give it the ``__getitems__`` torch asks for, delegating
   item by item to ``__getitem__`` so torchmeta's transforms still run.

Nothing else of torchmeta is changed.  :func:`task_batch` turns a torchmeta batch dict into a
:class:`lcp_meta.meta.TaskBatch`; torchmeta ``MetaModule`` models (``forward(x, params=None)``)
need no wrapper, lcp_meta calls them through ``torch.func.functional_call``.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Mapping, Optional

import torch

__all__ = ["patch", "PATCHES", "task_batch"]

_CHUNK = 32768
PATCHES: list = []  # names of the patches applied in this process (for tests and bug reports)


def _get_confirm_token(response) -> Optional[str]:
    """Google Drive's "virus scan" confirmation token: a cookie named ``download_warning*``."""
    for key, value in response.cookies.items():
        if key.startswith("download_warning"):
            return value
    return None


def _save_response_content(response, destination, chunk_size: int = _CHUNK) -> None:
    """Stream a ``requests`` response into ``destination`` (skipping keep-alive chunks)."""
    with open(destination, "wb") as fh:
        for chunk in response.iter_content(chunk_size):
            if chunk:
                fh.write(chunk)


def _patch_torchvision_helpers() -> None:
    tv_utils = importlib.import_module("torchvision.datasets.utils")
    for name, fn in (("_get_confirm_token", _get_confirm_token),
                     ("_save_response_content", _save_response_content)):
        if not hasattr(tv_utils, name):
            setattr(tv_utils, name, fn)
            PATCHES.append(f"torchvision.datasets.utils.{name}")


def _subset_task_getitems(self, indices):
    # one by one through SubsetTask.__getitem__, so torchmeta's target transforms are applied
    return [self[i] for i in indices]


def _patch_subset_task() -> None:
    from torch.utils.data import Subset
    from torchmeta.utils.data.task import SubsetTask

    overrides_item = SubsetTask.__getitem__ is not Subset.__getitem__
    inherits_items = getattr(SubsetTask, "__getitems__", None) is getattr(Subset, "__getitems__", None)
    if hasattr(Subset, "__getitems__") and overrides_item and inherits_items:
        SubsetTask.__getitems__ = _subset_task_getitems
        PATCHES.append("torchmeta.utils.data.task.SubsetTask.__getitems__")


def patch() -> Any:
    """Make torchmeta 1.8.0 importable and its loaders usable on torch 2.x; returns the module.

    Idempotent; raises ``ImportError`` (with the install command) when torchmeta is absent.
    """
    if importlib.util.find_spec("torchmeta") is None:
        raise ImportError("torchmeta is not installed; run `bash scripts/install_adapters.sh` "
                          "(or `pip install --no-deps torchmeta==1.8.0 h5py ordered-set`)")
    _patch_torchvision_helpers()
    tm = importlib.import_module("torchmeta")
    _patch_subset_task()
    return tm


def task_batch(batch: Mapping, device=None, dtype: Optional[torch.dtype] = None):
    """A torchmeta batch dict (``batch['train']``, ``batch['test']`` from a ``BatchMetaDataLoader`` over a
    ``ClassSplitter``-split dataset; each ``[inputs (T, N, ...), targets (T, N)]``) as a
    :class:`lcp_meta.meta.TaskBatch`: train = support, test = query.  Extra entries are ignored;
    ``device`` / ``dtype`` move the tensors (``dtype`` casts floating ones only)."""
    from lcp_meta.meta import TaskBatch

    if not isinstance(batch, Mapping) or "train" not in batch or "test" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(f"expected a torchmeta batch dict with 'train' and 'test' entries "
                        f"(from BatchMetaDataLoader over a ClassSplitter dataset), got {got}")
    parts = []
    for split in ("train", "test"):
        entry = batch[split]
        if not isinstance(entry, (tuple, list)) or len(entry) < 2:
            raise TypeError(f"batch[{split!r}] must be [inputs, targets], got {type(entry).__name__}")
        parts.extend(entry[:2])
    tb = TaskBatch(*parts)
    return tb.to(device, dtype) if (device is not None or dtype is not None) else tb


patch()
