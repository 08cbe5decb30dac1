"""The supervised LCP engine against exact references, in float64 on tiny networks.

References are computed independently of the controllers: F_beta and H by Newton's method with a dense
Hessian (then central finite differences over the parameters), dL/dtheta by a dense linear solve of the
adjoint system (itself checked against finite differences), Jacobians by dense autograd.
"""
import math

import pytest
import torch

from lcp_meta.core.system import EquilibriumModel, output_loss
from lcp_meta.models import build_model
from lcp_meta.supervised import make_method

DT = torch.float64


def tiny(name, seed=0, **kw):
    torch.manual_seed(seed)
    if name == "ff":
        model = build_model("ff", in_shape=(6,), num_classes=3, hidden=(5, 4), **kw)
        x = torch.randn(4, 6)
    elif name == "rnn":
        model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=5, **kw)
        x = torch.randn(4, 4)
    elif name == "conv-rnn":
        model = build_model("conv-rnn", in_shape=(2, 4, 4), num_classes=3, channels=4, inner=4, groups=2,
                            pool=2, **kw)
        with torch.no_grad():  # a less trivial implicit layer than the N(0, 0.01) init
            model.conv1.weight.normal_(0, 0.08)
            model.conv2.weight.normal_(0, 0.08)
        x = torch.randn(3, 2, 4, 4)
    elif name == "conv-ff":
        model = build_model("conv-ff", in_shape=(2, 20, 20), num_classes=3, channels=(3, 4, 5), fc=(6, 5), **kw)
        x = torch.randn(3, 2, 20, 20)
    model = model.to(DT)
    x = x.to(DT)
    y = torch.randint(0, 3, (x.shape[0],))
    return model, x, y


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in params_of(model)])


def newton_min(fun, z0, iters=8, tol=1e-12):
    """Minimise a smooth function of a flat vector by Newton's method with its dense Hessian
    (quadratic convergence: from a warm start a few steps reach machine precision)."""
    z = z0.clone()
    for _ in range(iters):
        step = torch.linalg.solve(torch.func.hessian(fun)(z), torch.func.grad(fun)(z))
        z = z - step
        if step.norm() <= tol * max(1.0, float(z.norm())):
            break
    return z


def energy_min_value(model, x, y, beta, loss, z0, exact_output=False):
    """F_beta = min_{v,y} 1/2|g-v|^2 + 1/2|h(v)-y|^2 + beta l(y); with exact_output, H = min over v with
    the outputs held at the loss minimum (MSE: the one-hot target)."""
    with torch.no_grad():
        c = model.encode(x)
    B, n = c.shape[0], c[0].numel()
    target_y = torch.nn.functional.one_hot(y, model.num_classes).to(DT)

    def fun(z):
        v = z[: B * n].reshape(c.shape)
        out = target_y if exact_output else z[B * n:].reshape(B, -1)
        val = 0.5 * (model.g(c, v) - v).pow(2).sum() + 0.5 * (model.h(v) - out).pow(2).sum()
        return val if exact_output else val + beta * output_loss(out, y, loss)

    z = newton_min(fun, z0)
    return float(fun(z)), z


def fd_gradient(model, value_fn, directions=None, eps=1e-5):
    """Central finite differences of value_fn() over every parameter entry (or along directions)."""
    params = params_of(model)
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def set_flat(vec):
        i = 0
        with torch.no_grad():
            for p in params:
                p.copy_(vec[i:i + p.numel()].reshape(p.shape))
                i += p.numel()

    dirs = directions if directions is not None else torch.eye(flat.numel(), dtype=DT)
    out = []
    for d in dirs:
        set_flat(flat + eps * d)
        fp = value_fn()
        set_flat(flat - eps * d)
        fm = value_fn()
        out.append((fp - fm) / (2 * eps))
    set_flat(flat)
    return torch.tensor(out, dtype=DT), dirs


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------- the exact reference dL/dtheta
def dense_loss_gradient(model, x, y, loss="ce"):
    """dL/dtheta of L = l(h(v*)) at the free equilibrium, with the adjoint from a dense linear solve."""
    params = params_of(model)
    with torch.no_grad():
        c0 = model.encode(x)
    v, stats = model.free_equilibrium(c0, tol=1e-15, max_iter=5000)
    n = v.numel()
    J = torch.autograd.functional.jacobian(lambda s: model.g(c0, s.reshape(v.shape)).reshape(-1), v.reshape(-1), vectorize=True)
    out = model.h(v)
    gl = torch.autograd.functional.jacobian(lambda o: output_loss(o.reshape(out.shape), y, loss), out.reshape(-1), vectorize=True)
    Jh = torch.autograd.functional.jacobian(lambda s: model.h(s.reshape(v.shape)).reshape(-1), v.reshape(-1), vectorize=True)
    a = torch.linalg.solve((torch.eye(n, dtype=DT) - J).T, Jh.T @ gl).reshape(v.shape)
    c = model.encode(x)
    obj = (model.g(c, v) * a).sum() + output_loss(model.h(v), y, loss)
    grads = torch.autograd.grad(obj, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def free_loss(model, x, y, loss="ce"):
    with torch.no_grad():
        c = model.encode(x)
        v, _ = model.free_equilibrium(c, tol=1e-15, max_iter=5000)
        return float(output_loss(model.h(v), y, loss))


MODELS = ["ff", "rnn", "conv-rnn"]
# the conv DEQ's generic (autograd) VJPs make its reference checks cost ~1 min of CPU each: the F_beta check
# runs always, the dense-reference and weak-control ones with LCP_META_SLOW=1
MODELS_FAST = ["ff", "rnn", pytest.param("conv-rnn", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", MODELS_FAST)
def test_dense_reference_matches_finite_differences(name):
    model, x, y = tiny(name)
    ref = dense_loss_gradient(model, x, y)
    dirs = torch.randn(3, ref.numel(), dtype=DT)
    fd, _ = fd_gradient(model, lambda: free_loss(model, x, y), dirs)
    assert rel_err(dirs @ ref, fd) < 1e-7


# ------------------------------------------------------------------------------------- F_beta and H
def solve_state_vector(method, x, y):
    """The DI equilibrium as a flat (v, y) vector, to warm-start Newton."""
    with torch.no_grad():
        c = method.model.encode(x)
    (v, yc, e, u), stats = method.controlled_equilibrium(c, y)
    return torch.cat([v.reshape(-1), yc.reshape(-1)]), stats


# (alpha, k_i, k_p): beta = k_i/alpha + k_p.  The tiny conv DEQ runs at the spec's conv-rnn setting (alpha 1,
# k_i 0.3): with much stronger control its GroupNorm/ReLU dynamics fall into a limit cycle.
GAINS = {"ff": (0.5, 1.0, 0.5), "rnn": (0.5, 1.0, 0.5), "conv-rnn": (1.0, 0.3, 0.0)}


@pytest.mark.parametrize("name", MODELS)
def test_di_update_is_gradient_of_F_beta(name):
    model, x, y = tiny(name)
    alpha, k_i, k_p = GAINS[name]
    method = make_method("lcp-di", model, alpha=alpha, k_i=k_i, k_p=k_p, tol=1e-14, max_iter=20000)
    assert method.beta == pytest.approx(k_i / alpha + k_p)
    stats = method.backward(x, y)
    assert stats["converged"] and stats["residual"] < 1e-14
    upd = flat_grads(model)
    z0, _ = solve_state_vector(method, x, y)
    value = lambda: energy_min_value(model, x, y, method.beta, "ce", z0)[0]
    # directional derivatives along random directions (a full sweep costs two Newton solves per entry)
    dirs = torch.randn(4, upd.numel(), dtype=DT)
    fd, _ = fd_gradient(model, value, dirs)
    assert rel_err(dirs @ upd, fd) < 1e-5


@pytest.mark.parametrize("name", ["ff", "rnn"])  # the tiny conv DEQ does not settle under exact control
def test_di_update_is_gradient_of_H_with_exact_control(name):
    model, x, y = tiny(name, seed=1)
    method = make_method("lcp-di", model, alpha=0.0, k_i=1.0, loss="mse", tol=1e-14, max_iter=50000)
    stats = method.backward(x, y)
    assert stats["converged"]
    # exact output control: the controlled outputs sit at the loss minimum
    with torch.no_grad():
        c = model.encode(x)
    (v, yc, e, u), _ = method.controlled_equilibrium(c, y)
    torch.testing.assert_close(yc, torch.nn.functional.one_hot(y, 3).to(DT), atol=1e-10, rtol=0)
    upd = flat_grads(model)
    value = lambda: energy_min_value(model, x, y, None, "mse", v.reshape(-1), exact_output=True)[0]
    # H = 1/2 |psi*|^2: the minimum of the constrained energy equals the least control found by DI
    assert value() == pytest.approx(0.5 * float(e.pow(2).sum() + u.pow(2).sum()), rel=1e-9)
    dirs = torch.randn(4, upd.numel(), dtype=DT)
    fd, _ = fd_gradient(model, value, dirs)
    assert rel_err(dirs @ upd, fd) < 1e-5


# ------------------------------------------------------------------------------ weak control, RBP, BP
@pytest.mark.parametrize("name", MODELS_FAST)
def test_weak_control_recovers_exact_gradient_and_rbp_equals_it(name):
    model, x, y = tiny(name, seed=2)
    ref = dense_loss_gradient(model, x, y)
    beta = 1e-4
    di = make_method("lcp-di", model, alpha=1.0, k_i=beta, tol=1e-14, max_iter=20000)
    di.backward(x, y)
    upd = flat_grads(model) / beta
    cos = float(torch.dot(upd, ref) / (upd.norm() * ref.norm()))
    assert cos > 0.999
    assert rel_err(upd, ref) < 1e-2  # the bias is O(beta)
    rbp = make_method("rbp", model, tol=1e-14, max_iter=20000)
    model.zero_grad(set_to_none=True)  # backward accumulates into .grad, like loss.backward()
    rbp.backward(x, y)
    assert rel_err(flat_grads(model), ref) < 1e-8
    if model.layered:
        model.zero_grad(set_to_none=True)
        make_method("bp", model).backward(x, y)
        assert rel_err(flat_grads(model), ref) < 1e-8


def test_bp_equals_dense_gradient_ff():
    model, x, y = tiny("ff", seed=3)
    ref = dense_loss_gradient(model, x, y)
    make_method("bp", model).backward(x, y)
    assert rel_err(flat_grads(model), ref) < 1e-10


# ------------------------------------------------------------------------------------ stationarity
def dense_JT(model, c, v, e, u):
    """J_f(v)^T e + J_h(v)^T u from dense autograd Jacobians."""
    J = torch.autograd.functional.jacobian(lambda s: model.g(c, s.reshape(v.shape)).reshape(-1), v.reshape(-1), vectorize=True)
    Jh = torch.autograd.functional.jacobian(lambda s: model.h(s.reshape(v.shape)).reshape(-1), v.reshape(-1), vectorize=True)
    jf = (J - torch.eye(v.numel(), dtype=DT)).T @ e.reshape(-1)
    return jf, Jh.T @ u.reshape(-1)


@pytest.mark.parametrize("name", ["ff", "rnn"])
def test_stationarity_di_and_ebd(name):
    model, x, y = tiny(name, seed=4)
    with torch.no_grad():
        c = model.encode(x)
    di = make_method("lcp-di", model, alpha=0.1, k_i=1.0, tol=1e-14, max_iter=20000)
    (v, yc, e, u), _ = di.controlled_equilibrium(c, y)
    jf, jh = dense_JT(model, c, v, e, u)
    assert float((jf + jh).norm()) <= 1e-8 * float(jh.norm())
    # EBD (Adam on the energy, beta = 1/alpha) reaches the same stationary state to its tolerance
    ebd = make_method("lcp-ebd", model, alpha=0.1, ebd_lr=1e-2, ebd_steps=800, ebd_init="zeros")  # spec (ff)
    (v2, y2, e2, u2), st = ebd.controlled_equilibrium(c, y)
    jf2, jh2 = dense_JT(model, c, v2, e2, u2)
    assert float((jf2 + jh2).norm()) <= 1e-3 * float(jh2.norm())
    assert rel_err(torch.cat([e2.reshape(-1), u2.reshape(-1)]), torch.cat([e.reshape(-1), u.reshape(-1)])) < 1e-3


def test_anderson_reaches_the_same_equilibrium():
    model, x, y = tiny("rnn", seed=5)
    with torch.no_grad():
        c = model.encode(x)
    # the faithful Euler simulation, named explicitly since the default is now the fastest exact solver
    ref = make_method("lcp-di", model, solver="euler", tol=1e-13, max_iter=20000).controlled_equilibrium(c, y)
    acc = make_method("lcp-di", model, solver="anderson", tol=1e-13, max_iter=20000).controlled_equilibrium(c, y)
    for a, b in zip(acc[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert acc[1].iterations < ref[1].iterations


# --------------------------------------------------------------------- closed forms and the local rule
@pytest.mark.parametrize("name", ["ff", "rnn", "conv-ff"])
def test_closed_form_vjps_equal_autograd(name):
    model, x, y = tiny(name, seed=6)
    with torch.no_grad():
        c = model.encode(x)
    v = torch.randn_like(c)
    e, u = torch.randn_like(c), torch.randn(c.shape[0], 3, dtype=DT)
    g, h, jg, jh = model.step_terms(c, v, e, u)
    torch.testing.assert_close(jg, EquilibriumModel.g_vjp(model, c, v, e), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jh, EquilibriumModel.h_vjp(model, v, u), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, model.g(c, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, model.h(v), rtol=1e-12, atol=1e-12)
    # feedback weights equal to the true transposes give the same products (the KP pathway)
    fb = {k: (w.t() if lin else w).detach() for k, (w, lin) in model.feedback_pairs().items()}
    torch.testing.assert_close(model.g_vjp(c, v, e, fb), jg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.h_vjp(v, u, fb), jh, rtol=1e-12, atol=1e-12)


def test_rnn_update_is_the_local_rule():
    model, x, y = tiny("rnn", seed=7)
    method = make_method("lcp-di", model, tol=1e-13, max_iter=20000)
    method.backward(x, y)
    with torch.no_grad():
        c = model.encode(x)
    (v, yc, e, u), _ = method.controlled_equilibrium(c, y)
    s = torch.tanh(v)
    torch.testing.assert_close(model.W.weight.grad, -e.T @ s, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(model.U.weight.grad, -e.T @ x, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(model.U.bias.grad, -e.sum(0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(model.readout.weight.grad, -u.T @ s, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(model.readout.bias.grad, -u.sum(0), rtol=1e-10, atol=1e-14)
    # e* = -f(v*) and u* = -beta grad l(y*) at the equilibrium
    torch.testing.assert_close(e, v - model.g(c, v), rtol=1e-9, atol=1e-13)
    gl = torch.func.grad(lambda o: output_loss(o, y, "ce"))(yc)
    torch.testing.assert_close(u, -method.beta * gl, rtol=1e-9, atol=1e-13)
