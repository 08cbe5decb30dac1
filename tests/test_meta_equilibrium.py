"""LCP at its equilibrium by default: dense float64 references for the meta-gradient and the reported
residuals, the CG guard, input checks and divergence advice (issues 7, 9.3, 10.1)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian

from lcp_meta.core.solvers import DivergenceError
from lcp_meta.meta import IMAML, LCP, ContrastiveMeta, TaskBatch, make_method
from lcp_meta.meta.reference import exact_hypergradient, flat_loss, flatten_params, inner_solution
from lcp_meta.models.fewshot import MetaMLP

DT = torch.float64


def _problem(seed=0, T=2, n=8, hidden=(16, 16), amp=2.0):
    torch.manual_seed(seed)
    model = MetaMLP(1, hidden, 1, activation="tanh").double()
    a = 0.5 + amp * torch.rand(T, 1, 1, dtype=DT)
    ph = 3 * torch.rand(T, 1, 1, dtype=DT)
    xs, xq = 6 * torch.rand(T, n, 1, dtype=DT) - 3, 6 * torch.rand(T, n, 1, dtype=DT) - 3
    return model, TaskBatch(xs, a * torch.sin(xs + ph), xq, a * torch.sin(xq + ph))


def _grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _tasks(tb):
    return tb.x_support, tb.y_support, tb.x_query, tb.y_query


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_lcp_at_defaults_is_the_exact_hypergradient(lam):
    """Nothing but lam set: the LCP meta-gradient, not a truncated controller (cosine 0.30 before)."""
    model, tb = _problem()
    ref = exact_hypergradient(model, F.mse_loss, *_tasks(tb), lam=lam)
    stats = LCP(model, F.mse_loss, lam=lam).meta_backward(tb)
    assert stats.converged and stats.control_residual < 1e-6 and stats.inner_residual < 1e-6
    assert _cos(_grad(model), ref) >= 0.99  # beta = 1e-2: O(beta) from the beta -> 0 limit
    # the truncated controller under its own name is reported as what it is
    model.zero_grad()
    trunc = make_method("lcp-truncated", model, F.mse_loss, lam=lam).meta_backward(tb)
    assert not trunc.converged and trunc.control_residual > 1e-2


@pytest.mark.parametrize("beta, rounds", [(0.05, True), (1e-5, False)])
def test_reported_residuals_are_those_of_the_returned_state(beta, rounds):
    """Recompute |(H + lam) u + grad l_out| / |grad l_out| and |f + beta u| / |f(omega)| with dense Hessians.
    Without rounds (small beta) the inner residual uses the force the relaxation evaluated at its last state."""
    model, tb = _problem(1, T=2)
    lam = 1.0
    lcp = LCP(model, F.mse_loss, lam=lam, beta=beta, tol=1e-3)  # loose: residuals well above round-off
    stats = lcp.meta_backward(tb)
    assert (stats.extra["rounds"] > 0) == rounds
    names = [k for k, _ in model.named_parameters()]
    ctrl, inner = _dense_residuals(model, tb, lam, beta, lcp.last_state)
    assert stats.control_residual == pytest.approx(max(ctrl), rel=1e-6)
    assert stats.inner_residual == pytest.approx(max(inner), rel=1e-6)
    assert stats.residual == pytest.approx(max(max(ctrl), max(inner)), rel=1e-6) and stats.residual <= 1e-3
    # and the gradient is -lam u, averaged over tasks
    u_mean = torch.cat([lcp.last_state["u"][k].mean(0).reshape(-1) for k in names])
    torch.testing.assert_close(_grad(model), -lam * u_mean, rtol=1e-12, atol=1e-14)


def _dense_residuals(model, tb, lam, beta, state):
    """Per task, recomputed with dense Hessians: |(H + lam) u + grad l_out| / |grad l_out| and
    |f(phi) + beta u| / |f(omega)| at the returned state."""
    loss = flat_loss(model, F.mse_loss)
    omega, _, _ = flatten_params(model)
    names = [k for k, _ in model.named_parameters()]
    ctrl, inner = [], []
    for t in range(tb.num_tasks):
        phi = torch.cat([state["phi"][k][t].reshape(-1) for k in names])
        u = torch.cat([state["u"][k][t].reshape(-1) for k in names])
        xs, ys, xq, yq = (v[t] for v in _tasks(tb))
        H = hessian(lambda p: loss(p, xs, ys), phi)
        p = phi.clone().requires_grad_(True)
        g_in, = torch.autograd.grad(loss(p, xs, ys), p)
        g_out, = torch.autograd.grad(loss(p, xq, yq), p)
        o = omega.clone().requires_grad_(True)
        g0, = torch.autograd.grad(loss(o, xs, ys), o)
        ctrl.append(float((H @ u + lam * u + g_out).norm() / g_out.norm()))
        inner.append(float((-g_in - lam * (phi - omega) + beta * u).norm() / g0.norm()))
    return ctrl, inner


@pytest.mark.parametrize("control_tol", [None, 0.05])
def test_cg_certified_control_is_exact_and_reports_true_residuals(monkeypatch, control_tol):
    """The default path at small beta: relax, CG on the control, certified by CG's own (recursive) residual
    and |f(phi) + beta u|; here beta u moves the inner equilibrium by more than tol, so one round relaxes phi
    under beta u and checks/continues the control there, still without the joint DI dynamics.  The residuals
    it reports are the true ones (dense Hessians), it costs exactly power_iters + CG steps + rounds
    Hessian-vector products, and the meta-gradient is the exact hypergradient (tight tol) or as close as its
    residuals allow (loose control_tol)."""
    import lcp_meta.meta.inner_problem as ip
    calls = {"hvp": 0}
    real = ip.grad_and_hvp

    def counted(*a, **k):
        calls["hvp"] += 1  # once per (task-batched) call under vmap
        return real(*a, **k)

    monkeypatch.setattr(ip, "grad_and_hvp", counted)
    model, tb = _problem(5, T=3)
    lam = 1.0
    ref = exact_hypergradient(model, F.mse_loss, *_tasks(tb), lam=lam)
    lcp = LCP(model, F.mse_loss, lam=lam, tol=1e-3, control_tol=control_tol)
    stats = lcp.meta_backward(tb)
    # certified without the joint DI dynamics; Hessian-vector products: the step estimate, the CG steps and one
    # per round of (relax under beta u, check the control at the moved phi)
    assert stats.converged and stats.extra["joint_iterations"] == 0 and stats.extra["rounds"] >= 1
    assert calls["hvp"] == lcp.power_iters + stats.extra["control_iterations"] + stats.extra["rounds"] \
        == stats.extra["hvps"]
    ctrl, inner = _dense_residuals(model, tb, lam, lcp.beta, lcp.last_state)
    assert stats.control_residual == pytest.approx(max(ctrl), rel=1e-6)
    assert stats.inner_residual == pytest.approx(max(inner), rel=1e-6)
    assert max(inner) <= 1e-3 and max(ctrl) <= (control_tol or 1e-3)
    names = [k for k, _ in model.named_parameters()]
    u_mean = torch.cat([lcp.last_state["u"][k].mean(0).reshape(-1) for k in names])
    torch.testing.assert_close(_grad(model), -lam * u_mean, rtol=1e-12, atol=1e-14)
    cos = _cos(_grad(model), ref)
    if control_tol is None:
        assert cos >= 0.9999 and max(ctrl) > 1e-5  # a real residual, not round-off: the check above can fail
    else:  # a looser control: fewer CG steps, residual between the two tolerances, still a good gradient
        assert 1e-3 < max(ctrl) <= control_tol and cos >= 0.99


def test_control_tol_is_checked():
    model, _ = _problem()
    with pytest.raises(ValueError, match="control_tol must be a finite number > 0 or None, got -0.1"):
        LCP(model, F.mse_loss, control_tol=-0.1)
    with pytest.raises(ValueError, match="control_tol=0.1 applies to the dynamic-inversion controller"):
        LCP(model, F.mse_loss, controller="direct", control_tol=0.1)


def _largest_curvature(model, tb, lam):
    loss = flat_loss(model, F.mse_loss)
    omega, _, _ = flatten_params(model)
    top = 0.0
    for t in range(tb.num_tasks):
        phi = inner_solution(loss, omega, lam, tb.x_support[t], tb.y_support[t])
        H = hessian(lambda p: loss(p, tb.x_support[t], tb.y_support[t]), phi)
        top = max(top, float(torch.linalg.eigvalsh(H)[-1]) + lam)
    return top


def test_no_nan_where_the_free_dynamics_is_stable():
    """At a given inner_lr just inside the free dynamics' stability limit (inner_lr lam_max < 2, dense
    Hessian at phi*) LCP converges to the exact hypergradient; just outside it raises, never NaN."""
    model, tb = _problem(2)
    lam = 1.0
    top = _largest_curvature(model, tb, lam)
    ref = exact_hypergradient(model, F.mse_loss, *_tasks(tb), lam=lam)
    stats = LCP(model, F.mse_loss, lam=lam, inner_lr=1.8 / top, inner_steps=5000).meta_backward(tb)
    assert stats.converged and _cos(_grad(model), ref) >= 0.99
    model.zero_grad()
    with pytest.raises(DivergenceError, match="inner_lr"):
        LCP(model, F.mse_loss, lam=lam, inner_lr=2.2 / top, inner_steps=5000).meta_backward(tb)
    assert all(p.grad is None for p in model.parameters())


def test_imaml_cg_guard_on_an_indefinite_system():
    """A concave inner loss makes Hess l_in + lam indefinite: CG stops at p^T A p <= 0 and says so."""
    model, tb = _problem(3)
    concave = lambda pred, y: -F.mse_loss(pred, y)  # noqa: E731
    m = IMAML(model, concave, lam=0.05, cg_steps=10, inner_lr=0.01, inner_steps=1, tol=None)
    stats = m.meta_backward(tb)
    assert stats.extra["cg_indefinite"] == tb.num_tasks and not stats.converged
    assert math.isfinite(stats.control_residual) and torch.isfinite(_grad(model)).all()
    # without the guard the first step would divide by a negative curvature: the guard is what fires
    model.zero_grad()
    fine = IMAML(model, F.mse_loss, lam=2.0, cg_steps=5).meta_backward(tb)
    assert fine.extra["cg_indefinite"] == 0 and fine.control_residual < 1


@pytest.mark.parametrize("make, value", [
    (lambda m: LCP(m, F.mse_loss, beta=float("inf")), "beta must be a finite number > 0, got inf"),
    (lambda m: LCP(m, F.mse_loss, beta=float("nan")), "beta must be a finite number > 0, got nan"),
    (lambda m: LCP(m, F.mse_loss, lam=float("inf")), "lam must be a finite number > 0, got inf"),
    (lambda m: LCP(m, F.mse_loss, inner_lr=float("nan")), "inner_lr must be a finite number > 0 or None"),
    (lambda m: LCP(m, F.mse_loss, psi_lr=-1.0), "psi_lr must be a finite number > 0 or None, got -1.0"),
    (lambda m: IMAML(m, F.mse_loss, lam=0.0), "lam must be a finite number > 0, got 0.0"),
    (lambda m: ContrastiveMeta(m, F.mse_loss, beta=float("inf")), "beta must be a finite number > 0"),
    (lambda m: LCP(m, F.mse_loss, tol=None), "lcp-truncated"),
])
def test_bad_settings_are_rejected(make, value):
    model, _ = _problem()
    with pytest.raises(ValueError, match=value.replace("(", r"\(")):
        make(model)


def test_divergence_advice_names_the_cause():
    model, tb = _problem(4)
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    cases = [
        (TaskBatch(tb.x_support, nan(tb.y_support), tb.x_query, tb.y_query), {}, r"y_support"),
        (TaskBatch(tb.x_support, tb.y_support, tb.x_query, nan(tb.y_query)), {}, r"\(y_query contain"),
        (tb, {"inner_lr": 10.0}, r"likely cause: inner_lr=10.0 is past the stability limit"),
        # the automatic step (inner_lr unset) must not be advised to a run that already uses it
        (tb, {"inner_steps": 3}, r"raise inner_steps.*smooth activation"),
        (tb, {"inner_steps": 3, "inner_lr": 0.01}, r"raise inner_steps.*leave inner_lr unset"),
    ]
    for batch, kw, pattern in cases:
        with pytest.raises(DivergenceError, match=pattern):
            LCP(model, F.mse_loss, lam=1.0, **kw).meta_backward(batch)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------ a new controller: one class, one decorator
# (the worked example of docs/architecture.md)
from lcp_meta.core.controllers import CONTROLLERS, Controller, register_controller  # noqa: E402
from lcp_meta.core.solvers import SolverStats  # noqa: E402


@register_controller("newton-test")
class DenseNewton(Controller):
    """From the free inner equilibrium, the control's equilibrium (Hess l_in + lam) u = -grad l_out by one dense
    solve, the matrix built column by column from the inner problem's curvature products (tiny problems); then
    one Newton step of the inner equation f(phi) + beta u = 0 (its Jacobian is -(Hess l_in + lam)) and the
    control solved again there: the controlled equilibrium at finite beta, to round-off."""

    calls = 0

    def equilibrium(self, lcp, problem, batch):
        omega, lam, tb = batch
        type(self).calls += 1
        phi = lcp.adapt_params(tb.x_support, tb.y_support)  # the free equilibrium (raises if not reached)
        names, shapes = list(phi), [v.shape[1:] for v in phi.values()]
        sizes = [s.numel() for s in shapes]
        tree = lambda flat: {k: c.reshape(s) for k, c, s in zip(names, flat.split(sizes), shapes)}  # noqa: E731
        flat = lambda t: torch.cat([t[k].reshape(-1) for k in names])  # noqa: E731
        phis, us = [], []
        for i in range(tb.num_tasks):
            xs, ys, xq, yq = tb.x_support[i], tb.y_support[i], tb.x_query[i], tb.y_query[i]
            eye = torch.eye(sum(sizes), dtype=DT)

            def control(p):  # (Hess l_in(p) + lam, u = -(Hess l_in(p) + lam)^-1 grad l_out(p))
                A = torch.stack([flat(problem.curvature(p, tree(col), lam, xs, ys)) for col in eye], 1)
                return A, torch.linalg.solve(A, -flat(problem.grad(p, xq, yq)))

            p = {k: v[i] for k, v in phi.items()}
            A, u = control(p)
            p = tree(flat(p) + torch.linalg.solve(A, flat(problem.force(p, omega, lam, xs, ys)) + lcp.beta * u))
            phis.append(p)
            us.append(tree(control(p)[1]))
        phi = {k: torch.stack([t[k] for t in phis]) for k in names}
        u = {k: torch.stack([t[k] for t in us]) for k in names}
        return phi, u, SolverStats(iterations=1, residual=0.0, converged=True), None


def test_a_registered_controller_is_used_and_gives_the_exact_hypergradient():
    model, tb = _problem(3, hidden=(6,))
    lam = 1.5
    ref = exact_hypergradient(model, F.mse_loss, *_tasks(tb), lam=lam)
    before = DenseNewton.calls
    lcp = LCP(model, F.mse_loss, lam=lam, beta=1e-9, controller="newton-test", tol=1e-13)
    assert lcp.name == "lcp-newton-test" and CONTROLLERS["newton-test"] is DenseNewton
    stats = lcp.meta_backward(tb)
    assert DenseNewton.calls == before + 1
    assert stats.converged and stats.control_residual < 1e-10
    torch.testing.assert_close(_grad(model), ref, rtol=1e-7, atol=1e-10)
    # the built-in DI controller reaches the same meta-gradient by its own route (relaxation + CG + joint DI)
    model.zero_grad()
    LCP(model, F.mse_loss, lam=lam, beta=1e-9).meta_backward(tb)
    torch.testing.assert_close(_grad(model), ref, rtol=1e-4, atol=1e-8)


def test_controllers_that_do_not_drive_the_inner_problem_are_refused():
    model, _ = _problem()
    for name in ("kp", "lf", "no-such-controller"):
        with pytest.raises(ValueError, match="unknown controller .* for meta-learning; expected one of"):
            LCP(model, F.mse_loss, controller=name)


def test_first_order_is_the_direct_controller():
    model, tb = _problem(2, hidden=(6,))
    with pytest.warns(DeprecationWarning, match="controller='direct'"):
        old = LCP(model, F.mse_loss, lam=1.0, beta=0.1, first_order=True)
    assert old.controller == "direct" and old.name == "lcp-direct"
    old.meta_backward(tb)
    g_old = _grad(model).clone()
    model.zero_grad()
    LCP(model, F.mse_loss, lam=1.0, beta=0.1, controller="direct").meta_backward(tb)
    assert torch.equal(_grad(model), g_old)
    with pytest.raises(ValueError, match="cannot be combined with 'ebd'"):
        LCP(model, F.mse_loss, controller="ebd", first_order=True)


def test_automatic_step_uses_the_spectral_radius_when_the_curvature_is_negative():
    """Power iteration converges to the eigenvalue of largest magnitude; on a concave inner loss that is
    negative, and the stable gradient step is bounded by its magnitude (dense eigenvalues), not by lam."""
    model, tb = _problem(3, T=2)
    concave = lambda pred, y: -F.mse_loss(pred, y)  # noqa: E731
    lam = 0.05
    m = IMAML(model, concave, lam=lam, power_iters=200)
    system, params = m._system()
    omega = {k: v.detach() for k, v in params.items()}
    phi = {k: v.unsqueeze(0).expand(tb.num_tasks, *v.shape).clone() for k, v in omega.items()}
    a, lmax = m._auto_step(system, phi, m.lam_tree(params), tb.x_support, tb.y_support)
    loss = flat_loss(model, concave)
    flat, _, _ = flatten_params(model)
    for t in range(tb.num_tasks):
        ev = torch.linalg.eigvalsh(hessian(lambda p: loss(p, tb.x_support[t], tb.y_support[t]), flat)) + lam
        assert ev[0] < 0 and -ev[0] > ev[-1]  # the case: the dominant eigenvalue is negative
        assert float(lmax[t]) == pytest.approx(float(ev.abs().max()), rel=1e-3)
        assert float(a[t]) == pytest.approx(1 / (1.25 * float(ev.abs().max())), rel=1e-3)


def test_momentum_rises_restart_without_shrinking_the_step():
    """On a quadratic inner problem (a linear model, squared loss) every plain gradient step with the automatic
    step 1 / (1.25 lam_max) lowers E, so the energy rises of the heavy-ball path are momentum overshoots: they
    restart the momentum and keep the step (shrinking on each of them stalled the conv-4 relaxation)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1).double()
    T, n = 2, 12
    scale = torch.logspace(0, 1.5, 6, dtype=DT)  # an ill-conditioned design: many momentum rises
    xs, xq = torch.randn(T, n, 6, dtype=DT) * scale, torch.randn(T, n, 6, dtype=DT) * scale
    tb = TaskBatch(xs, xs.sum(-1, keepdim=True), xq, xq.sum(-1, keepdim=True))
    m = IMAML(model, F.mse_loss, lam=0.1, tol=1e-8, power_iters=100, inner_steps=3000)
    system, params = m._system()
    omega = {k: v.detach() for k, v in params.items()}
    lam = m.lam_tree(params)
    phi, st, info = m._relax(system, omega, lam, tb.x_support, tb.y_support)
    a0, _ = m._auto_step(system, {k: v.unsqueeze(0).expand(T, *v.shape) for k, v in omega.items()}, lam,
                         tb.x_support, tb.y_support)
    assert st.converged
    torch.testing.assert_close(info["a"], a0)  # never shrunk
    # the relaxed state is the minimiser of E (dense normal equations per task)
    for t in range(T):
        X = torch.cat([xs[t], torch.ones(n, 1, dtype=DT)], 1)
        w0 = torch.cat([omega["weight"].reshape(-1), omega["bias"]])
        A = 2 * X.T @ X / n + 0.1 * torch.eye(7, dtype=DT)
        b = 2 * X.T @ tb.y_support[t].reshape(-1) / n + 0.1 * w0
        w = torch.linalg.solve(A, b)
        got = torch.cat([phi["weight"][t].reshape(-1), phi["bias"][t]])
        # residual |A phi - b| <= tol |A w0 - b| (the force at omega), hence this distance to the minimiser
        bound = 1e-8 * float((A @ w0 - b).norm()) / float(torch.linalg.eigvalsh(A)[0])
        assert float((got - w).norm()) <= 1.01 * bound
