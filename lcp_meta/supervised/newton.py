"""Per-sample Newton for the samples of LCP-DI's reduced iteration that do not settle (issue 9).

:class:`StragglerNewton` is handed the stalled samples by the active-set Euler iteration (through
:class:`~lcp_meta.core.solvers.StallRescue`, see ``supervised/di.py``) and solves their controlled-equilibrium
equations by Newton's method (:func:`~lcp_meta.core.solvers.newton_rows`); the rnn's Jacobian is in closed form
(``RecurrentEquilibrium.fixed_point_jacobian``).
"""
from __future__ import annotations

import math

import torch

from ..core.solvers import newton_rows, relative_change

__all__ = ["StragglerNewton"]


class StragglerNewton:
    """Per-sample Newton for the samples the reduced iteration does not settle (issue 9).

    On the MNIST rnn, after a few Adam steps one or two samples per batch chatter (relative change 1e-2..1e-1)
    or creep (rate ~0.99 per step) under the reduced iteration, and alone they ran to the 800-step cap.  Their
    fixed point, where it exists, is found here by Newton's method on the same equations, in the unknowns
    ``x = (v, y)`` of one sample (``e = v - g(c, v)`` is eliminated)::

        r_v = e - J_g(v)^T e - J_h(v)^T u(y),     r_y = y - h(v) - u(y),     u(y) = -beta/B grad_y l_i(y)

    with the dense (n + classes)^2 Jacobian by forward mode (``torch.func.jacfwd``, vmapped over the stalled
    samples; in closed form where the model has one, ``fixed_point_jacobian``: the rnn; ``fb`` the KP feedback
    weights).  A sample counts as solved only where the reduced map itself (``step``) moves it by less than half
    the tolerance: the stop rule is Euler's.
    Where the Jacobian turns singular without a root (a local minimum of ``|r|``: no fixed point near that point
    of the orbit), Newton gives up after a few steps and the sample goes on as without it, until a later look
    hands it over again from elsewhere on its orbit."""

    def __init__(self, prob, max_iter: int = 10, stability: bool = False, reach: float = math.inf):
        self.model, self.c, self.fb, self.tol = prob.model, prob.c, prob.fb, prob.tol
        self.onehot, self.ce = prob.out.onehot, prob.out.loss == "ce"
        self.b = prob.out.b  # the output controller's per-sample strength (batch-mean loss)
        self.max_iter, self.stability, self.reach = max_iter, stability, reach
        self.jacobian = None  # None: torch.func.jacfwd
        if hasattr(self.model, "fixed_point_jacobian"):  # the model's closed forms (the rnn)
            self.jacobian, self.residual = _closed_form(self)
        self.handed = self.solved = self.iterations = self.jacobians = self.far = 0
        self.samples = set()  # the distinct samples handed over (a sample may be handed again at a later look)
        self.moves = []  # relative distance |x* - x0| / |x0| of each root found from the handed state
        self.rho = []  # spectral radius of the reduced map's Jacobian at each solution (with ``stability``)

    def _u(self, y, oh):
        return -self.b * ((torch.softmax(y, -1) if self.ce else y) - oh)

    def _split(self, x):
        n = math.prod(self.c.shape[1:])
        return x[:, :n].reshape(-1, *self.c.shape[1:]), x[:, n:]

    def residual(self, x, c, oh):
        m, fb = self.model, self.fb
        v, y = self._split(x)
        e = v - m.g(c, v)
        u = self._u(y, oh)
        r_v = e - m.g_vjp(c, v, e, fb) - m.h_vjp(v, u, fb)
        return torch.cat([r_v.flatten(1), y - m.h(v) - u], 1)

    def state(self, x, c):
        """The reduced map's state ``(v, e, y)`` at ``x``."""
        v, y = self._split(x)
        return v, v - self.model.g(c, v), y

    def __call__(self, step, z, rows):
        v, _, y = z
        c, oh = self.c.index_select(0, rows), self.onehot.index_select(0, rows)

        def accept(x, live):  # the Euler stop rule, with a margin: the next Euler step must stop there too
            zl = self.state(x, c[live])
            return relative_change(tuple(step(zl, rows[live])), zl) < 0.5 * self.tol

        x0 = torch.cat([v.flatten(1), y], 1)
        x, ok, counts = newton_rows(self.residual, x0, (c, oh), accept=accept, max_jacobians=self.max_iter,
                                    jacobian=self.jacobian)
        move = (torch.linalg.vector_norm(x - x0, dim=1) / torch.linalg.vector_norm(x0, dim=1).clamp_min(1e-30)).double()
        self.moves += move[ok].tolist()
        # several equilibria can exist (strong control): a root farther than `reach` (relative) from where the
        # iteration was may be another one than the iteration would settle to; such samples are left to it.  Off by
        # default: on the MNIST rnn the roots of the stragglers lie up to 0.36 away (chatter of that amplitude),
        # as far as a wrong root of a sample handed over at step 3 in the tests; the stall test itself (no halving
        # over 50 steps, from step 100 on) is what keeps samples that are still settling away from Newton
        far = ok & ~(move <= self.reach)
        self.far += int(far.sum())
        ok = ok & ~far
        self.handed += rows.numel()
        self.samples.update(rows.tolist())
        self.solved += int(ok.sum())
        self.iterations += counts["steps"]
        self.jacobians += counts["jacobians"]
        znew = self.state(x, c)
        if self.stability:
            for i in torch.nonzero(ok)[:, 0].tolist():
                self.rho.append(_spectral_radius(step, tuple(t[i:i + 1] for t in znew), rows[i:i + 1]))
        return znew, ok

    def report(self) -> dict:
        out = {"newton_samples": len(self.samples), "newton_handovers": self.handed, "newton_solved": self.solved,
               "newton_iterations": self.iterations,
               "newton_jacobians": self.jacobians, "newton_too_far": self.far,
               "newton_max_move": max(self.moves, default=0.0)}
        if self.stability:
            out["newton_unstable"] = sum(r > 1 for r in self.rho)
            out["newton_max_rho"] = max(self.rho, default=math.nan)
        return out


def _closed_form(newton):
    """``(jacobian, residual)`` of :meth:`StragglerNewton.residual` from the model's closed forms
    (``fixed_point_jacobian``, ``fixed_point_residual``; tests/test_supervised_newton.py checks them against forward
    mode and the generic residual), with the output controller's part: ``u = u(y)``, ``r_y = y - h(v) - u``::

        d r_v / d y = (d r_v / d u) du/dy,   d r_y / d v = -dh/dv,   d r_y / d y = I - du/dy"""
    m, fb = newton.model, newton.fb
    n = math.prod(newton.c.shape[1:])
    cache = {}  # M^T W, formed at the first Jacobian (most batches need none)

    def residual(x, c, oh):
        v, y = x[:, :n], x[:, n:]
        u = newton._u(y, oh)
        r_v, h = m.fixed_point_residual(c, v, u, fb)
        return torch.cat([r_v, y - h - u], 1)

    def jacobian(x, c, oh):
        v, y = x[:, :n], x[:, n:]
        u = newton._u(y, oh)
        jvv, jvu, jhv = m.fixed_point_jacobian(c, v, u, fb, cache)
        k = y.shape[1]
        eye_k = torch.eye(k, dtype=x.dtype, device=x.device)
        if newton.ce:
            p = torch.softmax(y, -1)
            dudy = -newton.b * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
        else:
            dudy = (-newton.b * eye_k).expand(x.shape[0], k, k)
        return torch.cat([torch.cat([jvv, jvu @ dudy], 2), torch.cat([-jhv, eye_k - dudy], 2)], 1)

    return jacobian, residual


def _spectral_radius(step, z, rows) -> float:
    """Largest |eigenvalue| of the Jacobian of ``step`` (one sample's state ``z``) at ``z``: below 1 the reduced
    iteration converges to this fixed point from nearby, above 1 it leaves it (chatters around it)."""
    sizes = [t[0].numel() for t in z]

    def flat_step(zf):
        parts, i = [], 0
        for t, n in zip(z, sizes):
            parts.append(zf[i:i + n].reshape(t.shape))
            i += n
        return torch.cat([t.reshape(-1) for t in step(tuple(parts), rows)])

    zf = torch.cat([t.reshape(-1) for t in z])
    J = torch.func.jacfwd(flat_step)(zf)
    return float(torch.linalg.eigvals(J.double()).abs().max())
