"""N-way K-shot episodes drawn from a class-indexed image tensor, and the 95% confidence interval.

An episode picks N distinct classes, relabels them 0..N-1 in a random order, and takes K support and Q query
drawings per class, disjoint from each other.  Episodes are described by *indices* (class ids and drawing ids)
so that a fixed test set of hundreds of 20-way episodes costs kilobytes; images are gathered batch by batch on
the device that holds the image tensor.  All randomness comes from a CPU ``torch.Generator`` seeded
explicitly: the same seed gives the same episodes on every device.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch

from .tasks import TaskBatch
from ..utils.errors import UserInputError


class EpisodeIndices(NamedTuple):
    """Which images make up E episodes.

    classes: (E, N) class ids; column j of an episode gets label j.
    support: (E, N, K) drawing ids of the support images.
    query:   (E, N, Q) drawing ids of the query images.
    """

    classes: torch.Tensor
    support: torch.Tensor
    query: torch.Tensor

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def slice(self, start: int, stop: int) -> "EpisodeIndices":
        return EpisodeIndices(self.classes[start:stop], self.support[start:stop], self.query[start:stop])


class EpisodeSampler:
    """Seeded N-way K-shot episodes over ``images`` of shape (classes, drawings, *image_shape).

    images: uint8 (0..255, scaled to [0, 1] when gathered) or floating point; keep it on the device where
        the episodes are used.
    ways, shots, queries: N, K and the query drawings per class (Q).
    """

    def __init__(self, images: torch.Tensor, ways: int, shots: int, queries: int = 1):
        if images.dim() < 3:
            raise UserInputError(f"images must have shape (classes, drawings, *image_shape), got {tuple(images.shape)}")
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        num_classes, drawings = images.shape[:2]
        if ways > num_classes:
            raise UserInputError(f"{ways}-way episodes need at least {ways} classes; this split has {num_classes}")
        if shots + queries > drawings:
            raise UserInputError(f"shots + queries = {shots + queries} drawings per class needed; "
                             f"each class has {drawings}")
        self.images, self.ways, self.shots, self.queries = images, ways, shots, queries

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    def sample_indices(self, num_episodes: int, seed: Optional[int] = None,
                       generator: Optional[torch.Generator] = None) -> EpisodeIndices:
        """Draw the indices of ``num_episodes`` episodes (classes distinct within each episode)."""
        if not isinstance(num_episodes, int) or num_episodes < 1:
            raise UserInputError(f"num_episodes must be a positive integer, got {num_episodes!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        num_classes, drawings = self.images.shape[:2]
        # argsort of uniform noise = an independent random permutation per row, in one vectorised call
        classes = torch.rand(num_episodes, num_classes, generator=generator).argsort(dim=1)[:, : self.ways]
        draws = torch.rand(num_episodes, self.ways, drawings, generator=generator).argsort(dim=2)
        support = draws[..., : self.shots]
        query = draws[..., self.shots: self.shots + self.queries]
        return EpisodeIndices(classes, support, query)

    def gather(self, idx: EpisodeIndices, dtype: torch.dtype = torch.float32) -> TaskBatch:
        """Images and labels of the episodes in ``idx``.

        Returns x_support (E, N*K, *image_shape), y_support (E, N*K) int64 in 0..N-1 (class-major order),
        x_query (E, N*Q, *image_shape), y_query (E, N*Q).
        """
        dev = self.images.device
        classes = idx.classes.to(dev)
        e, n = classes.shape

        def take(draw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            draw = draw.to(dev)
            per = draw.shape[-1]
            cls = classes.unsqueeze(-1).expand(e, n, per)
            x = self.images[cls, draw]  # (E, N, per, *image_shape)
            x = x.reshape(e, n * per, *self.images.shape[2:])
            if not x.is_floating_point():
                x = x.to(dtype) / 255.0
            else:
                x = x.to(dtype)
            y = torch.arange(n, device=dev).repeat_interleave(per).expand(e, n * per).contiguous()
            return x, y

        xs, ys = take(idx.support)
        xq, yq = take(idx.query)
        return TaskBatch(xs, ys, xq, yq)

    def sample(self, num_episodes: int, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> TaskBatch:
        """``gather(sample_indices(...))``: a meta-batch of episodes ready for a meta-learning method."""
        return self.gather(self.sample_indices(num_episodes, seed=seed, generator=generator), dtype=dtype)

    def iter_batches(self, idx: EpisodeIndices, batch_size: int,
                     dtype: torch.dtype = torch.float32) -> Iterator[TaskBatch]:
        """Gather a fixed episode set in chunks of ``batch_size`` episodes (bounded memory)."""
        for start in range(0, len(idx), batch_size):
            yield self.gather(idx.slice(start, start + batch_size), dtype=dtype)


def mean_ci95(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval, ``1.96 * std / sqrt(n)``.

    ``std`` is the sample standard deviation (n - 1 in the denominator); one value gives a half-width of 0.
    """
    t = torch.as_tensor(list(values) if not torch.is_tensor(values) else values, dtype=torch.float64).flatten()
    n = t.numel()
    if n == 0:
        raise UserInputError("mean_ci95 needs at least one value")
    mean = float(t.mean())
    if n == 1:
        return mean, 0.0
    return mean, float(1.96 * t.std(unbiased=True) / math.sqrt(n))
