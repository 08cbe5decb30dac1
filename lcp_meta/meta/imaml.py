"""iMAML (Rajeswaran et al. 2019): implicit differentiation of the proximal inner problem.

The adapted parameters phi* minimise l_in(phi) + lam/2 |phi - omega|^2 (inner gradient descent); the
meta-gradient is ``lam (Hess l_in(phi*) + lam)^-1 grad l_out(phi*)``, with the linear system solved by a
few conjugate-gradient steps (Hessian-vector products only).  ``lam`` may be per parameter (a diagonal
Lambda); then omega's gradient is ``Lambda y`` and lam's is ``-(phi* - omega) * y`` with
``(Hess l_in + Lambda) y = grad l_out(phi*)``.
"""
from __future__ import annotations

import torch

from .base import MetaMethod, MetaStats
from .functional import grad_and_hvp

__all__ = ["IMAML"]


class IMAML(MetaMethod):
    """iMAML with a conjugate-gradient hypergradient.

    Args (beyond :class:`MetaMethod`):
        cg_steps: conjugate-gradient iterations (5 in the iMAML paper).
        damping: added to the diagonal, ``(Hess l_in + lam + damping) y = grad l_out``; guards CG against
            the indefinite Hessians of non-convex inner losses (0: the exact system).
    """

    name = "imaml"

    def __init__(self, model, loss_fn=None, *, cg_steps: int = 5, damping: float = 0.0, **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        kwargs.setdefault("lam", 2.0)
        super().__init__(model, **kwargs)
        if int(cg_steps) < 1 or damping < 0:
            raise ValueError(f"expected cg_steps >= 1 and damping >= 0, got {cg_steps}, {damping}")
        self.cg_steps, self.damping = int(cg_steps), float(damping)

    def _cg(self, system, lam):
        """Per-task CG on (Hess l_in(phi) + lam + damping) y = b, from y = 0, a fixed number of steps."""
        damping, steps = self.damping, self.cg_steps

        def dot(a, b):
            return sum((a[k] * b[k]).sum() for k in a)

        def cg(phi, b, xs, ys):
            def A(v):
                _, hv = grad_and_hvp(system.loss, phi, v, xs, ys)
                return {k: hv[k] + (lam[k] + damping) * v[k] for k in v}

            y = {k: torch.zeros_like(v) for k, v in b.items()}
            r = dict(b)
            p = dict(b)
            rs = dot(r, r)
            bnorm = rs.sqrt()
            for _ in range(steps):
                Ap = A(p)
                pAp = dot(p, Ap)
                # an exactly solved system gives p = 0: step by 0 instead of dividing 0 by 0
                alpha = torch.where(pAp != 0, rs / torch.where(pAp != 0, pAp, torch.ones_like(pAp)), 0.0 * pAp)
                y = {k: y[k] + alpha * p[k] for k in y}
                r = {k: r[k] - alpha * Ap[k] for k in r}
                rs_new = dot(r, r)
                ratio = torch.where(rs != 0, rs_new / torch.where(rs != 0, rs, torch.ones_like(rs)), 0.0 * rs)
                p = {k: r[k] + ratio * p[k] for k in p}
                rs = rs_new
            return y, rs.sqrt() / bnorm.clamp_min(torch.finfo(bnorm.dtype).tiny)

        return system.tmap(cg, (0, 0, 0, 0))

    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        lam = self.lam_tree(params)
        stats = MetaStats(inner_loss_before=float(system.losses(omega, tb.x_support, tb.y_support, True).mean()),
                          query_loss_before=float(system.losses(omega, tb.x_query, tb.y_query, True).mean()))
        phi, st = self._free(system, omega, lam, tb.x_support, tb.y_support)
        stats.iterations, stats.residual, stats.converged = st.iterations, st.residual, bool(st.converged)
        with torch.no_grad():
            go = system.grads(phi, tb.x_query, tb.y_query)
            y, cg_res = self._cg(system, lam)(phi, go, tb.x_support, tb.y_support)
            grads = {k: (lam[k] * y[k]).mean(0) for k in omega}
            lam_grads = {k: (-(phi[k] - omega[k]) * y[k]).mean(0) for k in omega} if self.learn_lam else None
            stats.inner_loss_after = float(system.losses(phi, tb.x_support, tb.y_support).mean())
            stats.query_loss_after = float(system.losses(phi, tb.x_query, tb.y_query).mean())
            stats.extra["cg_residual"] = float(cg_res.max())
        return grads, lam_grads, stats, st
