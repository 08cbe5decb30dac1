"""The least-control principle as a meta-learning (outer-loop) optimizer.

A controller adds a control ``psi`` to the inner dynamics, ``dphi/dt = f(phi, omega) + psi``, and steers
the adapted parameters to a state where the query loss l_out is small, with as little control as possible
(spec section 4).  Since ``d f / d omega = lam I`` the meta-gradient needs only the final control:

    grad_omega = -lam psi* / beta          grad_lam = (phi* - omega) . psi* / beta

(reported divided by the control strength ``beta`` so that learning rates carry over from implicit
differentiation; beta -> 0 gives the iMAML hypergradient ``lam (Hess l_in + lam)^-1 grad l_out(phi*)``).
These formulas hold ONLY at the controlled equilibrium, so ``LCP`` runs its dynamics until the residuals
``|f(phi) + beta u| / |f(omega)|`` (inner) and ``|(Hess l_in + lam) u + grad l_out| / |grad l_out|``
(control) are below ``tol`` and raises a DivergenceError otherwise.

How the dynamic-inversion (DI) equilibrium is reached by default (``solver="auto"``):

1. relax the inner problem with gradients only (no Hessian-vector products), u = 0, heavy-ball steps with
   the step ``a`` of a user's ``inner_lr`` or ``1 / (1.25 lam_max)`` from a power-iteration estimate and
   momentum ``(1 - sqrt(a lam))^2``;
2. the control at that phi, ``du/dt = -(Hess l_in + lam) u - grad l_out``, integrated by line-searched
   heavy-ball steps (CG), from u = 0 until its residual meets ``control_tol`` (default ``tol``).  CG's
   recursive residual is the control residual, and the inner residual at finite beta, ``|f(phi) + beta u|``,
   needs f(phi) only, so the joint equilibrium is certified without another Hessian-vector product;
3. where beta u moves the inner equilibrium by more than tol: rounds of relaxing phi under the constant
   control beta u (gradients only, phi moves by O(beta)) and checking the control at the new phi (one
   Hessian-vector product; CG continues from u only if it no longer meets its tolerance).  Should rounds not
   settle, the joint DI dynamics ``phi += f(phi) + beta u``, ``u += -(Hess l_in + lam) u - grad l_out``
   (heavy-ball with the step of 1) take over from there.  At finite beta this is the exact controlled
   equilibrium; nothing is linearised.

The control's Jacobian is the inner dynamics' Jacobian at the equilibrium, so the control cannot diverge
where the inner relaxation at that step converges (see :mod:`lcp_meta.meta.dynamics`).
``solver="heavy-ball"`` runs the joint DI dynamics from (phi*, 0) after step 1 instead of 2-3;
``solver="euler"`` is the single-phase simulation: the joint dynamics from (omega, 0) with Euler steps
inner_lr / psi_lr, also stopped on the residuals.

``LCP(..., truncated=True)`` (``make_method("lcp-truncated")``) is the former fixed-step controller:
``inner_steps`` joint Euler steps from (omega, 0), whatever the residual.  It computes something else than
the LCP meta-gradient, is reported with ``converged=False`` and its residuals, and never runs under the
name ``lcp``.

Internally the control is stored as ``u = psi / beta``: the same dynamics, but both halves of the state
have comparable scale.

The controllers are the registered classes of :mod:`lcp_meta.core.controllers` (``"di"``, ``"direct"``,
``"leaky"``, ``"ebd"``, or any class registered there); this module registers how each of them reaches its
equilibrium on the inner problem (``@DI.drives("inner")``), and ``LCP`` looks the controller up by name.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch.func import grad, grad_and_value

from ..core.controllers import CONTROLLERS, DI, EBD, Direct, Leaky, make_controller
from ..core.integrators import apply, heavy_ball
from ..core.tree import tree_dot, tree_expand, tree_map, tree_norm, tree_pack, tree_zeros_like
from .base import MetaGradient, MetaMethod, MetaStats, check_positive
from .dynamics import (SAFETY, STOP_RULES, cg_control, control_map, guarded_step, iterate, momentum_for,
                       rayleigh_power, safe_ratio)

__all__ = ["LCP", "CONTROLLERS"]

# the method's name for each controller (a controller registered later runs as "lcp-<name>")
NAMES = {"di": "lcp", "direct": "lcp-direct", "leaky": "lcp-direct", "ebd": "lcp-ebd"}
# rounds of (relax under beta u, correct the control) before the joint DI dynamics take over
ROUNDS = 5


def _neg(t):
    return {k: -v for k, v in t.items()}


class LCP(MetaMethod):
    """Least-control meta-learning.

    Args (beyond :class:`MetaMethod`):
        beta: control strength (the relaxation of spec section 1); small beta = implicit differentiation.
            Default 1e-3: the meta-gradient is the exact gradient of F_beta / beta, O(beta) from the implicit
            hypergradient, and that bias grows where Hess l_in + lam is nearly singular (on a 1-16-16-1
            tanh regressor at lam = 0.5: cosine 0.93 at beta = 1e-2, 0.9999 at 1e-3).
        controller: the name of a controller registered in :data:`lcp_meta.core.controllers.CONTROLLERS`
            that drives the inner problem: ``"di"`` dynamic inversion (exact; one Hessian-vector product per
            control step), ``"direct"`` (first order: psi = -beta grad l_out(phi), no HVPs; it replaces
            (Hess l_in + lam)^-1 by 1/lam), ``"leaky"`` (direct control through a leaky integrator), or
            ``"ebd"`` energy-based (free inner loop, then gradient descent on 1/2 |f(phi)|^2 + beta l_out(phi);
            psi = -f).
        psi_lr: Euler step of the control dynamics (default: the heavy-ball step of the inner relaxation,
            see the module docstring; with ``solver="euler"`` / ``truncated``: inner_lr).
        first_order: deprecated spelling of ``controller="direct"`` (no second derivatives).
        ebd_lr, ebd_steps, ebd_momentum: step size, number of steps (cap when tol is set) and momentum of
            the energy descent of the ``"ebd"`` controller.  ``ebd_lr=None`` (the default): per task
            ``1 / (SAFETY L)`` with L a power-iteration estimate (``power_iters`` Hessian-vector products of
            the energy, at the free state the descent starts from) of the largest curvature of
            E = 1/2 |f|^2 + beta l_out, about lam_max(Hess l_in + lam)^2, and heavy-ball momentum
            ``(1 - sqrt(ebd_lr mu^2))^2`` (mu the smallest lam, mu^2 E's curvature where Hess l_in >= 0);
            ``ebd_momentum`` must then be left at 0; the momentum restarts and the step shrinks where E rises
            (the guards of the inner relaxation), so a curvature above the estimate cannot make it diverge.
            A fixed ebd_lr above about 2 / L diverges (lam_max = 10 needs ebd_lr < 0.02).
        leaky: direct controller only, the same as ``controller="leaky"``: psi is a leaky integral of the
            query-loss gradient, ``u += psi_lr (-grad l_out(phi) - u)`` with psi = beta u (same equilibrium,
            smoother dynamics).
        truncated: DI only: exactly ``inner_steps`` joint Euler steps from (omega, 0), not an equilibrium
            (the method is then named ``lcp-truncated``).
        control_tol: DI only: the tolerance of the control residual ``|(Hess l_in + lam) u + grad l_out| /
            |grad l_out|`` (default None: ``tol``, the inner residual's).  The counterpart of iMAML's
            ``cg_steps``/``cg_tol``: how exactly the linear system is solved, apart from how exactly the inner
            problem is; the run is converged when each residual meets its own tolerance.
        control_stop: DI only, how the tasks of a batch stop their control (CG) steps:
            ``"per-task"`` (default), each at the first step where its residual meets control_tol, so a task's
            result does not depend on its batch-mates (a batch split across ranks gives the same meta-gradient);
            or ``"batch"``, all together when the last one meets it.  The batch rule costs nothing more in a
            batched step and solves the early tasks more exactly (every residual is still <= control_tol),
            but a task's result then depends on its batch-mates within that tolerance.
    """

    name = "lcp"

    def __init__(self, model, loss_fn=None, *, beta: float = 1e-3, controller: str = "di",
                 psi_lr: Optional[float] = None, first_order: bool = False, ebd_lr: Optional[float] = None,
                 ebd_steps: int = 200, ebd_momentum: float = 0.0, leaky: bool = False, truncated: bool = False,
                 control_tol: Optional[float] = None, control_stop: str = "per-task", **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        if truncated:
            kwargs.setdefault("tol", None)
            kwargs.setdefault("inner_steps", 10)
        super().__init__(model, **kwargs)
        usable = sorted(n for n, c in CONTROLLERS.items() if c.can_drive("inner"))
        if controller not in usable:
            raise ValueError(f"unknown controller {controller!r} for meta-learning; expected one of {usable}")
        if first_order:  # one code path: the keyword is only another name of the direct controller
            warnings.warn("LCP(first_order=True) is deprecated: use controller='direct'", DeprecationWarning,
                          stacklevel=2)
            if controller not in ("di", "direct", "leaky"):
                raise ValueError(f"first_order=True is the direct controller; it cannot be combined with "
                                 f"{controller!r}")
            controller = "leaky" if controller == "leaky" else "direct"
        check_positive("beta", beta)
        check_positive("control_tol", control_tol, allow_none=True)
        if control_tol is not None and (controller != "di" or truncated):
            raise ValueError(f"control_tol={control_tol} applies to the dynamic-inversion controller at its "
                             f"equilibrium (lcp) only, not to {'lcp-truncated' if truncated else repr(controller)}")
        if control_stop not in STOP_RULES:
            raise ValueError(f"control_stop must be one of {STOP_RULES}, got {control_stop!r}")
        check_positive("psi_lr", psi_lr, allow_none=True)
        check_positive("ebd_lr", ebd_lr, allow_none=True)
        if isinstance(ebd_steps, bool) or int(ebd_steps) != ebd_steps or int(ebd_steps) < 1:
            raise ValueError(f"ebd_steps must be an integer >= 1, got {ebd_steps!r}")
        if not (isinstance(ebd_momentum, (int, float)) and not isinstance(ebd_momentum, bool)
                and 0.0 <= ebd_momentum < 1.0):
            raise ValueError(f"ebd_momentum must be a number in [0, 1), got {ebd_momentum!r}")
        if ebd_lr is None and ebd_momentum != 0.0:
            raise ValueError(f"ebd_momentum={ebd_momentum} needs a given ebd_lr (the former default was 0.01): with "
                             "ebd_lr=None (automatic) the momentum is set from the estimated curvature")
        if truncated and controller != "di":
            raise ValueError("truncated=True is the fixed-step dynamic-inversion controller (lcp-truncated)")
        if truncated and self.tol is not None:
            raise ValueError(f"lcp-truncated runs exactly inner_steps steps; got tol={self.tol} (use lcp for a "
                             "residual-stopped run)")
        if controller == "di" and not truncated and self.tol is None:
            raise ValueError("lcp runs its dynamics to the controlled equilibrium, so tol=None (a fixed number of "
                             "steps) is not lcp: use LCP(..., truncated=True) / make_method('lcp-truncated')")
        if leaky and controller not in ("direct", "leaky"):
            raise ValueError("leaky=True applies to the direct controller only")
        controller = "leaky" if leaky else controller
        self.beta, self.controller, self.truncated = float(beta), controller, bool(truncated)
        self.control_tol = None if control_tol is None else float(control_tol)
        self.control_stop = control_stop
        self.name = "lcp-truncated" if truncated else NAMES.get(controller, f"lcp-{controller}")
        self.psi_lr_given = float(psi_lr) if psi_lr is not None else None
        self.ebd_lr = None if ebd_lr is None else float(ebd_lr)
        self.ebd_steps, self.ebd_momentum = int(ebd_steps), float(ebd_momentum)
        self.leaky = controller == "leaky"
        self.control = make_controller(controller)

    def tols_for(self, dtype: torch.dtype):
        """(control, inner) residual tolerances in effect (None: a fixed number of steps)."""
        tol = self.tol_for(dtype)
        if tol is None:
            return None
        return (tol if self.control_tol is None else self.control_tol, tol)

    @property
    def psi_lr(self) -> Optional[float]:
        """The control step given by the user (None: automatic)."""
        return self.psi_lr_given

    # ----------------------------------------------------------------------------- step sizes
    def _steps_at_omega(self, system, omega, lam, tb):
        """Per-task (a_phi, a_u) of the single-phase dynamics from omega: inner_lr / psi_lr, or the
        automatic step 1 / (1.25 lam_max(omega)) for either when not given."""
        T = tb.num_tasks
        ref = next(iter(omega.values()))
        if self.inner_lr is None or self.psi_lr is None:
            auto, _ = self._auto_step(system, tree_expand(omega, T), lam, tb.x_support, tb.y_support)
        full = lambda v: torch.full((T,), v, dtype=ref.dtype, device=ref.device)  # noqa: E731
        a_phi = full(self.inner_lr) if self.inner_lr is not None else auto
        a_u = full(self.psi_lr) if self.psi_lr is not None else a_phi
        return a_phi, a_u

    # ----------------------------------------------------------------------------- controllers
    def _control_loop(self, system, omega, lam, tb, phi0, a_phi, m_phi, a_u, m_u, scale_in, tol, steps, u0=None):
        """The joint DI dynamics (phi, u) from (phi0, u0 or 0) until both residuals are below tol."""
        T = tb.num_tasks
        mapped = self._tmap(control_map(system, omega, lam, self.beta), (0,) * 13)
        if u0 is None:
            u0 = tree_zeros_like(phi0)
        state, rebuild = tree_pack([phi0, u0, tree_zeros_like(phi0), tree_zeros_like(phi0),
                                     a_phi, m_phi, a_u, m_u, scale_in])
        data = (tb.x_support, tb.y_support, tb.x_query, tb.y_query)

        def step(z):
            new, res = mapped(*rebuild(z), *data)
            return tree_pack(new)[0], res

        z, st, res = iterate(step, state, tol, steps)
        trees = rebuild(z)
        return trees[0], trees[1], st, res.reshape(T, 2)

    def _force_scale(self, system, omega, lam, tb):
        """|f(omega)| = |grad l_in(omega)| per task: the scale of the inner residual."""
        return tree_norm(system.tmap(system.grad, (None, 0, 0))(omega, tb.x_support, tb.y_support), batched=True)

    def _cg_control(self, system, omega, lam, tb, phi, tols, steps, scale_in, f=None, u0=None):
        """The control at the inner state phi by CG (:func:`~lcp_meta.meta.dynamics.cg_control`) from u = 0
        (or ``u0``) until its residual meets the control tolerance.  Returns (u, SolverStats, stuck,
        residuals (T, 2)): the joint DI step's (control, inner) residuals at (phi, u).  From u = 0 they cost
        no Hessian-vector product beyond CG's own: the control residual is CG's recursive one and the inner
        one ``|f(phi) + beta u| / |f(omega)|`` needs f(phi) only, which the relaxation that reached phi gives
        (``f``, required from u = 0).  From ``u0`` one product gives the true residual of u0 (and CG's start):
        if it already meets the tolerance, no CG step is taken."""
        xs, ys = tb.x_support, tb.y_support

        def restart(p, u, x, y, xq, yq):  # and the force on u, -(A u + grad l_out): one HVP with f
            g = system.grad(p, xq, yq)
            t = system.terms(p, u, None, omega, lam, x, y)
            return g, t.f, DI.inversion(t._replace(jh=_neg(g)))

        with torch.no_grad():
            if u0 is None:
                g, r0 = system.grads(phi, tb.x_query, tb.y_query), None  # f known already: grad l_out only
            else:
                g, f, r0 = self._tmap(restart, (0,) * 6)(phi, u0, xs, ys, tb.x_query, tb.y_query)
        u, st, res_u, flagged = cg_control(self._tmap, system, lam, phi, g, xs, ys, tols[0], steps, u0, r0,
                                           stop_rule=self.control_stop)
        with torch.no_grad():
            res_in = safe_ratio(tree_norm(tree_map(lambda fk, uk: fk + self.beta * uk, f, u), batched=True), scale_in)
        return u, st, st.stuck, torch.stack([res_u, res_in.to(torch.float64)], 1)

    def _joint(self, system, omega, lam, tb, control, name, a_phi, a_u):
        """Joint Euler dynamics of (phi, u = psi/beta) from phi = omega, u = 0:
        phi += eta (f(phi) + beta u) (heavy-ball with ``momentum``), u <- control(phi, u, psi_lr, data)
        (which also returns f(phi) and the control residual of its input state).  With ``solver="anderson"``
        through the core solvers (their stop rule: the relative change of the state; residuals None), otherwise
        stopped on the (control, inner) residuals of the state, which are returned (T, 2)."""
        beta = self.beta

        def one(phi, u, vel, lr, plr, scale, xs, ys, xq, yq):
            f, u_new, r_u = control(phi, u, plr, xs, ys, xq, yq)
            drive = DI.drive(f, u, beta)
            r_in = safe_ratio(tree_norm(drive), scale)  # |f + beta u| / |f(omega)|
            delta, vel = heavy_ball(lr, self.momentum).update(drive, vel)
            return (apply(phi, delta), u_new, vel), torch.stack([r_u, r_in])

        phi0 = tree_expand(omega, tb.num_tasks)
        state, rebuild = tree_pack([phi0, tree_zeros_like(phi0), tree_zeros_like(phi0)])
        mapped = system.tmap(one, (0,) * 10)
        data = (a_phi, a_u, self._force_scale(system, omega, lam, tb), tb.x_support, tb.y_support, tb.x_query,
                tb.y_query)

        if self.solver == "anderson":
            def step(z):
                return tree_pack(mapped(*rebuild(z), *data)[0])[0]

            z, st = self._dynamics(step, state, name=name)
            res = None
        else:
            def step(z):
                new, r = mapped(*rebuild(z), *data)
                return tree_pack(new)[0], r

            z, st, res = iterate(step, state, self.tols_for(phi0[next(iter(phi0))].dtype), self.inner_steps)
            res = res.reshape(tb.num_tasks, 2)
        phi, u, _ = rebuild(z)
        return phi, u, st, res

    def _advice(self, tb, phase, stats) -> str:
        if self.controller == "ebd" and phase == "control" and stats.diverged and self.ebd_lr is not None:
            return (f"likely cause: ebd_lr={self.ebd_lr} is above the stable step of the energy descent, about "
                    "2 / lam_max(Hess l_in + lam)^2: lower it, or leave ebd_lr=None (automatic, from a curvature "
                    "estimate)")
        if (self.controller == "ebd" and phase == "control" and not stats.diverged
                and not getattr(stats, "indefinite", False)):
            if self.ebd_lr is None:
                step = self._info.get("ebd_lr", float("nan"))
                return (f"likely cause: too few energy-descent steps: raise ebd_steps (the cap, now {self.ebd_steps}); "
                        f"the automatic step (now {step:.3g}) and momentum follow E's curvature, whose condition "
                        "number is about (lam_max / lam)^2: a larger lam also shortens the descent")
            return (f"likely cause: too few energy-descent steps: raise ebd_steps (the cap, now {self.ebd_steps}), "
                    f"ebd_lr (now {self.ebd_lr}) or ebd_momentum (now {self.ebd_momentum})")
        return super()._advice(tb, phase, stats)

    # ----------------------------------------------------------------------------- meta-gradient
    def _residuals(self, system, omega, lam, tb, phi, u):
        """(control, inner) residuals of (phi, u) per task: one evaluation of the DI step, no update."""
        T = tb.num_tasks
        one = control_map(system, omega, lam, self.beta)
        zero = torch.zeros(T, dtype=next(iter(phi.values())).dtype, device=next(iter(phi.values())).device)
        scale = self._force_scale(system, omega, lam, tb)
        with torch.no_grad():
            _, res = self._tmap(one, (0,) * 13)(phi, u, tree_zeros_like(phi), tree_zeros_like(u), zero, zero,
                                                zero, zero, scale, tb.x_support, tb.y_support, tb.x_query,
                                                tb.y_query)
        return res.reshape(T, 2).to(torch.float64)

    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        lam = self.lam_tree(params)
        stats = MetaStats()
        self._info = {}
        phi, u, st, res = self.control.equilibrium(self, system, (omega, lam, tb))
        stats.iterations = st.iterations
        stats.extra.update(self._info)
        if u is None:
            u = {k: torch.full_like(v, float("nan")) for k, v in phi.items()}
            stats.residual = st.residual
            stats.inner_residual = st.residual
        else:
            if res is None:
                res = self._residuals(system, omega, lam, tb, phi, u)
            stats.control_residual = float(res[:, 0].max())
            stats.inner_residual = float(res[:, 1].max())
            stats.residual = max(stats.control_residual, stats.inner_residual)
            st.residual = stats.residual
            tols = self.tols_for(next(iter(omega.values())).dtype)
            # the verdict is that of the residuals reported (a phase stopped on another quantity, e.g. the relative
            # change of the state, can stop far from the equilibrium, where -lam u is not the meta-gradient); only
            # solver="anderson" is documented to stop on the relative change of the state instead
            if tols is not None and self.solver != "anderson" and st.converged and \
                    not bool((res <= res.new_tensor(tols)).all()):
                st.converged = False
        stats.converged = bool(st.converged and not st.diverged)
        with torch.no_grad():
            grads, lam_grads = system.local_update(phi, omega, lam, u, bool(self.learn_lam))
            stats.control_norm = float(self.beta * tree_norm(u, batched=True).mean())
        stats.extra["beta"] = self.beta
        # the returned state, per task (for inspection: the residuals above are of exactly this state)
        self.last_state = {"phi": phi, "u": u}
        return MetaGradient(grads, st, stats, phi, lam_grads)


# ------------------------------------------------------------------------------- drivers on the inner problem
# How each registered controller reaches its equilibrium on the inner problem.  Every driver takes
# (controller, lcp, system, (omega, lam, tb)) and returns (phi, u = psi / beta, SolverStats, residuals or None);
# u None means the inner phase failed (the stats say where: ``phase``).

@DI.drives("inner")
def _di(ctrl, lcp, system, batch):
    """Dynamic inversion: at the equilibrium u* = -(Hess l_in(phi*) + lam)^-1 grad l_out(phi*)."""
    omega, lam, tb = batch
    tol = lcp.tols_for(next(iter(omega.values())).dtype)
    if lcp.solver == "anderson":
        return _di_anderson(lcp, system, omega, lam, tb)
    if lcp.truncated or lcp.solver == "euler":
        a_phi, a_u = lcp._steps_at_omega(system, omega, lam, tb)
        m_phi = torch.full_like(a_phi, lcp.momentum)
        phi0 = tree_expand(omega, tb.num_tasks)
        phi, u, st, res = lcp._control_loop(system, omega, lam, tb, phi0, a_phi, m_phi, a_u, torch.zeros_like(a_u),
                                            lcp._force_scale(system, omega, lam, tb), tol, lcp.inner_steps)
        st.phase = "inner"  # one joint dynamics: a failure is reported as the inner dynamics'
        lcp._info = {"control_iterations": st.iterations, "step": float(a_phi.mean())}
        return phi, u, st, res
    if lcp.solver == "heavy-ball":
        return _di_heavy_ball(lcp, system, omega, lam, tb, tol)
    return _di_rounds(lcp, system, omega, lam, tb, tol)


def _relax_first(lcp, system, omega, lam, tb, scale=None):
    """The DI drivers' first phase: relax phi with gradients only (u = 0), recording the step in ``lcp._info``.
    Returns ``(phi, stats, info, failed)``; a failed relaxation is reported as the inner dynamics'."""
    phi, st, info = lcp._relax(system, omega, lam, tb.x_support, tb.y_support, scale=scale)
    lcp._info = {"inner_iterations": st.iterations, "hvps": info["hvps"], "step": float(info["a"].mean())}
    if info["lmax"] is not None:
        lcp._info["lam_max"] = float(info["lmax"].max())
    failed = st.diverged or not st.converged
    if failed:
        st.phase = "inner"
    return phi, st, info, failed


def _di_heavy_ball(lcp, system, omega, lam, tb, tol):
    """Relax (gradients only), then the joint DI dynamics from (phi*, 0) with heavy-ball steps."""
    phi0, st1, info, failed = _relax_first(lcp, system, omega, lam, tb)
    if failed:
        return phi0, None, st1, None
    a = info["a"]
    m = momentum_for(a, lcp._mu(lam))
    a_u, m_u = (a, m) if lcp.psi_lr is None else (torch.full_like(a, lcp.psi_lr), torch.zeros_like(a))
    phi, u, st2, res = lcp._control_loop(system, omega, lam, tb, phi0, a, m, a_u, m_u, info["scale"], tol,
                                         lcp.inner_steps)
    lcp._info.update(control_iterations=st2.iterations, hvps=info["hvps"] + st2.iterations + 1)
    st2.phase = "control"
    st2.iterations += st1.iterations
    return phi, u, st2, res


def _di_rounds(lcp, system, omega, lam, tb, tol):
    """The default, in rounds that all keep the DI controller's equilibrium (``tol``: the pair (control,
    inner)):
    (1) relax phi with gradients only (u = 0);
    (2) run the control at that phi by line-searched heavy-ball steps (CG) to its equilibrium
        u = -(Hess l_in + lam)^-1 grad l_out: the controlled equilibrium in the limit beta -> 0.  Its last
        step certifies itself: CG's recursive residual is the control residual, and the inner residual at
        finite beta, |f(phi) + beta u|, needs f(phi) only (one support gradient, no Hessian product);
    (3) while the inner residual is above tol (beta u moved the inner equilibrium by more than tol allows):
        relax phi again under the constant control beta u (gradients only; phi moves by O(beta)), then
        check the control at the new phi with one Hessian-vector product and continue CG from u where it
        no longer meets its tolerance.  Usually one round; if rounds do not settle, the joint DI dynamics
        (phi += f + beta u, u += -(Hess l_in + lam) u - grad l_out, heavy-ball with the step of (1)) take
        over from there."""
    phi, st1, info, failed = _relax_first(lcp, system, omega, lam, tb)
    if failed:
        return phi, None, st1, None
    scale_in = info["scale"]  # |grad E(omega)| = |f(omega)|: the relaxation started at omega
    # f(phi) = -grad E(phi): the relaxation's last step evaluated it at the phi it returned
    u, stc, indefinite, res = lcp._cg_control(system, omega, lam, tb, phi, tol, lcp.inner_steps, scale_in,
                                              f=_neg(info["grad_e"]))
    iters, hvps, cg_iters, rounds = st1.iterations + stc.iterations, info["hvps"] + stc.iterations, stc.iterations, 0
    tols = torch.tensor(tol, dtype=res.dtype, device=res.device)
    while not (stc.diverged or indefinite or not stc.converged) and not bool((res <= tols).all()) and rounds < ROUNDS:
        phi, st1, _ = lcp._relax(system, omega, lam, tb.x_support, tb.y_support, phi0=phi,
                                 shift=tree_map(lambda t: lcp.beta * t, u),
                                 scale=scale_in, reuse=info)
        iters += st1.iterations
        if st1.diverged or not st1.converged:
            st1.phase = "inner"
            st1.iterations = iters
            lcp._info.update(control_iterations=cg_iters, rounds=rounds + 1, joint_iterations=0, hvps=hvps)
            return phi, None, st1, None
        u, stc, indefinite, res = lcp._cg_control(system, omega, lam, tb, phi, tol, lcp.inner_steps, scale_in, u0=u)
        iters, hvps, cg_iters, rounds = iters + stc.iterations, hvps + 1 + stc.iterations, cg_iters + stc.iterations, \
            rounds + 1
    lcp._info.update(control_iterations=cg_iters, rounds=rounds, joint_iterations=0, hvps=hvps)
    if stc.diverged or indefinite or not stc.converged:
        stc.phase, stc.indefinite = "control", indefinite
        stc.iterations = iters
        return phi, u, stc, None
    if bool((res <= tols).all()):  # certified: the joint equilibrium to tol
        stc.phase, stc.iterations, stc.residual = "control", iters, float(res.max())
        return phi, u, stc, res
    a = info["a"]
    m = momentum_for(a, lcp._mu(lam))
    phi, u, st3, res = lcp._control_loop(system, omega, lam, tb, phi, a, m, a, m, scale_in, tol, lcp.inner_steps,
                                         u0=u)
    # the joint loop evaluates its residual before each update: one product more than it has updates
    lcp._info.update(joint_iterations=st3.iterations, hvps=hvps + st3.iterations + 1)
    st3.phase = "control"
    st3.iterations += iters
    return phi, u, st3, res


def _di_anderson(lcp, system, omega, lam, tb):
    """The joint dynamics through :func:`lcp_meta.core.solvers.solve` (``solver="anderson"``)."""
    a_phi, a_u = lcp._steps_at_omega(system, omega, lam, tb)

    def control(phi, u, plr, xs, ys, xq, yq):
        go = system.grad(phi, xq, yq)
        t = system.terms(phi, u, _neg(go), omega, lam, xs, ys)
        _, du = DI.field(t, u)  # -(Hess l_in + lam) u - grad l_out
        return t.f, {k: u[k] + plr * du[k] for k in u}, safe_ratio(tree_norm(du), tree_norm(go))

    phi, u, st, res = lcp._joint(system, omega, lam, tb, control, "LCP dynamic-inversion dynamics", a_phi, a_u)
    lcp._info = {"control_iterations": st.iterations}
    st.phase = "inner"
    return phi, u, st, res


@Direct.drives("inner")
def _direct(ctrl, lcp, system, batch):
    """psi = -beta grad l_out(phi): the controlled equilibrium solves
    grad l_in + lam (phi - omega) + beta grad l_out = 0 (the nudged phase, reached in one phase)."""
    omega, lam, tb = batch
    if lcp.solver == "anderson":
        lr = lcp._anderson_lr(system, omega, lam, tb.x_support, tb.y_support)
        phi, st = system.free_equilibrium(omega, lam, tb.x_support, tb.y_support, lr=lr,
                                          momentum=lcp.momentum, beta=lcp.beta, xq=tb.x_query, yq=tb.y_query,
                                          name="LCP direct-control dynamics",
                                          **lcp._solve_settings(next(iter(omega.values())).dtype))
    else:  # relative to |f(omega)|: the stop rule's residual is then the inner residual reported
        phi, st, info = lcp._relax(system, omega, lam, tb.x_support, tb.y_support, beta=lcp.beta,
                                   xq=tb.x_query, yq=tb.y_query, scale=lcp._force_scale(system, omega, lam, tb))
        lcp._info = {"inner_iterations": st.iterations, "step": float(info["a"].mean())}
    with torch.no_grad():
        u = _neg(system.grads(phi, tb.x_query, tb.y_query))
    return phi, u, st, _output_control_residuals(lcp, system, omega, lam, tb, phi, u)


def _output_control_residuals(lcp, system, omega, lam, tb, phi, u):
    """(control, inner) residuals per task (T, 2) of the first-order controllers at (phi, u): their control's
    own equation u = -grad l_out(phi), ``|u + grad l_out(phi)| / |grad l_out(phi)|`` (0 for the direct
    controller, which sets u so; the leaky integrator's state approaches it), and ``|f(phi) + beta u| /
    |f(omega)|``.  (The dynamic-inversion residual ``|(Hess l_in + lam) u + grad l_out|`` is not theirs: they
    replace that system by u = -grad l_out.)"""
    scale = lcp._force_scale(system, omega, lam, tb)
    with torch.no_grad():
        go = system.grads(phi, tb.x_query, tb.y_query)
        f = system.tmap(lambda p, x, y: system.force(p, omega, lam, x, y), (0, 0, 0))(phi, tb.x_support, tb.y_support)
        r_u = safe_ratio(tree_norm(tree_map(torch.add, u, go), batched=True), tree_norm(go, batched=True))
        r_in = safe_ratio(tree_norm(tree_map(lambda fk, uk: fk + lcp.beta * uk, f, u), batched=True), scale)
    return torch.stack([r_u, r_in], 1).to(torch.float64)


@Leaky.drives("inner")
def _leaky(ctrl, lcp, system, batch):
    """Direct control through the leaky integral output controller: u += eta_psi (-grad l_out(phi) - u),
    psi = beta u."""
    omega, lam, tb = batch
    a_phi, a_u = lcp._steps_at_omega(system, omega, lam, tb)

    def control(phi, u, plr, xs, ys, xq, yq):  # and the residual of u = -grad l_out, the control's equilibrium
        go = system.grad(phi, xq, yq)
        r_u = safe_ratio(tree_norm(tree_map(torch.add, u, go)), tree_norm(go))
        return system.force(phi, omega, lam, xs, ys), ctrl.output.integrate(u, go, plr), r_u

    phi, u, st, res = lcp._joint(system, omega, lam, tb, control, "LCP leaky direct-control dynamics", a_phi, a_u)
    return phi, u, st, (_output_control_residuals(lcp, system, omega, lam, tb, phi, u) if res is None else res)


@EBD.drives("inner")
def _ebd(ctrl, lcp, system, batch):
    """Free equilibrium, then descent on E(phi) = 1/2 |f(phi)|^2 + beta l_out(phi); psi = -f.

    The descent's step: ``lcp.ebd_lr`` (heavy-ball with ``ebd_momentum``), or with ``ebd_lr=None`` per task
    1 / (SAFETY L) with L the power-iteration estimate of E's largest curvature at the start (:func:`_ebd_step`)
    and momentum ``(1 - sqrt(a mu^2))^2``."""
    omega, lam, tb = batch
    beta = lcp.beta
    phi0, st0 = lcp._free(system, omega, lam, tb.x_support, tb.y_support)
    if st0.diverged or (lcp.tol_for(tb.x_support.dtype if tb.x_support.is_floating_point() else
                                    next(iter(omega.values())).dtype) is not None and not st0.converged):
        st0.phase = "inner"
        return phi0, None, st0, None

    def energy(phi, xs, ys, xq, yq):
        return EBD.energy(system.force(phi, omega, lam, xs, ys), beta, system.loss(phi, xq, yq))

    grad_e = grad(energy)  # = -(Hess l_in + lam) f + beta grad l_out: one HVP's worth of work
    auto = lcp.ebd_lr is None

    def control_residual(ge, phi, xq, yq):
        # with u = -f / beta: grad_e / beta = (Hess l_in + lam) u + grad l_out, so the control residual
        # |(Hess l_in + lam) u + grad l_out| / |grad l_out| of this state is |grad_e| / (beta |grad l_out|)
        # (and the inner one, |f + beta u|, is 0 by construction)
        return safe_ratio(tree_norm(ge), beta * tree_norm(system.grad(phi, xq, yq)))

    if auto:  # per-task step and momentum from E's curvature at phi0, adapted on the way (_ebd_guarded)
        mu2 = lcp._mu(lam) ** 2
        a, m, L = _ebd_step(lcp, system, grad_e, lam, tb, phi0)
        lcp._info = {**lcp._info, "ebd_lr": float(a.min()), "ebd_momentum": float(momentum_for(a, mu2).max()),
                     "ebd_curvature": float(L.max()), "hvps_ebd_estimate": lcp.power_iters}
    if auto and lcp.solver == "anderson":  # Anderson accelerates plain steps of the estimated size itself
        def one(phi, a_, xs, ys, xq, yq):
            ge = grad_e(phi, xs, ys, xq, yq)
            return ({k: phi[k] - a_ * ge[k] for k in phi}, a_), control_residual(ge, phi, xq, yq)

        state, rebuild = tree_pack([phi0, a])
    elif auto:
        one = _ebd_guarded(energy, control_residual, mu2)
        inf = torch.full_like(a, float("inf"))
        state, rebuild = tree_pack([phi0, tree_zeros_like(phi0), dict(phi0), inf, a, m])
    else:
        descent = heavy_ball(lcp.ebd_lr, lcp.ebd_momentum)

        def one(phi, vel, xs, ys, xq, yq):
            ge = grad_e(phi, xs, ys, xq, yq)
            delta, vel = descent.update(_neg(ge), vel)
            return (apply(phi, delta), vel), control_residual(ge, phi, xq, yq)

        state, rebuild = tree_pack([phi0, descent.init(phi0)])
    data = (tb.x_support, tb.y_support, tb.x_query, tb.y_query)
    n_state = len(rebuild(state))
    mapped = system.tmap(one, (0,) * (n_state + len(data)))

    if lcp.solver == "anderson":  # the fixed-point solver's own stop rule (relative change of the state)
        def step(z):
            return tree_pack(mapped(*rebuild(z), *data)[0])[0]

        z, st = lcp._dynamics(step, state, name="LCP energy-based descent", max_iter=lcp.ebd_steps)
    else:  # stopped on the control residual that is reported (a small step is not a small residual)
        def step(z):
            new, res = mapped(*rebuild(z), *data)
            return tree_pack(new)[0], res

        tols = lcp.tols_for(next(iter(omega.values())).dtype)
        z, st, _ = iterate(step, state, None if tols is None else tols[0], lcp.ebd_steps)
    st.phase = "control"
    phi = rebuild(z)[0]
    with torch.no_grad():
        f = system.tmap(lambda p, x, y: system.force(p, omega, lam, x, y), (0, 0, 0))(phi, tb.x_support, tb.y_support)
    u = {k: -f[k] / beta for k in f}  # u = psi / beta with psi = -f
    lcp._info = {**lcp._info, "free_iterations": st0.iterations, "ebd_iterations": st.iterations}
    st.iterations += st0.iterations
    st.converged = st.converged and st0.converged
    st.residual = max(st.residual, st0.residual)
    return phi, u, st, None


def _ebd_guarded(energy, control_residual, mu2: float) -> Callable:
    """Per-task step of the automatic energy descent, state (phi, vel, phi_prev, E_prev, a, m): the guarded
    heavy-ball step of the inner relaxation (:func:`~lcp_meta.meta.dynamics.guarded_step`), since E is not
    convex away from its minimiser and its curvature changes along the path; a rejected (non-finite) point
    reports the residual 1e30."""
    gv = grad_and_value(energy)

    def one(phi, vel, phi_prev, e_prev, a, m, xs, ys, xq, yq):
        g, e = gv(phi, xs, ys, xq, yq)
        res = control_residual(g, phi, xq, yq)
        new, bad = guarded_step(phi, vel, phi_prev, e_prev, a, m, g, e, mu2)
        return new, torch.where(bad, torch.full_like(res, 1e30), res)

    return one


def _ebd_step(lcp, system, grad_e, lam, tb, phi0):
    """Per-task (step, momentum, L) of the energy descent: L the largest |eigenvalue| of Hess E(phi0) by power
    iteration (``lcp.power_iters`` products ``Hess E v = d/dphi <grad E(phi), v>``, from grad E(phi0) plus a
    constant vector, as :func:`~lcp_meta.meta.dynamics.power_iteration`), the step 1 / (SAFETY L) and the
    heavy-ball momentum for curvatures in [mu^2, L] (mu the smallest lam: E's curvature is about
    (Hess l_in + lam)^2 + beta Hess l_out).  A non-finite estimate gives the step 0 (the descent then reports
    the residual of its start)."""
    iters = lcp.power_iters

    def estimate(phi, xs, ys, xq, yq):
        def hvp(v):
            return grad(lambda p: tree_dot(grad_e(p, xs, ys, xq, yq), v))(phi)

        return rayleigh_power(hvp, grad_e(phi, xs, ys, xq, yq), iters)

    with torch.no_grad():
        L = system.tmap(estimate, (0,) * 5)(phi0, tb.x_support, tb.y_support, tb.x_query, tb.y_query)
    mu2 = lcp._mu(lam) ** 2
    # the magnitude bounds a stable step (E is not convex far from its minimiser); never below E's mu^2
    L = torch.nan_to_num(L, nan=float("inf")).abs().clamp_min(mu2)
    a = 1.0 / (SAFETY * L)
    return a, torch.zeros_like(a), L  # the momentum of the (not yet taken) last step: none
