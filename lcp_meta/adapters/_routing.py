"""Shared plumbing of the adapters: meta-gradients as values, and losses whose backward runs a method.

A third-party training loop ends each task with ``loss.backward()``.  For LCP (and iMAML) that loss
must not be differentiated by autograd through an unrolled inner loop: its gradient is what the
method's :meth:`meta_backward` computes (e.g. ``-lam psi* / beta`` from the controlled equilibrium).
:func:`routed_loss` returns the loss value in a node whose backward calls ``meta_backward`` on that
task and hands the result to autograd, so ``.grad`` accumulates across tasks exactly as in the
library's loop.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch


def trainable(method: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters ``meta_backward`` may write into (the model's, and a learned lam)."""
    return [p for p in method.parameters() if p.requires_grad]


def meta_gradient(method, tasks) -> Tuple[List[Optional[torch.Tensor]], object]:
    """Run ``method.meta_backward(tasks)`` and return ``(grads, stats)`` without changing any ``.grad``.

    ``grads`` is aligned with :func:`trainable`; an entry is None where nothing was accumulated (e.g.
    with ``on_divergence="warn"`` after a divergence).  The previous ``.grad`` of every parameter is
    restored even when ``meta_backward`` raises, so a failed task never corrupts an accumulation.
    """
    params = trainable(method)
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        stats = method.meta_backward(tasks)
        grads = [p.grad for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return grads, stats


class _Routed(torch.autograd.Function):
    """Identity on a detached value; backward returns ``grad_output * compute_grads()``."""

    @staticmethod
    def forward(ctx, value, compute_grads, *params):
        ctx.compute_grads = compute_grads
        ctx.shapes = [p.shape for p in params]
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        with torch.enable_grad():  # meta_backward uses torch.func transforms; the engine disables grad here
            grads = ctx.compute_grads()
        out = []
        for g, shape in zip(grads, ctx.shapes):
            out.append(None if g is None else (grad_output * g).reshape(shape))
        return (None, None, *out)


def routed_loss(value: torch.Tensor, params: Sequence[torch.Tensor], compute_grads: Callable) -> torch.Tensor:
    """``value`` (a detached scalar) whose backward accumulates ``compute_grads()`` into ``params``."""
    return _Routed.apply(value, compute_grads, *params)


class _Guard(torch.autograd.Function):
    """Identity whose backward explains that these outputs carry no meta-gradient."""

    @staticmethod
    def forward(ctx, value, message, *params):
        ctx.message = message
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        raise RuntimeError(ctx.message)


def guarded(value: torch.Tensor, params: Sequence[torch.Tensor], message: str) -> torch.Tensor:
    """``value`` that raises ``message`` if anything backpropagates into it."""
    return _Guard.apply(value, message, *params)
