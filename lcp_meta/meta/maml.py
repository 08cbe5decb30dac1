"""MAML-style baselines: MAML (second order, unrolled), first-order MAML and Reptile.

The inner loop is ``inner_steps`` steps of (heavy-ball) gradient descent on the support loss, from
phi = omega, optionally with the proximal term lam/2 |phi - omega|^2 (lam = 0 by default: plain MAML).
"""
from __future__ import annotations

import torch

from ..core.solvers import SolverStats
from .base import MetaMethod, MetaStats
from .functional import task_map, tree_finite
from .memory import graph_saved_bytes

__all__ = ["MAML", "FOMAML", "Reptile"]


def _has_affine_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine for m in model.modules())


class _Unrolled(MetaMethod):
    supports_learned_lam = False

    def __init__(self, model, loss_fn=None, **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        kwargs.setdefault("lam", 0.0)
        kwargs.setdefault("inner_steps", 5)
        kwargs.setdefault("inner_lr", 0.1)
        super().__init__(model, **kwargs)

    def _start(self, system, omega, tb):
        return MetaStats(inner_loss_before=float(system.losses(omega, tb.x_support, tb.y_support, True).mean()),
                         query_loss_before=float(system.losses(omega, tb.x_query, tb.y_query, True).mean()))

    def _finish(self, system, stats, phi, tb, st):
        stats.iterations, stats.residual, stats.converged = st.iterations, st.residual, bool(st.converged)
        stats.inner_loss_after = float(system.losses(phi, tb.x_support, tb.y_support).mean())
        stats.query_loss_after = float(system.losses(phi, tb.x_query, tb.y_query).mean())


class MAML(_Unrolled):
    """MAML (Finn et al. 2017): the exact gradient of l_out(phi_K(omega)) through the unrolled inner loop.

    Differentiates through every inner step (second derivatives, memory linear in ``inner_steps``).
    ``tol`` is not supported: the unrolled computation has a fixed length.  Models with affine BatchNorm
    are unrolled task by task even with ``vmap=True``: vmap gets BatchNorm's double backward wrong in
    torch 2.x (the LCP / iMAML Hessian-vector products, forward-over-reverse, are not affected).
    """

    name = "maml"

    def __init__(self, model, loss_fn=None, **kwargs):
        super().__init__(model, loss_fn, **kwargs)
        if self.tol is not None:
            raise ValueError("MAML unrolls a fixed number of inner steps; use tol=None")

    def _meta_gradient(self, system, params, tb):
        omega = dict(params)  # live parameters: autograd records the unrolled inner loop
        lam = self.lam_tree(params)
        stats = self._start(system, {k: v.detach() for k, v in omega.items()}, tb)
        lr, mom, K = self.inner_lr, self.momentum, self.inner_steps

        def unrolled(om, xs, ys, xq, yq):
            phi, vel, prev = dict(om), None, None
            for _ in range(K):
                g = system.grad(phi, xs, ys)  # differentiable: gives MAML its second-order terms
                f = {k: -g[k] - lam[k] * (phi[k] - om[k]) for k in phi}
                if mom > 0:
                    vel = f if vel is None else {k: mom * vel[k] + f[k] for k in f}
                    f = vel
                prev, phi = phi, {k: phi[k] + lr * f[k] for k in phi}
            num = sum(((phi[k] - prev[k]).detach() ** 2).sum() for k in phi).sqrt()
            den = sum((phi[k].detach() ** 2).sum() for k in phi).sqrt()
            return system.loss(phi, xq, yq), phi, num / den.clamp_min(1e-12)

        # torch 2.x computes the double backward of affine BatchNorm wrongly under vmap (checked against
        # a hand-written create_graph loop); the second-order unroll then loops over tasks instead
        use_vmap = self.use_vmap and not _has_affine_batchnorm(self.model)
        with torch.enable_grad():
            lout, phi, rel = task_map(unrolled, (None, 0, 0, 0, 0), use_vmap)(
                omega, tb.x_support, tb.y_support, tb.x_query, tb.y_query)
            graph_bytes = graph_saved_bytes(lout)
            ok = bool(torch.isfinite(lout).all())
            if ok:
                gs = torch.autograd.grad(lout.mean(), list(omega.values()), allow_unused=True)
                grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(omega.items(), gs)}
            else:
                grads = {k: torch.full_like(v, float("nan")) for k, v in omega.items()}
        phi = {k: v.detach() for k, v in phi.items()}
        finite = ok and tree_finite(phi)
        st = SolverStats(iterations=K, residual=float(rel.max()), converged=finite, diverged=not finite)
        self._finish(system, stats, phi, tb, st)
        stats.extra["graph_bytes"] = graph_bytes
        return grads, None, stats, st


class FOMAML(_Unrolled):
    """First-order MAML: the query-loss gradient at the adapted parameters, grad l_out(phi_K)."""

    name = "fomaml"

    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        stats = self._start(system, omega, tb)
        phi, st = self._free(system, omega, self.lam_tree(params), tb.x_support, tb.y_support)
        with torch.no_grad():
            grads = {k: v.mean(0) for k, v in system.grads(phi, tb.x_query, tb.y_query).items()}
            self._finish(system, stats, phi, tb, st)
        return grads, None, stats, st


class Reptile(_Unrolled):
    """Reptile (Nichol et al. 2018): meta-gradient ``omega - phi_K`` (support data only; the query set
    enters the statistics, not the update).  An SGD step with learning rate epsilon on it is the Reptile
    interpolation ``omega + epsilon (phi_K - omega)``."""

    name = "reptile"

    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        stats = self._start(system, omega, tb)
        phi, st = self._free(system, omega, self.lam_tree(params), tb.x_support, tb.y_support)
        with torch.no_grad():
            grads = {k: (omega[k] - phi[k]).mean(0) for k in omega}
            self._finish(system, stats, phi, tb, st)
        return grads, None, stats, st
