"""Per-sample Newton for the samples of LCP-DI's reduced iteration that do not settle (issue 9).

:class:`StragglerNewton` is handed the stalled samples by the active-set Euler iteration (through
:class:`~lcp_meta.core.solvers.StallRescue`, see ``supervised/di.py``) and solves their controlled-equilibrium
equations by Newton's method (:func:`~lcp_meta.core.solvers.newton_rows`); the tanh rnn's Jacobian is in closed form.
"""
from __future__ import annotations

import math

import torch

from ..core.solvers import newton_rows, relative_change
from ..models.networks import RecurrentEquilibrium

__all__ = ["StragglerNewton"]


class StragglerNewton:
    """Per-sample Newton for the samples the reduced iteration does not settle (issue 9).

    On the MNIST rnn, after a few Adam steps one or two samples per batch chatter (relative change 1e-2..1e-1)
    or creep (rate ~0.99 per step) under the reduced iteration, and alone they ran to the 800-step cap.  Their
    fixed point, where it exists, is found here by Newton's method on the same equations, in the unknowns
    ``x = (v, y)`` of one sample (``e = v - g(c, v)`` is eliminated)::

        r_v = e - J_g(v)^T e - J_h(v)^T u(y),     r_y = y - h(v) - u(y),     u(y) = -beta/B grad_y l_i(y)

    with the dense (n + classes)^2 Jacobian by forward mode (``torch.func.jacfwd``, vmapped over the stalled
    samples; in closed form for the tanh rnn; ``fb`` the KP feedback weights).  A sample counts as solved only
    where the reduced map itself (``step``) moves it by less than half the tolerance: the stop rule is Euler's.
    Where the Jacobian turns singular without a root (a local minimum of ``|r|``: no fixed point near that point
    of the orbit), Newton gives up after a few steps and the sample goes on as without it, until a later look
    hands it over again from elsewhere on its orbit."""

    def __init__(self, prob, max_iter: int = 10, stability: bool = False, reach: float = math.inf):
        self.model, self.c, self.fb, self.tol = prob.model, prob.c, prob.fb, prob.tol
        self.onehot, self.ce = prob.out.onehot, prob.out.loss == "ce"
        self.b = prob.out.b  # the output controller's per-sample strength (batch-mean loss)
        self.max_iter, self.stability, self.reach = max_iter, stability, reach
        self.jacobian = _tanh_rnn_jacobian(self) if _is_tanh_rnn(self.model) else None  # None: torch.func.jacfwd
        if _is_tanh_rnn(self.model):  # the same residual in a third of the torch ops (Newton's steps cost per op)
            self.residual = _tanh_rnn_residual(self)
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


def _is_tanh_rnn(model) -> bool:
    return type(model) is RecurrentEquilibrium and model.activation == "tanh"


def _tanh_rnn_jacobian(newton):
    """The Jacobian of :meth:`StragglerNewton.residual` for the tanh rnn ``g = W s(v) + c``, ``h = D s(v) + d``, in
    closed form: ~13x cheaper than forward mode on the MNIST rnn (0.6 vs 8 ms per sample on one CPU thread),
    and the Jacobian is what Newton's cost is.  With ``S = diag(s')``, ``M``, ``N`` the matrices that the VJPs
    use (``W``, ``D``, or KP's ``B^T``), ``q = M^T e + N^T u``::

        d r_v / d v = (I - S M^T)(I - W S) - diag(s'' q),   d r_v / d y = -S N^T du/dy,
        d r_y / d v = -D S,                                  d r_y / d y = I - du/dy
    The product is expanded as ``I - W S - S M^T + S (M^T W) S`` with ``M^T W`` formed once per batch: a Jacobian
    then costs elementwise operations on n x n matrices instead of an n^3 product per sample
    (tests/test_supervised_newton.py checks it against forward mode)."""
    m, fb = newton.model, newton.fb
    W, D = m.W.weight.detach(), m.readout.weight.detach()
    M = W if not fb else fb["W"].t().detach()
    N = D if not fb else fb["readout"].t().detach()
    n, k = W.shape[0], D.shape[0]
    mtw = []  # M^T W, formed at the first Jacobian (most batches need none)

    def jacobian(x, c, oh):
        v, y = x[:, :n], x[:, n:]
        s = torch.tanh(v)
        sp = 1 - s * s
        e = v - m.g(c, v)
        p = torch.softmax(y, -1) if newton.ce else None
        u = newton._u(y, oh)
        q = e @ M + u @ N
        if not mtw:
            mtw.append(M.t() @ W)
        spc = sp[:, :, None]
        jvv = spc * (mtw[0] * sp[:, None, :] - M.t()) - W * sp[:, None, :]  # S M^T W S - S M^T - W S
        jvv.diagonal(dim1=1, dim2=2).add_(1 + 2 * s * sp * q)  # + I - diag(s'' q)  (s'' = -2 s s')
        eye_k = torch.eye(k, dtype=x.dtype, device=x.device)
        dudy = (-newton.b * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) if newton.ce
                else (-newton.b * eye_k).expand(x.shape[0], k, k))
        jvy = -(sp[:, :, None] * N.t()) @ dudy
        jyv = -D * sp[:, None, :]
        return torch.cat([torch.cat([jvv, jvy], 2), torch.cat([jyv, eye_k - dudy], 2)], 1)

    return jacobian


def _tanh_rnn_residual(newton):
    """:meth:`StragglerNewton.residual` for the tanh rnn, ``s = tanh(v)``, ``e = v - W s - c``:
    ``r_v = e - S (M e + N u)`` (``M``, ``N`` as in :func:`_tanh_rnn_jacobian`), ``r_y = y - D s - d - u``."""
    m, fb = newton.model, newton.fb
    W, D = m.W.weight, m.readout.weight
    M = W if not fb else fb["W"].t()
    N = D if not fb else fb["readout"].t()
    n = W.shape[0]

    def residual(x, c, oh):
        v, y = x[:, :n], x[:, n:]
        s = torch.tanh(v)
        e = v - (torch.addmm(c, s, W.t()) if m.W.bias is None else torch.addmm(c + m.W.bias, s, W.t()))
        u = newton._u(y, oh)
        r_v = e - (1 - s * s) * torch.addmm(u @ N, e, M)
        return torch.cat([r_v, y - m.readout(s) - u], 1)

    return residual


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
