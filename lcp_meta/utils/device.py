"""Device selection: ``auto`` takes a GPU when one is present."""
from __future__ import annotations

import torch

from .errors import UserInputError


def resolve_device(device: "str | torch.device | None" = "auto") -> torch.device:
    """Turn ``'auto' | 'cpu' | 'cuda' | 'cuda:N'`` (or a torch.device) into a torch.device.

    ``'auto'`` (and ``None``) picks CUDA when available, else the CPU.  Asking for CUDA on a machine
    without it is an error that says so, rather than a failure deep inside torch later on.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise UserInputError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    return dev
