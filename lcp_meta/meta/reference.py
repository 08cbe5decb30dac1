"""Dense reference computations for small models (tests and benchmarks; float64 advised).

Everything here works on the flattened parameter vector of one task with dense Hessians from
``torch.autograd.functional.hessian`` and Newton's method, independently of the methods' dynamics:

    phi*(omega)      = argmin_phi l_in(phi) + 1/2 (phi - omega)^T Lambda (phi - omega) [+ beta l_out(phi)]
    hypergradient    = Lambda (Hess l_in(phi*) + Lambda)^-1 grad l_out(phi*)
    F_beta(omega)    = min_phi 1/2 |f(phi, omega)|^2 + beta l_out(phi),  f = -grad l_in - Lambda (phi - omega)

Cost is cubic in the number of parameters: for models with at most a few hundred parameters.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple, Union

import torch
import torch.nn as nn
from torch.autograd.functional import hessian
from torch.func import functional_call

__all__ = ["flatten_params", "unflatten", "flat_loss", "inner_solution", "exact_hypergradient", "f_beta"]

Lam = Union[float, torch.Tensor]


def flatten_params(model: nn.Module) -> Tuple[torch.Tensor, List[str], List[torch.Size]]:
    """(vector of the trainable parameters, their names, their shapes)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    return (torch.cat([p.detach().reshape(-1) for _, p in named]), [k for k, _ in named],
            [p.shape for _, p in named])


def unflatten(vec: torch.Tensor, names: List[str], shapes: List[torch.Size]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`flatten_params`: a parameter dict from the vector."""
    chunks = vec.split([torch.Size(s).numel() for s in shapes])
    return {k: c.reshape(s) for k, c, s in zip(names, chunks, shapes)}


def flat_loss(model: nn.Module, loss_fn: Callable) -> Callable:
    """``loss(vec, x, y)``: the model's loss as a function of its flattened parameters."""
    _, names, shapes = flatten_params(model)
    consts = {k: b for k, b in model.named_buffers()}

    def loss(vec, x, y):
        return loss_fn(functional_call(model, (unflatten(vec, names, shapes), consts), (x,)), y)

    return loss


def _newton(obj: Callable, x0: torch.Tensor, iters: int, tol: float = 1e-13) -> torch.Tensor:
    """Newton's method with step halving; where the Hessian is not positive definite it is shifted
    (Levenberg) so every step descends.  Raises if the gradient does not vanish: a reference that
    silently stopped elsewhere would make a comparison meaningless."""
    x = x0.detach().clone()
    gnorm = float("inf")
    for _ in range(iters):
        xg = x.clone().requires_grad_(True)
        val = obj(xg)
        g, = torch.autograd.grad(val, xg)
        gnorm = float(g.norm())
        if gnorm <= tol * max(1.0, float(x.norm())):
            return x
        H = hessian(obj, x, vectorize=True)
        H = 0.5 * (H + H.T)
        low = float(torch.linalg.eigvalsh(H)[0])
        if low <= 1e-8:
            H = H + (1e-3 - low) * torch.eye(len(x), dtype=x.dtype, device=x.device)
        step = torch.linalg.solve(H, g)
        t = 1.0
        with torch.no_grad():
            while t > 1e-10 and obj(x - t * step) > val:
                t /= 2
        x = (x - t * step).detach()
    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(obj(xg), xg)
    if float(g.norm()) > 1e3 * tol * max(1.0, float(x.norm())):
        raise RuntimeError(f"reference Newton solve did not converge: gradient norm {float(g.norm()):.3e}")
    return x


def inner_solution(loss: Callable, omega: torch.Tensor, lam: Lam, xs, ys, beta: float = 0.0, xq=None, yq=None,
                   iters: int = 50) -> torch.Tensor:
    """argmin of l_in + 1/2 (phi - omega)^T Lambda (phi - omega) + beta l_out, by Newton from omega."""
    def obj(phi):
        d = phi - omega
        val = loss(phi, xs, ys) + 0.5 * (lam * d * d).sum()
        return val + beta * loss(phi, xq, yq) if beta else val

    return _newton(obj, omega, iters)


def exact_hypergradient(model: nn.Module, loss_fn: Callable, xs, ys, xq, yq, lam: Lam) -> torch.Tensor:
    """Mean over tasks of ``Lambda (Hess l_in(phi*) + Lambda)^-1 grad l_out(phi*)`` (flattened).

    ``lam``: a float or a vector of one value per parameter (per-parameter lam).
    """
    loss = flat_loss(model, loss_fn)
    omega, _, _ = flatten_params(model)
    out = []
    for t in range(xs.shape[0]):
        phi = inner_solution(loss, omega, lam, xs[t], ys[t])
        H = hessian(lambda p: loss(p, xs[t], ys[t]), phi, vectorize=True)
        pg = phi.clone().requires_grad_(True)
        g, = torch.autograd.grad(loss(pg, xq[t], yq[t]), pg)
        lam_vec = torch.as_tensor(lam, dtype=phi.dtype) * torch.ones_like(phi)
        out.append(lam_vec * torch.linalg.solve(H + torch.diag(lam_vec), g))
    return torch.stack(out).mean(0)


def f_beta(model: nn.Module, loss_fn: Callable, omega: torch.Tensor, lam: Lam, beta: float, xs, ys, xq, yq,
           iters: int = 50) -> torch.Tensor:
    """Mean over tasks of F_beta(omega) = min_phi 1/2 |f(phi, omega)|^2 + beta l_out(phi) (Newton)."""
    loss = flat_loss(model, loss_fn)
    vals = []
    for t in range(xs.shape[0]):
        def energy(phi, t=t):
            with torch.enable_grad():
                p = phi if phi.requires_grad else phi.detach().requires_grad_(True)
                g, = torch.autograd.grad(loss(p, xs[t], ys[t]), p, create_graph=True)
            f = -g - lam * (p - omega)
            return 0.5 * (f * f).sum() + beta * loss(p, xq[t], yq[t])

        phi0 = inner_solution(loss, omega, lam, xs[t], ys[t])
        phi = _newton(energy, phi0, iters)
        vals.append(energy(phi).detach())
    return torch.stack(vals).mean()
