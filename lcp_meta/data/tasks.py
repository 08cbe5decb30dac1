"""The one task type: a batch of T few-shot tasks, each with a support and a query set.

Task sources (sinusoid, Omniglot episodes) produce it and every meta-learning method consumes it (``lcp_meta.
TaskBatch`` is this class).  It lives in the data layer, below the methods, so that both can use it.  It unpacks
like the 4-tuple ``(x_support, y_support, x_query, y_query)`` that every method also accepts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["TaskBatch", "check_support", "cast_to"]


@dataclass
class TaskBatch:
    """A meta-batch of T tasks: support and query sets, each tensor with a leading task dim.

    x_support: (T, N_s, *x_shape)   y_support: (T, N_s, *y_shape)
    x_query:   (T, N_q, *x_shape)   y_query:   (T, N_q, *y_shape)
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    def __post_init__(self):
        names = ("x_support", "y_support", "x_query", "y_query")
        for n in names:
            if not isinstance(getattr(self, n), torch.Tensor):
                raise TypeError(f"TaskBatch.{n} must be a tensor, got {type(getattr(self, n)).__name__}")
        xs, ys, xq, yq = self.x_support, self.y_support, self.x_query, self.y_query
        check_support(xs, ys)
        check_support(xq, yq, what="query")
        if xq.shape[0] != xs.shape[0]:
            raise ValueError(f"support and query disagree on the number of tasks: x_support {tuple(xs.shape)} "
                             f"vs x_query {tuple(xq.shape)}; expected the same leading task dim T")
        if xq.shape[2:] != xs.shape[2:] or yq.shape[2:] != ys.shape[2:]:
            raise ValueError(f"support and query samples differ in shape: x {tuple(xs.shape)} vs {tuple(xq.shape)}, "
                             f"y {tuple(ys.shape)} vs {tuple(yq.shape)}; expected (T, N, *x_shape) and "
                             f"(T, N, *y_shape) with the same x_shape and y_shape")

    def __iter__(self) -> Iterator[torch.Tensor]:
        """``xs, ys, xq, yq = batch``: the four tensors, in the order of the 4-tuple form."""
        return iter((self.x_support, self.y_support, self.x_query, self.y_query))

    def __getitem__(self, k):
        """``batch[2]`` is ``x_query``: the tensors by position, as in the 4-tuple form (not task ``k``: see
        :meth:`task`)."""
        return tuple(self)[k]

    @classmethod
    def coerce(cls, tasks) -> "TaskBatch":
        """Accept a TaskBatch, a 4-tuple ``(xs, ys, xq, yq)`` or ``((xs, ys), (xq, yq))``."""
        if isinstance(tasks, cls):
            return tasks
        if isinstance(tasks, (tuple, list)):
            if len(tasks) == 4:
                return cls(*tasks)
            if len(tasks) == 2 and all(isinstance(t, (tuple, list)) and len(t) == 2 for t in tasks):
                return cls(tasks[0][0], tasks[0][1], tasks[1][0], tasks[1][1])
        raise TypeError("expected tasks as a TaskBatch, a 4-tuple (x_support, y_support, x_query, y_query) or "
                        f"((x_support, y_support), (x_query, y_query)); got {type(tasks).__name__}")

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    def to(self, device=None, dtype=None) -> "TaskBatch":
        """Move to ``device``; cast floating tensors (inputs, regression targets) to ``dtype``."""
        return TaskBatch(*(cast_to(t, device, dtype) for t in self))

    def task(self, i: int) -> "TaskBatch":
        """Task ``i`` as a batch of one."""
        return self.slice(i, i + 1)

    def slice(self, start: int, stop: int) -> "TaskBatch":
        """Tasks ``start:stop``."""
        return TaskBatch(*(t[start:stop] for t in self))


def cast_to(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """``t`` on ``device``; floating tensors cast to ``dtype`` (integer class labels keep theirs)."""
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device) if device is not None else t


def check_support(x, y, what="support"):
    """Refuse inputs/targets that are not ``(T, N, *x_shape)`` / ``(T, N, *y_shape)`` tensors with T, N >= 1."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"expected {what} inputs and targets as tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.dim() < 3 or y.dim() < 2:
        raise ValueError(f"expected x_{what} of shape (tasks, shots, *x_shape) and y_{what} of shape "
                         f"(tasks, shots, *y_shape) with a leading task dim; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)} (add a task dim with .unsqueeze(0) for a single task)")
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"x_{what} {tuple(x.shape)} and y_{what} {tuple(y.shape)} disagree on (tasks, shots); "
                         f"expected x (T, N, *x_shape) and y (T, N, *y_shape)")
    if x.shape[0] == 0 or x.shape[1] == 0:
        # the mean losses would divide by zero (or index an empty batch) far from here
        raise ValueError(f"empty {what} set: x_{what} has shape {tuple(x.shape)}; expected at least one task and "
                         f"one example per task (T >= 1, N >= 1)")
