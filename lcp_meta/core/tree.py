"""The one tree toolkit: parameters (and vectors shaped like them) as pytrees, on ``torch.utils._pytree``.

A *tree* is any nesting of dicts, tuples and lists with tensors at the leaves; the usual one is a ``dict``
name -> tensor (a model's parameters).  A *task-batched* tree carries a leading task dim on every leaf.
Arithmetic is :func:`tree_map` over one or several trees (``tree_map(torch.sub, a, b)``); what is left here is
what a map cannot say in one call: reductions, and the flat state the solvers iterate on.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
from torch.utils import _pytree
from torch.utils._pytree import tree_leaves

Tree = Dict[str, torch.Tensor]

__all__ = ["Tree", "tree_map", "tree_leaves", "tree_zeros_like", "tree_detach", "tree_dot", "tree_norm",
           "tree_finite", "tree_expand", "tree_pack"]


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """``fn`` leaf by leaf over one or several trees of the same structure (``torch.utils._pytree.tree_map``).

    Parameter dicts, by far the most frequent trees and mapped in every inner step, take a direct path: the
    general pytree walk costs ~30 microseconds a call, which adds up over thousands of steps."""
    if type(tree) is dict and all(type(r) is dict for r in rest):
        return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}
    return _pytree.tree_map(fn, tree, *rest)


def tree_zeros_like(a: Any) -> Any:
    return tree_map(torch.zeros_like, a)


def tree_detach(a: Any) -> Any:
    return tree_map(torch.Tensor.detach, a)


def tree_dot(a: Any, b: Any, batched: bool = False) -> torch.Tensor:
    """Inner product over all leaves; with ``batched`` one value per task (the leading dim is kept)."""
    if batched:
        return sum((x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(tree_leaves(a), tree_leaves(b)))
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def tree_norm(a: Any, batched: bool = False) -> torch.Tensor:
    return tree_dot(a, a, batched).sqrt()


def tree_finite(a: Any) -> bool:
    """True when every entry is finite (one host synchronisation)."""
    leaves = tree_leaves(a)
    if not leaves:
        return True
    return bool(torch.stack([torch.isfinite(v).all() for v in leaves]).all())


def tree_expand(a: Any, n: int) -> Any:
    """Repeat an unbatched tree ``n`` times along a new leading task dim (a real copy per task)."""
    return tree_map(lambda v: v.detach().unsqueeze(0).expand(n, *v.shape).clone(), a)


def tree_pack(state: Any) -> Tuple[Tuple[torch.Tensor, ...], Callable[[Any], Any]]:
    """A state made of trees and tensors -> (a flat tuple of its tensors, the inverse map).

    The step-map solvers iterate on flat tuples of tensors; methods think in trees.  ``rebuild(z)`` puts a
    flat tuple (e.g. the solver's result) back into the structure of ``state``.
    """
    if isinstance(state, (list, tuple)) and all(type(t) is dict or isinstance(t, torch.Tensor) or t == ()
                                                 for t in state):
        # the usual state, a sequence of parameter dicts, tensors and empty integrator states: a direct path
        # (called every step)
        layout = [list(t) if type(t) is dict else () if type(t) is tuple else None for t in state]
        flat = tuple(v for t in state for v in (t.values() if type(t) is dict else t if type(t) is tuple else (t,)))

        def rebuild(z):
            out, i = [], 0
            for names in layout:
                if names is None:
                    out.append(z[i])
                    i += 1
                elif names == ():
                    out.append(())
                else:
                    out.append(dict(zip(names, z[i:i + len(names)])))
                    i += len(names)
            return out if isinstance(state, list) else tuple(out)

        return flat, rebuild
    leaves, spec = _pytree.tree_flatten(state)
    return tuple(leaves), lambda z: _pytree.tree_unflatten(list(z), spec)
