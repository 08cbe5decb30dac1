"""MAML-style baselines: MAML (second order, unrolled), first-order MAML and Reptile.

The inner loop is ``inner_steps`` steps of (heavy-ball) gradient descent on the support loss, from
phi = omega, optionally with the proximal term lam/2 |phi - omega|^2 (lam = 0 by default: plain MAML).
"""
from __future__ import annotations

import torch

from ..core.integrators import apply, heavy_ball
from ..core.solvers import SolverStats
from ..core.tree import tree_expand, tree_finite, tree_map, tree_norm
from .base import MetaGradient, MetaMethod, MetaStats
from .functional import grad_and_hvp, task_map
from .memory import graph_saved_bytes

__all__ = ["MAML", "FOMAML", "Reptile"]


def _has_affine_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine for m in model.modules())


class _Unrolled(MetaMethod):
    supports_learned_lam = False
    proximal = False  # lam = 0 by default: plain MAML / FOMAML / Reptile
    equilibrium = False  # K steps define the method: no residual tolerance

    def __init__(self, model, loss_fn=None, **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        kwargs.setdefault("lam", 0.0)
        kwargs.setdefault("inner_steps", 5)
        kwargs.setdefault("inner_lr", 0.1)
        super().__init__(model, **kwargs)

    @staticmethod
    def _result(grads, st: SolverStats, phi, **extra) -> MetaGradient:
        stats = MetaStats(iterations=st.iterations, residual=st.residual, converged=bool(st.converged), extra=extra)
        return MetaGradient(grads, st, stats, phi)

    def _first_order(self, system, params, tb, direction) -> MetaGradient:
        """The first-order methods: K inner steps from omega, then ``direction(omega, phi)`` per task."""
        omega = {k: v.detach() for k, v in params.items()}
        phi, st = self._free(system, omega, self.lam_tree(params), tb.x_support, tb.y_support)
        with torch.no_grad():
            grads = tree_map(lambda g: g.mean(0), direction(omega, phi))
        return self._result(grads, st, phi)


class MAML(_Unrolled):
    """MAML (Finn et al. 2017): the exact gradient of l_out(phi_K(omega)) through the unrolled inner loop.

    Differentiates through every inner step (second derivatives, memory linear in ``inner_steps``).
    ``tol`` is not supported: the unrolled computation has a fixed length.

    Models with affine BatchNorm take a second, equivalent route: torch 2.x's vmap gets BatchNorm's
    double backward wrong (checked against finite differences), so instead of autograd through the
    vmapped unroll, the trajectory phi_0..phi_{K-1} is stored and the reverse pass is written out by
    hand with forward-over-reverse Hessian-vector products (unaffected by the bug), still vmapped.
    ``MetaStats.extra["graph_bytes"]`` is then the size of the stored trajectory.
    """

    name = "maml"

    def __init__(self, model, loss_fn=None, **kwargs):
        super().__init__(model, loss_fn, **kwargs)
        if self.tol is not None:
            raise ValueError("MAML unrolls a fixed number of inner steps; use tol=None")

    def _meta_gradient(self, system, params, tb):
        omega = dict(params)  # live parameters: autograd records the unrolled inner loop
        lam = self.lam_tree(params)
        K, inner = self.inner_steps, heavy_ball(self.inner_lr, self.momentum)

        def unrolled(om, xs, ys, xq, yq):
            phi, prev = dict(om), None
            vel = inner.init(phi)
            for _ in range(K):
                # differentiable: gives MAML its second-order terms
                delta, vel = inner.update(system.force(phi, om, lam, xs, ys), vel)
                prev, phi = phi, apply(phi, delta)
            num = sum(((phi[k] - prev[k]).detach() ** 2).sum() for k in phi).sqrt()
            den = sum((phi[k].detach() ** 2).sum() for k in phi).sqrt()
            return system.loss(phi, xq, yq), phi, num / den.clamp_min(1e-12)

        if self.use_vmap and _has_affine_batchnorm(self.model):
            return self._adjoint(system, params, tb)
        with torch.enable_grad():
            lout, phi, rel = task_map(unrolled, (None, 0, 0, 0, 0), self.use_vmap)(
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
        return self._result(grads, st, phi, graph_bytes=graph_bytes)

    def _adjoint(self, system, params, tb):
        """MAML's exact meta-gradient by a hand-written reverse pass over the stored trajectory.

        Forward: v_{k+1} = m v_k + f(phi_k), phi_{k+1} = phi_k + eta v_{k+1}, f = -grad l_in - lam (phi - omega).
        Reverse, from a_phi = grad l_out(phi_K), a_v = 0: with a = a_v + eta a_phi,
        a_phi <- a_phi - (Hess l_in(phi_k) + lam) a,  a_v <- m a,  grad_omega += lam a;  finally
        grad_omega += a_phi (phi_0 = omega).
        """
        omega = {k: v.detach() for k, v in params.items()}
        lam, names = self.lam_tree(params), list(omega)
        lr, mom, K, T = self.inner_lr, self.momentum, self.inner_steps, tb.num_tasks
        xs, ys = tb.x_support, tb.y_support
        inner = heavy_ball(lr, mom)

        def fwd(phi, vel, x, y):
            delta, vel = inner.update(system.force(phi, omega, lam, x, y), vel)
            return apply(phi, delta), vel

        def bwd(phi, a_phi, a_v, x, y):
            a = {k: a_v[k] + lr * a_phi[k] for k in a_phi}
            _, ha = grad_and_hvp(system.loss, phi, a, x, y)
            return ({k: a_phi[k] - ha[k] - lam[k] * a[k] for k in a}, {k: mom * a[k] for k in a},
                    {k: lam[k] * a[k] for k in a})

        fwd_m, bwd_m = system.tmap(fwd, (0, 0, 0, 0)), system.tmap(bwd, (0, 0, 0, 0, 0))
        with torch.no_grad():
            phi = tree_expand(omega, T)
            vel = inner.init(phi)
            traj = []
            for _ in range(K):
                traj.append(phi)
                prev, (phi, vel) = phi, fwd_m(phi, vel, xs, ys)
            rel = (tree_norm(tree_map(torch.sub, phi, prev), batched=True)
                   / tree_norm(phi, batched=True).clamp_min(1e-12))
            a_phi = system.grads(phi, tb.x_query, tb.y_query)
            a_v = {k: torch.zeros_like(v) for k, v in a_phi.items()}
            g_omega = {k: torch.zeros_like(v) for k, v in a_phi.items()}
            for phi_k in reversed(traj):
                a_phi, a_v, contrib = bwd_m(phi_k, a_phi, a_v, xs, ys)
                g_omega = {k: g_omega[k] + contrib[k] for k in names}
            grads = {k: (g_omega[k] + a_phi[k]).mean(0) for k in names}
        finite = tree_finite(phi) and bool(torch.isfinite(rel).all())
        st = SolverStats(iterations=K, residual=float(rel.max()), converged=finite, diverged=not finite)
        return self._result(grads, st, phi,
                            graph_bytes=sum(v.numel() * v.element_size() for p in traj for v in p.values()))


class FOMAML(_Unrolled):
    """First-order MAML: the query-loss gradient at the adapted parameters, grad l_out(phi_K)."""

    name = "fomaml"

    def _meta_gradient(self, system, params, tb):
        return self._first_order(system, params, tb, lambda omega, phi: system.grads(phi, tb.x_query, tb.y_query))


class Reptile(_Unrolled):
    """Reptile (Nichol et al. 2018): meta-gradient ``omega - phi_K`` (support data only; the query set
    enters the statistics, not the update).  An SGD step with learning rate epsilon on it is the Reptile
    interpolation ``omega + epsilon (phi_K - omega)``."""

    name = "reptile"

    def _meta_gradient(self, system, params, tb):
        return self._first_order(system, params, tb, lambda omega, phi: {k: omega[k] - phi[k] for k in omega})
