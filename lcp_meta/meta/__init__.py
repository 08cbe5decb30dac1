"""Meta-learning methods: LCP as an outer-loop optimizer, and MAML-style / implicit baselines.

Every method follows one interface (:class:`MetaMethod`): ``meta_backward(tasks)`` accumulates the
mean-over-tasks meta-gradient into ``.grad`` (then any torch optimizer steps), ``adapt`` / ``adapt_params``
return adapted parameters, ``predict`` adapted query predictions; tasks are vmapped.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..core.registry import method_info, method_names, register_method
from ..core.registry import build as _build
from ..core.solvers import DivergenceError
from .base import MetaGradient, MetaMethod, MetaStats, TaskBatch
from .contrastive import ContrastiveMeta
from .imaml import IMAML
from .lcp import CONTROLLERS, LCP
from .maml import FOMAML, MAML, Reptile
from .memory import graph_saved_bytes

__all__ = ["TaskBatch", "MetaMethod", "MetaStats", "MetaGradient", "LCP", "MAML", "FOMAML", "Reptile", "IMAML",
           "ContrastiveMeta", "make_method", "METHOD_NAMES", "CONTROLLERS", "DivergenceError",
           "graph_saved_bytes", "method_kwargs", "method_info", "is_proximal", "register_method"]

register_method("meta", "lcp", LCP)  # the dynamic-inversion controller (LCP's default) at its equilibrium
register_method("meta", "lcp-direct", LCP, controller="direct")
register_method("meta", "lcp-ebd", LCP, controller="ebd")
register_method("meta", "imaml", IMAML)
register_method("meta", "maml", MAML)
register_method("meta", "fomaml", FOMAML)
register_method("meta", "reptile", Reptile)
register_method("meta", "cml", ContrastiveMeta)
# the fixed-step controller: not the LCP meta-gradient, reported with its residuals
register_method("meta", "lcp-truncated", LCP, controller="di", truncated=True)

METHOD_NAMES = method_names("meta")


def method_kwargs(name: str) -> tuple:
    """The keyword arguments the named meta-learning method accepts (besides model and loss_fn)."""
    return method_info(name, "meta").kwargs()


def is_proximal(name: str) -> bool:
    """Whether the named method's inner problem has the proximal term lam/2 |phi - omega|^2 by default (LCP,
    iMAML, CML: they take a shared lam); MAML, FOMAML and Reptile default to lam = 0."""
    return method_info(name, "meta").proximal


def make_method(name: str, model: nn.Module, loss_fn: Callable, **kwargs) -> MetaMethod:
    """Build a meta-learning method by name (one of :data:`METHOD_NAMES`, or ``"meta:<name>"``).

    ``"lcp"`` is LCP with the dynamic-inversion controller run to its equilibrium, ``"lcp-direct"`` /
    ``"lcp-ebd"`` the direct and energy-based controllers, ``"lcp-truncated"`` the dynamic-inversion
    controller stopped after ``inner_steps`` joint steps (not an equilibrium; reported as such).  Keyword
    arguments a method does not take raise a TypeError that lists the ones it does.  Methods registered with
    :func:`register_method` are built the same way.
    """
    if isinstance(name, str) and name.startswith("supervised:"):
        raise ValueError(f"{name!r} is a supervised method: build it with lcp_meta.supervised.make_method(name, "
                         "model, **settings)")
    return _build(name, model, loss_fn, kind="meta", **kwargs)
