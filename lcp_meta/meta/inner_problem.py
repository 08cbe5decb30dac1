"""The inner problem of meta-learning as a system of the controllers (spec section 4).

Inner learning is a gradient flow on the regularised support loss; its fixed point is the adapted model:

    phi*(omega) = argmin_phi  E(phi) = l_in(phi) + lam/2 |phi - omega|^2
    f(phi, omega) = -grad E = -grad l_in(phi) - lam (phi - omega)          (the free dynamics dphi/dt = f)

``omega`` are the meta-parameters (the model's initial weights), ``phi`` the task-adapted parameters, ``lam``
the proximal strength (a scalar or one value per parameter element, a tree like phi), ``l_in`` the support
loss and ``l_out`` the query loss of a task.  As a system of :mod:`lcp_meta.core.controllers` its output map
is the identity (the loss ``l_out`` is read on phi itself) and its Jacobian ``J_f = -(Hess l_in + lam)`` is
symmetric, so the network's dynamic-inversion controller drives it unchanged (:meth:`InnerProblem.terms`).
Every per-task function here acts on ONE task; the methods map them over tasks (``tmap``: vmap or a loop).
The problem knows nothing of the method that solves it: solver settings come in as arguments.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.func import grad

from ..core.controllers import Terms
from ..core.integrators import apply, euler, heavy_ball
from ..core.solvers import solve
from ..core.tree import Tree, tree_expand, tree_pack
from .functional import grad_and_hvp, task_map

__all__ = ["InnerProblem"]


class InnerProblem:
    """One task's inner problem: its losses, the force f, the curvature ``Hess l_in + lam`` and the meta-side
    local update; ``kind = "inner"`` for the controllers' drivers."""

    kind = "inner"

    def __init__(self, loss: Callable, model_fn: Callable, use_vmap: bool = True):
        self.loss = loss          # loss(params, x, y) -> scalar, one task
        self.model_fn = model_fn  # model_fn(params, x) -> prediction, one task
        self.use_vmap = use_vmap
        self.grad = grad(loss)    # grad_params loss(params, x, y)

    # ------------------------------------------------------------------ per-task: spec section 4
    @staticmethod
    def force_from(g: Tree, phi: Tree, omega: Tree, lam: Tree) -> Tree:
        """f = -g - lam (phi - omega) from the support gradient g = grad l_in(phi): the one place f is written."""
        return {k: -g[k] - lam[k] * (phi[k] - omega[k]) for k in phi}

    def force(self, phi: Tree, omega: Tree, lam: Tree, x, y) -> Tree:
        """f(phi, omega) = -grad l_in(phi) - lam (phi - omega)."""
        return self.force_from(self.grad(phi, x, y), phi, omega, lam)

    def energy(self, phi: Tree, omega: Tree, lam: Tree, x, y) -> torch.Tensor:
        """E(phi) = l_in(phi) + lam/2 |phi - omega|^2, whose negative gradient is f."""
        return self.loss(phi, x, y) + 0.5 * sum((lam[k] * (phi[k] - omega[k]) ** 2).sum() for k in phi)

    def terms(self, phi: Tree, e: Optional[Tree], u: Optional[Tree], omega: Optional[Tree], lam: Tree, x, y) -> Terms:
        """The controllers' terms at phi: ``f`` (None without ``omega``), ``h = phi``,
        ``J_f^T e = -(Hess l_in + lam) e`` (None without ``e``) and ``J_h^T u = u``.  With ``e`` one
        forward-over-reverse pass gives the gradient and the curvature product together."""
        if e is None:
            g, jf = self.grad(phi, x, y), None
        else:
            g, he = grad_and_hvp(self.loss, phi, e, x, y)
            jf = {k: -(he[k] + lam[k] * e[k]) for k in e}
        return Terms(None if omega is None else self.force_from(g, phi, omega, lam), phi, jf, u)

    def curvature(self, phi: Tree, v: Tree, lam: Tree, x, y) -> Tree:
        """(Hess l_in(phi) + lam) v = -J_f^T v, the operator of the control's equilibrium (and of iMAML's CG)."""
        return {k: -w for k, w in self.terms(phi, v, None, None, lam, x, y).jf.items()}

    # ------------------------------------------------------------------ the meta-side local update
    @staticmethod
    def local_update(phi: Tree, omega: Tree, lam: Tree, u: Tree, learn_lam: bool) -> Tuple[Tree, Optional[Tree]]:
        """Mean over tasks of ``-(df/domega)^T psi / beta = -lam u`` and, when lam is learned,
        ``-(df/dlam)^T psi / beta = (phi - omega) . u`` (u = psi / beta, spec section 4)."""
        grads = {k: (-lam[k] * u[k]).mean(0) for k in omega}
        lam_grads = {k: ((phi[k] - omega[k]) * u[k]).mean(0) for k in omega} if learn_lam else None
        return grads, lam_grads

    # ------------------------------------------------------------------ task-batched helpers
    def tmap(self, fn, in_dims):
        return task_map(fn, in_dims, self.use_vmap)

    def losses(self, params: Tree, x, y, shared: bool = False) -> torch.Tensor:
        """Per-task loss values (T,); ``shared`` when ``params`` has no task dim (omega)."""
        with torch.no_grad():
            return self.tmap(self.loss, (None if shared else 0, 0, 0))(params, x, y)

    def grads(self, params: Tree, x, y) -> Tree:
        """Per-task gradients of the loss at task-batched params."""
        return self.tmap(self.grad, (0, 0, 0))(params, x, y)

    def free_equilibrium(self, omega: Tree, lam: Tree, xs, ys, *, lr: float, momentum: float = 0.0,
                         tol: Optional[float], max_iter: int, solver: str = "euler", phi0: Optional[Tree] = None,
                         beta: float = 0.0, xq=None, yq=None, name: str = "inner dynamics"):
        """Gradient dynamics on E [+ beta l_out] with step ``lr`` (heavy-ball with ``momentum``) from ``phi0``
        (default omega), through :func:`lcp_meta.core.solvers.solve` (``tol=None``: exactly ``max_iter``
        steps).  ``beta != 0`` is the nudged phase (the direct controller's equilibrium).  Returns
        (phi, SolverStats); phi has a leading task dim."""
        if phi0 is None:
            phi0 = tree_expand(omega, xs.shape[0])
        # plain Euler carries no state, so the solver's stop rule sees phi alone, as without momentum it always has
        inner = heavy_ball(lr, momentum) if momentum > 0 else euler(lr)
        xq_, yq_ = (xq, yq) if beta != 0.0 else (xs, ys)

        def one(phi, st, x, y, a, b):
            f = self.force(phi, omega, lam, x, y)
            if beta != 0.0:
                go = self.grad(phi, a, b)
                f = {k: f[k] - beta * go[k] for k in f}
            delta, st = inner.update(f, st)
            return apply(phi, delta), st

        mapped = self.tmap(one, (0, 0, 0, 0, 0, 0))
        state, rebuild = tree_pack([phi0, inner.init(phi0)])

        def step(z):
            return tree_pack(list(mapped(*rebuild(z), xs, ys, xq_, yq_)))[0]

        z, st = solve(step, state, solver=solver, tol=tol, max_iter=max_iter, name=name)
        return rebuild(z)[0], st
