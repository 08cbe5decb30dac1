"""The inner equilibrium system of meta-learning (spec section 4).

Inner learning is a gradient flow on the regularised support loss; its fixed point is the adapted model:

    phi*(omega) = argmin_phi  l_in(phi) + lam/2 |phi - omega|^2
    f(phi, omega) = -grad l_in(phi) - lam (phi - omega)          (the free dynamics dphi/dt = f)

``omega`` are the meta-parameters (the model's initial weights), ``phi`` the task-adapted parameters,
``lam`` the proximal strength (a scalar or one value per parameter element), ``l_in`` the support loss
and ``l_out`` the query loss of a task.  Every function here acts on ONE task; the meta-learning methods
map them over tasks with vmap.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.func import grad

from .functional import Tree, grad_and_hvp, task_map

__all__ = ["InnerSystem", "pack", "unpack"]


def pack(trees: Sequence[Tree]) -> Tuple[torch.Tensor, ...]:
    """Trees (same keys, leading task dim) -> one flat tuple of tensors, the solver's state format."""
    return tuple(v for t in trees for v in t.values())


def unpack(z: Sequence[torch.Tensor], names: List[str]) -> List[Tree]:
    n = len(names)
    return [dict(zip(names, z[i:i + n])) for i in range(0, len(z), n)]


class InnerSystem:
    """The inner problem of one task: its losses, force f and curvature (Hessian-vector products)."""

    def __init__(self, loss: Callable, model_fn: Callable, use_vmap: bool = True):
        self.loss = loss          # loss(params, x, y) -> scalar, one task
        self.model_fn = model_fn  # model_fn(params, x) -> prediction, one task
        self.use_vmap = use_vmap
        self.grad = grad(loss)    # grad_params loss(params, x, y)

    # ------------------------------------------------------------------ per-task building blocks
    def force(self, phi: Tree, omega: Tree, lam: Tree, x, y) -> Tree:
        """f(phi, omega) = -grad l_in(phi) - lam (phi - omega)."""
        g = self.grad(phi, x, y)
        return {k: -g[k] - lam[k] * (phi[k] - omega[k]) for k in phi}

    def force_and_hvp(self, phi: Tree, v: Tree, omega: Tree, lam: Tree, x, y) -> Tuple[Tree, Tree]:
        """(f(phi), (Hess l_in(phi) + lam) v): one forward-over-reverse pass."""
        g, hv = grad_and_hvp(self.loss, phi, v, x, y)
        f = {k: -g[k] - lam[k] * (phi[k] - omega[k]) for k in phi}
        return f, {k: hv[k] + lam[k] * v[k] for k in phi}

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

    def free_equilibrium(self, omega: Tree, lam: Tree, xs, ys, cfg, phi0: Optional[Tree] = None,
                         beta: float = 0.0, xq=None, yq=None, name: str = "inner dynamics",
                         steps: Optional[int] = None):
        """Gradient dynamics (heavy-ball with ``cfg.momentum``) on l_in + lam/2|phi-omega|^2 [+ beta l_out].

        From ``phi0`` (default omega) with step ``cfg.inner_lr``, ``steps`` (default cfg.inner_steps)
        steps or until the relative change is below ``cfg.tol``.  ``beta != 0`` gives the nudged phase
        of contrastive meta-learning.  Returns (phi, SolverStats); phi has a leading task dim.
        """
        names = list(omega)
        T = xs.shape[0]
        if phi0 is None:
            phi0 = {k: v.detach().unsqueeze(0).expand(T, *v.shape).clone() for k, v in omega.items()}
        lr, mom = cfg.inner_lr, cfg.momentum
        nudged = beta != 0.0

        def one(phi, vel, x, y, xq_, yq_):
            f = self.force(phi, omega, lam, x, y)
            if nudged:
                go = self.grad(phi, xq_, yq_)
                f = {k: f[k] - beta * go[k] for k in f}
            if vel is None:
                return {k: phi[k] + lr * f[k] for k in phi}, None
            vel = {k: mom * vel[k] + f[k] for k in vel}
            return {k: phi[k] + lr * vel[k] for k in phi}, vel

        if mom > 0:
            mapped = self.tmap(lambda p, v, x, y, a, b: one(p, v, x, y, a, b), (0, 0, 0, 0, 0, 0))
            state = pack([phi0, {k: torch.zeros_like(v) for k, v in phi0.items()}])
        else:
            mapped = self.tmap(lambda p, x, y, a, b: one(p, None, x, y, a, b)[0], (0, 0, 0, 0, 0))
            state = pack([phi0])
        xq_, yq_ = (xq, yq) if nudged else (xs, ys)

        def step(z):
            trees = unpack(z, names)
            if mom > 0:
                return pack(mapped(trees[0], trees[1], xs, ys, xq_, yq_))
            return pack([mapped(trees[0], xs, ys, xq_, yq_)])

        z, st = cfg._dynamics(step, state, name=name, max_iter=steps)
        return unpack(z, names)[0], st
