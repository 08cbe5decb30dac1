"""Sinusoid regression tasks (Finn et al. 2017): the embedded few-shot benchmark, no files needed.

A task is ``y = amplitude * sin(x - phase)`` with amplitude ~ U[0.1, 5], phase ~ U[0, pi] and inputs
x ~ U[-5, 5].  Each task gives ``shots`` support points (for the inner adaptation) and ``queries`` query
points (for the outer loss).  Sampling draws from a CPU ``torch.Generator`` and only then moves the tensors to
the requested device, so the same seed gives the same tasks on a CPU and on a GPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from ..utils.errors import UserInputError
from .tasks import TaskBatch


TaskTensors = TaskBatch  # the former name of the one task type (kept for code that imports it)


class SinusoidBatch(NamedTuple):
    """Sampled sinusoid tasks: the tensors plus the true task parameters (for plots of the fits)."""

    tasks: TaskBatch
    amplitude: torch.Tensor  # (T,)
    phase: torch.Tensor  # (T,)


def _check_range(name: str, rng: Tuple[float, float]) -> Tuple[float, float]:
    lo, hi = (float(v) for v in rng)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise UserInputError(f"{name} must be a finite (low, high) pair with low <= high, got {rng!r}")
    return lo, hi


class SinusoidTasks:
    """Generator of K-shot sinusoid regression tasks.

    Args:
        shots: support points per task (K).
        queries: query points per task (default: K, as in the MAML protocol).
        amplitude, phase, x_range: the uniform ranges of the task distribution.
    """

    def __init__(self, shots: int = 10, queries: Optional[int] = None,
                 amplitude: Tuple[float, float] = (0.1, 5.0), phase: Tuple[float, float] = (0.0, math.pi),
                 x_range: Tuple[float, float] = (-5.0, 5.0)):
        queries = shots if queries is None else queries
        for name, value in (("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        self.shots, self.queries = shots, queries
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)

    @staticmethod
    def _uniform(gen: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    @staticmethod
    def function(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """The target ``amplitude * sin(x - phase)``; amplitude/phase of shape (T,), x of shape (T, M, 1)."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    def sample(self, num_tasks: int, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
               device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.float32) -> SinusoidBatch:
        """Draw ``num_tasks`` tasks: x of shape (T, K, 1), y of shape (T, K, 1) (support and query).

        Give either ``seed`` (a fresh generator, fully reproducible) or a CPU ``generator`` to continue.
        """
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise UserInputError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        amp = self._uniform(generator, (num_tasks,), *self.amplitude)
        phase = self._uniform(generator, (num_tasks,), *self.phase)
        # support and query inputs are drawn in one call, (T, K + Q): amplitude and phase do not depend on `queries`,
        # but the inputs of every task after the first do (changing `queries` changes the tasks' points)
        x = self._uniform(generator, (num_tasks, self.shots + self.queries, 1), *self.x_range)
        y = self.function(x, amp, phase)
        xs, xq = x[:, : self.shots], x[:, self.shots:]
        ys, yq = y[:, : self.shots], y[:, self.shots:]

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        tasks = TaskBatch(move(xs), move(ys), move(xq), move(yq))
        return SinusoidBatch(tasks, move(amp), move(phase))
