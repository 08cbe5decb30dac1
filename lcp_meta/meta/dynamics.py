"""Residual-stopped, task-batched loops for the equilibrium methods (LCP, iMAML, CML).

Two dynamics, both written per task and mapped over tasks (vmap), both integrated with heavy-ball steps
``v <- m v + a F(x);  x <- x + v`` (m = 0: forward Euler with step a):

* relaxation of the inner problem, ``F = f(phi) = -grad E(phi)`` with
  ``E(phi) = l_in(phi) + lam/2 |phi - omega|^2 [+ beta l_out(phi)]`` (gradients only);
* the dynamic-inversion control of LCP, run jointly with the inner dynamics:
  ``F_phi = f(phi) + beta u``, ``F_u = -(Hess l_in(phi) + lam) u - grad l_out(phi)`` (u = psi / beta).

Why heavy-ball with these steps is safe: linearised at the inner equilibrium, the relaxation has Jacobian
``-(Hess l_in + lam)``, and so has the control (it IS that linearisation applied to u).  A heavy-ball
iteration on a symmetric positive definite A is stable for every eigenvalue with ``0 < a lam_i < 2 (1 + m)``.
So the control, run with the step that made the inner relaxation converge, cannot diverge; the momentum
``m = (1 - sqrt(a mu))^2`` with ``mu = min lam`` (the smallest curvature of the proximal problem when
Hess l_in >= 0) makes both converge at the rate ``1 - sqrt(a mu)`` instead of ``1 - a mu``.

Stop rule: every iteration evaluates the residual at the current state (a by-product of the step), tasks
whose residual is below ``tol`` keep their state, the loop ends when all tasks are done or at ``max_iter``
updates.  The residual reported is therefore the residual of the state returned.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch.func import grad_and_value

from ..core.controllers import DI
from ..core.solvers import SolverStats, _flat, _unflat
from ..core.tree import Tree, tree_dot, tree_norm

__all__ = ["STOP_RULES", "iterate", "safe_ratio", "power_iteration", "rayleigh_power", "guarded_step", "momentum_for",
           "relax_map", "control_map", "cg_step", "cg_control", "SAFETY"]

# the step is 1 / (SAFETY * estimated largest eigenvalue): power iteration estimates it from below
SAFETY = 1.25


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 / 0 = 0 (a task that starts at its solution has nothing left to do)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.where(num > 0, torch.full_like(num, float("inf")), 0.0 * num))


def momentum_for(a: torch.Tensor, mu: float) -> torch.Tensor:
    """Heavy-ball momentum (1 - sqrt(a mu))^2: the uniform rate 1 - sqrt(a mu) on eigenvalues in [mu, 1/a]."""
    return (1 - (a * mu).clamp(0, 1).sqrt()) ** 2


# --------------------------------------------------------------------------------------- the loop
def iterate(step: Callable, state: Tuple[torch.Tensor, ...], tol, max_iter: int, aux: bool = False):
    """Run ``step(state) -> (new_state, residual (T,) or (T, k)[, stuck (T,)])`` until every task's
    residuals are <= tol (or it is stuck: it stops there, unconverged).

    ``residual`` is the residual of the INPUT state.  Tasks that are done keep their state.  ``tol``: a
    number, or one per residual column (a sequence of k numbers, e.g. LCP's control and inner tolerances).
    ``tol=None``
    runs exactly ``max_iter`` updates (then ``converged`` is False: nothing says the run is at an
    equilibrium).  Returns (state, SolverStats, per-task residuals).  Stops early when a residual is not
    finite (``diverged``).

    ``aux=True``: the step returns ``(new_state, residual, extra)`` instead, ``extra`` anything it computed
    at its input state (e.g. the force), and a fourth value is returned: the ``extra`` of the last call,
    which was made at the state returned (every task, done ones included, is evaluated at each call), so a
    caller gets it without evaluating the returned state again.
    """
    T = state[0].shape[0]
    done = torch.zeros(T, dtype=torch.bool, device=state[0].device)
    res = torch.full((T,), float("nan"), dtype=torch.float64, device=state[0].device)
    tolv = None if tol is None else torch.as_tensor(tol, dtype=torch.float64, device=state[0].device)
    k = 0
    with torch.no_grad():
        while True:
            out = step(state)
            new, r = out[0], out[1]
            if aux:
                extra, stuck = out[2], None
            else:
                stuck = out[2] if len(out) > 2 else None  # tasks that cannot move on (stop, not converged)
            res = r.detach().to(torch.float64)
            worst = res if res.dim() == 1 else res.amax(1)
            finite = torch.isfinite(worst)
            if tolv is not None:  # several residuals: each must meet its tolerance
                met = res <= tolv
                done = done | (finite & (met if met.dim() == 1 else met.all(1)))
            halt = done if stuck is None else done | stuck
            flags = torch.stack([done.all(), ~finite.all(), halt.all()]).cpu()
            if bool(flags[0]) or bool(flags[1]) or bool(flags[2]) or k >= max_iter:
                break
            state = tuple(torch.where(done.view(-1, *([1] * (o.dim() - 1))), o, n) for o, n in zip(state, new))
            k += 1
    diverged = bool(flags[1])
    worst = res if res.dim() == 1 else res.amax(1)
    st = SolverStats(iterations=k, residual=float(worst.max()) if not diverged else float("nan"),
                     converged=bool(flags[0]) and not diverged, diverged=diverged, per_sample=worst.cpu())
    st.stuck = bool(stuck.any()) if stuck is not None else False
    return (state, st, res, extra) if aux else (state, st, res)


# ------------------------------------------------------------------------------- eigenvalue estimate
def power_iteration(system, phi: Tree, lam: Tree, xs, ys, iters: int) -> torch.Tensor:
    """Largest eigenvalue of Hess l_in(phi) + lam for ONE task by power iteration (``iters`` HVPs).

    Starts from grad l_in(phi) plus a constant vector (deterministic, so vmapped and looped runs agree);
    returns the last Rayleigh quotient, a lower bound of the largest eigenvalue (hence SAFETY)."""
    return rayleigh_power(lambda v: system.curvature(phi, v, lam, xs, ys), system.grad(phi, xs, ys), iters)


def rayleigh_power(matvec: Callable[[Tree], Tree], g: Tree, iters: int) -> torch.Tensor:
    """The Rayleigh quotient after ``iters`` steps of power iteration with ``matvec`` (a symmetric operator on
    trees, e.g. a Hessian-vector product), started from ``g`` plus a constant vector (deterministic)."""
    v = {k: g[k] + 1e-3 * (g[k].abs().mean() + 1) * torch.ones_like(g[k]) for k in g}
    ref = next(iter(g.values()))
    rq = torch.zeros((), dtype=ref.dtype, device=ref.device)
    for _ in range(iters):
        n = tree_norm(v)
        v = {k: v[k] / n for k in v}
        av = matvec(v)
        rq = tree_dot(v, av)
        v = av
    return rq


# ------------------------------------------------------------------------------------ relaxation
def guarded_step(phi: Tree, vel: Tree, phi_prev: Tree, e_prev: torch.Tensor, a: torch.Tensor, m: torch.Tensor,
                 g: Tree, e: torch.Tensor, mu: float):
    """One guarded heavy-ball descent step on an energy E with gradient ``g`` and value ``e`` at ``phi`` (one
    task): ``vel <- m vel - a g;  phi += vel``, where the step ``a`` came from a curvature estimate.  Returns
    ``((phi, vel, phi_prev, e_prev, a, m) after the step, bad)``, ``bad``: the point was not finite.

    The momentum restarts when E rises or the velocity points uphill; a plain gradient step (``m`` = 0, the
    momentum the last step used) that raises E overshot (a curvature above the estimate, the Hessian growing
    along the path), so it also shortens the step (x 0.7) and the run cannot keep oscillating; a non-finite point
    is undone (step / 4).  So a curvature above the estimate cannot make the descent diverge.  (Shrinking on
    every rise stalled the relaxation of a conv-4 network: its step fell 1e8-fold over a few hundred momentum
    restarts.)  The momentum otherwise is ``momentum_for(a, mu)``, mu the smallest curvature."""
    rel = max(1e-12, 64 * torch.finfo(e.dtype).eps)  # a rise of E smaller than this (relative) is round-off
    bad = ~(torch.isfinite(e) & torch.isfinite(tree_norm(g)))
    rise = e > e_prev + rel * e_prev.abs()
    uphill = tree_dot(g, vel) > 0  # the momentum points uphill: restart it
    a_new = torch.where(bad, 0.25 * a, torch.where(rise & (m == 0), 0.7 * a, a))
    m_new = torch.where(bad | rise | uphill, torch.zeros_like(a_new), momentum_for(a_new, mu))
    g = {k: torch.where(bad, torch.zeros_like(g[k]), g[k]) for k in g}
    vel_n = {k: m_new * vel[k] - a_new * g[k] for k in vel}
    base = {k: torch.where(bad, phi_prev[k], phi[k]) for k in phi}  # non-finite: back to the last point
    return ({k: base[k] + vel_n[k] for k in phi}, vel_n, base, torch.where(bad, e_prev, e), a_new, m_new), bad


def relax_map(system, omega: Tree, lam: Tree, mu: float, adaptive: bool, beta: float = 0.0) -> Callable:
    """Per-task step of the heavy-ball relaxation of E (gradients only).

    State per task: (phi, vel, phi_prev, e_prev, a, m, scale) [, c: a constant control added to the force,
    E - <c, phi>].  ``adaptive``: the step a came from an
    eigenvalue estimate, and each step is :func:`guarded_step` (``m`` in the state is the momentum the last
    step used), so a curvature larger than estimated cannot make the run diverge.
    Otherwise (a user's inner_lr, momentum m) it is the plain dynamics.  Residual:
    ``|grad E(phi)| / |grad E(phi_start)|`` (the force left, relative to the force at the start).
    Returns ``(new state, residual, grad E(phi))``: the gradient at the input state is returned too (see
    :func:`iterate`'s ``aux``), so the force at the relaxed state costs no further gradient.
    """
    nudged = beta != 0.0

    def energy(phi, xs, ys, xq, yq, c):
        e = system.energy(phi, omega, lam, xs, ys)
        if c is not None:  # a constant control c: the force is f(phi) + c
            e = e - sum((c[k] * phi[k]).sum() for k in phi)
        return e + beta * system.loss(phi, xq, yq) if nudged else e

    gv = grad_and_value(energy)

    def one(phi, vel, phi_prev, e_prev, a, m, scale, xs, ys, xq, yq, c=None):
        g, e = gv(phi, xs, ys, xq, yq, c)
        gn = tree_norm(g)
        scale = torch.where(torch.isnan(scale), gn, scale)
        res = safe_ratio(gn, scale)
        if adaptive:
            new, bad = guarded_step(phi, vel, phi_prev, e_prev, a, m, g, e, mu)
            res = torch.where(bad, torch.full_like(res, float(1e30)), res)  # a rejected point is not a solution
            return (*new, scale), res, g
        vel_n = {k: m * vel[k] - a * g[k] for k in vel}
        return ({k: phi[k] + vel_n[k] for k in phi}, vel_n, phi_prev, e, a, m, scale), res, g

    return one


# --------------------------------------------------------------------------------------- control
def control_map(system, omega: Tree, lam: Tree, beta: float) -> Callable:
    """Per-task step of the joint (phi, u) dynamics of the dynamic-inversion controller.

    State per task: (phi, u, vphi, vu, a_phi, m_phi, a_u, m_u, scale_in).  One forward-over-reverse pass
    gives f(phi) and (Hess l_in + lam) u; one gradient gives grad l_out(phi).  Residuals (of the input
    state): control ``|(Hess l_in + lam) u + grad l_out| / |grad l_out|``, inner ``|f + beta u| / scale_in``
    (scale_in = |f(omega)|); the step returns the larger of the two and both separately.
    """

    def one(phi, u, vphi, vu, a_phi, m_phi, a_u, m_u, scale_in, xs, ys, xq, yq):
        go = system.grad(phi, xq, yq)
        # the DI controller's field on the inner problem: output control -grad l_out, fed back as beta u
        f_in, f_u = DI.field(system.terms(phi, u, {k: -v for k, v in go.items()}, omega, lam, xs, ys), u, beta)
        r_u = safe_ratio(tree_norm(f_u), tree_norm(go))
        r_in = safe_ratio(tree_norm(f_in), scale_in)
        vphi = {k: m_phi * vphi[k] + a_phi * f_in[k] for k in vphi}
        vu = {k: m_u * vu[k] + a_u * f_u[k] for k in vu}
        new = ({k: phi[k] + vphi[k] for k in phi}, {k: u[k] + vu[k] for k in u}, vphi, vu,
               a_phi, m_phi, a_u, m_u, scale_in)
        return new, torch.stack([r_u, r_in])

    return one


# ------------------------------------------------------------------ control at a fixed inner state
def cg_step(Ap: torch.Tensor, x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, rs: torch.Tensor,
            active: torch.Tensor):
    """One conjugate-gradient step on ``A x = b`` given the product ``Ap = A p`` (residual ``r = b - A x``,
    search direction ``p``, ``rs = r . r``), taken only where ``active``.  Vectors are flat: ``(T, n)`` for a
    batch of tasks (``rs``, ``active`` per task) or ``(n,)`` for one task inside vmap.  An active task whose
    curvature ``p^T A p`` is not positive (an indefinite system, or NaN) is flagged ``bad`` and does not move.
    Returns ``(x, r, p, rs, bad, moved)``."""
    pAp = (p * Ap).sum(-1)
    bad = active & ~(pAp > 0)
    go = active & ~bad
    alpha = torch.where(go, rs / torch.where(go, pAp, torch.ones_like(pAp)), 0 * rs).unsqueeze(-1)
    x, r = x + alpha * p, r - alpha * Ap
    rs_new = (r * r).sum(-1)
    ratio = torch.where(go, rs_new / torch.where(go, rs, torch.ones_like(rs)), 0 * rs).unsqueeze(-1)
    p = torch.where(go.unsqueeze(-1), r + ratio * p, p)
    return x, r, p, torch.where(go, rs_new, rs), bad, go


STOP_RULES = ("per-task", "batch")


def cg_control(tmap: Callable, system, lam: Tree, phi: Tree, g: Tree, xs, ys, tol: float, max_iter: int,
               u0: Tree = None, r0: Tree = None, stop_rule: str = "per-task"):
    """The control dynamics ``du/dt = -(Hess l_in(phi) + lam) u - grad l_out(phi)`` at a fixed (solved) inner
    state phi, from u = 0 (or from ``u0`` with its force ``r0 = -(A u0 + g)``), integrated by heavy-ball steps
    whose step and momentum come from an exact line search each step: that is the conjugate-gradient method,
    so the control reaches its equilibrium
    ``u* = -(Hess l_in + lam)^-1 grad l_out`` in at most dim(u) steps (far fewer for the clustered spectra of
    few-shot problems) instead of ~sqrt(condition number) per digit.

    Task-batched (``g = grad l_out(phi)`` per task); the loop runs until every task's residual
    ``|(Hess l_in + lam) u + g| / |g|`` is <= tol.  That residual is CG's recursive one (``r = -(A u + g)``
    up to round-off), known after each step without a further product with A, so a step is never spent only
    on certifying the last one.  ``stop_rule``:

    - ``"per-task"`` (default): a task stops at the first step where its residual meets tol; its result does not
      depend on the other tasks of the batch, so a batch split across ranks gives the same meta-gradient.
    - ``"batch"``: the tasks step together until the last one meets tol.  A task done before the others goes on,
      which costs nothing in a batched step and makes its solve more exact.  Its residual is still <= tol at
      the end (a task whose residual rises above tol again counts as unfinished), but its result now depends on
      its batch-mates within that tolerance.

    A task whose curvature ``p^T A p`` is not positive (Hess l_in + lam indefinite at phi) stops at its last
    iterate; it is flagged where its residual was still above tol.  ``tol <= 0`` runs exactly ``max_iter``
    steps (iMAML's ``cg_steps``) in one task-mapped call.  Returns (u, SolverStats (``stuck``: some task was
    flagged), residuals (T,), flagged (T,)).
    """
    if stop_rule not in STOP_RULES:
        raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {stop_rule!r}")
    lockstep = stop_rule == "batch"
    # CG runs on one flat vector per task: each tree operation is then one tensor operation, and a call of the
    # task-mapped product passes two tensors across the vmap boundary instead of two trees
    keys = list(g)
    like = [g[k] for k in keys]
    sizes = [t[0].numel() for t in like]

    def tree_of(vec):  # one task's (n,) -> tree (views)
        return {k: c.reshape(t.shape[1:]) for k, c, t in zip(keys, vec.split(sizes), like)}

    def curvature(ph, v, x, y):  # one task: (Hess l_in(phi) + lam) v, flat in and out
        av = system.curvature(tree_of(ph), tree_of(v), lam, x, y)
        return torch.cat([av[k].reshape(-1) for k in keys])

    def fixed_steps(ph, u, r, p, rs, live, x, y):  # one task, all max_iter steps inside one mapped call
        bad_any = torch.zeros_like(live)
        for _ in range(max_iter):
            u, r, p, rs, bad, go = cg_step(curvature(ph, p, x, y), u, r, p, rs, live)
            bad_any, live = bad_any | bad, go & (rs > 0)
        return u, r, p, rs, bad_any

    product = tmap(curvature, (0, 0, 0, 0))
    flat = lambda tree: _flat([tree[k] for k in keys])  # noqa: E731  (task-batched tree -> (T, n))
    with torch.no_grad():
        phf = flat(phi)
        if u0 is None:
            u, r = torch.zeros_like(phf), -flat(g)  # the force on u at u = 0, no product with A needed
        else:
            u, r = flat(u0), flat(r0)
        p = r
        rs = (r * r).sum(-1)
        gn = tree_norm(g, batched=True)
        res = safe_ratio(rs.sqrt(), gn)  # from 0: 1 (0 where grad l_out = 0, NaN for non-finite data)
        need = res > tol  # tasks whose residual is above tol: the loop runs while there are any
        live = need.clone()  # tasks that are stepped (a task met tol at its start has nothing to improve)
        flagged = torch.zeros_like(need)
        k = 0
        if tol <= 0 and max_iter > 0:  # a fixed number of steps (iMAML's cg_steps): no residual to check
            # between steps, so the whole loop runs in one task-mapped call (fewer vmap boundaries)
            u, r, p, rs, flagged = tmap(fixed_steps, (0,) * 8)(phf, u, r, p, rs, live, xs, ys)
            res, k, need = safe_ratio(rs.sqrt(), gn), max_iter, torch.zeros_like(need)
        while k < max_iter and bool(need.any()):
            u, r, p, rs, bad, go = cg_step(product(phf, p, xs, ys), u, r, p, rs, live)
            flagged = flagged | (bad & need)
            res = safe_ratio(rs.sqrt(), gn)
            live = go & (rs > 0)  # r = 0 is exact: no direction left
            # (CG's residual norm need not fall monotonically: under the batch rule a task that met tol and rose
            # above it again counts as unfinished, so the loop ends with every residual <= tol, or at max_iter)
            need = live & (res > tol)
            if not lockstep:  # per task: a task that meets tol stops there
                live = need
            k += 1
        u = dict(zip(keys, _unflat(u, like)))
    res = res.to(torch.float64)
    finite = bool(torch.isfinite(res).all())
    st = SolverStats(iterations=k, residual=float(res.max()) if finite else float("nan"),
                     converged=finite and bool((res <= tol).all()), diverged=not finite, per_sample=res.cpu())
    st.stuck = bool(flagged.any())
    return u, st, res, flagged
