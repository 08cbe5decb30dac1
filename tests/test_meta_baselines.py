"""MAML, FOMAML, Reptile and contrastive meta-learning against their defining formulas (float64)."""
import pytest
import torch
import torch.nn.functional as F

from lcp_meta.meta import FOMAML, MAML, ContrastiveMeta, Reptile
from lcp_meta.meta.reference import flat_loss, flatten_params, inner_solution

from conftest import sine_tasks, tanh_mlp


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _loss(model, params, x, y):
    return F.mse_loss(torch.func.functional_call(model, params, (x,)), y)


def _unroll(model, x, y, lr, K, create_graph, momentum=0.0):
    """Hand-written inner loop with plain autograd."""
    names = [k for k, _ in model.named_parameters()]
    phi = [p for p in model.parameters()] if create_graph else [p.detach().clone().requires_grad_() for p in model.parameters()]
    vel = None
    for _ in range(K):
        g = torch.autograd.grad(_loss(model, dict(zip(names, phi)), x, y), phi, create_graph=create_graph)
        if momentum:
            vel = list(g) if vel is None else [momentum * v + gi for v, gi in zip(vel, g)]
            g = vel
        phi = [p - lr * gi for p, gi in zip(phi, g)]
        if not create_graph:
            phi = [p.detach().requires_grad_() for p in phi]
    return dict(zip(names, phi))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_maml_equals_unrolled_autograd(momentum):
    model, (xs, ys, xq, yq) = tanh_mlp(), sine_tasks(3, 5)
    lr, K = 0.1, 4
    total = 0
    for t in range(xs.shape[0]):
        total = total + _loss(model, _unroll(model, xs[t], ys[t], lr, K, True, momentum), xq[t], yq[t])
    ref = torch.autograd.grad(total / xs.shape[0], list(model.parameters()))
    stats = MAML(model, F.mse_loss, inner_lr=lr, inner_steps=K, momentum=momentum).meta_backward((xs, ys, xq, yq))
    for a, b in zip(_grads(model), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert stats.iterations == K and stats.converged and stats.query_loss_after < stats.query_loss_before
    # second-order terms matter here: FOMAML differs
    model.zero_grad()
    FOMAML(model, F.mse_loss, inner_lr=lr, inner_steps=K, momentum=momentum).meta_backward((xs, ys, xq, yq))
    assert max(float((a - b).abs().max()) for a, b in zip(_grads(model), ref)) > 1e-4


def test_fomaml_and_reptile_formulas():
    model, (xs, ys, xq, yq) = tanh_mlp(seed=1), sine_tasks(3, 5, seed=1)
    lr, K = 0.1, 6
    phis = [_unroll(model, xs[t], ys[t], lr, K, False) for t in range(xs.shape[0])]
    names = [k for k, _ in model.named_parameters()]
    fo = [sum(torch.autograd.grad(_loss(model, phis[t], xq[t], yq[t]), [phis[t][k] for k in names])[i]
              for t in range(len(phis))) / len(phis) for i in range(len(names))]
    FOMAML(model, F.mse_loss, inner_lr=lr, inner_steps=K).meta_backward((xs, ys, xq, yq))
    for a, b in zip(_grads(model), fo):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    model.zero_grad()
    Reptile(model, F.mse_loss, inner_lr=lr, inner_steps=K).meta_backward((xs, ys, xq, yq))
    for (k, p), a in zip(model.named_parameters(), _grads(model)):
        ref = sum(p.detach() - phis[t][k].detach() for t in range(len(phis))) / len(phis)
        torch.testing.assert_close(a, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_cml_formula_against_newton_equilibria(symmetric):
    """grad = lam (phi_0 - phi_beta) / beta with both equilibria solved independently by Newton."""
    model, (xs, ys, xq, yq) = tanh_mlp(seed=2), sine_tasks(2, 5, seed=2)
    lam, beta = 2.0, 0.3
    loss = flat_loss(model, F.mse_loss)
    omega, names, shapes = flatten_params(model)
    ref = 0
    for t in range(xs.shape[0]):
        plus = inner_solution(loss, omega, lam, xs[t], ys[t], beta=beta, xq=xq[t], yq=yq[t])
        if symmetric:
            minus = inner_solution(loss, omega, lam, xs[t], ys[t], beta=-beta, xq=xq[t], yq=yq[t])
            ref = ref + lam * (minus - plus) / (2 * beta)
        else:
            ref = ref + lam * (inner_solution(loss, omega, lam, xs[t], ys[t]) - plus) / beta
    ref = ref / xs.shape[0]
    ContrastiveMeta(model, F.mse_loss, lam=lam, beta=beta, symmetric=symmetric, inner_lr=0.15, inner_steps=1000,
                    tol=1e-14).meta_backward((xs, ys, xq, yq))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)
