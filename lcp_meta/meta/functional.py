"""The task-batched (vmapped) helpers every meta-learning method is built on.

Parameters are trees (:mod:`lcp_meta.core.tree`): a ``dict`` name -> tensor, task-batched trees with a
leading task dimension on every tensor.  The model is only ever called
through :func:`torch.func.functional_call`, so plain ``nn.Module`` s and torchmeta ``MetaModule`` s
work alike, and every per-task function can be mapped over tasks with :func:`torch.func.vmap`
(or, as a fallback, a Python loop: :func:`task_map`).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap

from ..core.tree import Tree

__all__ = ["Tree", "task_map", "split_model", "check_vmappable", "make_model_fn", "make_loss", "grad_and_hvp"]


# -------------------------------------------------------------------------------- task mapping
def task_map(fn: Callable, in_dims: Sequence, use_vmap: bool = True) -> Callable:
    """Map a per-task function over the leading task dim of its batched arguments.

    ``in_dims`` has one entry per positional argument: ``0`` (batched along dim 0) or ``None``
    (shared by all tasks).  With ``use_vmap`` this is :func:`torch.func.vmap`; otherwise a Python
    loop over tasks whose outputs (tensors, dicts or tuples of them) are stacked: the reference
    the vmapped version is tested against, and a fallback for models vmap cannot handle.
    """
    in_dims = tuple(in_dims)
    if use_vmap:
        return vmap(fn, in_dims=in_dims, randomness="different")

    def looped(*args):
        n = None
        for a, d in zip(args, in_dims):
            if d is not None:
                n = _leading(a)
                break
        if n is None:
            raise ValueError("task_map needs at least one batched argument")
        outs = [fn(*[_pick(a, i) if d is not None else a for a, d in zip(args, in_dims)]) for i in range(n)]
        return _stack(outs)

    return looped


def _leading(a) -> int:
    if isinstance(a, torch.Tensor):
        return a.shape[0]
    if isinstance(a, Mapping):
        return _leading(next(iter(a.values())))
    return _leading(a[0])


def _pick(a, i):
    if isinstance(a, torch.Tensor):
        return a[i]
    if isinstance(a, Mapping):
        return {k: _pick(v, i) for k, v in a.items()}
    return type(a)(_pick(v, i) for v in a)


def _stack(outs):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outs)
    if isinstance(first, Mapping):
        return {k: _stack([o[k] for o in outs]) for k in first}
    return type(first)(_stack([o[j] for o in outs]) for j in range(len(first)))


# ------------------------------------------------------------------------------- model handling
def split_model(model: nn.Module) -> Tuple[Tree, Tree]:
    """(meta-parameters, constants): trainable parameters, and buffers plus frozen parameters."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    consts = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    consts.update({k: b for k, b in model.named_buffers()})
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to meta-learn")
    return params, consts


def check_vmappable(model: nn.Module) -> None:
    """BatchNorm that updates running statistics writes into shared buffers, which vmap forbids
    (and which would leak statistics between tasks): ask for ``track_running_stats=False``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats and mod.training:
            raise ValueError(
                f"module {name!r} ({type(mod).__name__}) tracks running statistics, which cannot be updated "
                "per task under vmap; build it with track_running_stats=False (expected for few-shot nets), "
                "put the model in eval() mode, or pass vmap=False")


def make_model_fn(model: nn.Module, consts: Tree) -> Callable[[Tree, torch.Tensor], torch.Tensor]:
    """``model_fn(params, x)``: the model evaluated at the given parameters (and its fixed buffers)."""

    def model_fn(params: Tree, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, consts), (x,), strict=False)

    return model_fn


def make_loss(model_fn: Callable, loss_fn: Callable) -> Callable[[Tree, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(params, x, y)`` for one task."""

    def loss(params: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(model_fn(params, x), y)

    return loss


@functools.cache
def _load_jvp_decompositions() -> None:
    """torch loads its forward-AD decompositions at the first jvp through ``torch.jit.script``, which warns
    (FutureWarning, torch 2.14) that torch.jit.script is deprecated: a torch internal no user of this library can
    act on.  Load them once (cached) with that one warning silenced (any other warning still shows)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except ImportError:  # another torch layout: its first jvp loads what it needs
            pass


def grad_and_hvp(loss: Callable, params: Tree, v: Tree, x, y) -> Tuple[Tree, Tree]:
    """``(grad loss(params), Hess loss(params) @ v)`` in one forward-over-reverse pass, ``jvp(grad(loss))``.

    Floating data enter as dual numbers with zero tangents: some backward formulas (e.g. ``F.mse_loss`` in
    torch 2.x) fail under forward AD when one operand carries no tangent at all.
    """
    _load_jvp_decompositions()
    g_fn = grad(loss)
    primals, tangents = [params], [v]
    for t in (x, y):
        primals.append(t)
        tangents.append(torch.zeros_like(t) if t.is_floating_point() else None)
    if tangents[2] is None:  # integer labels: no tangent possible
        if tangents[1] is None:
            return jvp(lambda p: g_fn(p, x, y), (params,), (v,))
        return jvp(lambda p, x_: g_fn(p, x_, y), (params, x), (v, tangents[1]))
    if tangents[1] is None:
        return jvp(lambda p, y_: g_fn(p, x, y_), (params, y), (v, tangents[2]))
    return jvp(g_fn, (params, x, y), (v, tangents[1], tangents[2]))
