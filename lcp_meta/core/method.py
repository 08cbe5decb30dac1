"""The one method contract of both sides: gradients in, ``.grad`` accumulated once, statistics out.

A supervised method (``backward(x, y)``) and a meta-learning method (``meta_backward(tasks)``) differ in how
they compute their gradients and what they report; everything around that is the same and lives here, in
:meth:`GradientMethod._backward`:

1. the subclass's :meth:`~GradientMethod._gradients` returns a :class:`Gradients`: the tensors to update, their
   gradients, its statistics and, when its dynamics failed, what failed;
2. a failure, or a gradient that is not finite everywhere, goes to the divergence policy
   (:func:`~lcp_meta.core.solvers.check_divergence`: raise a DivergenceError or warn, naming the residual) and
   NO ``.grad`` is touched;
3. otherwise the gradients are ADDED to ``.grad``, exactly like ``loss.backward()``: call
   ``optimizer.zero_grad()`` before each step.

Statistics of both sides are :class:`Stats`: read-only mappings (``stats["loss"]``, ``dict(stats)``) that
also have attributes.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .solvers import SolverStats, check_divergence
from .tree import tree_finite

__all__ = ["Gradients", "GradientMethod", "Stats", "StepStats", "accumulate_grads", "grads_finite", "check_number",
           "ON_DIVERGENCE"]


ON_DIVERGENCE = ("raise", "warn")


def check_number(name: str, value, *, who: str = "", sign: Optional[str] = None, allow_none: bool = False,
                 allow_inf: bool = False) -> None:
    """The one check of a numeric setting of a method: a one-line ValueError naming it and the bad value
    unless ``value`` is a finite real number (NaN slips through every ``<``/``>`` test; bools are refused).

    sign: None (any), "positive" (> 0) or "nonnegative" (>= 0); allow_none: None passes (an automatic
    choice); allow_inf: +inf passes (e.g. "no limit"); who: the method's name, prefixed to the message.
    """
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (math.isfinite(value) or (allow_inf and value == math.inf))
    ok = ok and (sign is None or (value > 0 if sign == "positive" else value >= 0))
    if not ok:
        cond = {None: "", "positive": " > 0", "nonnegative": " >= 0"}[sign]
        alts = (" or inf" if allow_inf else "") + (" or None" if allow_none else "")
        raise ValueError(f"{who + ': ' if who else ''}{name} must be a finite number{cond}{alts}, got {value!r}")


class Stats(Mapping):
    """Mapping access to a statistics object through its :meth:`as_dict` (subclasses define it)."""

    def as_dict(self) -> dict:
        raise NotImplementedError

    def __getitem__(self, key):
        return self.as_dict()[key]

    def __iter__(self):
        return iter(self.as_dict())

    def __len__(self):
        return len(self.as_dict())


class StepStats(dict, Stats):
    """Statistics as a plain dict whose keys are also attributes (``stats["loss"] == stats.loss``)."""

    def as_dict(self) -> dict:
        return dict(self)

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    # dict's own methods win over Mapping's mixins
    __getitem__, __iter__, __len__, keys, items, values, get, __contains__, __eq__ = (
        dict.__getitem__, dict.__iter__, dict.__len__, dict.keys, dict.items, dict.values, dict.get,
        dict.__contains__, dict.__eq__)


@dataclass
class Gradients:
    """What a method computed for one batch.

    params / grads: the tensors whose ``.grad`` receives the step and their gradients, aligned.
    stats: the method's statistics (returned by the template whatever happens).
    failure: None, or ``(what, SolverStats)`` when the method's dynamics diverged or missed their tolerance:
        then nothing is accumulated and the divergence policy reports ``what`` with the residual.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    stats: Any
    failure: Optional[tuple] = None
    on_accept: Optional[Callable[[], None]] = None  # run after the accumulation (e.g. LF's new Q): never on failure


def grads_finite(grads: Sequence[torch.Tensor]) -> bool:
    """True when every gradient entry is finite (one host synchronisation): :func:`~lcp_meta.core.tree.tree_finite`."""
    return tree_finite(list(grads))


def accumulate_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """``p.grad += g`` (``p.grad = g`` where there is none), in each parameter's dtype, like autograd."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            g = g.detach().to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g


class GradientMethod:
    """The template both method families derive from.  Subclasses implement :meth:`_gradients` and set
    ``name`` and ``on_divergence`` ("raise" or "warn")."""

    name = "method"
    on_divergence = "raise"

    def _gradients(self, batch) -> Gradients:
        raise NotImplementedError

    def _report_failure(self, what: str, stats: Optional[SolverStats], batch) -> None:
        """The divergence policy (:func:`~lcp_meta.core.solvers.check_divergence`): raise, or warn."""
        check_divergence(what, stats, who=self.name, finite=False, on_fail=self.on_divergence, stacklevel=4)

    def _backward(self, batch) -> Any:
        """Compute, check, accumulate; returns the statistics (``self.accumulated`` says whether ``.grad``
        received the step)."""
        out = self._gradients(batch)
        self.accumulated = False
        failure = out.failure
        if failure is None and not grads_finite(out.grads):
            failure = ("update", None)
        if failure is not None:
            self._report_failure(*failure, batch)  # raises, or warns; .grad is not touched either way
            return out.stats
        accumulate_grads(out.params, out.grads)
        if out.on_accept is not None:
            out.on_accept()
        self.accumulated = True
        return out.stats
