"""LCP with linear feedback (LCP-LF): ``e = Q u``, one matrix Q from the output controller to every hidden
unit, learned in an extra noisy phase after each batch (spec section 2).

Our reading of the official code (``LCPLinearFeedback`` in seijin-kobayashi/least-control):

- Controlled dynamics of ``(v, y, u_I)``: ``e = Q u`` is instantaneous (not integrated),
  ``v += dt (g(c, v) - v + Q u)``; ``y`` and ``u_I`` as in LCP-DI.
- Update: the hidden error injected into the implicit module is ``e* * s'(v*)`` (the hook on the
  state), so ``grad = -(dg/dtheta)^T (e* s'(v*)) - (dh/dtheta)^T u*``.
- Noisy phase, from the controlled equilibrium and with the parameters of this batch: an
  Ornstein-Uhlenbeck noise ``eps`` (time constant ``tau_eps``) is added to the feedback,
  ``v_fb = Q u + sigma eps``.  The hidden state runs ``timescale**2`` times faster than the output
  controller (``dt_slow = dt / timescale**2``, ``v += dt (g - v + v_fb)``; ``y``, ``u_I`` use ``dt_slow``;
  ``eps += (timescale / tau_eps)(-dt_slow eps + sqrt(dt_slow) N(0, 1))``).  Over ``noise_steps`` steps it
  accumulates ``-(1/sigma^2) v_fb (u - u*)^T`` (batch mean), then
  ``Q += dt / tau_Q (accumulated - wd_Q Q)``.  Q is a buffer, not an optimizer parameter.
  The official code runs this phase through its fixed-point solver, whose stop rule never fires on the
  noisy, accumulating state, so it runs ``max_iter`` steps: ``noise_steps`` defaults to ``max_iter``.
  We run it inside :meth:`backward` (before the optimizer step, as the official code does); Q changes only
  when the whole batch succeeded.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..core.controllers import LF, OutputController, OutputGain
from ..core.solvers import check_divergence
from ..core.method import Gradients
from ..core.system import NetworkSystem, local_update, loss_grad_fn, output_loss_grad
from .methods import Method, check_finite

__all__ = ["LinearFeedback"]


class LinearFeedback(Method):
    """LCP-LF with the spec's settings ``sigma=0.01``, ``wd_Q=0.01``, ``tau_Q=1e5``, ``timescale=5``."""

    name = "lcp-lf"
    controller = "lf"
    k_i, k_p, alpha = OutputGain(), OutputGain(), OutputGain()  # the output controller's gains (one copy)

    def __init__(self, model, alpha: float = 0.1, k_i: float = 1.0, k_p: float = 0.0, dt: float = 1.0,
                 sigma: float = 0.01, wd_Q: float = 0.01, tau_Q: float = 1e5, timescale: float = 5.0,
                 tau_eps: float = 1.0, noise_steps: Optional[int] = None, learn_Q: bool = True,
                 loss: str = "ce", **kw):
        super().__init__(model, loss=loss, **kw)
        try:
            model.act_derivative(model.init_state(torch.zeros(1, *model.state_shape,
                                                              dtype=next(model.parameters()).dtype,
                                                              device=next(model.parameters()).device)))
        except NotImplementedError as exc:
            raise ValueError(f"lcp-lf needs a model whose state is a vector of pre-activations (ff, rnn, "
                             f"conv-ff): {exc}") from None
        for key, val in (("alpha", alpha), ("k_i", k_i), ("k_p", k_p), ("dt", dt), ("sigma", sigma), ("wd_Q", wd_Q),
                         ("tau_Q", tau_Q), ("timescale", timescale), ("tau_eps", tau_eps)):
            check_finite(self.name, key, val)
        if min(sigma, tau_Q, timescale, tau_eps) <= 0 or wd_Q < 0 or alpha < 0 or not 0 < dt <= 1:
            raise ValueError("expected sigma, tau_Q, timescale, tau_eps > 0, wd_Q >= 0, alpha >= 0, 0 < dt <= 1")
        self.output, self.dt = OutputController(k_i, k_p, alpha), float(dt)
        self.sigma, self.wd_Q, self.tau_Q, self.timescale, self.tau_eps = sigma, wd_Q, tau_Q, timescale, tau_eps
        self.noise_steps = int(noise_steps if noise_steps is not None else self.max_iter)
        self.learn_Q = learn_Q
        p = next(model.parameters())
        n_state, k = math.prod(model.state_shape), model.num_classes
        # the official init: N(0, 1/n_out) entries
        self.feedback.register_buffer("Q", torch.randn(n_state, k, dtype=p.dtype, device=p.device) / math.sqrt(k))

    @property
    def Q(self) -> torch.Tensor:
        return self.feedback.Q

    @property
    def beta(self) -> float:
        return self.output.beta

    @torch.no_grad()
    def noisy_phase(self, c, target, v, y, u_i, u_ref, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Run the noisy phase from a controlled equilibrium; return the proposed new Q (not assigned)."""
        Q, dt, tf, out = self.Q, self.dt, self.timescale, self.output
        dts = dt / tf ** 2
        c = c.detach()
        system = NetworkSystem(self.model, c)
        grad_l = loss_grad_fn(target, self.model.num_classes, c.dtype, self.loss)
        randn = lambda t: torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=generator)
        eps = randn(v)
        acc = torch.zeros_like(Q)
        for _ in range(self.noise_steps):
            gl = grad_l(y)
            u = out.u(u_i, gl)
            v_fb = LF.feedback(u, Q) + self.sigma * eps
            # accumulate -(1/sigma^2) v_fb (u - u*)^T, summed over the batch here, averaged below
            acc -= v_fb.t() @ (u - u_ref) / self.sigma ** 2
            t = system.terms(v)
            eps = eps + tf / self.tau_eps * (-dts * eps + math.sqrt(dts) * randn(eps))
            v = v + tf ** 2 * dts * LF.drive(t.f, v_fb)
            y = out.output_step(y, t.h, u, dts)
            u_i = out.integrate(u_i, gl, dts)
        acc /= v.shape[0]
        return Q + dt / self.tau_Q * (acc - self.wd_Q * Q)

    def _gradients(self, batch):
        x, target = self._prepare(*batch)
        with torch.enable_grad():
            c = self.model.encode(x)
        (v, yc, u_i, u), stats = self.controlled_equilibrium(c, target)
        with torch.no_grad():
            e = LF.feedback(u, self.Q)
            e_hidden = e * self.model.act_derivative(v)  # the official code's modulated hidden error
        params = self.parameters()
        grads = local_update(self.model, c, v, e_hidden, u, params)
        new_q = self.noisy_phase(c, target, v, yc, u_i, u) if self.learn_Q else None
        if new_q is not None:
            check_divergence("the noisy phase that learns Q", who=self.name, finite=bool(torch.isfinite(new_q).all()),
                             left=".grad, parameters and Q were left untouched")
        # Q changes only once the update is accepted (the template accumulates it, then runs on_accept)
        return Gradients(params, grads, self._control_stats(target, v, yc, e, u, stats),
                         on_accept=None if new_q is None else (lambda: self.Q.copy_(new_q)))


@LF.drives("network")
def _network(ctrl, method, system, target):
    """LF on the network: the joint Euler dynamics of ``(v, y, u_I)`` with ``e = Q u``; returns
    ``((v*, y*, u_I*, u*), SolverStats)``."""
    m, dt, Q, out, c = method.model, method.dt, method.Q, method.output, system.c
    grad_l = loss_grad_fn(target, m.num_classes, c.dtype, method.loss)

    def step(z):
        v, y, u_i = z
        gl = grad_l(y)
        u = out.u(u_i, gl)
        t = system.terms(v)
        v = v + dt * LF.drive(t.f, LF.feedback(u, Q))
        return v, out.output_step(y, t.h, u, dt), out.integrate(u_i, gl, dt)

    v0 = m.init_state(c)
    with torch.no_grad():
        y0 = torch.zeros_like(m.h(v0))
    (v, y, u_i), stats = method._solve(step, (v0, y0, torch.zeros_like(y0)), "controlled dynamics")
    with torch.no_grad():
        u = out.u(u_i, output_loss_grad(y, target, method.loss))
    return (v, y, u_i, u), stats
