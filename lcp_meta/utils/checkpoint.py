"""Atomic checkpoints that capture everything a resumed run needs (parameters, optimizer, RNG, step).

Checkpoints are loaded with ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain types
(dicts, lists, tuples, numbers, strings) only, so a crafted file cannot run code on ``--resume``.  That is why the
RNG states are stored as tensors and plain numbers rather than as numpy arrays.
"""
from __future__ import annotations

import os
import pickle
import random
import secrets
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from .errors import CheckpointError


def rng_state() -> Dict[str, Any]:
    """The state of every random generator a run draws from (python, numpy, torch CPU and CUDA), as tensors and
    plain types (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        keys = np.asarray(npst["keys"].numpy() if isinstance(npst["keys"], torch.Tensor) else npst["keys"],
                          dtype=np.uint32)
        npst = (npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    np.random.set_state(npst)
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tmp_siblings(path: Path):
    return path.parent.glob(f"{path.name}.*.tmp") if path.parent.is_dir() else ()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_tmp(path: "str | os.PathLike") -> int:
    """Remove temporary files of ``path`` torn by a killed writer (their process is gone); returns how many.

    Temporary names are ``<name>.<pid>-<random>.tmp``; names in another pattern (older versions) are stale too.
    """
    path, removed = Path(path), 0
    for tmp in list(_tmp_siblings(path)):
        pid = tmp.name[len(path.name) + 1:-len(".tmp")].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue  # a live writer (or our own, in another thread) is still at work on it
        try:
            tmp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _atomic_write(path: "str | os.PathLike", write, mode: str) -> Path:
    """Write through a temporary file in the same folder, then rename: a crash never leaves a torn file, and the
    next write of the same file removes what a killed writer left.  The file gets the usual mode (0666 less the
    umask, 0644 in general), like files written with ``open``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    tmp = path.parent / f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: "str | os.PathLike") -> Path:
    """``torch.save`` atomically (see :func:`_atomic_write`)."""
    return _atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def atomic_write_text(text: str, path: "str | os.PathLike") -> Path:
    """Write a text file (a JSON result, a table) atomically: readers never see half a file."""
    return _atomic_write(path, lambda fh: fh.write(text), "w")


def load_checkpoint(path: "str | os.PathLike", map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`, safely (``weights_only=True``).

    Raises FileNotFoundError when it is missing, :class:`CheckpointError` (one line naming the file) when it holds
    anything but tensors and plain types, or cannot be read (truncated, not a checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; nothing to resume from")
    clean_stale_tmp(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message spans many lines; its first says which global was refused
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refused to load checkpoint {path}: it holds objects other than tensors and plain types "
            f"({reason[:200]}); delete it (or choose another --out) if you did not write it") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {reason}); it is truncated "
                              f"or not an lcp_meta checkpoint: delete it to start over") from None
