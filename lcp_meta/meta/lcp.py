"""The least-control principle as a meta-learning (outer-loop) optimizer.

A controller adds a control ``psi`` to the inner dynamics, ``dphi/dt = f(phi, omega) + psi``, and steers
the adapted parameters to a state where the query loss l_out is small, with as little control as possible
(spec section 4).  Since ``d f / d omega = lam I`` the meta-gradient needs only the final control:

    grad_omega = -lam psi* / beta          grad_lam = (phi* - omega) . psi* / beta

(reported divided by the control strength ``beta`` so that learning rates carry over from implicit
differentiation; beta -> 0 gives the iMAML hypergradient ``lam (Hess l_in + lam)^-1 grad l_out(phi*)``).

Internally the control is stored as ``u = psi / beta``: the same dynamics, but both halves of the state
have comparable scale, which keeps the relative-change stop rule meaningful and float32 accurate.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.func import grad

from .base import MetaMethod, MetaStats
from .system import pack, unpack

__all__ = ["LCP", "CONTROLLERS"]

CONTROLLERS = ("di", "direct", "ebd")


class LCP(MetaMethod):
    """Least-control meta-learning.

    Args (beyond :class:`MetaMethod`):
        beta: control strength (the relaxation of spec section 1); small beta = implicit differentiation.
        controller: ``"di"`` dynamic inversion (exact; one Hessian-vector product per step, run jointly
            with the inner loop from phi = omega, psi = 0), ``"direct"`` (first order: psi = -beta grad
            l_out(phi), no HVPs; it replaces (Hess l_in + lam)^-1 by 1/lam), or ``"ebd"`` energy-based
            (free inner loop, then gradient descent on 1/2 |f(phi)|^2 + beta l_out(phi); psi = -f).
        psi_lr: Euler step eta_psi of the control dynamics (default: inner_lr).
        first_order: True selects the direct controller (no second derivatives).
        ebd_lr, ebd_steps, ebd_momentum: step size, number of steps (cap when tol is set) and momentum of
            the energy descent of the ``"ebd"`` controller.
        leaky: direct controller only: psi is a leaky integral of the query-loss gradient,
            ``u += psi_lr (-grad l_out(phi) - u)`` with psi = beta u (same equilibrium, smoother dynamics).
    """

    name = "lcp"

    def __init__(self, model, loss_fn=None, *, beta: float = 1e-2, controller: str = "di",
                 psi_lr: Optional[float] = None, first_order: bool = False, ebd_lr: float = 0.01,
                 ebd_steps: int = 200, ebd_momentum: float = 0.0, leaky: bool = False, **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        super().__init__(model, **kwargs)
        if controller not in CONTROLLERS:
            raise ValueError(f"unknown controller {controller!r}; expected one of {CONTROLLERS}")
        if first_order:
            if controller == "ebd":
                raise ValueError("first_order=True is the direct controller; it cannot be combined with 'ebd'")
            controller = "direct"
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if (psi_lr is not None and psi_lr <= 0) or ebd_lr <= 0 or int(ebd_steps) < 1:
            raise ValueError(f"expected psi_lr > 0, ebd_lr > 0, ebd_steps >= 1; got {psi_lr}, {ebd_lr}, {ebd_steps}")
        if not 0.0 <= ebd_momentum < 1.0:
            raise ValueError(f"ebd_momentum must be in [0, 1), got {ebd_momentum}")
        self.beta, self.controller = float(beta), controller
        self.name = {"di": "lcp", "direct": "lcp-direct", "ebd": "lcp-ebd"}[controller]
        self.psi_lr = float(psi_lr) if psi_lr is not None else self.inner_lr
        self.ebd_lr, self.ebd_steps, self.ebd_momentum = float(ebd_lr), int(ebd_steps), float(ebd_momentum)
        if leaky and controller != "direct":
            raise ValueError("leaky=True applies to the direct controller only")
        self.leaky = bool(leaky)

    # ----------------------------------------------------------------------------- controllers
    def _joint(self, system, omega, lam, tb, control, name):
        """Joint Euler dynamics of (phi, u = psi/beta) from phi = omega, u = 0:
        phi += eta (f(phi) + beta u) (heavy-ball with ``momentum``), u <- control(...)."""
        names, T = list(omega), tb.num_tasks
        lr, beta, mom = self.inner_lr, self.beta, self.momentum

        def one(phi, u, vel, xs, ys, xq, yq):
            f, u_new = control(phi, u, xs, ys, xq, yq)
            drive = {k: f[k] + beta * u[k] for k in phi}
            if vel is None:
                return {k: phi[k] + lr * drive[k] for k in phi}, u_new, None
            vel = {k: mom * vel[k] + drive[k] for k in vel}
            return {k: phi[k] + lr * vel[k] for k in phi}, u_new, vel

        phi0 = {k: v.unsqueeze(0).expand(T, *v.shape).clone() for k, v in omega.items()}
        zeros = {k: torch.zeros_like(v) for k, v in phi0.items()}
        data = (tb.x_support, tb.y_support, tb.x_query, tb.y_query)
        if mom > 0:
            mapped = system.tmap(lambda p, u, v, *d: one(p, u, v, *d), (0,) * 7)
            state = pack([phi0, zeros, dict(zeros)])
        else:
            mapped = system.tmap(lambda p, u, *d: one(p, u, None, *d)[:2], (0,) * 6)
            state = pack([phi0, zeros])

        def step(z):
            return pack(mapped(*unpack(z, names), *data))

        z, st = self._dynamics(step, state, name=name)
        trees = unpack(z, names)
        return trees[0], trees[1], st

    def _di(self, system, omega, lam, tb):
        """Dynamic inversion: u += eta_psi (-(Hess l_in(phi) + lam) u - grad l_out(phi)), one HVP per step;
        at the fixed point u* = -(Hess l_in + lam)^-1 grad l_out(phi*)."""
        plr = self.psi_lr

        def control(phi, u, xs, ys, xq, yq):
            f, hu = system.force_and_hvp(phi, u, omega, lam, xs, ys)  # hu = (Hess l_in + lam) u
            go = system.grad(phi, xq, yq)
            return f, {k: u[k] - plr * (hu[k] + go[k]) for k in u}

        return self._joint(system, omega, lam, tb, control, "LCP dynamic-inversion dynamics")

    def _direct(self, system, omega, lam, tb):
        """psi = -beta grad l_out(phi): the controlled equilibrium solves
        grad l_in + lam (phi - omega) + beta grad l_out = 0 (the nudged phase, reached in one phase)."""
        if self.leaky:
            return self._leaky(system, omega, lam, tb)
        phi, st = system.free_equilibrium(omega, lam, tb.x_support, tb.y_support, self, beta=self.beta,
                                          xq=tb.x_query, yq=tb.y_query, name="LCP direct-control dynamics")
        with torch.no_grad():
            u = {k: -v for k, v in system.grads(phi, tb.x_query, tb.y_query).items()}
        return phi, u, st

    def _leaky(self, system, omega, lam, tb):
        """Direct control through a leaky integrator: u += eta_psi (-grad l_out(phi) - u), psi = beta u."""
        plr = self.psi_lr

        def control(phi, u, xs, ys, xq, yq):
            f = system.force(phi, omega, lam, xs, ys)
            go = system.grad(phi, xq, yq)
            return f, {k: u[k] - plr * (go[k] + u[k]) for k in u}

        return self._joint(system, omega, lam, tb, control, "LCP leaky direct-control dynamics")

    def _ebd(self, system, omega, lam, tb):
        """Free equilibrium, then descent on E(phi) = 1/2 |f(phi)|^2 + beta l_out(phi); psi = -f."""
        names, beta, lr, mom = list(omega), self.beta, self.ebd_lr, self.ebd_momentum
        phi0, st0 = system.free_equilibrium(omega, lam, tb.x_support, tb.y_support, self,
                                            name="LCP-EBD free inner dynamics")
        if st0.diverged:
            return phi0, None, st0

        def energy(phi, xs, ys, xq, yq):
            f = system.force(phi, omega, lam, xs, ys)
            return 0.5 * sum((v * v).sum() for v in f.values()) + beta * system.loss(phi, xq, yq)

        grad_e = grad(energy)  # = -(Hess l_in + lam) f + beta grad l_out: one HVP's worth of work

        def one(phi, vel, *d):
            g = grad_e(phi, *d)
            if vel is None:
                return {k: phi[k] - lr * g[k] for k in phi}, None
            vel = {k: mom * vel[k] - g[k] for k in vel}
            return {k: phi[k] + lr * vel[k] for k in phi}, vel

        data = (tb.x_support, tb.y_support, tb.x_query, tb.y_query)
        if mom > 0:
            mapped = system.tmap(lambda p, v, *d: one(p, v, *d), (0,) * 6)
            state = pack([phi0, {k: torch.zeros_like(v) for k, v in phi0.items()}])
        else:
            mapped = system.tmap(lambda p, *d: one(p, None, *d)[0], (0,) * 5)
            state = pack([phi0])

        def step(z):
            out = mapped(*unpack(z, names), *data)
            return pack(out if isinstance(out, tuple) else [out])

        z, st = self._dynamics(step, state, name="LCP energy-based descent", max_iter=self.ebd_steps)
        phi = unpack(z, names)[0]
        with torch.no_grad():
            f = system.tmap(lambda p, x, y: system.force(p, omega, lam, x, y), (0, 0, 0))(
                phi, tb.x_support, tb.y_support)
        u = {k: -f[k] / beta for k in f}  # u = psi / beta with psi = -f
        st.iterations += st0.iterations
        st.converged = st.converged and st0.converged
        st.residual = max(st.residual, st0.residual)
        return phi, u, st

    # ----------------------------------------------------------------------------- meta-gradient
    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        lam = self.lam_tree(params)
        stats = MetaStats(inner_loss_before=float(system.losses(omega, tb.x_support, tb.y_support, True).mean()),
                          query_loss_before=float(system.losses(omega, tb.x_query, tb.y_query, True).mean()))
        phi, u, st = getattr(self, "_" + self.controller)(system, omega, lam, tb)
        stats.iterations, stats.residual = st.iterations, st.residual
        stats.converged = bool(st.converged and not st.diverged)
        if u is None:
            u = {k: torch.full_like(v, float("nan")) for k, v in phi.items()}
        with torch.no_grad():
            # grad_omega = -lam psi / beta = -lam u ;  grad_lam = (phi - omega) . psi / beta = (phi - omega) . u
            grads = {k: (-lam[k] * u[k]).mean(0) for k in omega}
            lam_grads = {k: ((phi[k] - omega[k]) * u[k]).mean(0) for k in omega} if self.learn_lam else None
            stats.inner_loss_after = float(system.losses(phi, tb.x_support, tb.y_support).mean())
            stats.query_loss_after = float(system.losses(phi, tb.x_query, tb.y_query).mean())
            unorm = torch.stack([v.reshape(v.shape[0], -1).pow(2).sum(1) for v in u.values()]).sum(0).sqrt()
            stats.control_norm = float(self.beta * unorm.mean())
        stats.extra["beta"] = self.beta
        return grads, lam_grads, stats, st
