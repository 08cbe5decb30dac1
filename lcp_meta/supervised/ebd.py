"""Energy-based LCP (LCP-EBD): reach the least-control state by minimising an energy with Adam.

    E(v, y) = 1/2 |v - g(c, v)|^2 + 1/2 |y - h(v)|^2 + (1/alpha) l(y)        (sums over the batch)

whose minimiser is the same ``F_beta`` state as LCP-DI with ``beta = 1/alpha``.  Then ``e* = v - g(c, v*)``,
``u* = y* - h(v*)`` (``psi* = -f``) and the update is the LCP one.  The gradient of E is assembled from the
model's VJPs, ``dE/dv = -(J_f^T e + J_h^T u)``, ``dE/dy = u + (1/alpha) grad l(y)``, so no autograd graph
is built per step.  Spec settings: ff Adam lr 0.01 for 800 steps from 0; rnn lr 1e-3 for 200 steps
starting at the free equilibrium.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..core.controllers import EBD
from ..core.integrators import adam, apply
from ..core.solvers import SolverStats, check_divergence
from ..core.system import NetworkSystem, output_loss, output_loss_grad
from ..core.tree import tree_map, tree_norm
from .methods import Method, check_finite

__all__ = ["EnergyBased"]


class EnergyBased(Method):
    """LCP-EBD.  ``ebd_lr``/``ebd_steps``: Adam on the states; ``ebd_init``: 'zeros' or 'free' (start at the free
    equilibrium, solved with ``tol``/``max_iter``); ``stop_tol``: optional early stop on the relative change
    of the states (None runs every step, as the official code does)."""

    name = "lcp-ebd"
    controller = "ebd"

    def __init__(self, model, alpha: float = 0.1, ebd_lr: float = 0.01, ebd_steps: int = 800,
                 ebd_init: str = "zeros", betas=(0.9, 0.999), stop_tol: Optional[float] = None, loss: str = "ce",
                 **kw):
        super().__init__(model, loss=loss, **kw)
        for key, val in (("alpha", alpha), ("ebd_lr", ebd_lr), ("ebd_steps", ebd_steps)):
            check_finite(self.name, key, val)
        if stop_tol is not None:
            check_finite(self.name, "stop_tol", stop_tol)
            if stop_tol <= 0:
                raise ValueError(f"{self.name}: stop_tol must be > 0 (or None: run every step), got {stop_tol!r}")
        if alpha <= 0 or ebd_lr <= 0 or int(ebd_steps) < 1:
            raise ValueError(f"expected alpha > 0, ebd_lr > 0, ebd_steps >= 1; got {alpha}, {ebd_lr}, {ebd_steps}")
        if ebd_init not in ("zeros", "free"):
            raise ValueError(f"ebd_init must be 'zeros' or 'free', got {ebd_init!r}")
        self.alpha, self.lr, self.steps, self.init, self.betas, self.stop_tol = (
            float(alpha), float(ebd_lr), int(ebd_steps), ebd_init, tuple(betas), stop_tol)

    @property
    def beta(self) -> float:
        return 1.0 / self.alpha

    def energy_grad(self, c, target, v, y):
        """``(dE/dv, dE/dy, e, u)`` at ``(v, y)``, with ``e = -f = v - g`` and ``u = y - h``."""
        system = NetworkSystem(self.model, c)
        t = system.terms(v)
        e, u = -t.f, y - t.h
        return EBD.state_grad(system.vjps(v, e, u)), u + self.beta * output_loss_grad(y, target, self.loss), e, u

    def energy(self, c, target, v, y) -> torch.Tensor:
        t = NetworkSystem(self.model, c).terms(v)
        return EBD.energy(t.f, self.beta, output_loss(y, target, self.loss), y - t.h)

    def _extra_stats(self, c, target, v, yc):
        return {"energy": float(self.energy(c, target, v, yc))}


@EBD.drives("network")
@torch.no_grad()
def _network(ctrl, method, system, target):
    """EBD on the network: Adam on the states ``(v, y)`` from 0 or the free equilibrium; returns
    ``((v*, y*, e* = -f, u* = y* - h), SolverStats)``."""
    c = system.c
    if method.init == "free":  # (Euler freezes settled samples only where the method's do leave: Method.samples_leave)
        kw = {"freeze_converged": method.samples_leave} if method.solver == "euler" else {}
        v, _ = method.model.free_equilibrium(c, solver=method.solver, tol=method.tol, max_iter=method.max_iter,
                                             check_every=method.check_every, **kw)
    else:
        v = method.model.init_state(c)
    y = method.model.h(v) if method.init == "free" else torch.zeros_like(method.model.h(v))
    opt = adam(method.lr, *method.betas)  # torch.optim.Adam's arithmetic, on the states
    state = opt.init((v, y))
    stats = SolverStats(iterations=0, residual=math.inf, converged=False)
    rel = math.inf
    for t in range(1, method.steps + 1):
        gv, gy, _, _ = method.energy_grad(c, target, v, y)
        delta, state = opt.update((-gv, -gy), state)  # the force is -dE
        new = apply((v, y), delta)
        rel = float(tree_norm(tree_map(torch.sub, new, (v, y))) / tree_norm(new).clamp_min(1e-12))
        v, y = new
        stats.iterations = t
        if not math.isfinite(rel):
            stats.diverged = True
            break
        if method.stop_tol is not None and rel < method.stop_tol:
            break
    stats.residual = rel
    # without stop_tol the fixed number of steps is the method (the official code's); with it, only a run that met it
    stats.converged = not stats.diverged and (method.stop_tol is None or rel < method.stop_tol)
    check_divergence("energy minimisation (Adam on the states)", stats, who=method.name)
    g, h, _, _ = method.model.step_terms(c, v, None, None)
    return (v, y, v - g, y - h), stats
