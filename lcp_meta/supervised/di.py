"""LCP with dynamic inversion (LCP-DI) and its variant with Kolen-Pollack feedback weights (LCP-DI-KP).

Joint forward-Euler dynamics of the state ``(v, y, e, u_I)`` (spec section 2; dt = tau = 1):

    grad_l = grad_y l(y)                                  (batch-mean loss)
    u      = k_i u_I - k_p grad_l                         output controller (leaky integral + proportional)
    u_I   += dt (-grad_l - alpha u_I)
    y     += dt (h(v) - y + u)                            controlled output units
    e     += dt (J_f(v)^T e + J_h(v)^T u),  J_f = J_g - I  the control circuit inverts the Jacobian
    v     += dt (g(c, v) - v + e)                         controlled hidden state

At the equilibrium ``e* = -f(v*)``, ``u* = y* - h(v*) = -beta grad l(y*)`` with ``beta = k_i/alpha + k_p``,
and ``J_f^T e* + J_h^T u* = 0``: exactly the stationarity of
``F_beta = min 1/2|g(v) - v|^2 + 1/2|h(v) - y|^2 + beta l(y)``, so the update
``-(dg/dtheta)^T e* - (dh/dtheta)^T u*`` is its exact gradient.  ``alpha = 0`` gives exact output control
(``grad l(y*) = 0``) and the least-control objective ``H`` itself (reachable with the MSE loss).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from ..core.control import CONTROL_SOLVERS, ControlProblem, OutputControl, resolve_control_solver
from ..core.controllers import DI, KP, OutputController, OutputGain
from ..core.solvers import SOLVERS, StallRescue
from ..core.system import NetworkSystem, default_check_every, local_update, loss_grad_fn, output_loss_grad
from .methods import Method, check_finite
from .newton import StragglerNewton

__all__ = ["DynamicInversion", "KolenPollack"]


class DynamicInversion(Method):
    """LCP-DI.  ``alpha`` leak of the integral controller, ``k_i`` integral gain, ``k_p`` proportional
    gain, ``dt`` Euler step (spec defaults: 0.1, 1, 0, 1; stop at relative change 1e-6 or 800 steps).
    ``solver``: 'auto' (default: the fastest exact solver, see ``core/control.py``), 'sweep' (layered nets),
    'reduced', 'warm-anderson', 'euler-flat' (the Euler dynamics below on one flat state per sample with an
    active set: the same iterates as 'euler', fast), or 'euler' / 'anderson' on the joint dynamics (``dt``
    matters only for 'euler', 'euler-flat' and 'anderson').

    ``newton``: 'auto' (default) hands the samples whose reduced iteration stops settling to per-sample Newton
    on the same fixed-point equations (:class:`StragglerNewton`), where that applies: the reduced iteration with
    the per-sample stop on a batch-independent model (not the batch-wide stop of the ``paper`` preset, nor the
    Euler simulation), a state of at most ``NEWTON_MAX_STATE`` numbers per sample, and a smooth nonlinearity
    (tanh or linear; 'on' also ReLU nets, where it may reach another equilibrium); 'off' never.
    ``newton_options``: ``window``, ``min_iter``, ``factor``, ``tries``, ``tail`` (the stall test and the hand-overs,
    see :class:`~lcp_meta.core.solvers.StallRescue`),
    ``max_iter`` (Jacobians per sample, see :func:`~lcp_meta.core.solvers.newton_rows`), ``reach`` (largest
    relative distance from the handed state to an accepted root; default no limit) and ``stability`` (also report
    the spectral radius of the reduced map's Jacobian at each Newton solution: a dense eigenvalue problem per
    sample, for diagnostics).  Statistics: ``newton_samples`` handed over (``newton_handovers`` counting the
    repeated hand-overs of a sample), ``newton_solved``, ``newton_iterations``
    (steps) and ``newton_jacobians`` (the cost), ``newton_too_far``, ``newton_max_move``; with ``stability``
    ``newton_unstable`` (roots the reduced iteration leaves) and ``newton_max_rho``."""

    name = "lcp-di"
    controller = "di"  # the registered controller whose field the joint dynamics integrate
    structured_solvers = True  # (core.control's; checked below)
    k_i, k_p, alpha = OutputGain(), OutputGain(), OutputGain()  # the output controller's gains (one copy)
    NEAR = 1e-2  # 'auto': a stalled reduced solve this close to settling is finished by warm-anderson
    # Newton on a stalled sample: a dense (n + classes)^2 Jacobian per sample (the tanh rnn's in closed form: ~0.6
    # ms for 256 + 10 on one CPU thread, ~8 ms by forward mode), against ~0.15 ms per reduced step of one sample
    NEWTON_MAX_STATE = 2048
    # stall test: a sample whose relative change has not halved in 50 steps, looked at from step 50 on; a sample
    # Newton fails on is handed again at later looks (5 times at most: from another point of its orbit it often
    # succeeds); the last 3 samples are handed over whatever their rate (their steps cost as much as a batch's).
    # On the MNIST rnn the samples that settle do so in 25-200 steps, halving their change every few steps; the
    # stragglers (from ~8 Adam steps on) chatter at 1e-2..1e-1 or creep at ~0.99 a step.  Measured on the
    # stragglers' batches of a training run (benchmarks/results/rnn_newton_cpu.md).  A shorter window (25) was
    # as fast there but hands samples over sooner, farther from where they settle (see 'auto' below)
    NEWTON = {"window": 50, "min_iter": 50, "factor": 0.5, "tries": 5, "tail": 3, "max_iter": 10, "stability": False,
              "reach": math.inf}

    def __init__(self, model, alpha: float = 0.1, k_i: float = 1.0, k_p: float = 0.0, dt: float = 1.0,
                 loss: str = "ce", solver: str = "auto", newton: str = "auto", newton_options: Optional[dict] = None,
                 **kw):
        super().__init__(model, loss=loss, solver=solver, **kw)
        if newton not in ("auto", "on", "off"):
            raise ValueError(f"{self.name}: newton must be 'auto', 'on' or 'off', got {newton!r}")
        unknown = set(newton_options or {}) - set(self.NEWTON)
        if unknown:
            raise ValueError(f"{self.name}: unknown newton_options {sorted(unknown)}; "
                             f"expected keys of {sorted(self.NEWTON)}")
        self.newton, opts = newton, {**self.NEWTON, **(newton_options or {})}
        self.newton_options = opts
        StallRescue(None, *(opts[k] for k in ("window", "min_iter", "factor", "tries", "tail")))  # (validates)
        if int(opts["max_iter"]) != opts["max_iter"] or opts["max_iter"] < 1:
            raise ValueError(f"{self.name}: newton_options max_iter must be an integer >= 1, got {opts['max_iter']!r}")
        for key, val in (("alpha", alpha), ("k_i", k_i), ("k_p", k_p), ("dt", dt)):
            check_finite(self.name, key, val)
        if alpha < 0 or k_i < 0 or k_p < 0 or not 0 < dt <= 1:
            raise ValueError(f"expected alpha >= 0, k_i >= 0, k_p >= 0 and 0 < dt <= 1; got alpha={alpha}, "
                             f"k_i={k_i}, k_p={k_p}, dt={dt}")
        if k_i == 0 and k_p == 0:
            raise ValueError("k_i and k_p are both 0: the output controller would exert no control")
        self.output, self.dt = OutputController(k_i, k_p, alpha), float(dt)
        self.control_options = {}  # ControlProblem fields (inner, warm_tol, inner_kw) for the structured solvers
        known = set(SOLVERS) | set(CONTROL_SOLVERS) | {"auto"}
        if solver not in known:
            raise ValueError(f"unknown solver {solver!r} for {self.name}; expected one of {sorted(known)}")
        if solver == "sweep" and not model.layered:
            raise ValueError(f"solver 'sweep' needs a layered model ('ff', 'conv-ff'); {type(model).__name__} is "
                             f"recurrent: use 'warm-anderson' or 'auto'")

    @property
    def beta(self) -> float:
        """Control strength of the equilibrium reached: ``u* = -beta grad l(y*)``."""
        return self.output.beta

    def controlled_step(self, c, target):
        """One Euler step of the joint dynamics: the DI field on the network system, the output units, and the
        output controller (see the module docstring)."""
        system, dt, out = NetworkSystem(self.model, c, self._fb()), self.dt, self.output
        grad_l = loss_grad_fn(target, self.model.num_classes, c.dtype, self.loss)

        def step(z):
            v, y, e, u_i = z
            gl = grad_l(y)
            u = out.u(u_i, gl)
            t = system.terms(v, e, u)
            dv, de = DI.field(t, e)
            return v + dt * dv, out.output_step(y, t.h, u, dt), e + dt * de, out.integrate(u_i, gl, dt)

        return step

    def _simulate(self, c, target, solver):
        """The joint Euler dynamics from 0 (see the module docstring)."""
        v0 = self.model.init_state(c)
        with torch.no_grad():
            y0 = torch.zeros_like(self.model.h(v0))
        (v, y, e, u_i), stats = self._solve(self.controlled_step(c, target),
                                            (v0, y0, torch.zeros_like(v0), torch.zeros_like(y0)),
                                            "controlled dynamics", solver=solver)
        with torch.no_grad():
            u = self.output.u(u_i, output_loss_grad(y, target, self.loss))
        return (v, y, e, u), stats


@DI.drives("network")
@KP.drives("network")
def _network(ctrl, method, system, target):
    """The DI (and KP) controller on the network: the controlled equilibrium ``(v*, y*, e*, u*)`` and the
    solver statistics.

    ``solver`` 'euler' (or 'anderson') runs the joint dynamics from 0 (the faithful simulation, with ``dt``);
    a name in :data:`~lcp_meta.core.control.CONTROL_SOLVERS` reaches the same fixed point with the
    problem's structure; 'auto' picks the fastest exact one for the model (``system.fb``: KP's feedback weights)."""
    c = system.c
    name = resolve_control_solver(method.solver, method.model, method.loss, method.beta, c.shape[0])
    if name in CONTROL_SOLVERS:
        out = OutputControl(target, method.model.num_classes, c.dtype, method.loss, method.beta)
        prob = ControlProblem(method.model, c, out, system.fb, method.tol, method.max_iter,
                              method.check_every or default_check_every(c.device), gains=method.output,
                              dt=method.dt, freeze_converged=method.stop_rule == "per-sample",
                              **method.control_options)
        if "active_set" not in method.control_options:
            prob.active_set = method.samples_leave
        fallback = method.solver == "auto" and name == "reduced" and method.max_iter >= 2
        if fallback:  # 'auto' keeps max_iter as its total budget: half for each attempt
            prob.max_iter = method.max_iter // 2
        newton = _newton_for(method, prob, name)
        with torch.no_grad():
            z, stats = CONTROL_SOLVERS[name](prob)
            if newton is not None:  # what follows runs as without it (the samples it failed on were tried already)
                prob.inner_kw = {k: v for k, v in prob.inner_kw.items() if k != "rescue"}
            if fallback and not stats.converged and not stats.diverged:
                prob.max_iter = method.max_iter - stats.iterations
                if prob.active_set:  # only the samples that have not converged go on (see _unsettled_rows)
                    z, stats, name = _unsettled_rows(method, prob, target, z, stats, name)
                    _report_newton(stats, newton)
                    method._check(stats, f"controlled dynamics ({name})")
                    return z, stats
                # (a choice of solver, not of acceptance: a fixed threshold, so that max_residual=inf, which
                # only says "apply whatever state is reached", does not send far-off solves to Anderson)
                if stats.residual <= min(method.max_residual, method.NEAR):
                    # stalled close to an equilibrium the Euler dynamics (damped by the integral controller)
                    # settle to, e.g. chattering ReLU nets: accelerate instead
                    first, first_z = stats, z
                    z, stats = CONTROL_SOLVERS["warm-anderson"](prob)
                    name = f"{name}, then warm-anderson"
                    if not stats.converged and not stats.diverged and stats.residual > first.residual:
                        # Anderson (restarted from the free equilibrium) ended farther from settling than the
                        # reduced iteration had got: report and use the better state
                        used = first.iterations + stats.iterations
                        z, stats = first_z, dataclasses.replace(first, iterations=used)
                        first = dataclasses.replace(first, iterations=0)
                        name = "reduced, better than the warm-anderson retry"
                else:  # far from settling (dynamics that oscillate): go on as one run with the full budget
                    v, y, e, _ = z
                    prob.start = (v, e, y)
                    first, (z, stats) = stats, CONTROL_SOLVERS[name](prob)
                stats.iterations += first.iterations
                if stats.mean_iterations is not None:
                    stats.mean_iterations += first.mean_iterations or first.iterations
        _report_newton(stats, newton)
        method._check(stats, f"controlled dynamics ({name})")
        return z, stats
    return method._simulate(c, target, name)


def _newton_for(method, prob, name):
    """The per-sample Newton of ``method.newton='auto'`` (None where it does not apply), set as the rescue of
    the reduced iteration's stalled samples in ``prob``."""
    if (method.newton == "off" or name != "reduced" or prob.inner != "euler" or not prob.active_set
            or math.isinf(prob.out.beta) or math.prod(prob.c.shape[1:]) > method.NEWTON_MAX_STATE):
        return None
    # 'auto': smooth nets only.  Where a ReLU net chatters between activation patterns, a root Newton finds near
    # the orbit can be another equilibrium than the one the iteration settles to (tiny conv-ff of the tests:
    # a 16% different update, with the root 6e-4 away and stable)
    if method.newton == "auto" and getattr(method.model, "activation", None) not in ("tanh", "linear"):
        return None
    opts = method.newton_options
    newton = StragglerNewton(prob, int(opts["max_iter"]), bool(opts["stability"]), float(opts["reach"]))
    prob.inner_kw = {**(prob.inner_kw or {}), "rescue": StallRescue(newton, opts["window"], opts["min_iter"],
                                                                          opts["factor"], opts["tries"], opts["tail"])}
    return newton


def _report_newton(stats, newton):
    if newton is not None:
        stats.extra = {**(stats.extra or {}), **newton.report()}


def _subproblem(prob, target, rows, method):
    """The controlled-equilibrium problem of the samples ``rows`` of a batch-independent model: their drive and
    targets, and the output controller of the whole batch (``beta`` scaled by the subset's share, so that the
    batch-mean loss keeps the per-sample strength ``beta / B``)."""
    b, n = prob.c.shape[0], rows.numel()
    out = OutputControl(target.index_select(0, rows), method.model.num_classes, prob.c.dtype, method.loss,
                        method.beta * n / b)
    return dataclasses.replace(prob, c=prob.c.index_select(0, rows), out=out, start=None, active_set=True)


def _unsettled_rows(method, prob, target, z, first, name):
    """'auto' on a batch-independent model, after the reduced iteration's half of the budget: the same
    continuation as for a coupled batch (Anderson from the free equilibrium when close to settling, else the
    reduced iteration goes on), run on the samples that have not converged only; the others keep their state."""
    rows = torch.nonzero(~(first.per_sample < method.tol))[:, 0].to(prob.c.device)
    if rows.numel() == 0:  # (every sample below tol at the last look: nothing to continue)
        return z, first, name
    sub = _subproblem(prob, target, rows, method)
    zr = tuple(t.index_select(0, rows) for t in z)
    if first.residual <= min(method.max_residual, method.NEAR):  # (see _network)
        zs, st = CONTROL_SOLVERS["warm-anderson"](sub)
        name = f"{name}, then warm-anderson on {rows.numel()} samples"
        if not st.converged and not st.diverged and st.residual > first.residual:
            zs, st = zr, dataclasses.replace(st, residual=first.residual, per_sample=first.per_sample[rows.cpu()])
            name = f"reduced, better than the warm-anderson retry on {rows.numel()} samples"
    else:
        v, y, e, _ = zr
        sub.start = (v, e, y)
        zs, st = CONTROL_SOLVERS[name](sub)
    z = tuple(t.clone().index_copy_(0, rows, r) for t, r in zip(z, zs))
    per_sample = first.per_sample.clone()
    per_sample[rows.cpu()] = st.per_sample
    b = prob.c.shape[0]
    stats = dataclasses.replace(
        st, iterations=first.iterations + st.iterations, residual=float(per_sample.max()), per_sample=per_sample,
        mean_iterations=(first.mean_iterations or first.iterations) + (st.mean_iterations or st.iterations)
        * rows.numel() / b)
    return z, stats, name


class KolenPollack(DynamicInversion):
    """LCP-DI-KP: every transposed forward weight in ``J^T e`` is replaced by a learned feedback weight B
    (``B_D`` for the readout).  Kolen-Pollack: B's update is the transpose of its forward weight's update,
    and both decay by ``kp_wd`` after each optimizer step, so B and W^T converge to each other
    (``kp_decay='before-batch'``: the authors' variant, every implicit-module, decoder and feedback parameter
    decays before each batch's dynamics).
    Feedback weights start as the official code's: random, scaled to unit Frobenius norm (readout:
    ``N(0, 1/(n_out n_hidden))``)."""

    name = "lcp-di-kp"
    controller = "kp"

    KP_DECAY = ("after-step", "before-batch")

    def __init__(self, model, kp_wd: float = 1e-6, kp_decay: str = "after-step", **kw):
        super().__init__(model, **kw)
        if kp_decay not in self.KP_DECAY:
            raise ValueError(f"kp_decay must be one of {self.KP_DECAY}, got {kp_decay!r}")
        self.kp_decay = kp_decay
        pairs = model.feedback_pairs()
        if not pairs:
            raise ValueError(f"lcp-di-kp needs a model with closed-form feedback pathways (ff, rnn, conv-ff); "
                             f"{type(model).__name__} has none")
        check_finite(self.name, "kp_wd", kp_wd)
        if kp_wd < 0:
            raise ValueError(f"kp_wd must be >= 0, got {kp_wd}")
        self.kp_wd, self.pairs = float(kp_wd), pairs
        self.feedback.B = nn.ParameterDict()
        for key, (w, is_linear) in pairs.items():
            shape = w.t().shape if is_linear else w.shape
            b = torch.randn(shape, dtype=w.dtype, device=w.device)
            if key == "readout":
                b /= math.sqrt(w.shape[0] * w.shape[1])
            else:
                b /= b.norm()
            self.feedback.B[key] = nn.Parameter(b)

    def _fb(self):
        return dict(self.feedback.B.items())

    def _update(self, c, v, e, u, params):
        grads = local_update(self.model, c, v, e, u, params)
        index = {id(p): i for i, p in enumerate(params)}
        for key, (w, is_linear) in self.pairs.items():  # B gets the (transposed) forward update
            gw = grads[index[id(w)]]
            grads[index[id(self.feedback.B[key])]] = gw.t() if is_linear else gw.clone()
        return grads

    def decayed_parameters(self):
        """What the decay shrinks: 'after-step' the forward weights with a feedback twin and the feedback weights;
        'before-batch' (the authors') every parameter of the implicit module and the decoder (weights and
        biases, everything but the encoder) and every feedback weight."""
        if self.kp_decay == "after-step":
            return [w for w, _ in self.pairs.values()] + list(self.feedback.B.values())
        enc = {id(p) for p in self.model.encoder_parameters()}
        return [p for p in self.model.parameters() if id(p) not in enc] + list(self.feedback.parameters())

    def _decay(self):
        with torch.no_grad():
            for p in self.decayed_parameters():
                p.mul_(1 - self.kp_wd)

    def backward(self, x, y):
        if self.kp_decay != "before-batch" or not self.kp_wd:
            return super().backward(x, y)
        # the authors decay before the batch's dynamics, which then run with the decayed weights; a batch that
        # fails restores them, so that a refused batch (a raised DivergenceError, or a warning under
        # on_divergence="warn") leaves the parameters as they were
        params = self.decayed_parameters()
        saved = [p.detach().clone() for p in params]

        def restore():
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

        self._decay()
        try:
            stats = super().backward(x, y)
        except BaseException:
            restore()
            raise
        if not self.accumulated:
            restore()
        return stats

    def after_step(self):
        if self.kp_decay == "after-step":
            self._decay()

    def alignment_angles(self):
        """Angle (degrees) between each feedback weight and its forward weight's transpose."""
        out = {}
        for key, (w, is_linear) in self.pairs.items():
            a = (w.t() if is_linear else w).flatten().double()
            a, b = a.detach(), self.feedback.B[key].detach().flatten().double()
            cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30)
            out[key] = float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))))
        return out
