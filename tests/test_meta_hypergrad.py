"""LCP and iMAML meta-gradients against dense float64 references (exact hypergradient, F_beta, lam)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lcp_meta.meta import IMAML, LCP, ContrastiveMeta
from lcp_meta.meta.reference import exact_hypergradient, f_beta, flat_loss, flatten_params, inner_solution

from conftest import DT, sine_tasks, tanh_mlp


def _grad_vec(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _compare(a, b):
    cos = float(a @ b / (a.norm() * b.norm()))
    rel = float((a - b).norm() / b.norm())
    return cos, rel


def test_lcp_di_matches_exact_hypergradient_at_small_beta():
    model, tasks = tanh_mlp((10,)), sine_tasks(amplitude=(0.5, 1.0))
    ref = exact_hypergradient(model, F.mse_loss, *tasks, lam=2.0)
    lcp = LCP(model, F.mse_loss, lam=2.0, beta=1e-5, controller="di", inner_lr=0.15, inner_steps=1000, tol=1e-12)
    stats = lcp.meta_backward(tasks)
    assert stats.converged and stats.iterations < 1000
    cos, rel = _compare(_grad_vec(model), ref)
    assert cos > 0.9999 and rel < 1e-3, (cos, rel)
    # and it is not trivially close: the first-order (direct) controller is measurably off
    model.zero_grad()
    LCP(model, F.mse_loss, lam=2.0, beta=1e-5, controller="direct", inner_lr=0.15, inner_steps=1000,
        tol=1e-12).meta_backward(tasks)
    assert _compare(_grad_vec(model), ref)[1] > 1e-2


def test_imaml_cg_matches_exact_hypergradient():
    model, tasks = tanh_mlp((10,), seed=1), sine_tasks(amplitude=(0.5, 1.0), seed=1)
    ref = exact_hypergradient(model, F.mse_loss, *tasks, lam=2.0)
    n = sum(p.numel() for p in model.parameters())
    IMAML(model, F.mse_loss, lam=2.0, cg_steps=2 * n, inner_lr=0.15, inner_steps=1000, tol=1e-12).meta_backward(tasks)
    cos, rel = _compare(_grad_vec(model), ref)
    assert cos > 0.9999 and rel < 1e-3, (cos, rel)
    # five CG steps (the paper's setting) are only approximate here
    model.zero_grad()
    stats = IMAML(model, F.mse_loss, lam=2.0, cg_steps=2, inner_lr=0.15, inner_steps=1000, tol=1e-12).meta_backward(tasks)
    assert stats.extra["cg_residual"] > 1e-6


def test_cml_small_beta_approaches_exact_hypergradient():
    model, tasks = tanh_mlp((10,), seed=2), sine_tasks(amplitude=(0.5, 1.0), seed=2)
    ref = exact_hypergradient(model, F.mse_loss, *tasks, lam=2.0)
    ContrastiveMeta(model, F.mse_loss, lam=2.0, beta=1e-4, symmetric=True, inner_lr=0.15, inner_steps=1000,
                    tol=1e-14).meta_backward(tasks)
    cos, rel = _compare(_grad_vec(model), ref)
    assert cos > 0.9999 and rel < 1e-3, (cos, rel)


@pytest.mark.parametrize("controller", ["di", "ebd"])
def test_lcp_update_is_gradient_of_f_beta(controller):
    """-lam psi (the meta-gradient times beta) is the exact gradient of F_beta at finite beta."""
    model, tasks = tanh_mlp((10,), seed=3), sine_tasks(amplitude=(0.5, 1.0), seed=3)
    lam, beta = 2.0, 0.5
    kw = dict(ebd_lr=0.01, ebd_steps=3000, ebd_momentum=0.8) if controller == "ebd" else {}
    lcp = LCP(model, F.mse_loss, lam=lam, beta=beta, controller=controller, inner_lr=0.15, inner_steps=1000,
              tol=1e-13, **kw)
    stats = lcp.meta_backward(tasks)
    assert stats.converged
    g = beta * _grad_vec(model)  # the reported gradient is divided by beta
    omega, _, _ = flatten_params(model)
    torch.manual_seed(7)
    eps = 1e-4
    for _ in range(1):  # one random direction: each F_beta evaluation is a dense third-order Newton solve
        d = torch.randn_like(omega)
        fd = (f_beta(model, F.mse_loss, omega + eps * d, lam, beta, *tasks)
              - f_beta(model, F.mse_loss, omega - eps * d, lam, beta, *tasks)) / (2 * eps)
        assert abs(float(g @ d) - float(fd)) < 1e-5 * abs(float(fd)), (float(g @ d), float(fd))
    # finite beta really differs from the small-beta hypergradient (the test would catch a mix-up)
    ref = exact_hypergradient(model, F.mse_loss, *tasks, lam=lam)
    assert _compare(_grad_vec(model), ref)[1] > 1e-3


def _outer(model, tasks, lam_vec):
    """Mean query loss at the exact inner solution for (per-element) lam: the function lam-gradients differentiate."""
    loss = flat_loss(model, F.mse_loss)
    omega, _, _ = flatten_params(model)
    xs, ys, xq, yq = tasks
    return sum(float(loss(inner_solution(loss, omega, lam_vec, xs[t], ys[t]), xq[t], yq[t]))
               for t in range(xs.shape[0])) / xs.shape[0]


@pytest.mark.parametrize("method, mode", [("lcp", "scalar"), ("lcp", "per_param"), ("imaml", "per_param"),
                                          ("cml", "scalar")])
def test_lam_gradient_matches_finite_differences(method, mode):
    model, tasks = tanh_mlp((10,), seed=4), sine_tasks(amplitude=(0.5, 1.0), seed=4)
    lam = 1.5
    common = dict(lam=lam, learn_lam=mode, inner_lr=0.15, inner_steps=1000, tol=1e-12)
    if method == "lcp":
        meth = LCP(model, F.mse_loss, beta=1e-6, **common)
    elif method == "imaml":
        meth = IMAML(model, F.mse_loss, cg_steps=80, **common)
    else:
        meth = ContrastiveMeta(model, F.mse_loss, beta=1e-4, symmetric=True, **{**common, "tol": 1e-14})
    meth.meta_backward(tasks)
    n = sum(p.numel() for p in model.parameters())
    eps = 1e-5
    if mode == "scalar":
        raw = meth.lam_raw
        g = float(raw.grad / torch.sigmoid(raw.detach()))  # undo the softplus chain rule
        fd = (_outer(model, tasks, lam + eps) - _outer(model, tasks, lam - eps)) / (2 * eps)
        assert math.isclose(g, fd, rel_tol=1e-3), (g, fd)
    else:
        g = torch.cat([(r.grad / torch.sigmoid(r.detach())).reshape(-1) for r in meth.lam_raw])
        assert g.shape == (n,)
        torch.manual_seed(5)
        d = torch.randn(n, dtype=DT)
        fd = (_outer(model, tasks, lam + eps * d) - _outer(model, tasks, lam - eps * d)) / (2 * eps)
        assert math.isclose(float(g @ d), fd, rel_tol=1e-3), (float(g @ d), fd)
