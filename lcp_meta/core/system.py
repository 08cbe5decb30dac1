"""Equilibrium systems: the object every supervised LCP controller and baseline works on.

Notation (as in the official LCP code and the spec, section 2):

- ``x``  the input; ``c = encode(x)`` its *input drive*, computed once per batch and shaped like the state
  (the encoder is part of the implicit module: ``g`` depends on its parameters through ``c``);
- ``v``  the hidden state, one tensor per sample (batch first).  Layered nets stack the pre-activations
  of all hidden layers into one flat vector (the official layout); ``v`` starts at 0;
- ``g(c, v)`` the implicit module, free dynamics ``f(v) = g(c, v) - v``, free equilibrium ``v* = g(c, v*)``;
- ``h(v)`` the output map (decoder) to the output units ``y`` (logits), controlled by ``dy = h(v) - y + u``;
- ``e`` the control on the hidden state and ``u`` the control on the output units; together they are the
  control ``psi = (e, u)`` of the least-control principle.

A model supplies ``encode``, ``g`` and ``h``.  The vector-Jacobian products ``J_g(v)^T e`` and
``J_h(v)^T u`` that the controllers need each step are generic (``torch.func.vjp``); the tanh/ReLU models
override them in closed form (``s'(v) * (W^T e)``), which avoids building an autograd graph per step.

The LCP update (spec section 1) needs only the controlled equilibrium:
``grad_theta = -(dg/dtheta)^T e* - (dh/dtheta)^T u*``, obtained by :func:`local_update` from a single
autograd pass over ``(g(c, v*) * e*).sum() + (h(v*) * u*).sum()`` (no graph over the iterations).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .controllers import Terms
from .losses import LOSSES, check_target, loss_grad_fn, output_loss, output_loss_grad  # noqa: F401 (re-exported)
from .solvers import SOLVERS, SolverStats, solve

__all__ = ["EquilibriumModel", "NetworkSystem", "LOSSES", "output_loss", "output_loss_grad", "loss_grad_fn",
           "check_target", "local_update", "default_check_every"]


def default_check_every(device: torch.device) -> int:
    """Checking the stop rule synchronises a GPU; on CUDA look every 10 steps, on the CPU every step."""
    return 10 if torch.device(device).type == "cuda" else 1


# ------------------------------------------------------------------------------------------------ model
class EquilibriumModel(nn.Module):
    """Base class of the supervised equilibrium networks (see the module docstring for the notation).

    Subclasses set ``in_shape``, ``num_classes``, ``state_shape`` (per sample), and ``depth``: for a
    *layered* (feedforward) net, ``g`` reaches its exact fixed point from ``v = 0`` in ``depth``
    applications (so the free equilibrium is one forward pass and BP applies); 0 for recurrent nets.
    """

    in_shape: Tuple[int, ...]
    num_classes: int
    state_shape: Tuple[int, ...]
    depth: int = 0

    @property
    def layered(self) -> bool:
        return self.depth > 0

    # a subclass whose step maps never mix samples (the package's models) says so; batch norm in training mode
    # (batch statistics) still couples them, which ``batch_independent`` checks at call time
    samples_independent = False

    @property
    def batch_independent(self) -> bool:
        """True when no sample's dynamics depend on another sample of its batch, so that a converged sample may
        leave the batch (active-set iteration): the class declares ``samples_independent`` and no batch-norm
        layer is in training mode.  False for any model that does not declare it."""
        return self.samples_independent and not any(
            isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training for mod in self.modules())

    # ---- what a subclass defines
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input drive ``c`` (shaped like the state) computed once per batch."""
        raise NotImplementedError

    def g(self, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Implicit module: the free dynamics are ``dv/dt = g(c, v) - v``."""
        raise NotImplementedError

    def h(self, v: torch.Tensor, update_stats: bool = False) -> torch.Tensor:
        """Output map (logits).  ``update_stats`` lets batch-norm layers update their running statistics;
        the dynamics call it with False so that hundreds of solver steps do not each move them."""
        raise NotImplementedError

    def act_derivative(self, v: torch.Tensor) -> torch.Tensor:
        """s'(v) for models whose state is a vector of pre-activations (needed by LCP-LF)."""
        raise NotImplementedError(f"{type(self).__name__} has no elementwise nonlinearity on its state")

    def feedback_pairs(self) -> Dict[str, Tuple[nn.Parameter, bool]]:
        """Forward weights that appear transposed in ``J^T`` products: ``key -> (weight, is_linear)``.

        LCP-DI-KP replaces each by a learned feedback weight.  ``is_linear`` says the feedback is the
        transpose of a matrix (nn.Linear); otherwise it has the forward conv kernel's shape.
        Models without closed-form VJPs return {} (KP is then unavailable)."""
        return {}

    # ---- generic pieces
    def init_state(self, c: torch.Tensor) -> torch.Tensor:
        """All states start at 0 (spec section 2)."""
        return torch.zeros_like(c)

    def g_vjp(self, c: torch.Tensor, v: torch.Tensor, e: torch.Tensor,
              fb: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """``J_g(v)^T e`` (generic autograd version; ``fb`` replaces transposed weights, see KP)."""
        if fb:
            raise NotImplementedError(f"{type(self).__name__} has no feedback-weight VJP")
        with torch.enable_grad():
            _, pull = torch.func.vjp(lambda s: self.g(c, s), v)
            return pull(e)[0]

    def h_vjp(self, v: torch.Tensor, u: torch.Tensor, fb: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """``J_h(v)^T u`` (generic autograd version)."""
        if fb:
            raise NotImplementedError(f"{type(self).__name__} has no feedback-weight VJP")
        with torch.enable_grad():
            _, pull = torch.func.vjp(lambda s: self.h(s), v)
            return pull(u)[0]

    def step_terms(self, c, v, e, u, fb=None):
        """``(g(c, v), h(v), J_g^T e, J_h^T u)`` for one controller step; closed-form models share the
        nonlinearity between the four (``e`` or ``u`` may be None when a term is not needed)."""
        jg = None if e is None else self.g_vjp(c, v, e, fb)
        jh = None if u is None else self.h_vjp(v, u, fb)
        return self.g(c, v), self.h(v), jg, jh

    # ---- layered nets: exact one-pass solves (generic versions; closed-form models override them)
    def logits(self, x: torch.Tensor, update_stats: bool = False) -> torch.Tensor:
        """``h(v*)`` of a layered net by a plain forward pass (with autograd, for BP)."""
        return self.h(self.forward_sweep(self.encode(x)), update_stats=update_stats)

    def forward_sweep(self, c: torch.Tensor, e: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact solution of ``v = g(c, v) + e`` for a layered net: ``depth`` applications from 0 suffice
        because block ``l`` of ``g`` reads only block ``l-1``."""
        if not self.layered:
            raise NotImplementedError(f"{type(self).__name__} is recurrent: no one-pass forward sweep")
        v = self.init_state(c)
        for _ in range(self.depth):
            v = self.g(c, v) if e is None else self.g(c, v) + e
        return v

    def backward_sweep(self, c: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                       fb: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Exact solution of ``e = J_g(v)^T e + J_h(v)^T u`` for a layered net (``J_g`` is nilpotent)."""
        if not self.layered:
            raise NotImplementedError(f"{type(self).__name__} is recurrent: no one-pass backward sweep")
        jh = self.h_vjp(v, u, fb)
        e = jh
        for _ in range(self.depth - 1):
            e = self.g_vjp(c, v, e, fb) + jh
        return e

    def check_input(self, x) -> torch.Tensor:
        """Validate a batch of inputs and move it to the model's device.

        Accepts shape ``(B, *in_shape)`` (or ``(B, prod(in_shape))`` for the fully connected models) in
        the model's floating dtype; anything else is a ValueError naming what was expected."""
        p = next(self.parameters())
        expected = (-1, *self.in_shape)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor of shape (B, {', '.join(map(str, self.in_shape))})")
        flat_ok = getattr(self, "accepts_flat", False) and x.dim() == 2 and x.shape[1] == math.prod(self.in_shape)
        if not (flat_ok or tuple(x.shape[1:]) == tuple(self.in_shape)) or x.dim() < 2:
            raise ValueError(f"inputs must have shape (B, {', '.join(map(str, self.in_shape))}) for this "
                             f"{type(self).__name__} (in_shape={tuple(self.in_shape)}), got {tuple(x.shape)}")
        if x.dtype != p.dtype:
            raise ValueError(f"inputs must have the model's dtype {p.dtype} and shape {expected}, got {x.dtype}; "
                             f"convert them (x.to({p.dtype})) or the model")
        if x.shape[0] == 0:
            raise ValueError("empty batch: expected at least one input")
        return x.to(p.device)

    def free_equilibrium(self, c: torch.Tensor, solver: str = "euler", tol: float = 1e-6, max_iter: int = 800,
                         check_every: Optional[int] = None, raise_on_fail: bool = False,
                         **solver_kw) -> Tuple[torch.Tensor, SolverStats]:
        """Solve ``v* = g(c, v*)`` from ``v = 0`` (no graph)."""
        ce = check_every or default_check_every(c.device)
        free = free_solver(solver)
        if free != solver:  # a controlled strategy
            if self.layered:  # the exact free equilibrium of a layered net is one forward pass
                with torch.no_grad():
                    v = self.forward_sweep(c)
                return v, SolverStats(iterations=self.depth, residual=0.0, converged=True,
                                      per_sample=torch.zeros(c.shape[0], dtype=torch.float64))
        (v,), stats = solve(lambda z: (self.g(c, z[0]),), (self.init_state(c),), solver=free, tol=tol,
                            max_iter=max_iter, check_every=ce, raise_on_fail=raise_on_fail,
                            name="free dynamics", **solver_kw)
        return v, stats

    def predict(self, x: torch.Tensor, solver: str = "euler", tol: float = 1e-6, max_iter: int = 800,
                check_every: Optional[int] = None, **solver_kw) -> Tuple[torch.Tensor, SolverStats]:
        """Logits at the free equilibrium (no grad).  Prediction never uses a controller."""
        x = self.check_input(x)
        with torch.no_grad():
            c = self.encode(x)
            v, stats = self.free_equilibrium(c, solver=solver, tol=tol, max_iter=max_iter,
                                             check_every=check_every, **solver_kw)
            return self.h(v), stats


def free_solver(solver: str) -> str:
    """The solver of the free dynamics that ``solver`` stands for: itself, or for a controlled-equilibrium strategy
    of LCP-DI (``auto``, ``sweep``, ``reduced``, ``warm-anderson``, ``euler-flat``), which names none, the Euler
    iteration: as the authors evaluate, and not Anderson from 0, which left 173 of 2000 test samples of the
    paper-preset MNIST rnn unsettled where Euler left 5."""
    from .control import CONTROL_SOLVERS  # (a late import: control builds on this module)
    return "euler" if solver == "auto" or (solver not in SOLVERS and solver in CONTROL_SOLVERS) else solver


# ----------------------------------------------------------------------------------------- the system
class NetworkSystem:
    """One batch of a network as a system of the controllers (:mod:`lcp_meta.core.controllers`): state ``v``,
    free force ``f = g(c, v) - v``, output map ``h``; ``fb`` replaces the transposed forward weights in the
    VJPs (Kolen-Pollack; None: the true transposes)."""

    kind = "network"

    def __init__(self, model: EquilibriumModel, c: torch.Tensor, fb: Optional[Dict[str, torch.Tensor]] = None):
        self.model, self.c, self.fb = model, c, fb

    def terms(self, v: torch.Tensor, e: Optional[torch.Tensor] = None, u: Optional[torch.Tensor] = None) -> Terms:
        """``(f, h, J_f^T e, J_h^T u)`` at ``v`` in one pass (closed-form models share the nonlinearity)."""
        g, h, jg, jh = self.model.step_terms(self.c, v, e, u, self.fb)
        return Terms(g - v, h, None if jg is None else jg - e, jh)

    def vjps(self, v: torch.Tensor, e: torch.Tensor, u: torch.Tensor) -> Terms:
        """Only ``J_f^T e`` and ``J_h^T u`` (``f``, ``h`` left None: the caller has them)."""
        return Terms(None, None, self.model.g_vjp(self.c, v, e, self.fb) - e, self.model.h_vjp(v, u, self.fb))


# ------------------------------------------------------------------------------------------ the update
def local_update(model: EquilibriumModel, c: torch.Tensor, v: torch.Tensor, e: torch.Tensor,
                 u: torch.Tensor, params: Sequence[nn.Parameter]) -> List[torch.Tensor]:
    """``-(dg/dtheta)^T e - (dh/dtheta)^T u`` at the state ``v`` for every parameter in ``params``.

    ``c`` must still be attached to the encoder's graph (so the encoder gets ``-(dc/dtheta)^T e``);
    ``v``, ``e`` and ``u`` are treated as constants.  One autograd pass; parameters that do not take part
    get a zero gradient.  The decoder's batch-norm statistics (if any) are updated here, once per batch.
    """
    v, e, u = v.detach(), e.detach(), u.detach()
    with torch.enable_grad():
        obj = (model.g(c, v) * e).sum() + (model.h(v, update_stats=True) * u).sum()
        grads = torch.autograd.grad(-obj, list(params), allow_unused=True)
    return [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
