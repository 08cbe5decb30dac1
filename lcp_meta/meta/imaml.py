"""iMAML (Rajeswaran et al. 2019): implicit differentiation of the proximal inner problem.

The adapted parameters phi* minimise l_in(phi) + lam/2 |phi - omega|^2 (inner gradient descent); the
meta-gradient is ``lam (Hess l_in(phi*) + lam)^-1 grad l_out(phi*)``, with the linear system solved by a
few conjugate-gradient steps (Hessian-vector products only).  ``lam`` may be per parameter (a diagonal
Lambda); then omega's gradient is ``Lambda y`` and lam's is ``-(phi* - omega) * y`` with
``(Hess l_in + Lambda) y = grad l_out(phi*)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.tree import tree_dot
from .base import MetaGradient, MetaMethod, MetaStats, check_positive
from .dynamics import cg_step
from .functional import grad_and_hvp

__all__ = ["IMAML"]


class IMAML(MetaMethod):
    """iMAML with a conjugate-gradient hypergradient.

    Args (beyond :class:`MetaMethod`):
        cg_steps: conjugate-gradient iterations (5 in the iMAML paper); the cap when ``cg_tol`` is set.
        cg_tol: stop CG when the relative residual ``|(Hess l_in + lam) y - grad l_out| / |grad l_out|``
            is below it (None: exactly ``cg_steps``).
        damping: added to the diagonal, ``(Hess l_in + lam + damping) y = grad l_out`` (0: the exact system).

    CG needs a positive definite system.  Hess l_in + lam is indefinite where the inner loss curves down
    by more than lam (or the inner problem is not solved); CG then meets a direction with
    ``p^T A p <= 0``, where its step would go the wrong way or divide by zero.  Such a task stops at its
    last iterate (reported as ``extra["cg_indefinite"]``, the number of tasks) instead of diverging;
    ``control_residual`` shows how far that iterate is from solving the system.
    """

    name = "imaml"

    def __init__(self, model, loss_fn=None, *, cg_steps: int = 5, cg_tol: Optional[float] = None,
                 damping: float = 0.0, **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        kwargs.setdefault("lam", 2.0)
        super().__init__(model, **kwargs)
        if isinstance(cg_steps, bool) or int(cg_steps) < 1:
            raise ValueError(f"cg_steps must be an integer >= 1, got {cg_steps!r}")
        check_positive("cg_tol", cg_tol, allow_none=True)
        check_positive("damping", damping, allow_zero=True)
        self.cg_steps, self.cg_tol, self.damping = int(cg_steps), cg_tol, float(damping)

    def _cg(self, system, lam):
        """Per-task CG on (Hess l_in(phi) + lam + damping) y = b from y = 0, masked per task: a task stops
        when its residual meets cg_tol or its curvature p^T A p is not positive (indefinite system)."""
        damping, steps, cg_tol = self.damping, self.cg_steps, self.cg_tol

        def cg(phi, b, xs, ys):
            def A(v):
                _, hv = grad_and_hvp(system.loss, phi, v, xs, ys)
                return {k: hv[k] + (lam[k] + damping) * v[k] for k in v}

            y = {k: torch.zeros_like(v) for k, v in b.items()}
            r, p = dict(b), dict(b)
            rs = tree_dot(r, r)
            bnorm = rs.sqrt()
            active = bnorm > 0
            indefinite = torch.zeros_like(active)
            for _ in range(steps):
                if cg_tol is not None:
                    active = active & (rs.sqrt() > cg_tol * bnorm)
                y, r, p, rs, bad, active = cg_step(A, y, r, p, rs, active)
                indefinite = indefinite | bad
            return y, rs.sqrt() / bnorm.clamp_min(torch.finfo(bnorm.dtype).tiny), indefinite

        return system.tmap(cg, (0, 0, 0, 0))

    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        lam = self.lam_tree(params)
        phi, st = self._free(system, omega, lam, tb.x_support, tb.y_support)
        stats = MetaStats(iterations=st.iterations, residual=st.residual, converged=bool(st.converged),
                          inner_residual=st.residual)
        st.phase = "inner"
        with torch.no_grad():
            go = system.grads(phi, tb.x_query, tb.y_query)
            y, cg_res, indefinite = self._cg(system, lam)(phi, go, tb.x_support, tb.y_support)
            grads = {k: (lam[k] * y[k]).mean(0) for k in omega}
            lam_grads = {k: (-(phi[k] - omega[k]) * y[k]).mean(0) for k in omega} if self.learn_lam else None
            stats.control_residual = float(cg_res.max())
            stats.extra["cg_residual"] = stats.control_residual
            stats.extra["cg_indefinite"] = int(indefinite.sum())
        stats.residual = max(st.residual, stats.control_residual)
        return MetaGradient(grads, st, stats, phi, lam_grads)
