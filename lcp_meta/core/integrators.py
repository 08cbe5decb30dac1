"""The one inner integrator: steps of ``dx/dt = F(x)`` on trees, as optax-style ``init`` / ``update`` pairs.

Every loop of the library that moves a state along a force (the inner loop of MAML and the unrolled
baselines, LCP's joint and energy-descent dynamics, supervised EBD's Adam on the states) takes its step
through one of these.  An integrator is built from its hyper-parameters, which may be tensors (e.g. one step
per task under ``vmap``: build the integrator inside the mapped function)::

    opt = heavy_ball(lr, momentum)
    state = opt.init(x)                      # always carried, also when momentum == 0
    delta, state = opt.update(force, state)  # force: a tree like x, the direction of motion (-gradient)
    x = apply(x, delta)

Sign convention: ``force`` is ``F(x)`` (``-grad E`` for a descent on E), so every integrator moves WITH it.
The functions are pure (no in-place writes): autograd can differentiate through them (MAML) and
``torch.func.vmap`` can map them over tasks.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Tuple

import torch

from .tree import tree_map, tree_zeros_like

__all__ = ["Integrator", "euler", "heavy_ball", "adam", "apply", "INTEGRATORS"]


class Integrator(NamedTuple):
    """``init(x) -> state``; ``update(force, state) -> (delta, state)``; the new point is ``x + delta``."""

    init: Callable[[Any], Any]
    update: Callable[[Any, Any], Tuple[Any, Any]]


def apply(x: Any, delta: Any) -> Any:
    """``x + delta`` leaf by leaf."""
    return tree_map(torch.add, x, delta)


def euler(lr) -> Integrator:
    """Forward Euler (gradient descent on E when the force is -grad E): ``delta = lr F``; no state."""

    def init(x):
        return ()

    def update(force, state):
        return tree_map(lambda f: lr * f, force), state

    return Integrator(init, update)


def heavy_ball(lr, momentum) -> Integrator:
    """Polyak's heavy ball: ``v <- momentum v + F;  delta = lr v``.

    Callers carry the state whatever the momentum (one code path).  With a momentum of Python zero the
    heavy ball IS Euler, and its state is empty: the same numbers, no velocity entering a solver's stop rule
    (the relative change of the whole state) and no graph node per leaf when autograd records an unrolled
    loop (MAML).  A tensor momentum (e.g. one per task) always keeps a velocity.
    """
    if isinstance(momentum, (int, float)) and momentum == 0:
        return euler(lr)

    def init(x):
        return tree_zeros_like(x)

    def update(force, vel):
        vel = tree_map(lambda v, f: momentum * v + f, vel, force)
        return tree_map(lambda v: lr * v, vel), vel

    return Integrator(init, update)


class AdamState(NamedTuple):
    count: int  # a Python int, as torch.optim.Adam uses it: the bias corrections in double precision
    mean: Any
    var: Any


def adam(lr, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Integrator:
    """Adam as ``torch.optim.Adam`` computes it (bias corrections, ``eps`` added to the corrected root):
    ``m <- b1 m + (1-b1) F;  s <- b2 s + (1-b2) F^2;  delta = lr/(1-b1^t) m / (sqrt(s/(1-b2^t)) + eps)``.
    With ``F = -grad E`` this is ``torch.optim.Adam`` on E (Adam is odd in its input)."""

    def init(x):
        return AdamState(0, tree_zeros_like(x), tree_zeros_like(x))

    def update(force, state):
        t = state.count + 1
        mean = tree_map(lambda m, f: b1 * m + (1 - b1) * f, state.mean, force)
        var = tree_map(lambda s, f: b2 * s + (1 - b2) * f * f, state.var, force)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        delta = tree_map(lambda m, s: (lr / c1) * m / ((s / c2).sqrt() + eps), mean, var)
        return delta, AdamState(t, mean, var)

    return Integrator(init, update)


INTEGRATORS = {"euler": euler, "heavy-ball": heavy_ball, "adam": adam}
