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

from ..core.tree import tree_map
from .base import MetaGradient, MetaMethod, MetaStats, check_positive
from .dynamics import STOP_RULES, cg_control

__all__ = ["IMAML"]


class IMAML(MetaMethod):
    """iMAML with a conjugate-gradient hypergradient.

    Args (beyond :class:`MetaMethod`):
        cg_steps: conjugate-gradient iterations (5 in the iMAML paper); the cap when ``cg_tol`` is set.
        cg_tol: stop CG when the relative residual ``|(Hess l_in + lam) y - grad l_out| / |grad l_out|``
            is below it (None: exactly ``cg_steps``).  A task that reaches the cap above it is returned as it is
            (iMAML's own convention), and the step is reported unconverged.
        damping: added to the diagonal, ``(Hess l_in + lam + damping) y = grad l_out`` (0: the exact system).
        cg_stop: with ``cg_tol``, ``"per-task"`` (default: each task stops when it meets cg_tol) or ``"batch"``
            (all step until the last meets it); see :func:`~lcp_meta.meta.dynamics.cg_control`.

    CG needs a positive definite system.  Hess l_in + lam is indefinite where the inner loss curves down
    by more than lam (or the inner problem is not solved); CG then meets a direction with
    ``p^T A p <= 0``, where its step would go the wrong way or divide by zero.  Such a task stops at its
    last iterate (reported as ``extra["cg_indefinite"]``, the number of tasks) instead of diverging;
    ``control_residual`` shows how far that iterate is from solving the system.
    """

    name = "imaml"

    def __init__(self, model, loss_fn=None, *, cg_steps: int = 5, cg_tol: Optional[float] = None,
                 damping: float = 0.0, cg_stop: str = "per-task", **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        kwargs.setdefault("lam", 2.0)
        super().__init__(model, **kwargs)
        if isinstance(cg_steps, bool) or int(cg_steps) < 1:
            raise ValueError(f"cg_steps must be an integer >= 1, got {cg_steps!r}")
        check_positive("cg_tol", cg_tol, allow_none=True)
        check_positive("damping", damping, allow_zero=True)
        if cg_stop not in STOP_RULES:
            raise ValueError(f"cg_stop must be one of {STOP_RULES}, got {cg_stop!r}")
        self.cg_steps, self.cg_tol, self.damping, self.cg_stop = int(cg_steps), cg_tol, float(damping), cg_stop

    def _cg(self, system, lam, phi, b, xs, ys):
        """(Hess l_in(phi) + lam + damping) y = b per task by CG from y = 0: the same routine as LCP's
        control at a fixed inner state (:func:`~lcp_meta.meta.dynamics.cg_control`, which solves
        ``A u = -g``, so ``g = -b``), for exactly ``cg_steps`` steps, or until every task's relative residual
        meets ``cg_tol``.  A task whose curvature p^T A p is not positive (indefinite system) stops at its
        last iterate and is flagged.  Returns (y, relative residuals (T,), flagged (T,))."""
        damped = lam if self.damping == 0 else {k: v + self.damping for k, v in lam.items()}
        tol = 0.0 if self.cg_tol is None else self.cg_tol  # 0: no task stops before cg_steps (unless exact)
        y, _, res, flagged = cg_control(self._tmap, system, damped, phi, tree_map(torch.neg, b), xs, ys, tol,
                                        self.cg_steps, stop_rule=self.cg_stop)
        return y, res, flagged

    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        lam = self.lam_tree(params)
        phi, st = self._free(system, omega, lam, tb.x_support, tb.y_support)
        stats = MetaStats(iterations=st.iterations, residual=st.residual, converged=bool(st.converged),
                          inner_residual=st.residual)
        st.phase = "inner"
        with torch.no_grad():
            go = system.grads(phi, tb.x_query, tb.y_query)
            y, cg_res, indefinite = self._cg(system, lam, phi, go, tb.x_support, tb.y_support)
            grads = {k: (lam[k] * y[k]).mean(0) for k in omega}
            lam_grads = {k: (-(phi[k] - omega[k]) * y[k]).mean(0) for k in omega} if self.learn_lam else None
            stats.control_residual = float(cg_res.max())
            stats.extra["cg_residual"] = stats.control_residual
            stats.extra["cg_indefinite"] = int(indefinite.sum())
        if self.cg_tol is not None:  # cg_steps is then a cap: a CG stopped there above cg_tol has not converged
            stats.converged = stats.converged and stats.control_residual <= self.cg_tol
        stats.residual = max(st.residual, stats.control_residual)
        return MetaGradient(grads, st, stats, phi, lam_grads)
