"""LCP-DI's faithful Euler dynamics on one flat state per sample (solver 'euler-flat', ``core/control.py``).

It is the joint Euler simulation of ``DynamicInversion.controlled_step`` (state ``(v, y, e, u_I)``, leaky-integral
output controller, ``dt``), only written with fused products and an active set: its iterates must be the
simulation's (float64, ~1e-12 after k steps, for any dt, gains, loss, KP feedback, recurrent bias, a non-fused
model), samples must leave at different steps with the simulation's per-sample result, and its update must equal
the tight-tolerance Euler update (relative error < 1e-5).
"""
import pytest
import torch

from lcp_meta.core.control import CONTROL_SOLVERS, ControlProblem, OutputControl
from lcp_meta.core.solvers import solve
from lcp_meta.core.system import output_loss_grad
from lcp_meta.models import build_model
from lcp_meta.supervised import make_method

DT = torch.float64


def _rnn(seed=0, batch=8, radius=0.9, hidden=6, recurrent_bias=False):
    torch.manual_seed(seed)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=hidden, recurrent_bias=recurrent_bias).to(DT)
    with torch.no_grad():
        W = torch.randn(hidden, hidden, dtype=DT)
        model.W.weight.copy_(W / torch.linalg.eigvals(W).abs().max() * radius)
    return model, torch.randn(batch, 4, dtype=DT), torch.randint(0, 3, (batch,))


def _method(model, name="lcp-di", **kw):
    torch.manual_seed(1)  # (KP's feedback weights)
    return make_method(name, model, **kw)


def _flat_solve(method, x, y, tol, max_iter, active_set=True):
    """'euler-flat' on the batch's problem, as ``_network`` builds it."""
    c = method.model.encode(x)
    out = OutputControl(y, method.model.num_classes, DT, method.loss, method.beta)
    prob = ControlProblem(method.model, c, out, method._fb(), tol, max_iter, gains=method.output, dt=method.dt,
                          active_set=active_set, freeze_converged=True)
    with torch.no_grad():
        return CONTROL_SOLVERS["euler-flat"](prob)


def _simulation(method, x, y, tol, max_iter):
    """``DynamicInversion.controlled_step`` iterated by the generic Euler solver (the faithful simulation)."""
    c = method.model.encode(x)
    v0 = method.model.init_state(c)
    with torch.no_grad():
        y0 = torch.zeros_like(method.model.h(v0))
        (v, yy, e, ui), st = solve(method.controlled_step(c, y), (v0, y0, torch.zeros_like(v0), torch.zeros_like(y0)),
                                   tol=tol, max_iter=max_iter, freeze_converged=True)
        u = method.output.u(ui, output_loss_grad(yy, y, method.loss))
    return (v, yy, e, u), st


CASES = {  # method, gains and dt, loss
    "di-dt1": ("lcp-di", dict(alpha=0.1, k_i=1.0, k_p=0.0, dt=1.0), "ce"),
    "di-dt0.3-kp-gain": ("lcp-di", dict(alpha=0.5, k_i=0.7, k_p=0.5, dt=0.3), "ce"),
    "mse": ("lcp-di", dict(alpha=0.2, k_i=1.0, k_p=0.2, dt=0.7), "mse"),
    "exact-control-mse": ("lcp-di", dict(alpha=0.0, k_i=0.5, k_p=0.0, dt=0.5), "mse"),
    "kp": ("lcp-di-kp", dict(alpha=0.1, k_i=1.0, k_p=0.0, dt=1.0), "ce"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bias", [False, True])
def test_iterates_are_the_simulation_iterates(case, bias):
    name, gains, loss = CASES[case]
    model, x, y = _rnn(recurrent_bias=bias)
    method = _method(model, name, loss=loss, **gains)
    for k in (1, 7, 40):
        (v, yy, e, u), st = _flat_solve(method, x, y, tol=1e-300, max_iter=k)
        (v_r, y_r, e_r, u_r), st_r = _simulation(method, x, y, tol=1e-300, max_iter=k)
        assert st.iterations == st_r.iterations == k
        for a, b in ((v, v_r), (yy, y_r), (e, e_r), (u, u_r)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_iterates_of_a_model_without_fused_terms_are_the_simulation_iterates():
    model, x, y = _rnn()
    model.controlled_terms = None  # (the instance attribute hides the method: the step_terms branch)
    method = _method(model, alpha=0.3, k_i=1.0, k_p=0.3, dt=0.8)
    (v, yy, e, u), _ = _flat_solve(method, x, y, tol=1e-300, max_iter=25)
    (v_r, y_r, e_r, u_r), _ = _simulation(method, x, y, tol=1e-300, max_iter=25)
    for a, b in ((v, v_r), (yy, y_r), (e, e_r), (u, u_r)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_samples_leave_at_different_steps_with_the_simulation_state():
    model, x, y = _rnn(batch=16, radius=1.1)
    method = _method(model, alpha=0.1, k_i=1.0, k_p=0.0)
    z, st = _flat_solve(method, x, y, tol=1e-8, max_iter=5000)
    z_r, st_r = _simulation(method, x, y, tol=1e-8, max_iter=5000)
    assert st.converged and st_r.converged and st.iterations == st_r.iterations
    assert st.mean_iterations < st.iterations - 1  # samples left at different steps
    for a, b in zip(z, z_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.per_sample, st_r.per_sample, rtol=1e-6, atol=0)


def _update(model, name, x, y, **kw):
    method = _method(model, name, **kw)
    model.zero_grad(set_to_none=True)
    stats = method.backward(x, y)
    return torch.cat([p.grad.reshape(-1) for p in method.parameters()]), stats


@pytest.mark.parametrize("case", sorted(CASES))
def test_update_equals_tight_euler(case):
    name, gains, loss = CASES[case]
    model, x, y = _rnn(seed=2)
    got, st = _update(model, name, x, y, solver="euler-flat", tol=1e-10, max_iter=100000, loss=loss, **gains)
    assert st["converged"] and st["mean_iterations"] < st["iterations"]  # samples left at different steps
    ref, _ = _update(model, name, x, y, solver="euler", tol=1e-13, max_iter=200000, loss=loss, **gains)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_batch_wide_stop_iterates_the_whole_batch_like_the_simulation():
    model, x, y = _rnn(seed=2)
    gains = dict(alpha=0.1, k_i=1.0, k_p=0.0, tol=1e-8, stop_rule="batch")
    got, st = _update(model, "lcp-di", x, y, solver="euler-flat", **gains)
    ref, st_r = _update(model, "lcp-di", x, y, solver="euler", **gains)
    assert "mean_iterations" not in st and st["iterations"] == st_r["iterations"]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)


def test_bad_use_is_refused_with_a_clear_error():
    model, x, y = _rnn()
    method = _method(model)
    c = model.encode(x)
    out = OutputControl(y, 3, DT, "ce", method.beta)
    with pytest.raises(ValueError, match="gains"):
        CONTROL_SOLVERS["euler-flat"](ControlProblem(model, c, out, None, 1e-6, 10))
    with pytest.raises(ValueError, match="from 0"):
        CONTROL_SOLVERS["euler-flat"](ControlProblem(model, c, out, None, 1e-6, 10, gains=method.output,
                                                     start=(c, c, out.onehot)))


@pytest.mark.parametrize("case", ["di-dt1", "kp", "mse"])
def test_handover_to_the_reduced_map_gives_the_tight_euler_update(case):
    # the faithful dynamics until every sample's relative change is below 1e-3, then the reduced map from there:
    # on these tiny rnns (one equilibrium) the same update (in more or fewer steps than the dynamics alone: the
    # reduced map's rate is not the dynamics'); with MSE and b = 0.65 the reduced map does not settle from there
    # and the dynamics go on
    name, gains, loss = CASES[case]
    model, x, y = _rnn(seed=2)
    ref, _ = _update(model, name, x, y, solver="euler", tol=1e-13, max_iter=200000, loss=loss, **gains)
    alone, st_alone = _update(model, name, x, y, solver="euler-flat", tol=1e-10, max_iter=100000, loss=loss, **gains)
    method = _method(model, name, solver="euler-flat", tol=1e-10, max_iter=100000, loss=loss, **gains)
    method.control_options = {"handover_tol": 1e-3}
    model.zero_grad(set_to_none=True)
    st = method.backward(x, y)
    got = torch.cat([p.grad.reshape(-1) for p in method.parameters()])
    assert st["converged"] and st["mean_iterations"] != st_alone["mean_iterations"]  # (the reduced map ran)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_handover_where_a_sample_does_not_get_near_settling_ends_as_the_dynamics_alone():
    # handover_tol 1e-12 is not reached in half the 300-step budget: every sample goes on under the dynamics, and
    # the result is the dynamics' own after 300 steps (the samples that left at 1e-12 are not reported unsettled)
    model, x, y = _rnn(seed=2)
    gains = dict(alpha=0.1, k_i=1.0, k_p=0.0, tol=1e-13, max_iter=300, max_residual=float("inf"))
    alone, st_alone = _update(model, "lcp-di", x, y, solver="euler-flat", **gains)
    method = _method(model, solver="euler-flat", **gains)
    method.control_options = {"handover_tol": 1e-12}
    model.zero_grad(set_to_none=True)
    st = method.backward(x, y)
    got = torch.cat([p.grad.reshape(-1) for p in method.parameters()])
    assert not st_alone["converged"] and st["iterations"] == st_alone["iterations"] == 300
    torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-15)
