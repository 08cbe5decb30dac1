"""Fixed-point solvers for free and controlled equilibrium dynamics.

Every dynamics in lcp_meta is written as a *step map* ``z -> step(z)``: one forward-Euler step
``z + dt * F(z)`` of the continuous dynamics ``dz/dt = F(z)``.  Its fixed points are the equilibria
``F(z*) = 0``.  A state ``z`` is a tuple of tensors that share a leading *sample* dimension (data
points for the supervised networks, tasks for meta-learning); the stop rule is applied per sample.

Solvers are looked up by name in :data:`SOLVERS` (as in torchdeq) and return their statistics in a
:class:`SolverStats` instead of printing them.  They run under ``torch.no_grad()``: no autograd graph
is kept across iterations, so memory does not grow with the number of iterations.

Two things every caller shares live here, once: the stop rule (:class:`StopRule`; ``tol=None`` is a real
fixed-steps mode) and the divergence policy (:func:`check_divergence`), which decides whether a solve is
accepted and words the one-line error when it is not.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

State = Tuple[torch.Tensor, ...]
StepFn = Callable[[State], State]

__all__ = [
    "SolverStats",
    "DivergenceError",
    "StopRule",
    "check_divergence",
    "SOLVERS",
    "register_solver",
    "solve",
    "relative_change",
    "DivergenceGuard",
    "RowCache",
    "StallRescue",
    "newton_rows",
]


@dataclass
class SolverStats:
    """What a solve did.

    iterations: number of step-map evaluations performed.
    residual:   final relative change ``|z_{t+1} - z_t| / |z_{t+1}|``, the maximum over samples.
    converged:  every sample reached ``residual < tol`` before ``max_iter``.
    diverged:   the state became NaN/inf (the solve stopped there).
    per_sample: final relative change of each sample (a CPU tensor).
    fixed:      a fixed-steps run (``tol=None``): exactly ``max_iter`` steps, never "converged", since
                nothing says its end is an equilibrium.
    mean_iterations: the mean over samples of the step-map evaluations each sample took (set by the active-set
                iteration, whose cost is their sum; ``iterations`` is then the maximum over samples).
    reason:     why a solve was stopped as diverged when the state is still finite (the divergence guard).
    extra:      further scalar statistics a caller adds (e.g. LCP-DI's per-sample Newton counts), reported by
                :meth:`as_dict` with the rest.
    """

    iterations: int
    residual: float
    converged: bool
    diverged: bool = False
    per_sample: Optional[torch.Tensor] = None
    fixed: bool = False
    mean_iterations: Optional[float] = None
    reason: str = ""
    extra: Optional[dict] = None

    def as_dict(self) -> dict:
        out = {
            "iterations": self.iterations,
            "residual": self.residual,
            "converged": self.converged,
            "diverged": self.diverged,
        }
        if self.mean_iterations is not None:
            out["mean_iterations"] = self.mean_iterations
        out.update(self.extra or {})
        return out


class DivergenceError(RuntimeError):
    """Raised when a dynamics does not converge or turns NaN; carries the solver statistics."""

    def __init__(self, message: str, stats: Optional[SolverStats] = None):
        super().__init__(message)
        self.stats = stats


def _flat(z: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the components of a state into one (samples, features) matrix."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in z], dim=1)


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> State:
    out, i = [], 0
    for t in like:
        n = t[0].numel()
        out.append(flat[:, i : i + n].reshape(t.shape))
        i += n
    return tuple(out)


def relative_change(z_new: Sequence[torch.Tensor], z_old: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """Per-sample ``|z_new - z_old| / max(|z_new|, eps)`` over all components of the state."""
    # norms accumulated in float64 (a float32 state's norm cannot overflow there), few ops per call
    f64 = torch.float64
    if len(z_new) == 1:  # the common case: one component, no squares to add up
        a, b = z_new[0].reshape(z_new[0].shape[0], -1), z_old[0].reshape(z_old[0].shape[0], -1)
        num, den = torch.linalg.vector_norm(a - b, dim=1, dtype=f64), torch.linalg.vector_norm(a, dim=1, dtype=f64)
    else:  # one norm over the concatenated components: half the ops of a norm per component (small batches
        # of the active-set iteration are bound by the number of ops, not by their size)
        num, den = _norms([a - b for a, b in zip(z_new, z_old)]), _norms(z_new)
    # a state whose norm overflows has diverged: report NaN, not 0 (= finite / inf)
    return torch.where(torch.isfinite(den), num / den.clamp_min(eps), math.nan)


SOLVERS: Dict[str, Callable] = {}


def register_solver(name: str):
    """Decorator adding a solver ``fn(step, z0, stop: StopRule, **kw) -> (z, SolverStats)`` to the registry;
    it calls ``stop(iteration, per-sample relative change, stats)`` after each iteration and ends when it
    returns True."""

    def deco(fn):
        SOLVERS[name] = fn
        return fn

    return deco


class StopRule:
    """The stop rule of every solver, consulted after each iteration ``it`` with the per-sample relative
    change ``rel``: look every ``check_every`` iterations (each look synchronises a GPU) once ``min_iter``
    are done, and at ``max_iter``; stop when a sample is NaN/inf (diverged) or every sample is below ``tol``
    (converged).  ``tol=None`` is the fixed-steps mode: exactly ``max_iter`` iterations, looked at only at the
    end, where the run can only be found diverged, never converged."""

    def __init__(self, tol: Optional[float], max_iter: int, min_iter: int = 1, check_every: int = 1):
        self.tol, self.max_iter, self.min_iter, self.check_every = tol, max_iter, min_iter, check_every

    def new_stats(self) -> SolverStats:
        return SolverStats(iterations=0, residual=math.inf, converged=False, fixed=self.tol is None)

    def due(self, it: int) -> bool:
        if self.tol is None:
            return it == self.max_iter
        return it >= self.min_iter and (it % self.check_every == 0 or it == self.max_iter)

    def done(self, rel: torch.Tensor) -> torch.Tensor:
        """Per sample: below ``tol`` (all False in the fixed-steps mode)."""
        return rel < self.tol if self.tol is not None else torch.zeros_like(rel, dtype=torch.bool)

    def __call__(self, it: int, rel: torch.Tensor, stats: SolverStats) -> bool:
        """Record ``it`` in ``stats``; True when the solve stops here (``stats`` then says why).  A NaN/inf
        anywhere in a state makes its relative change NaN/inf, so ``rel`` alone tells both outcomes."""
        stats.iterations = it
        if not self.due(it):
            return False
        worst = float(rel.max())  # one host synchronisation; max propagates NaN
        if not math.isfinite(worst):
            stats.diverged = True
            return True
        if self.tol is not None and worst < self.tol:
            stats.converged = True
            return True
        return False


LEFT = ".grad and parameters were left untouched"


def check_divergence(what: str, stats: Optional[SolverStats] = None, *, who: str = "", tol: Optional[float] = None,
                     max_residual: Optional[float] = None, require_converged: bool = False, finite: bool = True,
                     left: str = LEFT, advice: str = "", on_fail: str = "raise", stacklevel: int = 2) -> bool:
    """The divergence policy of lcp_meta, used by every caller that accepts or refuses a solve or an update.

    A result is refused when the dynamics turned NaN/inf (``stats.diverged`` or a non-finite residual), when
    the update computed from them is not finite (``finite=False``), when the final relative residual exceeds
    ``max_residual`` ("did not settle"), or, with ``require_converged``, when the solve missed ``tol``.  A
    refusal raises :class:`DivergenceError` (``on_fail="raise"``) or warns (``"warn"``) with one line naming
    the residual and what was left untouched (``stacklevel`` as for the caller's own ``warnings.warn``);
    returns True when the result is accepted.  Callers refuse
    before they write anything, so a refused batch never changes ``.grad`` or the parameters."""
    res = math.nan if stats is None else stats.residual
    if stats is not None and (stats.diverged or not math.isfinite(res)):
        state = f"diverged ({stats.reason})" if stats.reason else "turned NaN/inf"
    elif not finite:
        state = "turned NaN/inf"
    elif stats is not None and max_residual is not None and res > max_residual:
        state = "did not settle"
    elif stats is not None and require_converged and not stats.converged:
        state = "did not converge"
    else:
        return True
    msg = f"{who}: " if who else ""
    msg += f"{what} {state}"
    if stats is not None:
        bound = (f", max_residual {max_residual:.1e}" if max_residual is not None
                 else f", tol {tol:.1e}" if tol is not None else "")
        msg += f" after {stats.iterations} iterations (relative residual {res:.3e}{bound})"
    msg += f"; {left}" + (f". {advice}" if advice else "")
    if on_fail == "warn":
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel + 1)
        return False
    raise DivergenceError(msg, stats)


def _norms(z: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample norm of a state over all its components (in float64), one norm over their concatenation."""
    n = z[0].shape[0]
    return torch.linalg.vector_norm(torch.cat([t.reshape(n, -1) for t in z], 1), dim=1, dtype=torch.float64)


class DivergenceGuard:
    """Stops a solve that is diverging while its state is still finite, instead of letting it run on to
    ``max_iter`` (or to inf): a linear iteration whose Jacobian has spectral radius > 1 (an RBP adjoint on an
    rnn that has left its contracting regime) grows geometrically, and its last iterate is garbage however it
    is clipped.  A sample is diverging when its state norm exceeds ``growth`` times its reference norm (the
    larger of the norms of its start and of its first iterate: an adjoint starts at ``b``, a controlled state
    at 0), or when its relative change rose at ``rising`` consecutive checks (None: that test off).  Consulted
    at the stop rule's checks (and after the first step, which sets the reference); the solve then ends with
    ``stats.diverged`` and a ``stats.reason``, which the divergence policy reports with the residual."""

    def __init__(self, growth: Optional[float] = 1e6, rising: Optional[int] = None):
        if growth is not None and not (math.isfinite(growth) and growth > 1):
            raise ValueError(f"DivergenceGuard growth must be a finite number > 1 (or None), got {growth}")
        if rising is not None and (int(rising) != rising or rising < 1):
            raise ValueError(f"DivergenceGuard rising must be an integer >= 1 (or None), got {rising}")
        self.growth, self.rising = growth, None if rising is None else int(rising)

    def start(self, z0: Sequence[torch.Tensor]) -> None:
        b = z0[0].shape[0]
        self.ref = _norms(z0)
        self.prev = torch.full((b,), math.inf, dtype=torch.float64, device=z0[0].device)
        self.ups = torch.zeros(b, dtype=torch.long, device=z0[0].device)

    def check(self, it: int, z: Sequence[torch.Tensor], rel: torch.Tensor,
              rows: Optional[torch.Tensor] = None) -> Optional[str]:
        """``z``/``rel``: the state and relative change of the samples ``rows`` (None: all); returns why the
        solve is diverging, or None."""
        n = _norms(z)
        if it == 1:  # rows is None at the first step: every sample iterates
            self.ref = torch.maximum(self.ref, n)
        bad = torch.zeros_like(rel, dtype=torch.bool)
        if self.growth is not None:
            ref = self.ref if rows is None else self.ref[rows]
            ratio = n / ref.clamp_min(1e-300)
            bad = bad | (ratio > self.growth)
        if self.rising is not None:
            prev = self.prev if rows is None else self.prev[rows]
            ups = torch.where(rel > prev, (self.ups if rows is None else self.ups[rows]) + 1, 0)
            if rows is None:
                self.prev, self.ups = rel.clone(), ups
            else:
                self.prev.index_copy_(0, rows, rel)
                self.ups.index_copy_(0, rows, ups)
            bad = bad | (ups >= self.rising)
        if not bool(bad.any()):  # one host synchronisation per check
            return None
        if self.growth is not None and bool((ratio > self.growth).any()):
            return f"its norm grew to {float(ratio.max()):.1e} times its start, limit {self.growth:.0e}"
        return f"its relative change rose at {self.rising} consecutive checks"


def _guard_stops(guard: Optional[DivergenceGuard], it: int, stop: StopRule, z, rel, stats: SolverStats,
                 rows: Optional[torch.Tensor] = None) -> bool:
    """Consult ``guard`` after the first step and at the stop rule's checks; a diverging solve is marked in
    ``stats`` (``diverged`` and ``reason``)."""
    if guard is None or not (it == 1 or stop.due(it)):
        return False
    stats.reason = guard.check(it, z, rel, rows) or ""
    if stats.reason:
        stats.diverged = True
    return bool(stats.reason)


@register_solver("euler")
def euler(step: StepFn, z0: State, stop: StopRule, freeze_converged: bool = True, active_set: bool = False,
          guard: Optional[DivergenceGuard] = None, rescue: Optional["StallRescue"] = None) -> Tuple[State, SolverStats]:
    """Plain iteration of the step map (forward Euler on the dynamics).

    With ``freeze_converged`` a sample whose relative change fell below ``tol`` keeps its state while
    the others go on, so a sample's result does not depend on the rest of its batch.

    ``active_set`` (for step maps whose samples are independent, i.e. no batch norm in training mode):
    the same per-sample stopping, computed on the samples still iterating only.  ``step(z, rows)`` is then
    called with the state of those samples and ``rows``, their indices in the batch (None: all of them), so
    that the map can pick its per-sample constants; a sample leaves at the check where its relative change is
    below ``tol``.  The cost is the sum of the per-sample iteration counts instead of batch x slowest sample;
    ``stats.iterations`` is the slowest sample's count and ``stats.mean_iterations`` the mean.

    ``guard``: a :class:`DivergenceGuard` that ends the solve as diverged once it is growing.

    ``rescue`` (with ``active_set`` only): a :class:`StallRescue` that is handed the samples whose relative change
    stopped falling; the samples it solves go on from its state, the others exactly as without it.
    """
    if rescue is not None and not active_set:
        raise ValueError("euler: a stall rescue needs active_set=True (it replaces single samples' states)")
    if active_set:
        return _euler_active(step, z0, stop, guard, rescue)
    z = tuple(z0)
    done = torch.zeros(z[0].shape[0], dtype=torch.bool, device=z[0].device)
    rel = torch.full((z[0].shape[0],), math.inf, dtype=torch.float64, device=z[0].device)
    stats = stop.new_stats()
    if guard is not None:
        guard.start(z)
    for it in range(1, stop.max_iter + 1):
        z_new = step(z)
        if freeze_converged and it > 1:
            z_new = tuple(torch.where(done.view(-1, *([1] * (a.dim() - 1))), b, a) for a, b in zip(z_new, z))
            rel = torch.where(done, rel, relative_change(z_new, z))
        else:
            rel = relative_change(z_new, z)
        z = z_new
        if freeze_converged and stop.due(it):
            done = done | stop.done(rel)
        if stop(it, rel, stats):
            break
        if _guard_stops(guard, it, stop, z, rel, stats):
            break
    stats.per_sample = rel.detach().cpu()
    stats.residual = float(stats.per_sample.max()) if stats.per_sample.numel() else 0.0
    return z, stats


def _euler_active(step, z0: State, stop: StopRule, guard: Optional[DivergenceGuard],
                  rescue: Optional["StallRescue"] = None) -> Tuple[State, SolverStats]:
    """:func:`euler` with ``active_set``: iterate the compacted state of the samples still iterating; a sample's
    state is written back into the batch when it leaves (and the rest at the end), so that an iteration costs
    the step map on the active rows and nothing else."""
    z = tuple(z0)
    b, dev = z[0].shape[0], z[0].device
    rows = None  # indices of the samples still iterating (None: all)
    za = z  # their state, compacted
    rel = torch.full((b,), math.inf, dtype=torch.float64, device=dev)  # final relative change per sample
    count = torch.zeros(b, dtype=torch.long, device=dev)  # iterations each sample took
    rel_a = rel
    stats = stop.new_stats()
    if guard is not None:
        guard.start(z)
    if rescue is not None:
        rescue.start(b, dev)
    for it in range(1, stop.max_iter + 1):
        zn = tuple(step(za, rows))
        rel_a = relative_change(zn, za)
        za = zn
        if stop(it, rel_a, stats):  # converged: every sample still iterating is below tol (the others were)
            break
        if _guard_stops(guard, it, stop, za, rel_a, stats, rows):
            break
        if stop.due(it):
            keep = ~stop.done(rel_a)
            if not bool(keep.all()):
                idx = torch.arange(b, device=dev) if rows is None else rows
                if rows is None:  # the first samples leave: from now on z holds the batch (our own copy)
                    z = tuple(torch.empty_like(t) for t in za)
                left = idx[~keep]
                for t, n in zip(z, za):
                    t.index_copy_(0, left, n[~keep])
                rel.index_copy_(0, left, rel_a[~keep])
                count.index_fill_(0, left, it)
                rows, za, rel_a = idx[keep], tuple(t[keep] for t in za), rel_a[keep]
            if rescue is not None and rescue.next_look <= it < stop.max_iter:
                za = rescue.look(step, za, rel_a, torch.arange(b, device=dev) if rows is None else rows, it)
    if rows is None:
        z, rel = za, rel_a
    else:
        for t, n in zip(z, za):
            t.index_copy_(0, rows, n)
        rel.index_copy_(0, rows, rel_a)
    count.index_fill_(0, torch.arange(b, device=dev) if rows is None else rows, stats.iterations)
    stats.mean_iterations = float(count.double().mean())
    stats.per_sample = rel.detach().cpu()
    stats.residual = float(stats.per_sample.max()) if stats.per_sample.numel() else 0.0
    return z, stats


class StallRescue:
    """Hands the samples of an active-set Euler iteration that stopped settling to another solver.

    A sample *stalls* when its relative change has not fallen by ``factor`` over the last ``window`` iterations,
    looked at every ``window`` iterations from ``min_iter`` on (at the stop rule's checks).  Each stalled sample
    is handed (at most ``tries`` times, at successive looks) to ``solve(step, z, rows) -> (z_new, ok)``: ``z``
    the stalled samples' states, ``rows`` their indices in the batch (for ``step(z, rows)``), ``ok`` which of
    them it solved; a solved sample goes on from
    ``z_new`` (the Euler iteration then tests the step map there, so the stop rule is unchanged), the others
    from their own state, as without a rescue.  When at most ``tail`` samples are left at a look (after the
    first), they are all handed over: the iteration of the last few samples costs as much per step as a full
    batch's (it is bound by the number of ops), whether they stalled or not.  ``handed``: how many samples were
    handed over."""

    def __init__(self, solve: Callable, window: int = 50, min_iter: int = 50, factor: float = 0.5, tries: int = 1,
                 tail: int = 0):
        for key, val in (("window", window), ("min_iter", min_iter), ("tries", tries)):
            if int(val) != val or val < 1:
                raise ValueError(f"StallRescue {key} must be an integer >= 1, got {val!r}")
        if not 0 < factor < 1:
            raise ValueError(f"StallRescue factor must be in (0, 1), got {factor!r}")
        self.solve, self.window, self.min_iter, self.factor = solve, int(window), int(min_iter), float(factor)
        self.tries, self.tail = int(tries), int(tail)
        self.handed = 0

    def start(self, b: int, device) -> None:
        """A new solve of a batch of ``b`` samples."""
        self.next_look = self.min_iter
        self.ref = torch.full((b,), math.inf, dtype=torch.float64, device=device)  # relative change at the last look
        self.tried = torch.zeros(b, dtype=torch.long, device=device)  # times handed over

    def look(self, step, za: State, rel_a: torch.Tensor, idx: torch.Tensor, it: int) -> State:
        """At iteration ``it``: the state ``za`` of the active samples ``idx`` (indices in the batch), with the
        stalled ones' replaced where solved."""
        self.next_look = it + self.window
        stalled = rel_a > self.factor * self.ref[idx]  # (first look: ref inf, none)
        if idx.numel() <= self.tail and self.ref[idx].isfinite().all():  # the last few: all of them
            stalled = torch.ones_like(stalled)
        stalled = stalled & (self.tried[idx] < self.tries)
        self.ref[idx] = rel_a
        if not bool(stalled.any()):  # one host synchronisation per look
            return za
        sel = torch.nonzero(stalled)[:, 0]
        self.tried[idx[sel]] += 1
        self.handed += sel.numel()
        new, ok = self.solve(step, tuple(t[sel] for t in za), idx[sel])
        if not bool(ok.any()):
            return za
        where = sel[ok]  # out of place: the step map's outputs are not ours to write into
        return tuple(t.index_copy(0, where, n[ok].to(t.dtype)) for t, n in zip(za, new))


def newton_rows(residual: Callable, x0: torch.Tensor, consts: Sequence[torch.Tensor] = (),
                accept: Optional[Callable] = None, max_jacobians: int = 10, max_steps: Optional[int] = None,
                halvings: int = 6, stall: int = 3, c1: float = 1e-4,
                jacobian: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """Newton's method on ``residual(x, *consts) = 0`` for every row of ``x`` (rows independent, ``x`` of shape
    (n, d), ``consts`` per-row tensors), each row with its own dense d x d Jacobian (forward mode,
    ``torch.func.jacfwd`` vmapped over the rows, or ``jacobian(x, *consts)`` when the caller has a closed form)
    and its own backtracking line search on ``|residual|``.

    The Jacobian is the cost (d forward-mode passes against one for a residual), so a row keeps its LU factors
    while a full step with them at least halves ``|residual|`` (the chord method, which near a root converges
    nearly as fast), and gets a fresh Jacobian otherwise.  ``accept(x, rows) -> bool per row`` decides when a row
    is solved (the caller's own stop rule; default: ``|residual| == 0``); it is consulted before every step.  A
    row fails when, with a fresh Jacobian, it is singular or ``halvings`` halvings give no sufficient decrease,
    when ``|residual|`` did not halve over its last ``stall`` Jacobians (no root in reach: e.g. a local minimum
    of ``|residual|`` at a singular Jacobian), or after ``max_jacobians`` Jacobians or ``max_steps`` steps
    (default ``4 max_jacobians``); it keeps its last iterate.  Returns ``(x, ok, counts)``: ``ok`` per row,
    ``counts`` the total ``steps`` and ``jacobians`` over the rows."""
    n, dev = x0.shape[0], x0.device
    max_steps = 4 * max_jacobians if max_steps is None else max_steps
    x = x0.clone()
    ok = torch.zeros(n, dtype=torch.bool, device=dev)

    def one(xr, *cr):  # a single row, for the Jacobian
        return residual(xr[None], *(c[None] for c in cr))[0]

    jac = jacobian or torch.func.vmap(torch.func.jacfwd(one), in_dims=(0,) + (0,) * len(consts))
    f = residual(x, *consts)
    norm = torch.linalg.vector_norm(f, dim=1).double()
    at_jac = torch.full((n, max_jacobians + 1), math.nan, dtype=torch.float64, device=dev)  # |r| at each Jacobian
    jacs = torch.zeros(n, dtype=torch.long, device=dev)
    lu = x.new_zeros(n, x.shape[1], x.shape[1])
    piv = torch.zeros(n, x.shape[1], dtype=torch.int32, device=dev)
    fresh = torch.ones(n, dtype=torch.bool, device=dev)  # the next step needs a new Jacobian
    usable = torch.ones(n, dtype=torch.bool, device=dev)
    live, steps = torch.arange(n, device=dev), 0
    for k in range(max_steps + 1):
        if live.numel() == 0:
            break
        done = accept(x[live], live) if accept is not None else norm[live] == 0
        ok[live[done]] = True
        live = live[~done]
        if k == max_steps or live.numel() == 0:
            break
        live = live[~(fresh[live] & (jacs[live] >= max_jacobians))]  # out of Jacobians: those rows stop here
        new = live[fresh[live]]
        if new.numel():
            f_lu, p_lu, info = torch.linalg.lu_factor_ex(jac(x[new], *(c[new] for c in consts)))
            lu[new], piv[new] = f_lu, p_lu
            usable[new] = info == 0
            at_jac[new, jacs[new]] = norm[new]
            jacs[new] += 1
            # no halving of |r| over the last `stall` Jacobians: give up on the row
            back = jacs[new] - 1 - stall
            far = torch.where(back >= 0, at_jac[new, back.clamp_min(0)], math.inf)
            live = live[~torch.isin(live, new[norm[new] > 0.5 * far])]
        if live.numel() == 0:
            break
        cl = tuple(c[live] for c in consts)
        dx = torch.linalg.lu_solve(lu[live], piv[live], -f[live][..., None])[..., 0]
        use = usable[live] & torch.isfinite(dx).all(1)
        dx = torch.where(use[:, None], dx, 0)
        f0 = norm[live]
        t = torch.ones(live.numel(), dtype=x.dtype, device=dev)
        for j in range(halvings + 1):
            xn = x[live] + t[:, None] * dx
            fn = residual(xn, *cl)
            nn = torch.linalg.vector_norm(fn, dim=1).double()
            good = use & (nn <= (1 - c1 * t.double()) * f0)  # (NaN compares False)
            if bool((good | ~use).all()) or j == halvings or not bool(fresh[live].all()):
                break  # (a chord step is tried at full length only: a fresh Jacobian is cheaper than halvings)
            t = torch.where(good, t, t / 2)
        steps += live.numel()
        moved = live[good]
        x[moved], f[moved], norm[moved] = xn[good], fn[good], nn[good]
        failed = ~good & fresh[live]  # (a failed chord step just gets a fresh Jacobian)
        # keep the factors after a full step that at least halved |r|; else a fresh Jacobian next time
        fresh[live] = ~(good & (t == 1) & (nn <= 0.5 * f0))
        live = live[~failed]
    return x, ok, {"steps": steps, "jacobians": int(jacs.sum())}


class RowCache:
    """Per-sample constants of a step map used with ``active_set``, gathered for the active rows once per change
    of the active set (the solver passes the same ``rows`` tensor until a sample leaves), not at every step."""

    def __init__(self, *full: torch.Tensor):
        self.full, self.rows, self.cur = full, None, full

    def __call__(self, rows: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        if rows is None:
            return self.full
        if rows is not self.rows:
            self.rows, self.cur = rows, tuple(t.index_select(0, rows) for t in self.full)
        return self.cur


@register_solver("anderson")
def anderson(step: StepFn, z0: State, stop: StopRule, m: int = 5, beta: float = 1.0,
             reg: float = 1e-10) -> Tuple[State, SolverStats]:
    """Anderson acceleration (type II) of the step map, per sample.

    Keeps the last ``m`` step-map outputs g_k = step(x_k) and residuals r_k = g_k - x_k, and takes the
    affine combination of the outputs whose combined residual has the least norm (a small regularised
    least-squares problem per sample).  It has the same fixed points as plain iteration.  The buffers are
    ring buffers updated in place: per step only one row is written (the step map is the cost, not this).
    """
    like = tuple(z0)
    x = _flat(like)
    B, D = x.shape
    dt, dev = x.dtype, x.device
    X = x.new_zeros(B, m, D) if beta != 1 else None  # past inputs (only needed for damping)
    G = x.new_zeros(B, m, D)  # past step-map outputs
    R = x.new_zeros(B, m, D)  # past residuals
    H = torch.zeros(B, m + 1, m + 1, dtype=dt, device=dev)  # bordered normal equations, filled per step
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    rhs = torch.zeros(B, m + 1, 1, dtype=dt, device=dev)
    rhs[:, 0] = 1
    eye = torch.eye(m, dtype=dt, device=dev)
    stats = stop.new_stats()
    rel = torch.full((B,), math.inf, dtype=torch.float64, device=dev)
    gx = _flat(step(_unflat(x, like)))
    G[:, 0], R[:, 0] = gx, gx - x
    if X is not None:
        X[:, 0] = x
    x = gx
    stats.iterations = 1
    for k in range(1, stop.max_iter):
        gx = _flat(step(_unflat(x, like)))
        n, j = min(k + 1, m), k % m
        G[:, j] = gx
        torch.sub(gx, x, out=R[:, j])
        if X is not None:
            X[:, j] = x
        Rn = R[:, :n]
        # minimise |sum_i a_i r_i| subject to sum_i a_i = 1; regularise relative to the residuals' scale,
        # which shrinks by many orders as the solve converges
        RR = Rn @ Rn.transpose(1, 2)
        scale = RR.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(dt).tiny)
        H[:, 1:n + 1, 1:n + 1] = RR + (reg * scale)[:, None, None] * eye[:n, :n]
        sol, info = torch.linalg.solve_ex(H[:, :n + 1, :n + 1], rhs[:, :n + 1])
        alpha = sol[:, 1:n + 1, 0]  # (B, n)
        # a singular system (residuals exactly zero or collinear): take the plain step for that sample
        bad = (info != 0) | ~torch.isfinite(alpha).all(1)
        alpha = torch.where(bad[:, None], eye[j, :n], alpha)
        x_new = (alpha[:, None] @ G[:, :n])[:, 0]
        if X is not None:
            x_new = beta * x_new + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        # the fixed-point residual of the point just evaluated is the honest stop criterion
        rel = (torch.linalg.vector_norm(R[:, j], dim=1).double()
               / torch.linalg.vector_norm(gx, dim=1).double().clamp_min(1e-12))
        x = x_new
        if stop(k + 1, rel, stats):
            break
    # return the evaluated point of the step map whose relative change ``rel`` is, converged or not (at the cap the
    # extrapolation x_new was never evaluated: its residual is unknown)
    x = gx
    stats.per_sample = rel.detach().cpu()
    stats.residual = float(stats.per_sample.max())
    return _unflat(x, like), stats


def solve(step: StepFn, z0: Sequence[torch.Tensor], *, solver: str = "euler", tol: Optional[float] = 1e-6,
          max_iter: int = 800, min_iter: int = 1, check_every: int = 1, raise_on_fail: bool = False,
          name: str = "dynamics", **kwargs) -> Tuple[State, SolverStats]:
    """Run ``step`` from ``z0`` to a fixed point with the named solver, without building a graph.

    Args:
        step: the step map; takes and returns a tuple of tensors with a shared leading sample dim.
        z0: the initial state.
        solver: a key of :data:`SOLVERS` (``"euler"`` or ``"anderson"``).
        tol: per-sample relative-change threshold of the stop rule; ``None``: exactly ``max_iter`` steps
            (a fixed-steps run, reported with ``fixed=True`` and ``converged=False``).
        max_iter: iteration cap.
        min_iter: iterations to run before the stop rule is consulted.
        check_every: consult the stop rule every this many iterations (each check synchronises a GPU).
        raise_on_fail: apply :func:`check_divergence`: raise :class:`DivergenceError` when the solve diverges
            (NaN/inf) or (with a ``tol``) does not converge, instead of only flagging it in the statistics.
        **kwargs: the solver's options, e.g. euler's ``active_set`` (then ``step(z, rows)``) and ``guard``.
    Returns:
        ``(z_star, stats)``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    if not isinstance(z0, (tuple, list)) or not z0 or not all(isinstance(t, torch.Tensor) for t in z0):
        raise TypeError("z0 must be a non-empty tuple of tensors sharing a leading sample dimension")
    if max_iter < 1 or (tol is not None and not tol > 0):
        raise ValueError(f"expected max_iter >= 1 and tol > 0 (or None), got max_iter={max_iter}, tol={tol}")
    with torch.no_grad():
        z, stats = SOLVERS[solver](step, tuple(z0), StopRule(tol, max_iter, min_iter, check_every), **kwargs)
    if raise_on_fail:
        check_divergence(name, stats, tol=tol, require_converged=tol is not None, left="parameters were left untouched")
    return z, stats
