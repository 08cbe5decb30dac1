"""The meta-learning interface: statistics, the meta half of the method template, the base class of methods.

A method owns a model whose trainable parameters are the meta-parameters ``omega``.
:meth:`MetaMethod.meta_backward` accumulates the mean-over-tasks meta-gradient into ``.grad`` exactly
like ``loss.backward()``, so any ``torch.optim`` optimizer can step afterwards.  All tasks of a batch
are processed together with :func:`torch.func.vmap` (``vmap=False`` loops over tasks instead).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.method import ON_DIVERGENCE, GradientMethod, Gradients, Stats, check_number
from ..core.solvers import SolverStats, check_divergence, solve
from ..core.tree import Tree, tree_detach, tree_expand, tree_finite, tree_norm, tree_pack, tree_zeros_like
from ..data.tasks import TaskBatch, cast_to, check_support
from .dynamics import SAFETY, iterate, power_iteration, relax_map
from .functional import check_vmappable, make_loss, make_model_fn, split_model, task_map
from .inner_problem import InnerProblem

__all__ = ["TaskBatch", "MetaStats", "MetaGradient", "MetaMethod", "check_positive"]


def check_prediction_target(pred: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse targets that would broadcast against the model's predictions (one task's ``(N, *out)``).

    Regression (floating) targets must have the prediction's shape; class labels (integer) must have its shape
    without the last (class) dim.  ``(N,)`` targets against ``(N, 1)`` predictions would otherwise give an
    ``(N, N)`` loss and a wrong meta-gradient with only a warning.  Shapes are static, so this also holds under
    vmap and the function transforms (there ``pred`` and ``y`` are one task's tensors).
    """
    want = pred.shape if y.is_floating_point() else pred.shape[:-1]
    if y.shape != want:
        kind = "regression targets (floating)" if y.is_floating_point() else "class labels (integer)"
        raise ValueError(f"targets of shape {tuple(y.shape)} do not match the model's predictions of shape "
                         f"{tuple(pred.shape)} (per task): {kind} must have shape {tuple(want)}; reshape y, "
                         f"e.g. y.unsqueeze(-1) for (N,) regression targets of a one-output model")


def checked_loss(loss_fn: Callable) -> Callable:
    """``loss_fn`` that first checks the target shape against the prediction (:func:`check_prediction_target`)."""

    def loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_prediction_target(pred, y)
        return loss_fn(pred, y)

    return loss


# ------------------------------------------------------------------------------------ statistics
@dataclass(eq=False)
class MetaStats(Stats):
    """What one meta-step did; each value is a mean over the tasks of the batch unless noted.

    inner_loss_before / inner_loss_after: support loss l_in at omega / at the adapted parameters.
    query_loss_before / query_loss_after: query loss l_out at omega / at the adapted parameters (for the
        single-phase LCP controllers the adapted state is the controlled one, O(beta) from the free one).
    control_norm: |psi*|, the norm of the control (0 for methods without a controller).
    iterations: steps of the dynamics (all phases).
    converged: every task met the residual tolerance ``tol`` and stayed finite.  A run with ``tol=None``
        (a fixed number of steps, e.g. ``lcp-truncated``) is never reported as converged; the unrolled
        methods (MAML, FOMAML, Reptile) compute exactly what they define after their K steps.
    residual: the largest final residual, maximum over tasks (max of inner_residual and control_residual).
    inner_residual: ``|f(phi) + beta u| / |f(omega)|``, the inner force left at the returned state relative to
        the force at omega (maximum over tasks); None for unrolled methods.
    control_residual: ``|(Hess l_in + lam) u + grad l_out| / |grad l_out|`` at the returned state (LCP with the
        dynamic-inversion or energy-based controller; for iMAML the conjugate-gradient residual of the same
        system; LCP's first-order controllers: ``|u + grad l_out| / |grad l_out|``, the residual of their own
        control u = -grad l_out, 0 for the direct one; maximum over tasks); None where there is no such system
        (MAML family, CML).
    meta_grad_norm: norm of the accumulated mean meta-gradient of the model parameters.
    extra: method-specific numbers (CG residual, lam, step sizes, Hessian-vector products, ...).
    """

    inner_loss_before: float = math.nan
    inner_loss_after: float = math.nan
    query_loss_before: float = math.nan
    query_loss_after: float = math.nan
    control_norm: float = 0.0
    iterations: int = 0
    converged: bool = True
    residual: float = 0.0
    inner_residual: Optional[float] = None
    control_residual: Optional[float] = None
    meta_grad_norm: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


@dataclass
class MetaGradient:
    """What a meta-learning method returns to the template (:meth:`MetaMethod._gradients`).

    grads: mean-over-tasks meta-gradient, a tree like the meta-parameters.
    solver: SolverStats of its dynamics (``phase`` "inner" / "control" names what failed).
    stats: its MetaStats; the template fills the losses before (at omega) and after (at ``phi``) and the norms.
    phi: the task-batched state the "after" losses are measured at (None: none, e.g. diverged).
    lam_grads: mean lam-gradient tree (methods with an implicit lam-gradient), or None.
    """

    grads: Tree
    solver: SolverStats
    stats: MetaStats
    phi: Optional[Tree] = None
    lam_grads: Optional[Tree] = None


def _softplus_inv(x: float) -> float:
    if x <= 0:
        raise ValueError(f"lam must be positive when learned, got {x}")
    return x + math.log(-math.expm1(-x))


def check_positive(name: str, value, allow_none: bool = False, allow_zero: bool = False) -> None:
    """One-line ValueError unless ``value`` is a finite real number > 0 (>= 0 with allow_zero)."""
    check_number(name, value, sign="nonnegative" if allow_zero else "positive", allow_none=allow_none)


AUTO = "auto"
# default residual tolerance of the equilibrium methods, by dtype (float32 cannot resolve much below 1e-5)
DEFAULT_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------------ base class
class MetaMethod(GradientMethod, nn.Module):
    """Base of every meta-learning method.

    Args:
        model: the learner; its trainable parameters are the meta-parameters omega.  It is called as
            ``functional_call(model, {**params, **buffers}, x)``.
        loss_fn: per-task loss ``loss_fn(pred, target) -> scalar`` (l_in on support, l_out on query).
        inner_lr: step size eta of the inner gradient dynamics.  None (the default of the equilibrium
            methods): ``1 / (1.25 lam_max)`` with lam_max a power-iteration estimate of the largest
            eigenvalue of ``Hess l_in(omega) + lam`` (``power_iters`` Hessian-vector products per task),
            with heavy-ball momentum ``(1 - sqrt(inner_lr lam))^2`` and a guard that halves the step
            whenever the inner energy rises without momentum.
        inner_steps: the cap on the number of steps of each phase (exactly this many when ``tol=None``).
        lam: strength of the proximal regulariser ``lam/2 |phi - omega|^2`` of the inner problem.
        momentum: heavy-ball momentum of the inner dynamics with a given ``inner_lr`` (0: gradient descent).
        tol: residual tolerance: the equilibrium methods stop when every task's relative residual
            (see :class:`MetaStats`) is below it.  Default ``"auto"``: 1e-6 in float64, 1e-4 in float32
            (equilibrium methods), None (unrolled methods).  ``None``: run exactly ``inner_steps`` (a
            truncated run: accumulated, but reported with ``converged=False`` and its residuals).
        learn_lam: False, ``"scalar"`` or ``"per_param"``: learn lam (kept positive through softplus).
        vmap: map over tasks with torch.func.vmap (False: a Python loop, same numbers).
        on_divergence: ``"raise"`` a DivergenceError or ``"warn"`` when the dynamics turn NaN or do not
            meet ``tol``; either way ``.grad`` is left untouched.
        solver: ``"auto"`` (the residual-stopped loops of :mod:`lcp_meta.meta.dynamics`), ``"euler"`` (for
            LCP: the single-phase joint dynamics from omega) or ``"anderson"`` (the fixed-point solver of
            :mod:`lcp_meta.core.solvers`, stopping on the relative change of the state).
        power_iters: Hessian-vector products of the eigenvalue estimate behind the automatic step.
    """

    name = "base"
    supports_learned_lam = True
    proximal = True  # the inner problem has lam/2 |phi - omega|^2 by default (the registry's ``is_proximal``)
    equilibrium = True  # stops on a residual tolerance by default (False: unrolled, fixed length)

    def __init__(self, model: nn.Module, loss_fn: Callable = F.mse_loss, *, inner_lr: Optional[float] = None,
                 inner_steps: int = 2000, lam: float = 1.0, momentum: float = 0.0, tol=AUTO,
                 learn_lam=False, vmap: bool = True, on_divergence: str = "raise", solver: str = "auto",
                 power_iters: int = 8):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(pred, target) -> scalar")
        check_positive("inner_lr", inner_lr, allow_none=True)
        if isinstance(inner_steps, bool) or int(inner_steps) != inner_steps or int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if tol != AUTO:
            check_positive("tol", tol, allow_none=True)
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if on_divergence not in ON_DIVERGENCE:
            raise ValueError(f"on_divergence must be one of {ON_DIVERGENCE}, got {on_divergence!r}")
        if solver not in ("auto", "euler", "anderson", "heavy-ball"):
            raise ValueError(f"solver must be 'auto', 'euler', 'heavy-ball' or 'anderson', got {solver!r}")
        if isinstance(power_iters, bool) or int(power_iters) < 1:
            raise ValueError(f"power_iters must be an integer >= 1, got {power_iters!r}")
        if learn_lam not in (False, None, "scalar", "per_param"):
            raise ValueError(f"learn_lam must be False, 'scalar' or 'per_param', got {learn_lam!r}")
        if learn_lam and not self.supports_learned_lam:
            raise ValueError(f"{type(self).__name__} has no implicit lam-gradient; use learn_lam=False")
        # the proximal problem needs lam > 0 (its curvature); unrolled methods may use lam = 0
        check_positive("lam", lam, allow_zero=not (self.equilibrium or learn_lam))
        self.model = model
        self.loss_fn = loss_fn
        self.inner_lr = float(inner_lr) if inner_lr is not None else None
        self.inner_steps, self.momentum = int(inner_steps), float(momentum)
        if tol == AUTO and not self.equilibrium:
            tol = None
        self.tol, self.use_vmap, self.on_divergence, self.solver = tol, bool(vmap), on_divergence, solver
        self.power_iters = int(power_iters)
        self.learn_lam = learn_lam or False
        self._lam = float(lam)
        params, _ = split_model(model)
        self._names = list(params)
        if self.learn_lam == "scalar":
            self.lam_raw = nn.Parameter(torch.tensor(_softplus_inv(lam), dtype=params[self._names[0]].dtype,
                                                     device=params[self._names[0]].device))
        elif self.learn_lam == "per_param":
            # a ParameterList in the order of the model's parameters (dots are not allowed as dict keys)
            self.lam_raw = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), _softplus_inv(lam)))
                                             for p in params.values()])

    # ------------------------------------------------------------------------------- lam handling
    def lam_tree(self, params: Tree) -> Tree:
        """Current lam for every parameter tensor (a scalar tensor, or per element), detached."""
        with torch.no_grad():
            if self.learn_lam == "scalar":
                lam = F.softplus(self.lam_raw)
                return {k: lam.to(p.dtype) for k, p in params.items()}
            if self.learn_lam == "per_param":
                return {k: F.softplus(r).to(p.dtype) for (k, p), r in zip(params.items(), self.lam_raw)}
            return {k: torch.tensor(self._lam, dtype=p.dtype, device=p.device) for k, p in params.items()}

    @property
    def lam(self):
        """Current lam: a float, or (learned per parameter) a dict name -> tensor."""
        if self.learn_lam == "scalar":
            return float(F.softplus(self.lam_raw.detach()))
        if self.learn_lam == "per_param":
            return self.lam_tree(split_model(self.model)[0])
        return self._lam

    def tol_for(self, dtype: torch.dtype) -> Optional[float]:
        """The residual tolerance in effect for data of ``dtype`` (None: a fixed number of steps)."""
        if self.tol == AUTO:
            return DEFAULT_TOL.get(dtype, 1e-6)
        return self.tol

    # ------------------------------------------------------------------------------- plumbing
    def _system(self) -> Tuple[InnerProblem, Tree]:
        params, consts = split_model(self.model)
        if list(params) != self._names:
            raise ValueError("the model's trainable parameters changed since the method was built: "
                             f"expected {self._names}, got {list(params)}")
        if self.use_vmap:
            check_vmappable(self.model)
        model_fn = make_model_fn(self.model, consts)
        return InnerProblem(make_loss(model_fn, checked_loss(self.loss_fn)), model_fn, self.use_vmap), params

    def _prepare(self, tasks) -> TaskBatch:
        tb = TaskBatch.coerce(tasks)
        p = next(iter(split_model(self.model)[0].values()))
        return tb.to(p.device, p.dtype)

    def _tmap(self, fn, in_dims):
        return task_map(fn, in_dims, self.use_vmap)

    def _dynamics(self, step, state: Tuple[torch.Tensor, ...], name: str, tol=AUTO, max_iter=None):
        """Run a task-batched step map with the fixed-point solvers of :mod:`lcp_meta.core.solvers`
        (stop rule: relative change of the state); returns (state, SolverStats).

        ``tol=None`` runs exactly ``max_iter`` steps (reported as not converged).  No autograd graph is
        kept across steps.
        """
        return solve(step, state, name=name, **self._solve_settings(state[0].dtype, tol, max_iter))

    def _solve_settings(self, dtype: torch.dtype, tol=AUTO, max_iter=None) -> dict:
        """``tol``, ``max_iter`` and ``solver`` of :func:`lcp_meta.core.solvers.solve` for this method's dynamics
        (``tol=None``: the solvers' fixed-steps mode, exactly max_iter steps, reported fixed, not converged)."""
        tol = self.tol_for(dtype) if tol == AUTO else tol
        return dict(tol=tol, max_iter=self.inner_steps if max_iter is None else int(max_iter),
                    solver="anderson" if self.solver == "anderson" and tol is not None else "euler")

    def _mu(self, lam: Tree) -> float:
        """The smallest lam: the curvature of the proximal problem where Hess l_in >= 0."""
        return float(min(float(v.min()) for v in lam.values()))

    def _auto_step(self, system: InnerProblem, phi: Tree, lam: Tree, xs, ys) -> Tuple[torch.Tensor, torch.Tensor]:
        """(per-task step 1 / (SAFETY lam_max), lam_max) from a power-iteration estimate at ``phi``."""
        lmax = self._tmap(lambda p, x, y: power_iteration(system, p, lam, x, y, self.power_iters),
                          (0, 0, 0))(phi, xs, ys)
        # power iteration finds the eigenvalue of largest MAGNITUDE: where Hess l_in has a negative curvature
        # larger than its largest positive one (a BatchNorm conv net at its initialisation) the Rayleigh quotient
        # is negative, and its magnitude, the spectral radius, is what bounds a stable gradient step
        lmax = torch.nan_to_num(lmax, nan=float("inf")).abs().clamp_min(self._mu(lam))
        return 1.0 / (SAFETY * lmax), lmax

    def _relax(self, system: InnerProblem, omega: Tree, lam: Tree, xs, ys, phi0: Optional[Tree] = None,
               beta: float = 0.0, xq=None, yq=None, steps: Optional[int] = None, shift: Optional[Tree] = None,
               scale: Optional[torch.Tensor] = None, reuse: Optional[dict] = None):
        """Relax the inner problem ``l_in + lam/2 |phi - omega|^2 [+ beta l_out]`` from ``phi0`` (default
        omega) with gradients only, until the residual ``|grad E| / |grad E(phi0)|`` is below tol.

        Returns (phi, SolverStats, info) where info holds the per-task step ``a``, momentum ``m``,
        ``lmax`` (None with a given inner_lr), ``scale`` = |grad E(phi0)|, ``hvps`` (power iteration) and
        ``grad_e`` = grad E at the returned phi (evaluated by the last step already: no further gradient).
        ``shift``: a constant per-task force c added to f (the energy gets ``- <c, phi>``); ``scale``: the
        residual's denominator (default |grad E(phi0)|); ``reuse``: the info of an earlier relaxation
        (its step and momentum are kept, no new eigenvalue estimate).
        """
        T = xs.shape[0]
        if phi0 is None:
            phi0 = tree_expand(omega, T)
        ref = next(iter(phi0.values()))
        mu = self._mu(lam)
        info = {"lmax": None, "hvps": 0}
        if reuse is not None:
            a, m = reuse["a"], reuse["m"]
        elif self.inner_lr is None:
            a, info["lmax"] = self._auto_step(system, phi0, lam, xs, ys)
            info["hvps"] = self.power_iters
            m = torch.zeros_like(a)  # the adaptive relaxation's state: the momentum of the last step (none yet)
        else:
            a = torch.full((T,), self.inner_lr, dtype=ref.dtype, device=ref.device)
            m = torch.full((T,), self.momentum, dtype=ref.dtype, device=ref.device)
        nudged = beta != 0.0
        one = relax_map(system, omega, lam, mu, adaptive=self.inner_lr is None, beta=beta)
        data = (xs, ys, xq, yq) if nudged else (xs, ys, xs, ys)
        if shift is not None:
            data = data + (shift,)
        mapped = self._tmap(one, (0,) * (7 + len(data)))
        inf = torch.full((T,), float("inf"), dtype=ref.dtype, device=ref.device)
        scale0 = torch.full_like(inf, float("nan")) if scale is None else scale.to(ref.dtype)
        state, rebuild = tree_pack([phi0, tree_zeros_like(phi0), dict(phi0), inf, a, m, scale0])

        def step(z):
            new, res, g = mapped(*rebuild(z), *data)
            return tree_pack(new)[0], res, g

        tol = self.tol_for(ref.dtype)
        z, st, _, grad_e = iterate(step, state, tol, self.inner_steps if steps is None else int(steps), aux=True)
        phi, _, _, _, a, m, scale = rebuild(z)
        if tol is None and not self.equilibrium:
            st.converged = not st.diverged  # an unrolled method's K steps are its definition
        info.update(a=a, m=m, scale=scale, grad_e=grad_e)
        return phi, st, info

    def _anderson_lr(self, system: InnerProblem, omega: Tree, lam: Tree, xs, ys) -> float:
        """The step of the gradient map that ``solver="anderson"`` accelerates: ``inner_lr``, or where it is not
        given the smallest of the tasks' automatic steps at omega (one step for the batch: Anderson's map is
        shared; its fixed point does not depend on the step, only whether the map is stable does)."""
        if self.inner_lr is not None:
            return self.inner_lr
        steps, _ = self._auto_step(system, tree_expand(omega, xs.shape[0]), lam, xs, ys)
        return float(steps.min())

    def _free(self, system: InnerProblem, omega: Tree, lam: Tree, xs, ys):
        """The free inner equilibrium phi* of l_in(phi) + lam/2 |phi - omega|^2, from phi = omega."""
        if self.solver == "anderson":
            return system.free_equilibrium(omega, lam, xs, ys, lr=self._anderson_lr(system, omega, lam, xs, ys),
                                           momentum=self.momentum,
                                           **self._solve_settings(next(iter(omega.values())).dtype))
        phi, st, _ = self._relax(system, omega, lam, xs, ys)
        return phi, st

    # ------------------------------------------------------------------------------- failures
    def _advice(self, tb: Optional[TaskBatch], phase: str, stats: SolverStats) -> str:
        """The likely cause of a failure, from what actually went wrong."""
        if getattr(stats, "indefinite", False):
            return (f"likely cause: Hess l_in + lam is not positive definite at the inner solution (lam="
                    f"{self._lam}), so the control has no stable equilibrium there: raise lam")
        if tb is not None:
            bad = [n for n in ("x_support", "y_support", "x_query", "y_query")
                   if getattr(tb, n).is_floating_point() and not bool(torch.isfinite(getattr(tb, n)).all())]
            if bad:
                return (f"likely cause: non-finite data ({', '.join(bad)} contain NaN/inf); clean the task "
                        "batch (hyper-parameters cannot fix this)")
        stalled = stats.residual is not None and math.isfinite(stats.residual) and stats.residual >= 1
        if not stats.diverged and stalled and phase == "inner" and self.inner_lr is not None:
            # bounded but no nearer the solution than at the start: more steps will not help
            return (f"likely cause: the inner dynamics made no progress (relative residual {stats.residual:.3g} >= 1, "
                    f"its value at the start): inner_lr={self.inner_lr} is likely past their stability limit "
                    "(inner_lr * largest eigenvalue of Hess l_in + lam must stay below 2): lower inner_lr, or leave "
                    "it unset for a step from a power-iteration estimate")
        if not stats.diverged:
            tol = self.tol_for(next(iter(split_model(self.model)[0].values())).dtype)
            # with the automatic step already on, a residual that stalls points at the loss, not the step: a ReLU
            # learner's inner loss has kinks where the gradient never vanishes (docs/results.md)
            other = ("leave inner_lr unset for the accelerated automatic step" if self.inner_lr is not None else
                     "if the residual plateaus (a ReLU learner's inner loss has kinks where no tolerance is met), "
                     "use a smooth activation such as tanh")
            return (f"likely cause: too few steps: raise inner_steps (the cap, now {self.inner_steps}) or tol "
                    f"(now {tol}), or {other}")
        if phase == "inner":
            if self.inner_lr is not None:
                return (f"likely cause: inner_lr={self.inner_lr} is past the stability limit of the free inner "
                        "dynamics (inner_lr * largest eigenvalue of Hess l_in + lam must stay below 2): lower "
                        "inner_lr, or leave it unset for a step from a power-iteration estimate")
            return (f"likely cause: the inner problem has no stable minimum near omega at lam={self._lam}: "
                    "raise lam")
        psi_lr = getattr(self, "psi_lr_given", None)
        beta = getattr(self, "beta", None)
        if psi_lr is not None:
            return f"likely cause: psi_lr={psi_lr} is too large for the control dynamics: lower psi_lr or leave it unset"
        if beta is not None and beta >= self._lam:
            return (f"likely cause: beta={beta} is large against lam={self._lam} (the control feeds beta u back "
                    "into the inner dynamics): lower beta")
        return (f"likely cause: Hess l_in + lam is not positive definite at the inner solution (lam={self._lam}): "
                "raise lam" + (f", or lower inner_lr={self.inner_lr}" if self.inner_lr is not None else ""))

    def _fail(self, what: str, stats: SolverStats, tb: Optional[TaskBatch] = None,
              phase: str = "inner", stacklevel: int = 3):
        """Report non-finite or unconverged dynamics (raise or warn); never touches ``.grad``."""
        p = next(iter(split_model(self.model)[0].values()))
        check_divergence(what, stats, who=self.name, tol=self.tol_for(p.dtype), require_converged=True,
                         left=".grad of the meta-parameters was left untouched", advice=self._advice(tb, phase, stats),
                         on_fail=self.on_divergence, stacklevel=stacklevel)

    # ------------------------------------------------------------------------------- public API
    def meta_backward(self, tasks) -> MetaStats:
        """Accumulate the mean-over-tasks meta-gradient into ``.grad`` of :meth:`parameters`.

        Returns the :class:`MetaStats` of the step.  When the dynamics diverge, or miss ``tol``, nothing
        is accumulated (DivergenceError, or a warning with ``on_divergence="warn"``).  With ``tol=None``
        (a fixed number of steps) the result is accumulated and reported with ``converged=False``.
        """
        return self._backward(self._prepare(tasks))

    def _gradients(self, tb: TaskBatch) -> Gradients:
        """The template's meta half: statistics common to every method (losses before and after, norms),
        the convergence verdict and lam's chain rule, around the method's own :meth:`_meta_gradient`."""
        system, params = self._system()
        omega = tree_detach(params)
        with torch.no_grad():  # targets that would broadcast against the predictions: a clear error, not a wrong gradient
            check_prediction_target(system.model_fn(omega, tb.x_support[0]), tb.y_support[0])
            check_prediction_target(system.model_fn(omega, tb.x_query[0]), tb.y_query[0])
        out = self._meta_gradient(system, params, tb)
        grads, lam_grads, stats, sst = out.grads, out.lam_grads, out.stats, out.solver
        stats.inner_loss_before = float(system.losses(omega, tb.x_support, tb.y_support, True).mean())
        stats.query_loss_before = float(system.losses(omega, tb.x_query, tb.y_query, True).mean())
        if out.phi is not None:
            stats.inner_loss_after = float(system.losses(out.phi, tb.x_support, tb.y_support).mean())
            stats.query_loss_after = float(system.losses(out.phi, tb.x_query, tb.y_query).mean())
        finite = tree_finite(grads) and (lam_grads is None or tree_finite(lam_grads))
        phase = getattr(sst, "phase", "inner")
        requested = self.tol_for(next(iter(params.values())).dtype) is not None
        unconverged = requested and not sst.converged
        failure = None
        if sst.diverged or unconverged or not finite:
            what = {"inner": "inner dynamics", "control": "control dynamics"}.get(phase, "inner dynamics")
            if not (sst.diverged or unconverged):
                what = "meta-gradient"
            # an unconverged run is reported as such (its placeholder gradient is NaN on purpose)
            sst.diverged = sst.diverged or (not finite and not unconverged)
            stats.converged = False
            failure = (what, sst)
        else:
            if not requested:
                stats.converged = stats.converged and not self.equilibrium
            # implicit methods keep no autograd graph across inner steps (MAML reports its own)
            stats.extra.setdefault("graph_bytes", 0)
            stats.meta_grad_norm = float(tree_norm(grads))
            if self.learn_lam == "scalar":
                stats.extra["lam"] = self.lam
        names = list(params)
        targets, values = [params[k] for k in names], [grads[k] for k in names]
        if lam_grads is not None and self.learn_lam and failure is None:
            with torch.no_grad():  # chain rule through lam = softplus(raw): d lam / d raw = sigmoid(raw)
                if self.learn_lam == "scalar":
                    targets.append(self.lam_raw)
                    values.append(sum(v.sum() for v in lam_grads.values()) * torch.sigmoid(self.lam_raw))
                else:
                    for k, raw in zip(names, self.lam_raw):
                        targets.append(raw)
                        values.append(lam_grads[k].expand_as(raw) * torch.sigmoid(raw))
        return Gradients(targets, values, stats, failure)

    def _report_failure(self, what: str, stats: SolverStats, tb) -> None:
        self._fail(what, stats, tb, getattr(stats, "phase", "inner"), stacklevel=5)

    def _meta_gradient(self, system: InnerProblem, params: Tree, tb: TaskBatch) -> "MetaGradient":
        """The method's own part: its mean meta-gradient and statistics (see :class:`MetaGradient`)."""
        raise NotImplementedError

    def adapt_params(self, x_support: torch.Tensor, y_support: torch.Tensor) -> Tree:
        """Adapted parameters of a batch of tasks (the free inner solution; no query data): a dict
        name -> tensor with a leading task dim."""
        p = next(iter(split_model(self.model)[0].values()))
        xs, ys = cast_to(x_support, p.device, p.dtype), cast_to(y_support, p.device, p.dtype)
        check_support(xs, ys)
        system, params = self._system()
        phi, st = self._free(system, self._adapt_from(params), self.lam_tree(params), xs, ys)
        if st.diverged or (self.tol_for(p.dtype) is not None and not st.converged):
            self._fail("inner adaptation", st, TaskBatch(xs, ys, xs, ys))
        return phi

    def _adapt_from(self, params: Tree) -> Tree:
        """The meta-parameters omega that test-time adaptation starts from and is regularised towards: the
        current ones (a method that evaluates an average of them, e.g. CML's Polyak mean, overrides this)."""
        return tree_detach(params)

    def adapt(self, x_support: torch.Tensor, y_support: torch.Tensor) -> nn.Module:
        """An adapted copy of the model for ONE task (tensors without a task dim); the original is untouched."""
        phi = self.adapt_params(x_support.unsqueeze(0), y_support.unsqueeze(0))
        clone = copy.deepcopy(self.model)
        with torch.no_grad():
            for k, p in clone.named_parameters():
                if k in phi:
                    p.copy_(phi[k][0])
        return clone

    def predict(self, tasks) -> torch.Tensor:
        """Adapted predictions on the query inputs, with a leading task dim.

        ``tasks``: a TaskBatch (its query targets are not used) or ``(x_support, y_support, x_query)``.
        """
        if isinstance(tasks, (tuple, list)) and len(tasks) == 3:
            xs, ys, xq = tasks
        else:
            tb = TaskBatch.coerce(tasks)
            xs, ys, xq = tb.x_support, tb.y_support, tb.x_query
        p = next(iter(split_model(self.model)[0].values()))
        xq = cast_to(xq, p.device, p.dtype)
        if xq.dim() < 3 or xq.shape[0] != xs.shape[0]:
            raise ValueError(f"expected x_query of shape (tasks, queries, *x_shape) with {xs.shape[0]} tasks, "
                             f"got {tuple(xq.shape)}")
        phi = self.adapt_params(xs, ys)
        system, _ = self._system()
        with torch.no_grad():
            return self._tmap(system.model_fn, (0, 0))(phi, xq)

    def extra_repr(self) -> str:
        return (f"inner_lr={self.inner_lr or 'auto'}, inner_steps={self.inner_steps}, lam={self._lam}, "
                f"learn_lam={self.learn_lam}, tol={self.tol}, vmap={self.use_vmap}")
