"""Fixed-point solvers for free and controlled equilibrium dynamics.

Every dynamics in lcp_meta is written as a *step map* ``z -> step(z)``: one forward-Euler step
``z + dt * F(z)`` of the continuous dynamics ``dz/dt = F(z)``.  Its fixed points are the equilibria
``F(z*) = 0``.  A state ``z`` is a tuple of tensors that share a leading *sample* dimension (data
points for the supervised networks, tasks for meta-learning); the stop rule is applied per sample.

Solvers are looked up by name in :data:`SOLVERS` (as in torchdeq) and return their statistics in a
:class:`SolverStats` instead of printing them.  They run under ``torch.no_grad()``: no autograd graph
is kept across iterations, so memory does not grow with the number of iterations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

State = Tuple[torch.Tensor, ...]
StepFn = Callable[[State], State]

__all__ = [
    "SolverStats",
    "DivergenceError",
    "SOLVERS",
    "register_solver",
    "solve",
    "relative_change",
]


@dataclass
class SolverStats:
    """What a solve did.

    iterations: number of step-map evaluations performed.
    residual:   final relative change ``|z_{t+1} - z_t| / |z_{t+1}|``, the maximum over samples.
    converged:  every sample reached ``residual < tol`` before ``max_iter``.
    diverged:   the state became NaN/inf (the solve stopped there).
    per_sample: final relative change of each sample (a CPU tensor).
    trace:      the maximum relative change after each checked iteration (for convergence plots).
    """

    iterations: int
    residual: float
    converged: bool
    diverged: bool = False
    per_sample: Optional[torch.Tensor] = None
    trace: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "iterations": self.iterations,
            "residual": self.residual,
            "converged": self.converged,
            "diverged": self.diverged,
        }


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
    num = torch.zeros(z_new[0].shape[0], dtype=torch.float64, device=z_new[0].device)
    den = torch.zeros_like(num)
    for a, b in zip(z_new, z_old):
        num += (a - b).reshape(a.shape[0], -1).double().pow(2).sum(1)
        den += a.reshape(a.shape[0], -1).double().pow(2).sum(1)
    return num.sqrt() / den.sqrt().clamp_min(eps)


SOLVERS: Dict[str, Callable] = {}


def register_solver(name: str):
    """Decorator adding a solver ``fn(step, z0, tol, max_iter, min_iter, check_every, **kw)`` to the registry."""

    def deco(fn):
        SOLVERS[name] = fn
        return fn

    return deco


def _check(rel: torch.Tensor, z: State, tol: float) -> Tuple[bool, bool]:
    """(all converged, any non-finite). One host synchronisation."""
    finite = torch.stack([torch.isfinite(t).all() for t in z]).all() & torch.isfinite(rel).all()
    flags = torch.stack([(rel < tol).all(), ~finite]).cpu()
    return bool(flags[0]), bool(flags[1])


@register_solver("euler")
def euler(step: StepFn, z0: State, tol: float, max_iter: int, min_iter: int = 1, check_every: int = 1,
          freeze_converged: bool = True, trace: bool = False) -> Tuple[State, SolverStats]:
    """Plain iteration of the step map (forward Euler on the dynamics).

    With ``freeze_converged`` a sample whose relative change fell below ``tol`` keeps its state while
    the others go on, so a sample's result does not depend on the rest of its batch.
    """
    z = tuple(z0)
    done = torch.zeros(z[0].shape[0], dtype=torch.bool, device=z[0].device)
    rel = torch.full((z[0].shape[0],), math.inf, dtype=torch.float64, device=z[0].device)
    stats = SolverStats(iterations=0, residual=math.inf, converged=False)
    for it in range(1, max_iter + 1):
        z_new = step(z)
        if freeze_converged and it > 1:
            z_new = tuple(torch.where(done.view(-1, *([1] * (a.dim() - 1))), b, a) for a, b in zip(z_new, z))
        rel = torch.where(done, rel, relative_change(z_new, z))
        z = z_new
        stats.iterations = it
        if it >= min_iter and (it % check_every == 0 or it == max_iter):
            done = done | (rel < tol)
            conv, bad = _check(rel, z, tol)
            if trace:
                stats.trace.append(float(rel.max()))
            if bad:
                stats.diverged = True
                break
            if conv:
                stats.converged = True
                break
    stats.per_sample = rel.detach().cpu()
    stats.residual = float(stats.per_sample.max()) if stats.per_sample.numel() else 0.0
    return z, stats


@register_solver("anderson")
def anderson(step: StepFn, z0: State, tol: float, max_iter: int, min_iter: int = 1, check_every: int = 1,
             m: int = 5, beta: float = 1.0, reg: float = 1e-10, trace: bool = False) -> Tuple[State, SolverStats]:
    """Anderson acceleration (type II) of the step map, per sample.

    Keeps the last ``m`` iterates x_k and residuals r_k = step(x_k) - x_k, and takes the affine
    combination of the step-map outputs whose combined residual has the least norm (a small
    regularised least-squares problem per sample).  It has the same fixed points as plain iteration.
    """
    like = tuple(z0)
    x = _flat(like)
    B, D = x.shape
    X = x.new_zeros(B, m, D)  # past inputs
    G = x.new_zeros(B, m, D)  # past step-map outputs
    stats = SolverStats(iterations=0, residual=math.inf, converged=False)
    rel = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    gx = _flat(step(_unflat(x, like)))
    X[:, 0], G[:, 0] = x, gx
    x = gx
    stats.iterations = 1
    for k in range(1, max_iter):
        gx = _flat(step(_unflat(x, like)))
        n = min(k + 1, m)
        X[:, k % m], G[:, k % m] = x, gx
        F = (G[:, :n] - X[:, :n])  # residuals, (B, n, D)
        # minimise |sum_i a_i F_i| subject to sum_i a_i = 1 via the bordered normal equations
        H = torch.zeros(B, n + 1, n + 1, dtype=x.dtype, device=x.device)
        H[:, 0, 1:] = H[:, 1:, 0] = 1
        FF = F @ F.transpose(1, 2)
        # regularise relative to the residuals' scale: they shrink by many orders as the solve converges
        scale = FF.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(x.dtype).tiny)
        H[:, 1:, 1:] = FF + (reg * scale)[:, None, None] * torch.eye(n, dtype=x.dtype, device=x.device)
        y = torch.zeros(B, n + 1, 1, dtype=x.dtype, device=x.device)
        y[:, 0] = 1
        sol, info = torch.linalg.solve_ex(H, y)
        alpha = sol[:, 1 : n + 1, 0]  # (B, n)
        # a singular system (residuals exactly zero or collinear): take the plain step for that sample
        bad = (info != 0) | ~torch.isfinite(alpha).all(1)
        plain = torch.nn.functional.one_hot(torch.tensor(k % m, device=x.device), n).to(alpha.dtype)
        alpha = torch.where(bad[:, None], plain, alpha)
        x_new = beta * (alpha[:, None] @ G[:, :n])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        # the fixed-point residual of the point just evaluated is the honest stop criterion
        rel = (gx - x).double().norm(dim=1) / gx.double().norm(dim=1).clamp_min(1e-12)
        x = x_new
        stats.iterations = k + 1
        if k + 1 >= min_iter and ((k + 1) % check_every == 0 or k + 1 == max_iter):
            conv, bad = _check(rel, (x,), tol)
            if trace:
                stats.trace.append(float(rel.max()))
            if bad:
                stats.diverged = True
                break
            if conv:
                stats.converged = True
                x = gx  # return an evaluated point of the step map
                break
    stats.per_sample = rel.detach().cpu()
    stats.residual = float(stats.per_sample.max())
    return _unflat(x, like), stats


def solve(step: StepFn, z0: Sequence[torch.Tensor], *, solver: str = "euler", tol: float = 1e-6,
          max_iter: int = 800, min_iter: int = 1, check_every: int = 1, raise_on_fail: bool = False,
          name: str = "dynamics", **kwargs) -> Tuple[State, SolverStats]:
    """Run ``step`` from ``z0`` to a fixed point with the named solver, without building a graph.

    Args:
        step: the step map; takes and returns a tuple of tensors with a shared leading sample dim.
        z0: the initial state.
        solver: a key of :data:`SOLVERS` (``"euler"`` or ``"anderson"``).
        tol: per-sample relative-change threshold of the stop rule.
        max_iter: iteration cap.
        min_iter: iterations to run before the stop rule is consulted.
        check_every: consult the stop rule every this many iterations (each check synchronises a GPU).
        raise_on_fail: raise :class:`DivergenceError` when the solve diverges (NaN/inf) or does not
            converge, instead of only flagging it in the returned statistics.
    Returns:
        ``(z_star, stats)``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    if not isinstance(z0, (tuple, list)) or not z0 or not all(isinstance(t, torch.Tensor) for t in z0):
        raise TypeError("z0 must be a non-empty tuple of tensors sharing a leading sample dimension")
    if max_iter < 1 or tol <= 0:
        raise ValueError(f"expected max_iter >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
    with torch.no_grad():
        z, stats = SOLVERS[solver](step, tuple(z0), tol=tol, max_iter=max_iter, min_iter=min_iter,
                                   check_every=check_every, **kwargs)
    if raise_on_fail and (stats.diverged or not stats.converged):
        what = "turned NaN/inf" if stats.diverged else "did not converge"
        raise DivergenceError(
            f"{name} {what} after {stats.iterations} iterations (relative residual {stats.residual:.3e}, "
            f"tol {tol:.1e}); parameters were left untouched", stats)
    return z, stats
