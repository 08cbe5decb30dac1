"""Meta-learning methods: LCP as an outer-loop optimizer, and MAML-style / implicit baselines.

Every method follows one interface (:class:`MetaMethod`): ``meta_backward(tasks)`` accumulates the
mean-over-tasks meta-gradient into ``.grad`` (then any torch optimizer steps), ``adapt`` / ``adapt_params``
return adapted parameters, ``predict`` adapted query predictions; tasks are vmapped.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from ..core.solvers import DivergenceError
from .base import MetaMethod, MetaStats, TaskBatch
from .contrastive import ContrastiveMeta
from .imaml import IMAML
from .lcp import CONTROLLERS, LCP
from .maml import FOMAML, MAML, Reptile
from .memory import graph_saved_bytes

__all__ = ["TaskBatch", "MetaMethod", "MetaStats", "LCP", "MAML", "FOMAML", "Reptile", "IMAML",
           "ContrastiveMeta", "make_method", "METHOD_NAMES", "CONTROLLERS", "DivergenceError",
           "graph_saved_bytes", "method_kwargs"]

METHOD_NAMES = ("lcp", "lcp-direct", "lcp-ebd", "imaml", "maml", "fomaml", "reptile", "cml", "lcp-truncated")

# name -> (class, fixed keyword arguments)
_REGISTRY = {
    "lcp": (LCP, {"controller": "di"}),
    "lcp-direct": (LCP, {"controller": "direct"}),
    "lcp-ebd": (LCP, {"controller": "ebd"}),
    "imaml": (IMAML, {}),
    "maml": (MAML, {}),
    "fomaml": (FOMAML, {}),
    "reptile": (Reptile, {}),
    "cml": (ContrastiveMeta, {}),
    # the fixed-step controller: not the LCP meta-gradient, reported with its residuals
    "lcp-truncated": (LCP, {"controller": "di", "truncated": True}),
}


def method_kwargs(name: str) -> tuple:
    """The keyword arguments the named method accepts (besides model and loss_fn)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown meta-learning method {name!r}; expected one of {METHOD_NAMES}")
    cls, _ = _REGISTRY[name]
    keys = []
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, MetaMethod):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in keys:
                keys.append(p.name)
    return tuple(keys)


def make_method(name: str, model: nn.Module, loss_fn: Callable, **kwargs) -> MetaMethod:
    """Build a meta-learning method by name (one of :data:`METHOD_NAMES`).

    ``"lcp"`` is LCP with the dynamic-inversion controller run to its equilibrium, ``"lcp-direct"`` /
    ``"lcp-ebd"`` the direct and energy-based controllers, ``"lcp-truncated"`` the dynamic-inversion
    controller stopped after ``inner_steps`` joint steps (not an equilibrium; reported as such).  Keyword arguments a method does not take raise a TypeError that
    lists the ones it does.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown meta-learning method {name!r}; expected one of {METHOD_NAMES}")
    cls, fixed = _REGISTRY[name]
    allowed = method_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"method {name!r} got unexpected keyword argument(s) {unknown}; "
                        f"it accepts {sorted(allowed)}")
    for k, v in fixed.items():
        if k in kwargs and kwargs[k] != v and name != "lcp":
            raise ValueError(f"method {name!r} fixes {k}={v!r}; got {k}={kwargs[k]!r}")
        kwargs.setdefault(k, v)
    return cls(model, loss_fn, **kwargs)
