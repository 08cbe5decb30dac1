"""The common interface of every supervised learning method, and the BP / RBP baselines.

A method wraps an :class:`~lcp_meta.core.system.EquilibriumModel` and turns a batch ``(x, y)`` into
gradients::

    method = make_method("lcp-di", model, alpha=0.1, k_i=1.0)
    optimizer.zero_grad()
    stats = method.backward(x, y)        # adds to p.grad for p in method.parameters(), returns StepStats
    optimizer.step(); method.after_step()

``backward`` is the shared template of :mod:`lcp_meta.core.method`: it ADDS the batch's update to ``.grad``
(like ``loss.backward()``), and only once everything has succeeded: a dynamics that turns NaN/inf (or stalls
with a relative residual above ``max_residual``) raises :class:`~lcp_meta.core.solvers.DivergenceError`
naming the residual, leaving ``.grad`` and the parameters as they were.  A method implements
:meth:`Method._gradients` (the controllers share :meth:`Method._controlled_gradients`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..core.controllers import make_controller
from ..core.method import GradientMethod, Gradients, StepStats, check_number
from ..core.solvers import SOLVERS, DivergenceGuard, RowCache, SolverStats, check_divergence, solve
from ..core.system import (LOSSES, EquilibriumModel, NetworkSystem, check_target, default_check_every, local_update,
                           output_loss, output_loss_grad)

__all__ = ["Method", "Backprop", "RecurrentBackprop", "check_finite"]


def check_finite(method: str, key: str, value, allow_inf: bool = False) -> None:
    """A hyperparameter must be a finite real number; ``allow_inf`` admits +inf where it means "no limit"."""
    check_number(key, value, who=method, allow_inf=allow_inf)


class Method(GradientMethod):
    """Base class.  ``loss``: 'ce' (cross-entropy, the official choice) or 'mse'; ``solver``: 'euler' or
    'anderson'; ``tol``/``max_iter``: stop rule of the dynamics; ``check_every``: None picks 1 on the CPU,
    10 on CUDA; ``max_residual``: a solve that ends above this relative change counts as diverged (``inf``:
    only NaN/inf does, the update is applied from the state reached); ``stop_rule``: 'per-sample' (Euler freezes
    each converged sample of a batch-independent model; samples coupled by batch norm iterate together) or
    'batch' (the whole batch iterates until its largest change is below ``tol``, as the authors' solver does)."""

    name = "method"
    # where stats["loss"] (the trainer's "train loss") is measured: an LCP method reports the loss of the controlled
    # output y*, which the controller has pushed towards the target, so it is (at a settled solve) lower than the
    # free network's loss and not comparable with BP/RBP's (the test accuracy is the comparable number)
    loss_at = "controlled output"
    structured_solvers = False  # True: the subclass also takes core.control's solvers (and checks its names itself)

    def __init__(self, model: EquilibriumModel, loss: str = "ce", solver: str = "euler", tol: float = 1e-6,
                 max_iter: int = 800, check_every: Optional[int] = None, max_residual: float = 1e-2,
                 stop_rule: str = "per-sample"):
        if not isinstance(model, EquilibriumModel):
            raise TypeError(f"{self.name} needs an EquilibriumModel (from build_model), got {type(model).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        for key, val in (("tol", tol), ("max_iter", max_iter)):
            check_finite(self.name, key, val)
        check_finite(self.name, "max_residual", max_residual, allow_inf=True)
        if stop_rule not in ("per-sample", "batch"):
            raise ValueError(f"{self.name}: stop_rule must be 'per-sample' or 'batch', got {stop_rule!r}")
        self.stop_rule = stop_rule
        if solver not in SOLVERS and not self.structured_solvers:
            raise ValueError(f"{self.name}: unknown solver {solver!r}; expected one of {sorted(SOLVERS)} (auto, sweep, "
                             f"reduced, warm-anderson and euler-flat are LCP-DI/DI-KP's)")
        if tol <= 0 or int(max_iter) < 1 or max_residual <= 0:
            raise ValueError(f"expected tol > 0, max_iter >= 1, max_residual > 0; got {tol}, {max_iter}, {max_residual}")
        self.model, self.loss, self.solver = model, loss, solver
        self.tol, self.max_iter, self.check_every, self.max_residual = float(tol), int(max_iter), check_every, max_residual
        self.feedback = nn.Module()  # feedback weights / matrices the method owns (KP: B, LF: Q)

    # ---- interface
    def parameters(self) -> List[nn.Parameter]:
        """Everything the optimizer steps: the model's parameters and the method's feedback weights."""
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.feedback.parameters())

    def after_step(self) -> None:
        """Hook run after ``optimizer.step()`` (no-op unless a method needs one)."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep beyond the model's parameters."""
        return {"feedback": self.feedback.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.feedback.load_state_dict(state.get("feedback", {}))

    def to(self, device) -> "Method":
        self.feedback.to(device)
        return self

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Add the batch's update to ``.grad`` of :meth:`parameters`; returns the statistics."""
        return self._backward((x, y))

    def _gradients(self, batch) -> Gradients:
        """The controllers' shared path (BP and RBP override it): controlled equilibrium -> local update."""
        return self._controlled_gradients(*batch)

    # ---- the controllers' shared path: controlled equilibrium -> local update -> statistics
    controller: Optional[str] = None  # the registered controller (core.controllers) whose dynamics this method runs

    def controlled_equilibrium(self, c, target):
        """The controlled equilibrium and its solver statistics, from the network driver of the registered
        controller :attr:`controller` (no graph: ``c`` is detached)."""
        system = NetworkSystem(self.model, c.detach(), self._fb())
        return make_controller(self.controller).equilibrium(self, system, target)

    def _fb(self):
        """Replacements for transposed forward weights in the VJPs (None: the true transposes; KP: its B)."""
        return None

    def _update(self, c, v, e, u, params):
        """The local update ``-(dg/dtheta)^T e* - (dh/dtheta)^T u*`` (KP routes it through feedback weights)."""
        return local_update(self.model, c, v, e, u, params)

    def _control_stats(self, target, v, yc, e, u, stats: SolverStats, **extra) -> StepStats:
        with torch.no_grad():
            out = StepStats(loss=float(output_loss(yc, target, self.loss)),
                            output_loss=float(output_loss(self.model.h(v), target, self.loss)),
                            control_norm=float(torch.sqrt(e.pow(2).sum() + u.pow(2).sum())), beta=self.beta)
        out.update(extra)
        out.update(stats.as_dict())
        return out

    def _extra_stats(self, c, target, v, yc) -> dict:
        """Statistics a controller adds to the shared ones (EBD: its energy)."""
        return {}

    def _controlled_gradients(self, x, y) -> Gradients:
        """Solve the controlled equilibrium (``self.controlled_equilibrium``) and return its local update."""
        x, target = self._prepare(x, y)
        with torch.enable_grad():
            c = self.model.encode(x)
        (v, yc, e, u), stats = self.controlled_equilibrium(c, target)
        params = self.parameters()
        grads = self._update(c, v, e, u, params)
        with torch.no_grad():
            extra = self._extra_stats(c.detach(), target, v, yc)
        return Gradients(params, grads, self._control_stats(target, v, yc, e, u, stats, **extra))

    # ---- helpers
    def _prepare(self, x, y):
        x = self.model.check_input(x)
        return x, check_target(y, x.shape[0], self.model.num_classes, x.device)

    def _solve(self, step, z0, what: str, solver: Optional[str] = None, **kw):
        if (solver or self.solver) == "euler":
            # a sample frozen while batch norm still couples it to its moving batch-mates would not be at the
            # joint equilibrium: the per-sample rule freezes only on a batch-independent model (as RBP's does)
            kw.setdefault("freeze_converged", self.samples_leave)
        z, stats = solve(step, z0, solver=solver or self.solver, tol=self.tol, max_iter=self.max_iter,
                         check_every=self.check_every or default_check_every(z0[0].device), name=what, **kw)
        self._check(stats, what)
        return z, stats

    @property
    def samples_leave(self) -> bool:
        """The per-sample stop rule on a batch-independent model: a converged sample may leave the plain
        iteration (active set; the same per-sample result at the cost of the sum of per-sample counts)."""
        return self.stop_rule == "per-sample" and self.model.batch_independent

    def _check(self, stats: SolverStats, what: str) -> None:
        check_divergence(what, stats, who=self.name, max_residual=self.max_residual)

    def _model_params(self) -> List[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


class Backprop(Method):
    """BP: backpropagation through the feedforward net.  For a layered model the free equilibrium is
    one forward pass (``model.logits``), so this is the exact gradient of the free-equilibrium loss, at the
    cost of plain PyTorch.  Not defined for recurrent models (use 'rbp')."""

    name = "bp"
    loss_at = "network output"

    def __init__(self, model, loss="ce", **kw):
        super().__init__(model, loss=loss, **kw)
        if not model.layered:
            raise ValueError(f"bp needs a layered (feedforward) model such as 'ff' or 'conv-ff'; "
                             f"{type(model).__name__} is recurrent: use 'rbp'")

    def _gradients(self, batch):
        x, y = self._prepare(*batch)
        params = self._model_params()
        with torch.enable_grad():  # plain autograd through the layers: no state vector, no solver
            loss = output_loss(self.model.logits(x, update_stats=True), y, self.loss)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
        return Gradients(params, grads, StepStats(loss=float(loss.detach()), iterations=self.model.depth,
                                                  residual=0.0, converged=True, control_norm=0.0))


class RecurrentBackprop(Method):
    """RBP (recurrent backprop / Almeida-Pineda / implicit differentiation): free fixed point
    ``v* = g(c, v*)``, then the adjoint fixed point ``a = J_g(v*)^T a + J_h(v*)^T grad l`` and
    ``grad = (dh/dtheta)^T grad l + (dg/dtheta)^T a``.  Spec settings: 200 iterations, tolerance 1e-4.

    Stop rule: ``stop_rule='batch'`` is the authors' (the whole batch iterates until its largest relative
    change is below ``tol``; the paper preset).  The default 'per-sample' applies the same tolerance to each
    sample: on a batch-independent model (no batch norm in training mode) a converged sample leaves the
    iteration (active set), so the cost is the sum of the per-sample counts instead of batch x slowest.

    Divergence guard on the adjoint: once the network has left its contracting regime (rho(J_g) >= 1) the
    adjoint grows geometrically; the solve stops as soon as its norm exceeds ``guard_growth`` times its
    start, or its relative change rose at ``guard_rising`` consecutive checks (None: off), and the batch
    raises :class:`~lcp_meta.core.solvers.DivergenceError` (the trainer skips and counts it) instead of running
    on to inf and handing a garbage gradient to the clipping and the optimizer."""

    name = "rbp"
    loss_at = "network output"

    def __init__(self, model, loss="ce", tol=1e-4, max_iter=200, guard_growth: Optional[float] = 1e6,
                 guard_rising: Optional[int] = None, **kw):
        super().__init__(model, loss=loss, tol=tol, max_iter=max_iter, **kw)
        DivergenceGuard(guard_growth, guard_rising)  # (validates the settings now, with a one-line error)
        self.guard_growth, self.guard_rising = guard_growth, guard_rising

    def _gradients(self, batch):
        x, y = self._prepare(*batch)
        m, params = self.model, self._model_params()
        with torch.enable_grad():
            c = m.encode(x)
        cd = c.detach()
        euler = self.solver == "euler"
        active = euler and self.samples_leave
        kw = {"active_set": True} if active else {"freeze_converged": False} if euler else {}

        free_rows = RowCache(cd)

        def free(z, rows=None):  # rows: the samples z holds (active set; None: the whole batch)
            return (m.g(free_rows(rows)[0], z[0]),)

        (v,), s1 = self._solve(free, (m.init_state(cd),), "free dynamics", **kw)
        with torch.no_grad():
            b = m.h_vjp(v, output_loss_grad(m.h(v), y, self.loss))
        adjoint_rows = RowCache(cd, v, b)

        def adjoint(z, rows=None):
            cr, vr, br = adjoint_rows(rows)
            return (m.g_vjp(cr, vr, z[0]) + br,)

        if euler and (self.guard_growth is not None or self.guard_rising is not None):
            kw["guard"] = DivergenceGuard(self.guard_growth, self.guard_rising)
        (a,), s2 = self._solve(adjoint, (b,), "adjoint dynamics", **kw)
        with torch.enable_grad():
            loss = output_loss(m.h(v, update_stats=True), y, self.loss)
            obj = (m.g(c, v) * a).sum() + loss
            grads = torch.autograd.grad(obj, params, allow_unused=True)
        grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
        extra = {}
        if active:  # the cost of the active-set solves: the mean per-sample count (iterations: the slowest's)
            extra["mean_iterations"] = s1.mean_iterations + s2.mean_iterations
        return Gradients(params, grads, StepStats(
            loss=float(loss.detach()), iterations=s1.iterations + s2.iterations,
            residual=max(s1.residual, s2.residual), converged=s1.converged and s2.converged,
            free_iterations=s1.iterations, adjoint_iterations=s2.iterations, control_norm=0.0, **extra))
