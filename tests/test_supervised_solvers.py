"""The structured controlled-equilibrium solvers (core/control.py) against the faithful Euler simulation.

Each solver must give the same LCP update as the joint Euler dynamics run to a tight tolerance (float64,
tiny nets), for the layered (ff, conv-ff) and recurrent (rnn, conv-rnn) models, with true and with
Kolen-Pollack feedback weights, with leaky and with exact output control.
"""
import math
import re

import pytest
import torch

from lcp_meta.core.control import CONTROL_SOLVERS, OutputControl, resolve_control_solver
from lcp_meta.core.system import output_loss
from lcp_meta.models import build_model
from lcp_meta.supervised import make_method

DT = torch.float64


def tiny(name, seed=0):
    torch.manual_seed(seed)
    if name == "ff":
        model, x = build_model("ff", in_shape=(6,), num_classes=3, hidden=(5, 4)), torch.randn(4, 6)
    elif name == "rnn":
        model, x = build_model("rnn", in_shape=(4,), num_classes=3, hidden=5), torch.randn(4, 4)
    elif name == "conv-ff":
        model = build_model("conv-ff", in_shape=(2, 20, 20), num_classes=3, channels=(3, 4, 5), fc=(6, 5))
        x = torch.randn(3, 2, 20, 20)
    else:  # conv-rnn: batch-norm decoder (samples coupled), generic autograd VJPs
        model = build_model("conv-rnn", in_shape=(2, 4, 4), num_classes=3, channels=4, inner=4, groups=2, pool=2)
        with torch.no_grad():
            model.conv1.weight.normal_(0, 0.08)
            model.conv2.weight.normal_(0, 0.08)
        x = torch.randn(3, 2, 4, 4)
    return model.to(DT), x.to(DT), torch.randint(0, 3, (x.shape[0],))


def update(model, method_name, x, y, **kw):
    method = make_method(method_name, model, **kw)
    torch.manual_seed(123)  # KP's feedback weights: the same draw for every solver
    method = make_method(method_name, model, **kw)
    model.zero_grad(set_to_none=True)  # backward accumulates into .grad, like loss.backward()
    stats = method.backward(x, y)
    return torch.cat([p.grad.reshape(-1) for p in method.parameters()]), stats


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# the conv DEQ's settings are the spec's conv-rnn ones (stronger control puts the tiny net in a limit cycle)
GAINS = {"ff": dict(alpha=0.5, k_i=1.0, k_p=0.5), "rnn": dict(alpha=0.5, k_i=1.0, k_p=0.5),
         "conv-ff": dict(alpha=0.1, k_i=0.1), "conv-rnn": dict(alpha=1.0, k_i=0.3)}
CASES = [("ff", s) for s in ("sweep", "reduced", "warm-anderson", "euler-flat", "auto")] + \
        [("conv-ff", s) for s in ("sweep", "warm-anderson", "euler-flat", "auto")] + \
        [("rnn", s) for s in ("reduced", "warm-anderson", "euler-flat", "auto")] + \
        [("conv-rnn", s) for s in ("reduced", "warm-anderson", "euler-flat", "auto")]


@pytest.mark.parametrize("name,solver", CASES)
def test_solver_update_equals_tight_euler_update(name, solver):
    model, x, y = tiny(name)
    ref, _ = update(model, "lcp-di", x, y, solver="euler", tol=1e-14, max_iter=50000, **GAINS[name])
    got, stats = update(model, "lcp-di", x, y, solver=solver, tol=1e-11, max_iter=5000, **GAINS[name])
    assert stats["converged"]
    assert rel_err(got, ref) < 1e-5


def test_auto_falls_back_when_plain_iteration_chatters(monkeypatch):
    """Plain iteration of the reduced map does not settle on the tiny ReLU conv-ff (it chatters between
    activation patterns); 'auto' then finishes with warm-anderson and still gives the Euler update."""
    model, x, y = tiny("conv-ff")
    ref, _ = update(model, "lcp-di", x, y, solver="euler", tol=1e-14, max_iter=50000, **GAINS["conv-ff"])
    plain, stats = update(model, "lcp-di", x, y, solver="reduced", tol=1e-11, max_iter=500, max_residual=1.0,
                          **GAINS["conv-ff"])
    assert not stats["converged"] and rel_err(plain, ref) > 1e-3
    monkeypatch.setattr("lcp_meta.supervised.di.resolve_control_solver", lambda *a: "reduced")
    got, stats = update(model, "lcp-di", x, y, tol=1e-11, max_iter=1000, **GAINS["conv-ff"])
    assert stats["converged"] and 500 < stats["iterations"] <= 1000  # half the budget each, at most
    assert rel_err(got, ref) < 1e-5


def test_every_registered_solver_is_covered():
    assert {s for _, s in CASES} - {"auto"} == set(CONTROL_SOLVERS)


@pytest.mark.parametrize("name,solver", [("ff", "sweep"), ("ff", "reduced"), ("rnn", "reduced"),
                                         ("rnn", "warm-anderson"), ("rnn", "euler-flat")])
def test_kp_solver_update_equals_tight_euler_update(name, solver):
    model, x, y = tiny(name, seed=1)
    ref, _ = update(model, "lcp-di-kp", x, y, solver="euler", tol=1e-14, max_iter=50000)
    got, _ = update(model, "lcp-di-kp", x, y, solver=solver, tol=1e-11, max_iter=5000)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("name,solver", [("ff", "sweep"), ("rnn", "reduced"), ("rnn", "warm-anderson")])
def test_exact_output_control_mse(name, solver):
    """alpha = 0 with the MSE loss: outputs held at the one-hot target (H itself)."""
    model, x, y = tiny(name, seed=2)
    ref, _ = update(model, "lcp-di", x, y, solver="euler", alpha=0.0, loss="mse", tol=1e-14, max_iter=50000)
    got, _ = update(model, "lcp-di", x, y, solver=solver, alpha=0.0, loss="mse", tol=1e-11, max_iter=5000)
    assert rel_err(got, ref) < 1e-5


def test_auto_falls_back_to_euler_without_an_equilibrium():
    """Exact control with cross-entropy has no equilibrium: 'auto' runs the simulation (which fails as before)."""
    model, x, y = tiny("ff")
    with pytest.raises(ValueError, match="no equilibrium"):
        OutputControl(y, 3, DT, "ce", math.inf)
    assert resolve_control_solver("auto", model, "ce", math.inf) == "euler"
    rnn, _, _ = tiny("rnn")
    assert resolve_control_solver("auto", rnn, "ce", 10.0, 64) == "reduced"
    assert resolve_control_solver("auto", rnn, "ce", 10.0, 4) == "warm-anderson"  # strong control
    stats = make_method("lcp-di", model, alpha=0.0, loss="ce", max_iter=50, max_residual=1e9).backward(x, y)
    assert stats["iterations"] == 50 and not stats["converged"]


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_output_controller_solve_is_exact(loss):
    torch.manual_seed(3)
    h, target, beta = 3 * torch.randn(7, 5, dtype=DT), torch.randint(0, 5, (7,)), 40.0
    out = OutputControl(target, 5, DT, loss, beta)
    y, u = out.solve(h)
    # y = h + u and u = -beta grad l(y) with grad l the autograd gradient of the batch-mean loss
    gl = torch.func.grad(lambda o: output_loss(o, target, loss))(y)
    torch.testing.assert_close(u, -beta * gl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y, h + u, rtol=1e-12, atol=1e-14)


def test_sweeps_solve_their_systems_exactly():
    """One forward sweep solves v = g(c, v) + e; one backward sweep solves e = J_g^T e + J_h^T u (dense check)."""
    model, x, _ = tiny("ff", seed=4)
    with torch.no_grad():
        c = model.encode(x)
    e, u = torch.randn_like(c), torch.randn(c.shape[0], 3, dtype=DT)
    v = model.forward_sweep(c, e)
    torch.testing.assert_close(v, model.g(c, v) + e, rtol=1e-12, atol=1e-12)
    ea = model.backward_sweep(c, v, u)
    J = torch.autograd.functional.jacobian(lambda s: model.g(c, s.reshape(v.shape)).reshape(-1), v.reshape(-1))
    Jh = torch.autograd.functional.jacobian(lambda s: model.h(s.reshape(v.shape)).reshape(-1), v.reshape(-1))
    dense = torch.linalg.solve(torch.eye(v.numel(), dtype=DT) - J.T, Jh.T @ u.reshape(-1))
    torch.testing.assert_close(ea.reshape(-1), dense, rtol=1e-10, atol=1e-12)
    # the generic (autograd) versions agree with the closed forms
    from lcp_meta.core.system import EquilibriumModel
    torch.testing.assert_close(EquilibriumModel.forward_sweep(model, c, e), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(EquilibriumModel.backward_sweep(model, c, v, u), ea, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.logits(x), model.h(model.forward_sweep(c)), rtol=1e-12, atol=1e-12)


def test_bad_solver_names():
    model, _, _ = tiny("rnn")
    with pytest.raises(ValueError, match="unknown solver 'fast'"):
        make_method("lcp-di", model, solver="fast")
    with pytest.raises(ValueError, match="'sweep' needs a layered model"):
        make_method("lcp-di", model, solver="sweep")


@pytest.mark.parametrize("key,value", [("tol", float("nan")), ("alpha", float("nan")), ("k_i", float("inf")),
                                       ("max_residual", float("nan")), ("dt", float("nan")), ("k_p", "1")])
def test_non_finite_hyperparameters_are_refused(key, value):
    model, _, _ = tiny("ff")
    with pytest.raises(ValueError, match=f"{key} must be a finite number( or inf)?, got {re.escape(repr(value))}$"):
        make_method("lcp-di", model, **{key: value})
    if key in ("tol", "max_residual"):  # (and every method, through the base class)
        with pytest.raises(ValueError, match=f"{key} must be a finite number"):
            make_method("rbp", model, **{key: value})


def test_warm_start_that_does_not_settle_keeps_the_budget_and_a_valid_state():
    """Chaotic free dynamics: the free phase uses the whole budget; the solve reports it (no None state)."""
    torch.manual_seed(3)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=6).to(DT)
    with torch.no_grad():
        model.W.weight.copy_(4.0 * torch.linalg.qr(torch.randn(6, 6, dtype=DT))[0])
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    with torch.no_grad():
        c = model.encode(x)
    method = make_method("lcp-di", model, solver="warm-anderson", max_iter=60, max_residual=1e9)
    (v, yc, e, u), stats = method.controlled_equilibrium(c, y)
    assert stats.iterations <= 60 and not stats.converged
    assert all(torch.isfinite(t).all() for t in (v, yc, e, u))


def test_auto_continues_a_non_settling_solve_as_one_full_budget_run():
    """Oscillating dynamics (residual above max_residual after half the budget): 'auto' goes on with the plain
    iteration from where it stopped, which is the same as one run with the whole budget."""
    torch.manual_seed(3)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=6).to(DT)
    with torch.no_grad():
        model.W.weight.copy_(4.0 * torch.linalg.qr(torch.randn(6, 6, dtype=DT))[0])  # chaotic
    x, y = torch.randn(64, 4, dtype=DT), torch.randint(0, 3, (64,))
    with torch.no_grad():
        c = model.encode(x)
    _, whole = make_method("lcp-di", model, solver="reduced", max_iter=200, max_residual=1e9,
                           newton="off").controlled_equilibrium(c, y)  # (Newton runs in the first half only)
    assert whole.residual > 1e-2 and whole.iterations == 200
    with pytest.raises(Exception) as info:
        make_method("lcp-di", model, max_iter=200, max_residual=1e-2, newton="off").controlled_equilibrium(c, y)
    assert info.value.stats.iterations == 200
    torch.testing.assert_close(info.value.stats.per_sample, whole.per_sample, rtol=0, atol=0)


def test_max_residual_inf_applies_the_update_from_the_reached_state():
    """max_residual=inf (a faithful mode's setting): a solve that did not settle still writes its update."""
    model, x, y = tiny("rnn")
    method = make_method("lcp-di", model, solver="euler", max_iter=3, max_residual=float("inf"))
    stats = method.backward(x, y)
    assert not stats["converged"] and stats["iterations"] == 3
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


def test_batch_stop_rule_iterates_every_sample_together():
    from lcp_meta.core.solvers import solve
    model, x, y = tiny("rnn", seed=5)
    with torch.no_grad():
        c = model.encode(x)
    method = make_method("lcp-di", model, solver="euler", stop_rule="batch", tol=1e-8, max_iter=5000)
    (v, yc, e, u), stats = method.controlled_equilibrium(c, y)
    # the same as the unfrozen Euler iteration run for exactly that many steps
    z0 = (torch.zeros_like(c), torch.zeros_like(yc), torch.zeros_like(c), torch.zeros_like(yc))
    (v2, y2, e2, _), _ = solve(method.controlled_step(c, y), z0, tol=None, max_iter=stats.iterations,
                               freeze_converged=False)
    torch.testing.assert_close(v, v2, rtol=0, atol=0)
    torch.testing.assert_close(e, e2, rtol=0, atol=0)
    per_sample = make_method("lcp-di", model, solver="euler", tol=1e-8, max_iter=5000).controlled_equilibrium(c, y)
    assert not torch.equal(per_sample[0][0], v)  # frozen samples stopped earlier
    with pytest.raises(ValueError, match="stop_rule must be"):
        make_method("lcp-di", model, stop_rule="sample")
