"""Contrastive meta-learning (Zucchet et al. 2022): equilibrium propagation on the inner problem.

Two phases: the free equilibrium phi_0 of E(phi) = l_in(phi) + lam/2 |phi - omega|^2, then the nudged
equilibrium phi_beta of E + beta l_out, started from phi_0.  The meta-gradient is the finite difference
of dE/d omega between the phases, ``lam (phi_0 - phi_beta) / beta``, which tends to the implicit
hypergradient as beta -> 0 (``symmetric`` nudging, +beta and -beta, cancels the O(beta) bias).
lam's gradient is likewise ``(|phi_beta - omega|^2 - |phi_0 - omega|^2) / (2 beta)`` per element.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import MetaGradient, MetaMethod, MetaStats, check_positive
from ..core.tree import tree_norm

__all__ = ["ContrastiveMeta"]


class ContrastiveMeta(MetaMethod):
    """Contrastive meta-learning / equilibrium propagation.

    Args (beyond :class:`MetaMethod`):
        beta: nudging strength of the second phase.
        symmetric: nudge with +beta and -beta and difference the two (a third phase, O(beta^2) bias).
        nudged_steps: steps of the nudged phase (default: inner_steps; the cap when tol is set).
    """

    name = "cml"

    def __init__(self, model, loss_fn=None, *, beta: float = 0.1, symmetric: bool = False,
                 nudged_steps: Optional[int] = None, **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        super().__init__(model, **kwargs)
        check_positive("beta", beta)
        if nudged_steps is not None and int(nudged_steps) < 1:
            raise ValueError(f"nudged_steps must be >= 1, got {nudged_steps}")
        self.beta, self.symmetric = float(beta), bool(symmetric)
        self.nudged_steps = int(nudged_steps) if nudged_steps is not None else None

    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        lam, beta = self.lam_tree(params), self.beta
        stats = MetaStats()
        if self.solver == "anderson":
            phi0, st = self._free(system, omega, lam, tb.x_support, tb.y_support)
        else:
            phi0, st, info0 = self._relax(system, omega, lam, tb.x_support, tb.y_support)
        total = st.iterations
        ends = []
        for b in ((beta, -beta) if self.symmetric else (beta,)):
            if st.diverged:
                break
            if self.solver == "anderson":
                settings = self._solve_settings(next(iter(omega.values())).dtype, max_iter=self.nudged_steps)
                phib, stb = system.free_equilibrium(omega, lam, tb.x_support, tb.y_support, lr=self.inner_lr,
                                                    momentum=self.momentum, phi0=phi0, beta=b, xq=tb.x_query,
                                                    yq=tb.y_query, name="CML nudged phase", **settings)
            else:
                # residual relative to |f(omega)|, the scale of the inner problem (the nudged phase starts
                # with a force of only beta |grad l_out|); same step and momentum as the free phase
                phib, stb, _ = self._relax(system, omega, lam, tb.x_support, tb.y_support, phi0=phi0, beta=b,
                                           xq=tb.x_query, yq=tb.y_query, steps=self.nudged_steps,
                                           scale=info0["scale"], reuse=info0)
            ends.append(phib)
            total += stb.iterations
            stb.converged = stb.converged and st.converged
            stb.residual = max(stb.residual, st.residual)
            st = stb
        st.iterations = total
        stats.iterations, stats.residual, stats.converged = st.iterations, st.residual, bool(st.converged)
        stats.inner_residual = st.residual  # the largest over the free and nudged phases
        with torch.no_grad():
            if st.diverged or not ends:
                nan = {k: torch.full_like(v, float("nan")) for k, v in omega.items()}
                return MetaGradient(nan, st, stats)
            # the "reference" phase: phi_0, or the anti-nudged phase for symmetric nudging
            ref, scale = (ends[1], 2 * beta) if self.symmetric else (phi0, beta)
            plus = ends[0]
            grads = {k: (lam[k] * (ref[k] - plus[k]) / scale).mean(0) for k in omega}
            lam_grads = None
            if self.learn_lam:
                lam_grads = {k: (0.5 * ((plus[k] - omega[k]) ** 2 - (ref[k] - omega[k]) ** 2) / scale).mean(0)
                             for k in omega}
            go = system.grads(plus, tb.x_query, tb.y_query)
            stats.control_norm = float(beta * tree_norm(go, batched=True).mean())
        stats.extra["beta"] = beta
        return MetaGradient(grads, st, stats, phi0, lam_grads)
