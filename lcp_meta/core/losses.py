"""The output loss l(y) of the supervised networks and its gradient in closed form (spec section 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "check_target", "output_loss", "output_loss_grad", "loss_grad_fn"]

LOSSES = ("ce", "mse")


def check_target(target, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Validate class labels: an integer tensor of shape (batch,) with values in [0, num_classes)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape ({batch},), got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"labels must be integer class indices (torch.long) of shape ({batch},), "
                         f"got dtype {target.dtype}")
    if tuple(target.shape) != (batch,):
        raise ValueError(f"labels must have shape ({batch},) to match the inputs, got {tuple(target.shape)}")
    target = target.to(device=device, dtype=torch.long)
    if batch and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")
    return target


def output_loss(y: torch.Tensor, target: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """The batch-mean output loss l(y): cross-entropy (the official choice, ``nn.CrossEntropyLoss``) or
    ``mse`` = batch mean of ``1/2 |y - onehot(target)|^2`` (reachable by exact control, used for H)."""
    if loss == "ce":
        return F.cross_entropy(y, target)
    if loss == "mse":
        return 0.5 * (y - F.one_hot(target, y.shape[1]).to(y.dtype)).pow(2).sum() / y.shape[0]
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def output_loss_grad(y: torch.Tensor, target: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """grad_y l(y) in closed form (see :func:`loss_grad_fn`)."""
    return loss_grad_fn(target, y.shape[1], y.dtype, loss)(y)


def loss_grad_fn(target: torch.Tensor, num_classes: int, dtype: torch.dtype, loss: str = "ce"):
    """``y -> grad_y l(y)`` with the one-hot targets built once (the controllers call it every step)."""
    onehot = F.one_hot(target, num_classes).to(dtype)
    if loss == "ce":
        return lambda y: (torch.softmax(y, dim=1) - onehot) / y.shape[0]
    if loss == "mse":
        return lambda y: (y - onehot) / y.shape[0]
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
