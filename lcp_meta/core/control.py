"""Exact solvers for the LCP-DI controlled equilibrium that use the structure of the problem.

The Euler simulation of the joint dynamics (``supervised/di.py``) is the faithful model of the controller.
These solvers reach the *same* fixed point with far fewer evaluations; at it (spec section 2)

    y = h(v) + u,   u = -beta grad l(y)          (output controller; exact control: y = argmin l)
    e = J_g(v)^T e + J_h(v)^T u                   (dynamic inversion, linear in e)
    v = g(c, v) + e

- The output-controller problem is tiny and decoupled per sample given ``h(v)``: :class:`OutputControl`
  solves it exactly (closed form for MSE, Newton with a Sherman-Morrison inverse for cross-entropy).
- ``"sweep"`` (layered nets): ``J_g`` is strictly block-lower-triangular, so for a given ``v`` one backward
  sweep gives the exact ``e`` and one forward sweep the exact ``v = g(c, v) + e``.  Everything is then a
  function of ``v`` alone: ``v <- T(v)`` is iterated from the free equilibrium (one forward pass), with
  Anderson acceleration.  The coupling is weak (``u`` is O(beta / batch)), so a few sweeps suffice.
- ``"euler-flat"`` (any net; fastest on the rnn): not a solver of the equations but the faithful Euler dynamics
  of ``supervised/di.py`` themselves (same ``dt``, same leaky-integral output controller ``u_I``, from 0) on one
  flat state per sample with fused products: where several equilibria exist it reaches the dynamics' own.
- ``"warm-anderson"`` (any net): Anderson on the reduced state ``(v, e)`` with the output controller solved
  exactly at every step, warm-started from the free equilibrium (itself solved by Anderson).

Strategies are registered by name in :data:`CONTROL_SOLVERS`; each takes a :class:`ControlProblem` and returns
``((v, y, e, u), SolverStats)``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .solvers import RowCache, SolverStats, relative_change, solve
from .losses import loss_grad_fn

__all__ = ["OutputControl", "ControlProblem", "CONTROL_SOLVERS", "register_control_solver", "resolve_control_solver"]


class OutputControl:
    """The output controller at equilibrium, solved exactly per sample for a given ``h = h(v)``.

    Batch-mean loss: ``grad l(y) = (softmax(y) - onehot) / B`` (CE) or ``(y - onehot) / B`` (MSE).
    ``alpha = 0`` is exact control (``grad l(y) = 0``): only reachable with the MSE loss.
    """

    def __init__(self, target: torch.Tensor, num_classes: int, dtype: torch.dtype, loss: str, beta: float):
        self.onehot = F.one_hot(target, num_classes).to(dtype)
        self.loss, self.beta = loss, beta
        self.grad_l = loss_grad_fn(target, num_classes, dtype, loss)  # y -> grad l(y), batch-mean loss
        self.b = beta / target.shape[0]  # per-sample strength of the batch-mean loss
        if math.isinf(beta) and loss != "mse":
            raise ValueError(f"exact output control (alpha = 0) has no equilibrium with the {loss!r} loss; use 'mse'")

    def u_of(self, y: torch.Tensor) -> torch.Tensor:
        """``u = -beta grad l(y)`` (finite beta)."""
        return -self.beta * self.grad_l(y)

    def newton_step(self, y: torch.Tensor, h: torch.Tensor, p: Optional[torch.Tensor] = None,
                    onehot: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One Newton step towards the solution of ``y = h - beta grad l(y)`` (exact for MSE); ``p`` is
        ``softmax(y)`` when the caller has it already; ``onehot`` the targets' rows when ``y`` holds a subset of
        the batch (active-set iteration; the batch-mean scale ``b`` stays that of the whole batch)."""
        onehot = self.onehot if onehot is None else onehot
        if self.loss == "mse":
            return (h + self.b * onehot) / (1 + self.b)
        b = self.b
        p = torch.softmax(y, 1) if p is None else p
        r = y - h + b * (p - onehot)
        d = 1 + b * p
        dr, dp = r / d, p / d
        return y - dr - dp * (b * (p * dr).sum(1, keepdim=True) / (1 - b * (p * dp).sum(1, keepdim=True)))

    def solve(self, h: torch.Tensor, newton_tol: float = 0.0, max_newton: int = 30) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, u)`` with ``y = h + u`` and ``u = -beta grad l(y)``."""
        if math.isinf(self.beta):
            return self.onehot, self.onehot - h
        if self.loss == "mse":  # linear: y = h - b (y - onehot)
            y = (h + self.b * self.onehot) / (1 + self.b)
            return y, y - h
        # Newton on r(y) = y - h + b (p - onehot), J = diag(1 + b p) - b p p^T (invert by Sherman-Morrison);
        # r is the gradient of a strongly convex function of y, so Newton from y = h converges quadratically
        y, eps = h, torch.finfo(h.dtype).eps
        for _ in range(max_newton):
            y, y_old = self.newton_step(y, h), y
            if float((y - y_old).abs().max()) <= max(newton_tol, 4 * eps) * (1 + float(y.abs().max())):
                break
        return y, self.u_of(y)


@dataclass
class ControlProblem:
    """One batch's controlled-equilibrium problem: model, input drive ``c``, output controller, feedback
    weights (KP; None for the true transposes) and the stop rule."""

    model: object
    c: torch.Tensor
    out: OutputControl
    fb: Optional[dict]
    tol: float
    max_iter: int
    check_every: int = 1
    inner: str = "euler"  # the fixed-point solver 'reduced' runs on its map
    sweep_inner: str = "anderson"  # the one 'sweep' runs on T (plain iteration need not contract under exact control)
    warm_tol: Optional[float] = None  # stop rule of a free phase before the joint solve (None: none)
    inner_kw: Optional[dict] = None  # options of the inner solver (e.g. Anderson's memory m)
    start: Optional[tuple] = None  # (v, e, y) to continue from ('reduced' only; no free phase then)
    active_set: bool = False  # batch-independent model: plain iteration steps only the samples not yet converged
    # 'euler-flat' only (the faithful dynamics): the output controller (k_i, k_p, alpha), the Euler step and whether
    # a converged sample keeps its state while a coupled batch goes on (the per-sample stop without an active set)
    gains: Optional[object] = None
    dt: float = 1.0
    freeze_converged: bool = False
    # 'euler-flat': the dynamics until every sample's relative change is below handover_tol, then the reduced map
    # from there (where it settles; else the dynamics go on): None, the dynamics alone
    handover_tol: Optional[float] = None


CONTROL_SOLVERS: Dict[str, Callable] = {}


def register_control_solver(name: str):
    def deco(fn):
        CONTROL_SOLVERS[name] = fn
        return fn

    return deco


def resolve_control_solver(name: str, model, loss: str, beta: float, batch: int = 64) -> str:
    """``"auto"`` -> the fastest exact strategy for the model: ``sweep`` for layered nets, ``reduced``
    otherwise (``warm-anderson`` under exact control); ``euler`` when no equilibrium exists (exact control
    with cross-entropy).  :class:`~lcp_meta.supervised.DynamicInversion` falls back to ``warm-anderson``
    when the picked strategy does not converge."""
    if name != "auto":
        return name
    if math.isinf(beta) and loss != "mse":
        return "euler"
    if model.layered:
        return "sweep"
    # with the output controller settled instantly, the loop gain of the reduced map grows with beta / batch
    # (the batch-mean loss): plain iteration contracts only for weak control (MNIST: 10 / 64); under exact
    # or strong control accelerate
    return "warm-anderson" if beta / batch > 0.5 else "reduced"


def _finish(stats_list, iterations) -> SolverStats:
    """Merge the statistics of a strategy's phases (iterations add up, the last phase decides the rest)."""
    last = stats_list[-1]
    mean = None if last.mean_iterations is None else last.mean_iterations + iterations - last.iterations
    return SolverStats(iterations=iterations, residual=last.residual, converged=last.converged,
                       diverged=any(s.diverged for s in stats_list), per_sample=last.per_sample,
                       mean_iterations=mean, reason=last.reason)


@register_control_solver("sweep")
def sweep(p: ControlProblem):
    """Layered nets: fixed point of ``T(v) = forward_sweep(c, backward_sweep(v, u(h(v))))`` from the free
    equilibrium; each ``T`` is one backward and one forward pass (plus the tiny output solve)."""
    m, c, out, fb = p.model, p.c, p.out, p.fb
    if not m.layered:
        raise ValueError(f"the 'sweep' solver needs a layered (feedforward) model; {type(m).__name__} is recurrent")

    def T(z):
        v = z[0]
        _, u = out.solve(m.h(v))
        return (m.forward_sweep(c, m.backward_sweep(c, v, u, fb)),)

    v0 = m.forward_sweep(c)  # free equilibrium: one forward pass
    (v,), stats = solve(T, (v0,), solver=p.sweep_inner, tol=p.tol, max_iter=p.max_iter, check_every=p.check_every,
                        **(p.inner_kw or {}))
    y, u = out.solve(m.h(v))
    e = m.backward_sweep(c, v, u, fb)
    return (v, y, e, u), _finish([stats], stats.iterations + 1)


def _reduced(p: ControlProblem, warm_tol: Optional[float], inner: str, inner_kw: dict):
    """The reduced map on ``(v, e, y)``: ``u_I`` is eliminated (``u = -beta grad l(y)``), ``y`` takes one
    Newton step towards the exact output solve per evaluation, and ``g``, ``h`` and both VJPs share one
    nonlinearity; the map is the joint dynamics at ``dt = 1`` with the output controller settled."""
    m, c, out, fb = p.model, p.c, p.out, p.fb
    if p.start is not None:  # continue an earlier solve (plain iteration is memoryless: nothing is lost)
        v0, s0 = p.start[0], SolverStats(iterations=0, residual=0.0, converged=True)
    elif warm_tol is None:  # start the joint solve from v = 0
        v0, s0 = m.init_state(c), SolverStats(iterations=0, residual=0.0, converged=True)
    else:  # the free dynamics themselves (Euler), so that an equilibrium they do not reach makes them diverge
        v0, s0 = m.free_equilibrium(c, solver="euler", tol=max(p.tol, warm_tol), max_iter=p.max_iter,
                                    check_every=p.check_every, freeze_converged=False)
    if s0.diverged:  # (the caller raises on a diverged solve)
        return (v0, v0, v0, v0), s0
    budget = p.max_iter - s0.iterations  # max_iter bounds the whole solve, warm start included
    if budget < 1:  # the free phase used it all: report that state, control not yet started (e = 0), never as
        # settled, with the relative change of the reduced map there (the stop rule's measure; the free phase's
        # residual says nothing about the control)
        y, u = out.solve(m.h(v0))
        e0 = torch.zeros_like(v0)
        g, _, jg, jh = m.step_terms(c, v0, e0, u, fb)
        old, new = (v0, e0), (g + e0, jg + jh)
        if not math.isinf(out.beta):  # (its state holds y too)
            old, new = old + (y,), new + (y,)
        per = relative_change(new, old).detach().cpu()
        return (v0, y, e0, u), dataclasses.replace(s0, converged=False, residual=float(per.max()), per_sample=per)
    if inner == "euler":  # samples may be coupled (batch norm): they stop together, unless the model says they
        # are independent; only the finite-beta map below takes the rows of the active samples
        own = {"active_set": True} if p.active_set and not math.isinf(out.beta) else {"freeze_converged": False}
        inner_kw = {**own, **inner_kw}
    if math.isinf(out.beta):  # exact control: u = onehot - h(v) needs h before the step
        def step(z):
            v, e = z
            _, u = out.solve(m.h(v))
            g, _, jg, jh = m.step_terms(c, v, e, u, fb)
            return g + e, jg + jh

        e0 = torch.zeros_like(v0) if p.start is None else p.start[1]
        (v, e), s1 = solve(step, (v0, e0), solver=inner, tol=p.tol, max_iter=budget,
                           check_every=p.check_every, **inner_kw)
        y, u = out.solve(m.h(v))
        return (v, y, e, u), _finish([s0, s1], s0.iterations + s1.iterations)

    ce, batch = out.loss == "ce", c.shape[0]
    if p.active_set and getattr(m, "controlled_terms", None) is not None and c.dim() == 2:
        # (the per-sample stop only: the batch-wide stop of the paper preset keeps the map it was measured with)
        return _reduced_flat(p, v0, s0, budget, inner, inner_kw)

    per_row = RowCache(c, out.onehot)

    def step(z, rows=None):  # rows: the samples z holds (active-set iteration; None: the whole batch)
        v, e, y = z
        cr, oh = per_row(rows)
        sm = torch.softmax(y, 1) if ce else y
        u = (-out.beta / batch) * (sm - oh)  # the batch-mean loss: scaled by the whole batch's size
        g, h, jg, jh = m.step_terms(cr, v, e, u, fb)
        return g + e, jg + jh, out.newton_step(y, h, sm if ce else None, oh)

    e0, y0 = (torch.zeros_like(v0), out.solve(m.h(v0))[0]) if p.start is None else p.start[1:]
    (v, e, y), s1 = solve(step, (v0, e0, y0), solver=inner, tol=p.tol, max_iter=budget,
                          check_every=p.check_every, **inner_kw)
    return (v, y, e, out.u_of(y)), _finish([s0, s1], s0.iterations + s1.iterations)


# the output units' plain update y <- h(v) + u(y) contracts at a rate <= b / 2 (b = beta / batch: |d softmax / dy| <=
# 1/2); below this b it is used instead of a Newton step (the v/e rate, 0.7-0.99 on MNIST, dominates anyway)
PLAIN_Y_MAX_B = 0.5


def _reduced_flat(p: ControlProblem, v0, s0: SolverStats, budget: int, inner: str, inner_kw: dict):
    """The reduced map of :func:`_reduced` (finite beta, per-sample stop) for a model with ``controlled_terms``
    (the rnn), on one flat state ``[v, e, y]`` per sample: the same fixed point and the same stop rule (the
    relative change of the concatenated state), with a third of the torch ops per step, which is what the
    iteration of the last few samples costs.  ``y`` takes the plain step ``h + u(y)`` for the cross-entropy loss under weak control
    (``PLAIN_Y_MAX_B``), else the Newton step (exact in one step for MSE)."""
    m, c, out, fb = p.model, p.c, p.out, p.fb
    n, b = c.shape[1], out.b
    ce = out.loss == "ce"
    plain_y = ce and b <= PLAIN_Y_MAX_B
    per_row = RowCache(c, out.onehot, b * out.onehot)

    def step(z, rows=None):
        cr, oh, boh = per_row(rows)
        v, e, y = z[0][:, :n], z[0][:, n:2 * n], z[0][:, 2 * n:]
        sm = torch.softmax(y, 1) if ce else y
        u = torch.add(boh, sm, alpha=-b)  # -b (sm - onehot); the batch-mean loss: b = beta / (the whole batch's size)
        vn, en, h = m.controlled_terms(cr, v, e, u, fb)
        yn = h + u if plain_y else out.newton_step(y, h, sm if ce else None, oh)
        return (torch.cat([vn, en, yn], 1),)

    if p.start is None:
        y0 = out.solve(m.h(v0))[0]
        z0 = torch.cat([v0, torch.zeros_like(v0), y0], 1)
    else:
        z0 = torch.cat([p.start[0], p.start[1], p.start[2]], 1)
    kw = dict(inner_kw)
    rescue = kw.get("rescue")
    if rescue is not None and not isinstance(rescue.solve, _FlatRescue):
        rescue.solve = _FlatRescue(rescue.solve, n)
    (z,), s1 = solve(step, (z0,), solver=inner, tol=p.tol, max_iter=budget, check_every=p.check_every, **kw)
    v, e, y = z[:, :n], z[:, n:2 * n], z[:, 2 * n:]
    return (v, y, e, out.u_of(y)), _finish([s0, s1], s0.iterations + s1.iterations)


class _FlatRescue:
    """A stall rescue's solver (``solve(step, (v, e, y), rows)``, e.g. per-sample Newton) on the flat state of
    :func:`_reduced_flat`."""

    def __init__(self, solve, n: int):
        self.solve, self.n = solve, n

    def __call__(self, step, z, rows):
        n = self.n

        def split(t):
            return t[:, :n], t[:, n:2 * n], t[:, 2 * n:]

        def step3(z3, r):
            return split(step((torch.cat(z3, 1),), r)[0])

        new, ok = self.solve(step3, split(z[0]), rows)
        return (torch.cat(new, 1),), ok


@register_control_solver("reduced")
def reduced(p: ControlProblem):
    """Any net: plain iteration of the reduced map from 0 (``inner`` 'euler' unless set otherwise).  The
    iteration is the controlled dynamics themselves (dt = 1), so it diverges where they do."""
    return _reduced(p, p.warm_tol, p.inner, p.inner_kw or {})


@register_control_solver("warm-anderson")
def warm_anderson(p: ControlProblem):
    """Any net: Anderson on the reduced map, from the free equilibrium reached by the free dynamics (Euler
    to ``warm_tol``, default 1e-4).  Fastest where the Jacobian's spectrum leaves room for acceleration
    (eigenvalues near 1); on a random-init rnn (spectrum a disk around 0) plain iteration is as fast."""
    return _reduced(p, 1e-4 if p.warm_tol is None else p.warm_tol, "anderson", p.inner_kw or {})


@register_control_solver("euler-flat")
def euler_flat(p: ControlProblem):
    """The faithful joint Euler dynamics of LCP-DI (``DynamicInversion.controlled_step``: state ``(v, y, e, u_I)``
    from 0, the leaky-integral output controller ``p.gains``, step ``p.dt``) on one flat state ``[v, e, y, u_I]``
    per sample: the same iterates and the same stop rule (the relative change of the whole state), with the
    rnn's fused ``controlled_terms`` (other models: ``step_terms``) and, on a batch-independent model, the
    active set (a sample that meets ``tol`` leaves).  Unlike the reduced map, whose output controller is settled
    instantly, it follows the controller's lag, so the equilibrium it reaches is the dynamics' own by construction
    (at trained MNIST rnn parameters several exist, and the reduced map often falls into another basin).

    ``p.handover_tol`` (an option, off by default): the dynamics run until every sample's relative change is below
    it, and the reduced map finishes from there; where they do not get there in half the budget, or the reduced
    map does not settle from there (in half the remaining budget), the dynamics go on from where they were.  Not faithful by construction: it relies on the
    reduced map converging to the nearby equilibrium (measured: it did on every settled batch of the MNIST rnn
    checkpoint, benchmarks/results/supervised_cpu.md)."""
    m, c, out, fb, gains = p.model, p.c, p.out, p.fb, p.gains
    if gains is None:
        raise ValueError("solver 'euler-flat' needs the output controller's gains (ControlProblem.gains)")
    if p.start is not None:
        raise ValueError("solver 'euler-flat' runs the dynamics from 0; it does not continue from a start state")
    k_i, k_p, alpha, dt = gains.k_i, gains.k_p, gains.alpha, float(p.dt)
    batch, shape = c.shape[0], c.shape[1:]
    n, k = math.prod(shape), out.onehot.shape[1]
    ce = out.loss == "ce"
    fused = getattr(m, "controlled_terms", None) is not None and c.dim() == 2
    active = p.active_set  # (the model's samples are independent: grad l of the batch-mean loss is per sample)
    # grad l(y) = (softmax(y) - onehot) / B with B the whole batch's size, in one op from -onehot / B
    per_row = RowCache(c, out.onehot * (-1.0 / batch))

    def step(z, rows=None):
        z = z[0]
        cr, noh = per_row(rows)
        v, e, y, ui = z[:, :n], z[:, n:2 * n], z[:, 2 * n:2 * n + k], z[:, 2 * n + k:]
        gl = torch.add(noh, torch.softmax(y, 1) if ce else y, alpha=1.0 / batch)
        u = (ui if k_i == 1 else k_i * ui) if not k_p else torch.add(k_i * ui, gl, alpha=-k_p)
        if fused:
            vn, en, h = m.controlled_terms(cr, v, e, u, fb)  # g + e, J_g^T e + J_h^T u, h
        else:
            g, h, jg, jh = m.step_terms(cr, v.reshape(-1, *shape), e.reshape(-1, *shape), u, fb)
            vn, en = (g + e.reshape(g.shape)).flatten(1), (jg + jh).flatten(1)
        # the dt = 1 step of each component: v <- g + e, e <- J^T (e, u), y <- h + u, u_I <- (1 - alpha) u_I - grad l
        z1 = torch.cat([vn, en, h + u, torch.sub(ui if alpha == 0 else (1 - alpha) * ui, gl)], 1)
        return (z1 if dt == 1 else torch.lerp(z, z1, dt),)

    kw = {"active_set": True} if active else {"freeze_converged": p.freeze_converged}

    def run(z_start, tol, budget):
        return solve(step, (z_start,), solver="euler", tol=tol, max_iter=budget, check_every=p.check_every, **kw)

    z0 = c.new_zeros(batch, 2 * n + 2 * k)
    if p.handover_tol is None or p.handover_tol <= p.tol:
        (z,), stats = run(z0, p.tol, p.max_iter)
    else:  # the dynamics until every sample is within handover_tol of settling, then the reduced map from there
        # (half the budget at most: where a sample does not get there, the others, which left at handover_tol, and
        # it go on with the dynamics, so that every sample ends as under the dynamics alone)
        (z1,), first = run(z0, p.handover_tol, max(p.max_iter // 2, 1))
        budget = p.max_iter - first.iterations
        if first.converged and budget >= 2:
            v, e, y = z1[:, :n].reshape(c.shape), z1[:, n:2 * n].reshape(c.shape), z1[:, 2 * n:2 * n + k]
            q = dataclasses.replace(p, start=(v, e, y), max_iter=budget // 2, handover_tol=None)
            zr, st = _reduced(q, None, "euler", {})
            if st.converged:
                st.mean_iterations = (st.mean_iterations or st.iterations) + (first.mean_iterations or first.iterations)
                st.iterations += first.iterations
                return zr, st
            # (spent; the reduced map did not settle from there)
            first.mean_iterations = (first.mean_iterations or first.iterations) + (st.mean_iterations or st.iterations)
            first.iterations += st.iterations
            budget -= st.iterations
        if budget < 1:  # the dynamics used the whole budget without settling: report that
            z, stats = z1, first
        else:  # the dynamics go on from where they were (a sample that left froze: its trajectory is unchanged)
            (z,), stats = run(z1, p.tol, budget)
            stats.mean_iterations = None if stats.mean_iterations is None else \
                stats.mean_iterations + (first.mean_iterations or first.iterations)
            stats.iterations += first.iterations
    v, e, y, ui = z[:, :n], z[:, n:2 * n], z[:, 2 * n:2 * n + k], z[:, 2 * n + k:]
    gl = out.grad_l(y)
    u = k_i * ui - k_p * gl
    return (v.reshape(c.shape), y, e.reshape(c.shape), u), _finish([stats], stats.iterations)
