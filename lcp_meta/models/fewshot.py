"""Few-shot learners: the conv-4 network of the few-shot literature and a small MLP for regression.

Both are plain ``nn.Module`` s; the meta-learning methods call them through
``torch.func.functional_call`` with task-adapted parameters, vmapped over tasks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["Conv4", "MetaMLP"]


class Conv4(nn.Module):
    """``n_blocks`` x [conv3x3 (padding 1) -> BatchNorm -> ReLU -> maxpool 2], flatten, linear to ``n_ways``.

    BatchNorm keeps no running statistics (``track_running_stats=False``): it always normalises with the
    statistics of the batch it sees, as in MAML / iMAML / contrastive meta-learning, so adapted models
    of different tasks share no state and the network can be vmapped over tasks.

    Args:
        n_ways: number of output classes.
        in_channels: image channels (1 for Omniglot).
        hidden: channels of every conv block (64 in the literature).
        image_size: side of the square input (28 for Omniglot, 84 for miniImageNet).
        n_blocks: number of conv blocks.
    """

    def __init__(self, n_ways: int = 5, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 n_blocks: int = 4):
        super().__init__()
        if min(n_ways, in_channels, hidden, image_size, n_blocks) < 1:
            raise ValueError(f"Conv4 sizes must be positive, got n_ways={n_ways}, in_channels={in_channels}, "
                             f"hidden={hidden}, image_size={image_size}, n_blocks={n_blocks}")
        layers, ch, side = [], in_channels, image_size
        for _ in range(n_blocks):
            layers += [nn.Conv2d(ch, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                       nn.ReLU(), nn.MaxPool2d(2)]
            ch, side = hidden, side // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for {n_blocks} max-pool blocks")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden * side * side, n_ways)
        self.in_channels, self.image_size = in_channels, image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)  # (N, H, W) grey images
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv4 expects images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.classifier(self.features(x).flatten(1))


# smooth activations (tanh, sigmoid, gelu, softplus) give the inner problem a smooth stationary point, which the
# equilibrium methods (lcp, iMAML with a tolerance) need; ReLU's kinks stall gradient descent short of one
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "softplus": nn.Softplus}


class MetaMLP(nn.Module):
    """A fully connected net ``in_features -> hidden... -> out_features`` (default 1-40-40-1 ReLU, the
    sinusoid-regression learner of MAML; ``activation`` one of relu, tanh, sigmoid, gelu, softplus)."""

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1,
                 activation: str = "relu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        sizes = [in_features, *hidden, out_features]
        if min(sizes) < 1:
            raise ValueError(f"MetaMLP layer sizes must be positive, got {sizes}")
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
