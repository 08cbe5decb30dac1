"""The one conjugate-gradient routine of LCP's control and iMAML (meta/dynamics.py: cg_control), against a
hand-written dense CG on the explicit Hessian in float64 (issue 9: LCP meta-gradients at iMAML's cost)."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian

from lcp_meta.meta import IMAML, LCP, TaskBatch
from lcp_meta.meta.dynamics import cg_control
from lcp_meta.meta.reference import flat_loss, flatten_params, inner_solution, unflatten
from lcp_meta.models.fewshot import MetaMLP

DT = torch.float64


def _problem(T=3, n=8, seed=0):
    """Tasks of different difficulty (amplitudes 0.3 .. 3): their CG residuals fall at different rates."""
    torch.manual_seed(seed)
    model = MetaMLP(1, (8, 8), 1, activation="tanh").double()
    a = torch.linspace(0.3, 3.0, T, dtype=DT).view(T, 1, 1)
    ph = 3 * torch.rand(T, 1, 1, dtype=DT)
    xs, xq = 6 * torch.rand(T, n, 1, dtype=DT) - 3, 6 * torch.rand(T, n, 1, dtype=DT) - 3
    return model, TaskBatch(xs, a * torch.sin(xs + ph), xq, a * torch.sin(xq + ph))


def _dense(model, tb, lam, phi_vec):
    """Per task: the explicit A = Hess l_in(phi) + lam and g = grad l_out(phi)."""
    loss = flat_loss(model, F.mse_loss)
    out = []
    for t in range(tb.num_tasks):
        H = hessian(lambda p: loss(p, tb.x_support[t], tb.y_support[t]), phi_vec[t])
        p = phi_vec[t].clone().requires_grad_(True)
        g, = torch.autograd.grad(loss(p, tb.x_query[t], tb.y_query[t]), p)
        out.append((H + lam * torch.eye(len(g), dtype=DT), g))
    return out


def _dense_cg(A, b, steps):
    """Textbook CG on A x = b from 0: the iterates x_0 .. x_steps and their relative residuals."""
    x, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), r @ r
    xs, res = [x.clone()], [float(rs.sqrt() / b.norm())]
    for _ in range(steps):
        Ap = A @ p
        alpha = rs / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rs_new = r @ r
        p, rs = r + (rs_new / rs) * p, rs_new
        xs.append(x.clone())
        res.append(float(rs.sqrt() / b.norm()))
    return xs, res


def _setup(lam, use_vmap=True):
    model, tb = _problem()
    m = LCP(model, F.mse_loss, lam=lam, vmap=use_vmap)
    system, params = m._system()
    omega, names, shapes = flatten_params(model)
    # per-task inner solutions (Newton): Hess l_in + lam is positive definite there, CG's case
    loss = flat_loss(model, F.mse_loss)
    phi_vec = torch.stack([inner_solution(loss, omega, lam, tb.x_support[t], tb.y_support[t])
                           for t in range(tb.num_tasks)])
    phi = {k: torch.stack([unflatten(v, names, shapes)[k] for v in phi_vec]) for k in names}
    lam_tree = {k: torch.tensor(lam, dtype=DT) for k in names}
    g = system.grads(phi, tb.x_query, tb.y_query)
    return model, tb, system, m, phi, phi_vec, lam_tree, g, names


def _flat(tree, names, t):
    return torch.cat([tree[k][t].reshape(-1) for k in names])


@pytest.mark.parametrize("use_vmap", [True, False])
@pytest.mark.parametrize("stop_rule", ["per-task", "batch"])
def test_stop_rules_against_dense_cg(use_vmap, stop_rule):
    """per-task: each task returns the dense CG iterate of the first step where it meets tol (independent of
    its batch-mates); batch: a task that meets tol before the others keeps stepping (free in a batched step),
    every task returns the iterate of the loop's step count.  Every residual is <= tol (the certificate)."""
    lam, tol = 4.0, 1e-4
    model, tb, system, m, phi, phi_vec, lam_tree, g, names = _setup(lam, use_vmap)
    u, st, res, flagged = cg_control(m._tmap, system, lam_tree, phi, g, tb.x_support, tb.y_support, tol, 200,
                                     stop_rule=stop_rule)
    K = st.iterations
    assert st.converged and not flagged.any() and float(res.max()) <= tol
    first = []
    for t, (A, gt) in enumerate(_dense(model, tb, lam, phi_vec)):
        assert float(torch.linalg.eigvalsh(A)[0]) > 0  # a positive definite system: CG's case
        xs, rr = _dense_cg(A, -gt, K)
        first.append(next(k for k, r in enumerate(rr) if r <= tol))
        k = K if stop_rule == "batch" else first[-1]
        torch.testing.assert_close(_flat(u, names, t), xs[k], rtol=1e-10, atol=1e-12)
        assert float(res[t]) == pytest.approx(rr[k], rel=1e-8)
    assert min(first) < K == max(first)  # some task met tol before the last one: the case under test


def test_per_task_stop_does_not_depend_on_the_batch():
    """The default rule: a task solved alone and inside a batch gets the same control (a batch split across
    ranks gives the same meta-gradient)."""
    lam, tol = 4.0, 1e-4
    model, tb, system, m, phi, phi_vec, lam_tree, g, names = _setup(lam)
    u, *_ = cg_control(m._tmap, system, lam_tree, phi, g, tb.x_support, tb.y_support, tol, 200)
    one = lambda tree: {k: v[:1] for k, v in tree.items()}  # noqa: E731
    u1, *_ = cg_control(m._tmap, system, lam_tree, one(phi), one(g), tb.x_support[:1], tb.y_support[:1], tol, 200)
    for k in names:
        torch.testing.assert_close(u1[k][0], u[k][0], rtol=0, atol=0)


def test_unknown_stop_rule_is_refused():
    model, _ = _problem()
    with pytest.raises(ValueError, match="control_stop must be one of"):
        LCP(model, F.mse_loss, control_stop="sometimes")
    with pytest.raises(ValueError, match="cg_stop must be one of"):
        IMAML(model, F.mse_loss, cg_stop="all")


@pytest.mark.parametrize("use_vmap", [True, False])
def test_fixed_steps_in_one_mapped_call_equal_dense_cg(use_vmap):
    """tol = 0 (iMAML's cg_steps) runs all steps in one task-mapped call: the dense CG iterate at that count."""
    lam, steps = 4.0, 7
    model, tb, system, m, phi, phi_vec, lam_tree, g, names = _setup(lam, use_vmap)
    u, st, res, flagged = cg_control(m._tmap, system, lam_tree, phi, g, tb.x_support, tb.y_support, 0.0, steps)
    assert st.iterations == steps and not flagged.any()
    for t, (A, gt) in enumerate(_dense(model, tb, lam, phi_vec)):
        xs, rr = _dense_cg(A, -gt, steps)
        torch.testing.assert_close(_flat(u, names, t), xs[steps], rtol=1e-8, atol=1e-10)
        assert float(res[t]) == pytest.approx(rr[steps], rel=1e-6)


def test_imaml_and_lcp_give_the_same_meta_gradient_at_the_same_cg_count():
    """At equal work the two are the same computation: iMAML with k CG steps and LCP whose control_tol stops
    its (shared) CG at k steps under the batch rule, at the same relaxed inner state, give the same meta-gradient
    (beta small)."""
    model, tb = _problem()
    lcp = LCP(model, F.mse_loss, lam=1.0, tol=1e-3, control_tol=1e-2, beta=1e-8, control_stop="batch")
    stats = lcp.meta_backward(tb)
    g_lcp = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
    k = stats.extra["control_iterations"]
    assert stats.converged and stats.extra["rounds"] == 0 and k >= 2
    model.zero_grad()
    IMAML(model, F.mse_loss, lam=1.0, tol=1e-3, cg_steps=k).meta_backward(tb)
    g_imaml = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # -lam u (LCP) and lam y (iMAML) with u = -y; beta u moves phi by O(beta) only
    torch.testing.assert_close(g_lcp, g_imaml, rtol=1e-6, atol=1e-10)


def test_imaml_converged_only_where_cg_meets_cg_tol():
    """With cg_tol, cg_steps is a cap: a CG that stops at the cap above cg_tol is reported unconverged (its
    residual, the dense CG's at that count, is shown), one that meets cg_tol converged."""
    lam = 4.0
    model, tb, system, m, phi, phi_vec, lam_tree, g, names = _setup(lam)
    dense = [_dense_cg(A, -gt, 2)[1][2] for A, gt in _dense(model, tb, lam, phi_vec)]
    tol = 1e-10  # far below what 2 steps reach (8 x 8 + ... parameters)
    assert min(dense) > tol
    stats = IMAML(model, F.mse_loss, lam=lam, tol=1e-10, cg_steps=2, cg_tol=tol).meta_backward(tb)
    assert stats.inner_residual <= 1e-10 and not stats.converged
    assert stats.control_residual == pytest.approx(max(dense), rel=1e-5)
    stats = IMAML(model, F.mse_loss, lam=lam, tol=1e-10, cg_steps=500, cg_tol=1e-6).meta_backward(tb)
    assert stats.control_residual <= 1e-6 and stats.converged
    # without cg_tol the count is the method (the paper's 5 steps): converged is the inner solve's
    stats = IMAML(model, F.mse_loss, lam=lam, tol=1e-10, cg_steps=2).meta_backward(tb)
    assert stats.converged and stats.control_residual == pytest.approx(max(dense), rel=1e-5)
