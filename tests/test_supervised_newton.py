"""Per-sample Newton for the samples of LCP-DI's reduced iteration that stop settling (issue 9).

References are independent of the solver: the fixed-point equations checked with dense autograd Jacobians, the
update against the rnn's local rule and against finite differences of F_beta (its stationary point found by a
dense-Hessian Newton method), and the tight-tolerance Euler simulation; float64, tiny rnns.
"""
import math

import pytest
import torch

from lcp_meta.core.control import ControlProblem, OutputControl
from lcp_meta.core.solvers import StallRescue, newton_rows
from lcp_meta.core.system import output_loss
from lcp_meta.models import build_model
from lcp_meta.supervised import make_method
from lcp_meta.supervised.newton import StragglerNewton
from test_supervised_exact import fd_gradient  # central differences along directions (the shared helper)

DT = torch.float64


def _rnn(seed, radius, batch=8, hidden=6):
    torch.manual_seed(seed)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=hidden).to(DT)
    with torch.no_grad():
        W = torch.randn(hidden, hidden, dtype=DT)
        model.W.weight.copy_(W / torch.linalg.eigvals(W).abs().max() * radius)
    return model, torch.randn(batch, 4, dtype=DT), torch.randint(0, 3, (batch,))


def _update(model, x, y, **kw):
    method = make_method("lcp-di", model, **kw)
    model.zero_grad(set_to_none=True)
    stats = method.backward(x, y)
    return torch.cat([p.grad.reshape(-1) for p in method.parameters()]), stats, method


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# stragglers: seed 8, spectral radius 1.5, beta = 3 -- two of the 8 samples do not settle under the reduced iteration
# (one chatters around a fixed point it cannot reach: the reduced map's Jacobian there has spectral radius 1.007)
STRAGGLER = dict(seed=8, radius=1.5)
GAINS = dict(alpha=0.1, k_i=0.3, tol=1e-11, max_iter=2000)


# ----------------------------------------------------------------------------------------- the Newton solver
def test_newton_rows_solves_each_row_and_gives_up_where_there_is_no_root():
    a = torch.tensor([[2.0, 3.0], [5.0, 0.5], [-1.0, 1.0]], dtype=DT)

    def residual(x, a):  # rows 0, 1: x^3 + 0.1 x_other = a has a root; row 2's first entry x^2 + 1 has none
        r = x.pow(3) + 0.1 * x.flip(1) - a
        return torch.where(a < 0, x.pow(2) + 1, r)

    x, ok, counts = newton_rows(residual, torch.ones(3, 2, dtype=DT), (a,),
                                accept=lambda x, rows: residual(x, a[rows]).norm(dim=1) < 1e-13)
    assert ok.tolist() == [True, True, False]
    assert float(residual(x[:2], a[:2]).abs().max()) < 1e-13
    assert counts["jacobians"] <= 3 * 10 and counts["steps"] >= counts["jacobians"] // 3


@pytest.mark.parametrize("act", ["tanh", "relu", "linear"])
@pytest.mark.parametrize("loss,kp,bias", [("ce", False, False), ("mse", False, True), ("ce", True, True)])
def test_closed_form_rnn_jacobian_equals_forward_mode(loss, kp, bias, act):
    torch.manual_seed(3)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=6, recurrent_bias=bias, activation=act).to(DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    with torch.no_grad():
        c = model.encode(x)
    fb = {"W": torch.randn(6, 6, dtype=DT), "readout": torch.randn(6, 3, dtype=DT)} if kp else None
    prob = ControlProblem(model, c, OutputControl(y, 3, DT, loss, 2.5), fb, 1e-9, 100)
    newton = StragglerNewton(prob)
    assert newton.jacobian is not None
    z = torch.randn(5, 9, dtype=DT)
    oh = newton.onehot

    def one(zr, cr, ohr):  # the generic residual (the model's g and VJPs), not the closed form
        return StragglerNewton.residual(newton, zr[None], cr[None], ohr[None])[0]

    with torch.no_grad():
        ref = torch.func.vmap(torch.func.jacfwd(one))(z, c, oh)
        torch.testing.assert_close(newton.jacobian(z, c, oh), ref, rtol=1e-12, atol=1e-12)
        # the rnn's closed-form residual is the generic one
        torch.testing.assert_close(newton.residual(z, c, oh), StragglerNewton.residual(newton, z, c, oh),
                                   rtol=1e-13, atol=1e-13)


# -------------------------------------------------------------------------- (a) settling samples: same update
def test_newton_on_settling_samples_gives_the_tight_euler_update():
    model, x, y = _rnn(seed=0, radius=0.9)
    gains = dict(alpha=0.5, k_i=1.0, k_p=0.5)
    ref, _, _ = _update(model, x, y, solver="euler", tol=1e-13, max_iter=200000, **gains)
    # every sample looks stalled (its change does not halve at each step): all go to Newton from step 10 on
    got, st, _ = _update(model, x, y, tol=1e-12, newton_options={"window": 1, "min_iter": 10}, **gains)
    assert st["converged"] and st["newton_samples"] == 8 and st["newton_solved"] == 8
    assert _rel(got, ref) < 1e-8
    # handed over at step 3, far from where it settles, one sample's Newton lands on another equilibrium of the
    # same equations (strong control: several exist); 'reach' refuses roots that far and the iteration goes on
    far, st, _ = _update(model, x, y, tol=1e-12, newton_options={"window": 1, "min_iter": 3}, **gains)
    assert st["converged"] and st["newton_too_far"] == 0 and _rel(far, ref) > 0.1
    near, st, _ = _update(model, x, y, tol=1e-12, newton_options={"window": 1, "min_iter": 3, "reach": 0.2}, **gains)
    assert st["converged"] and st["newton_too_far"] >= 1 and st["newton_max_move"] > 0.2
    assert _rel(near, ref) < 1e-8


# ---------------------------------------------------------------- (b) a straggler: Newton's point is the equilibrium
def _dense_jt(model, c, v, e, u):
    """J_f(v)^T e + J_h(v)^T u with dense autograd Jacobians."""
    J = torch.autograd.functional.jacobian(lambda s: model.g(c, s.reshape(v.shape)).reshape(-1), v.reshape(-1))
    Jh = torch.autograd.functional.jacobian(lambda s: model.h(s.reshape(v.shape)).reshape(-1), v.reshape(-1))
    return (J - torch.eye(v.numel(), dtype=DT)).T @ e.reshape(-1) + Jh.T @ u.reshape(-1)


def _f_beta(model, x, y, beta, z0):
    """min over (v, y) of 1/2|g - v|^2 + 1/2|h(v) - y|^2 + beta l(y) near z0 (Newton on the gradient with the
    dense Hessian: it finds the stationary point whether or not the dynamics are stable there)."""
    with torch.no_grad():
        c = model.encode(x)
    n = c.numel()

    def fun(z):
        v, out = z[:n].reshape(c.shape), z[n:].reshape(c.shape[0], -1)
        return 0.5 * (model.g(c, v) - v).pow(2).sum() + 0.5 * (model.h(v) - out).pow(2).sum() \
            + beta * output_loss(out, y, "ce")

    z = z0.clone()
    for _ in range(30):
        step = torch.linalg.solve(torch.func.hessian(fun)(z), torch.func.grad(fun)(z))
        z = (z - step).detach()
        if step.norm() <= 1e-13 * max(1.0, float(z.norm())):
            break
    return float(fun(z)), z


def test_straggler_solved_by_newton_is_the_controlled_equilibrium():
    model, x, y = _rnn(**STRAGGLER)
    off, st_off, _ = _update(model, x, y, newton="off", max_residual=math.inf, **GAINS)
    assert not st_off["converged"] and st_off["residual"] > 1e-4  # the reduced iteration chatters
    assert "newton_samples" not in st_off
    got, st, method = _update(model, x, y, newton_options={"stability": True}, **GAINS)
    assert st["converged"] and st["residual"] < 1e-11
    assert st["newton_samples"] >= 1 and st["newton_solved"] == st["newton_samples"]
    # the point Newton found is a fixed point the reduced iteration leaves: why it chattered
    assert st["newton_unstable"] >= 1 and st["newton_max_rho"] > 1
    with torch.no_grad():
        c = model.encode(x)
    (v, yc, e, u), _ = method.controlled_equilibrium(c, y)
    # the fixed-point equations, from dense autograd: e = -f(v), y = h(v) + u, u = -beta grad l(y), J^T psi = 0
    # (to the solver's tolerance, 1e-11 relative change per step)
    assert _rel(v - model.g(c, v), e) < 1e-8
    assert _rel(model.h(v) + u, yc) < 1e-8
    yv = yc.clone().requires_grad_(True)
    grad_l = torch.autograd.grad(output_loss(yv, y, "ce"), yv)[0]
    assert _rel(-method.beta * grad_l, u) < 1e-8
    assert float(_dense_jt(model, c, v, e, u).norm()) <= 1e-8 * float(u.norm())
    # the update is the LCP update at that point: the rnn's local rule ...
    s = torch.tanh(v)
    torch.testing.assert_close(model.W.weight.grad, -e.T @ s, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(model.readout.weight.grad, -u.T @ s, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(model.U.weight.grad, -e.T @ x, rtol=1e-10, atol=1e-14)
    # ... and the gradient of F_beta along its stationary point (central differences, dense Newton re-solves)
    z0 = torch.cat([v.reshape(-1), yc.reshape(-1)])
    value, zs = _f_beta(model, x, y, method.beta, z0)
    assert float((zs - z0).norm() / z0.norm()) < 1e-9  # the same stationary point
    dirs = torch.randn(3, sum(p.numel() for p in model.parameters() if p.requires_grad), dtype=DT)
    fd, _ = fd_gradient(model, lambda: _f_beta(model, x, y, method.beta, z0)[0], directions=dirs)
    assert _rel(dirs @ got, fd) < 1e-5


# ---------------------------------------------------------------------------- (c) Newton fails: as without it
def test_newton_failure_falls_back_to_the_reduced_iteration_and_is_reported(monkeypatch):
    model, x, y = _rnn(**STRAGGLER)
    off, st_off, _ = _update(model, x, y, newton="off", max_residual=math.inf, **GAINS)

    def failing(residual, x0, consts=(), **kw):  # a Newton that never solves (and leaves garbage behind)
        x, ok, counts = newton_rows(residual, x0, consts, **kw)
        return torch.full_like(x, math.nan), torch.zeros_like(ok), counts

    monkeypatch.setattr("lcp_meta.supervised.newton.newton_rows", failing)
    got, st, _ = _update(model, x, y, max_residual=math.inf, **GAINS)
    assert st["newton_samples"] >= 1 and st["newton_solved"] == 0 and st["newton_jacobians"] >= 1
    assert not st["converged"] and st["residual"] == pytest.approx(st_off["residual"], rel=1e-9)
    assert torch.isfinite(got).all() and _rel(got, off) < 1e-10


# ------------------------------------------------------------------------------ where Newton is (not) used
def test_newton_stays_off_for_the_paper_stop_rule_and_the_euler_simulation():
    model, x, y = _rnn(**STRAGGLER)
    for kw in (dict(stop_rule="batch"), dict(solver="euler"), dict(newton="off")):
        _, st, _ = _update(model, x, y, max_residual=math.inf, **{**GAINS, "max_iter": 300}, **kw)
        assert "newton_samples" not in st, kw
    with pytest.raises(ValueError, match="newton must be 'auto', 'on' or 'off', got 'yes'"):
        make_method("lcp-di", model, newton="yes")
    with pytest.raises(ValueError, match="unknown newton_options \\['windw'\\]"):
        make_method("lcp-di", model, newton_options={"windw": 3})
    with pytest.raises(ValueError, match="StallRescue window must be an integer >= 1, got 0"):
        make_method("lcp-di", model, newton_options={"window": 0})
    with pytest.raises(ValueError, match="needs active_set=True"):
        from lcp_meta.core.solvers import solve
        solve(lambda z: z, (torch.zeros(2, 2),), rescue=StallRescue(lambda *a: None))
