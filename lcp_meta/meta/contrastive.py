"""Contrastive meta-learning (Zucchet et al. 2022): equilibrium propagation on the inner problem.

Two phases: the free equilibrium phi_0 of E(phi) = l_in(phi) + lam/2 |phi - omega|^2, then the nudged
equilibrium phi_beta of E + beta l_out, started from phi_0.  The meta-gradient is the finite difference
of dE/d omega between the phases, ``lam (phi_0 - phi_beta) / beta``, which tends to the implicit
hypergradient as beta -> 0 (``symmetric`` nudging, +beta and -beta, cancels the O(beta) bias).
lam's gradient is likewise ``(|phi_beta - omega|^2 - |phi_0 - omega|^2) / (2 beta)`` per element.

Polyak averaging (``polyak_start``) is what the authors' few-shot code does (smonsays/contrastive-meta-learning,
``fewshot/train.py``: ``meta_train`` folds the parameters into ``params_polyak_data`` after every outer step once
``epoch >= polyak_start``, and the ``__main__`` epoch loop tests a copy of the classifier that carries the mean):
a running mean of the META-parameters omega over the outer steps, used only where the method is evaluated
(``adapt``/``predict``: adaptation starts from, and is regularised towards, the mean).  The inner phases and the
meta-gradient are untouched: each phase's end point is its last inner iterate there too, not an average.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import MetaGradient, MetaMethod, MetaStats, check_positive
from .functional import split_model
from ..core.tree import tree_norm

__all__ = ["ContrastiveMeta"]


class ContrastiveMeta(MetaMethod):
    """Contrastive meta-learning / equilibrium propagation.

    Args (beyond :class:`MetaMethod`):
        beta: nudging strength of the second phase.
        symmetric: nudge with +beta and -beta and difference the two (a third phase, O(beta^2) bias).
        nudged_steps: steps of the nudged phase (default: inner_steps; the cap when tol is set).
        polyak_start: None (default: no averaging) or the outer step from which the meta-parameters are averaged
            (Polyak-Ruppert: the mean of omega after outer steps polyak_start, polyak_start + 1, ...);
            ``adapt``/``predict`` then adapt from that mean.  An outer step is one accepted ``meta_backward``
            followed by the optimizer's step: the iterate after it is folded in at the next ``meta_backward``,
            ``adapt`` or ``predict`` (so evaluate after ``opt.step()``, never between the two).
        polyak_restart: None (default: the uniform mean above) or R >= 1: every R outer steps from polyak_start on,
            the mean's count restarts, so that the mean so far weighs as much as one iterate.  This is what the
            authors' script computes with its epochs of R steps (its counter is an int handed to ``meta_train``
            by value, so each epoch starts again from count 1 and also re-folds the epoch's first iterate):
            in effect a mean over the last epoch.  Use it to reproduce their runs; it is not Polyak-Ruppert.
            Their Omniglot commands (``--polyak_start=4``, 125 batches per epoch, of which 124 give an outer step)
            are ``polyak_start=496, polyak_restart=124``.
    The averaging state lives in buffers of the method (``method.state_dict()`` carries it across checkpoints;
    the model's own state_dict does not).
    """

    name = "cml"

    def __init__(self, model, loss_fn=None, *, beta: float = 0.1, symmetric: bool = False,
                 nudged_steps: Optional[int] = None, polyak_start: Optional[int] = None,
                 polyak_restart: Optional[int] = None, **kwargs):
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        super().__init__(model, **kwargs)
        check_positive("beta", beta)
        if nudged_steps is not None and (isinstance(nudged_steps, bool) or int(nudged_steps) != nudged_steps
                                         or int(nudged_steps) < 1):
            raise ValueError(f"nudged_steps must be an integer >= 1, got {nudged_steps!r}")
        self.beta, self.symmetric = float(beta), bool(symmetric)
        self.nudged_steps = int(nudged_steps) if nudged_steps is not None else None
        self.polyak_start = _count_or_none("polyak_start", polyak_start, 0, "the outer step the average starts at")
        self.polyak_restart = _count_or_none("polyak_restart", polyak_restart, 1,
                                             "outer steps between restarts of the mean's count")
        if self.polyak_restart is not None and self.polyak_start is None:
            raise ValueError(f"polyak_restart={polyak_restart!r} needs polyak_start (the averaging is off without it)")
        if self.polyak_start is not None:
            for i, p in enumerate(split_model(model)[0].values()):
                self.register_buffer(f"polyak_mean_{i}", torch.zeros_like(p.detach()))
            # outer steps taken (accepted meta-gradients), iterates in the current mean, last step folded in
            # and the last step whose count was restarted (polyak_restart)
            for name, init in (("polyak_steps", 0), ("polyak_count", 0), ("polyak_last", -1), ("polyak_restarted", -1)):
                self.register_buffer(name, torch.tensor(init, dtype=torch.long))

    # ------------------------------------------------------------------------------- Polyak averaging
    def _polyak_fold(self, params) -> None:
        n = int(self.polyak_count) + 1
        with torch.no_grad():
            for i, p in enumerate(params.values()):
                mean = getattr(self, f"polyak_mean_{i}")
                mean.add_((p.detach() - mean) / n)  # running mean: the first iterate is copied exactly
        self.polyak_count.fill_(n)

    def _polyak_observe(self, stepping: bool = False) -> None:
        """Fold the current meta-parameters (the iterate after ``polyak_steps`` outer steps) into the mean,
        once per outer step, from ``polyak_start`` on.  ``stepping``: a meta-step starts from this iterate."""
        step = int(self.polyak_steps)
        if step < self.polyak_start:
            return
        params = split_model(self.model)[0]
        if int(self.polyak_last) < step:
            self._polyak_fold(params)
            self.polyak_last.fill_(step)
        restart = self.polyak_restart is not None and (step - self.polyak_start) % self.polyak_restart == 0
        if stepping and restart and int(self.polyak_restarted) < step:
            # the authors' next epoch begins: the mean counts as one iterate and this iterate is folded again
            # (at the end of training there is no next epoch, so an evaluation never sees this second fold)
            self.polyak_count.fill_(1)
            self._polyak_fold(params)
            self.polyak_restarted.fill_(step)

    def polyak_params(self):
        """The averaged meta-parameters (a dict name -> tensor, detached; the current iterate is folded in first,
        once per outer step), or None when averaging is off or has not started (fewer than ``polyak_start`` outer
        steps).  A learned lam is not averaged (the authors learn none)."""
        if self.polyak_start is None:
            return None
        self._polyak_observe()
        if int(self.polyak_count) == 0:
            return None
        names = split_model(self.model)[0]
        return {k: getattr(self, f"polyak_mean_{i}").detach() for i, k in enumerate(names)}

    def meta_backward(self, tasks) -> MetaStats:
        if self.polyak_start is None:
            return super().meta_backward(tasks)
        self._polyak_observe(stepping=True)  # the iterate the previous outer step produced
        stats = super().meta_backward(tasks)
        if getattr(self, "accumulated", False):  # an update the optimizer will take (none after a divergence)
            self.polyak_steps.add_(1)
        stats.extra["polyak_count"] = int(self.polyak_count)
        return stats

    def _adapt_from(self, params):
        """Test-time adaptation starts from the averaged meta-parameters once averaging has started."""
        omega = self.polyak_params()
        return super()._adapt_from(params) if omega is None else omega

    def _meta_gradient(self, system, params, tb):
        omega = {k: v.detach() for k, v in params.items()}
        lam, beta = self.lam_tree(params), self.beta
        stats = MetaStats()
        if self.solver == "anderson":
            phi0, st = self._free(system, omega, lam, tb.x_support, tb.y_support)
        else:
            phi0, st, info0 = self._relax(system, omega, lam, tb.x_support, tb.y_support)
        total = st.iterations
        ends = []
        for b in ((beta, -beta) if self.symmetric else (beta,)):
            if st.diverged:
                break
            if self.solver == "anderson":
                settings = self._solve_settings(next(iter(omega.values())).dtype, max_iter=self.nudged_steps)
                lr = self._anderson_lr(system, omega, lam, tb.x_support, tb.y_support)
                phib, stb = system.free_equilibrium(omega, lam, tb.x_support, tb.y_support, lr=lr,
                                                    momentum=self.momentum, phi0=phi0, beta=b, xq=tb.x_query,
                                                    yq=tb.y_query, name="CML nudged phase", **settings)
            else:
                # residual relative to |f(omega)|, the scale of the inner problem (the nudged phase starts
                # with a force of only beta |grad l_out|); same step and momentum as the free phase
                phib, stb, _ = self._relax(system, omega, lam, tb.x_support, tb.y_support, phi0=phi0, beta=b,
                                           xq=tb.x_query, yq=tb.y_query, steps=self.nudged_steps,
                                           scale=info0["scale"], reuse=info0)
            ends.append(phib)
            total += stb.iterations
            stb.converged = stb.converged and st.converged
            stb.residual = max(stb.residual, st.residual)
            st = stb
        st.iterations = total
        stats.iterations, stats.residual, stats.converged = st.iterations, st.residual, bool(st.converged)
        stats.inner_residual = st.residual  # the largest over the free and nudged phases
        with torch.no_grad():
            if st.diverged or not ends:
                nan = {k: torch.full_like(v, float("nan")) for k, v in omega.items()}
                return MetaGradient(nan, st, stats)
            # the "reference" phase: phi_0, or the anti-nudged phase for symmetric nudging
            ref, scale = (ends[1], 2 * beta) if self.symmetric else (phi0, beta)
            plus = ends[0]
            grads = {k: (lam[k] * (ref[k] - plus[k]) / scale).mean(0) for k in omega}
            lam_grads = None
            if self.learn_lam:
                lam_grads = {k: (0.5 * ((plus[k] - omega[k]) ** 2 - (ref[k] - omega[k]) ** 2) / scale).mean(0)
                             for k in omega}
            go = system.grads(plus, tb.x_query, tb.y_query)
            stats.control_norm = float(beta * tree_norm(go, batched=True).mean())
        stats.extra["beta"] = beta
        return MetaGradient(grads, st, stats, phi0, lam_grads)

    def extra_repr(self) -> str:
        extra = f", beta={self.beta}, symmetric={self.symmetric}, nudged_steps={self.nudged_steps}"
        if self.polyak_start is not None:
            extra += f", polyak_start={self.polyak_start}, polyak_restart={self.polyak_restart}"
        return super().extra_repr() + extra


def _count_or_none(name: str, value, low: int, what: str) -> Optional[int]:
    """None, or ``value`` as an int >= ``low`` (an integral float is accepted); else a one-line ValueError."""
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value and value >= low \
        and float(value).is_integer()
    if not ok:
        raise ValueError(f"{name} must be None or an integer >= {low} ({what}), got {value!r}")
    return int(value)
