"""Active-set iteration (a converged sample leaves the batch) and the divergence guard of the RBP adjoint.

The active-set solve must give the per-sample-stopped result of plain iteration (the same tolerance applied
to each sample), which for the supervised methods is the tight-tolerance Euler update up to the tolerance;
models whose samples are coupled (batch norm in training mode) must keep the batch-wide stop.
"""
import math

import pytest
import torch

from lcp_meta.core import solvers
from lcp_meta.core.solvers import DivergenceError, DivergenceGuard, solve
from lcp_meta.models import build_model
from lcp_meta.supervised import make_method

DT = torch.float64


def _affine(batch=6, dim=8, seed=0, radii=None):
    """Per-sample affine maps z -> A_i z + b_i with prescribed spectral radii (slow and fast samples)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g, dtype=DT)
    radii = torch.linspace(0.1, 0.9, batch, dtype=DT) if radii is None else torch.tensor(radii, dtype=DT)
    A = A / torch.linalg.eigvals(A).abs().amax(1)[:, None, None] * radii[:, None, None]
    b = torch.randn(batch, dim, generator=g, dtype=DT)
    x_star = torch.linalg.solve(torch.eye(dim, dtype=DT) - A, b)

    def step(z, rows=None):
        Ar, br = (A, b) if rows is None else (A[rows], b[rows])
        return ((Ar @ z[0][..., None])[..., 0] + br, 0.5 * z[1] + 1.0)

    return step, (torch.zeros(batch, dim, dtype=DT), torch.zeros(batch, 3, dtype=DT)), x_star


def test_active_set_equals_per_sample_freezing_and_reports_its_cost():
    step, z0, x_star = _affine()
    za, sa = solve(step, z0, tol=1e-9, max_iter=2000, active_set=True)
    zf, sf = solve(lambda z: step(z), z0, tol=1e-9, max_iter=2000, freeze_converged=True)
    for a, f in zip(za, zf):
        torch.testing.assert_close(a, f, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(za[0], x_star, rtol=1e-7, atol=1e-7)
    assert sa.converged and sf.converged and sa.iterations == sf.iterations  # the slowest sample's count
    torch.testing.assert_close(sa.per_sample, sf.per_sample, rtol=1e-9, atol=0)
    assert sa.residual == float(sa.per_sample.max()) < 1e-9
    # each sample took as many steps as it alone needs (solved one at a time), and the mean is their mean
    counts = [solve(lambda z, i=i: step(z, torch.tensor([i])), tuple(t[i:i + 1] for t in z0), tol=1e-9,
                    max_iter=2000)[1].iterations for i in range(6)]
    assert sa.mean_iterations == pytest.approx(sum(counts) / 6) and sa.mean_iterations < sa.iterations


def test_active_set_reports_a_sample_that_never_converges_as_before():
    # sample 2 rotates by 180 degrees forever (eigenvalues -1): it never meets the tolerance
    step, z0, _ = _affine(batch=4, radii=[0.2, 0.5, 1.0, 0.3], seed=1)

    def flip(z, rows=None):
        out = list(step(z, rows))
        r = torch.arange(4) if rows is None else rows
        out[0] = torch.where((r == 2)[:, None], -z[0] + 1.0, out[0])
        return tuple(out)

    za, sa = solve(flip, z0, tol=1e-8, max_iter=300, active_set=True)
    zf, sf = solve(lambda z: flip(z), z0, tol=1e-8, max_iter=300)
    assert not sa.converged and not sa.diverged and sa.iterations == 300
    assert sa.residual == sf.residual > 1e-2  # the same residual, the maximum over samples
    torch.testing.assert_close(sa.per_sample, sf.per_sample, rtol=1e-12, atol=0)
    torch.testing.assert_close(za[0], zf[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(DivergenceError, match="did not converge after 300 iterations"):
        solve(flip, z0, tol=1e-8, max_iter=300, active_set=True, raise_on_fail=True)


def _rnn(seed=0, batch=8, radius=None):
    torch.manual_seed(seed)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=6).to(DT)
    if radius is not None:
        with torch.no_grad():
            W = torch.randn(6, 6, dtype=DT)
            model.W.weight.copy_(W / torch.linalg.eigvals(W).abs().max() * radius)
    return model, torch.randn(batch, 4, dtype=DT), torch.randint(0, 3, (batch,))


def _update(model, name, x, y, **kw):
    method = make_method(name, model, **kw)
    model.zero_grad(set_to_none=True)
    stats = method.backward(x, y)
    return torch.cat([p.grad.reshape(-1) for p in method.parameters()]), stats


def _rel(a, b):
    return float((a - b).norm() / b.norm())


GAINS = dict(alpha=0.5, k_i=1.0, k_p=0.5)


@pytest.mark.parametrize("solver", ["auto", "reduced"])
def test_lcp_di_active_set_update_equals_tight_euler_and_batch_wide(solver):
    model, x, y = _rnn(radius=0.9)
    assert model.batch_independent
    fast, st = _update(model, "lcp-di", x, y, solver=solver, tol=1e-9, **GAINS)
    assert st["mean_iterations"] <= st["iterations"]  # the active set ran
    ref, _ = _update(model, "lcp-di", x, y, solver="euler", tol=1e-13, max_iter=200000, **GAINS)
    assert _rel(fast, ref) < 1e-5
    method = make_method("lcp-di", model, solver=solver, tol=1e-9, **GAINS)
    method.control_options["active_set"] = False  # the batch-wide stop at the same tolerance
    model.zero_grad(set_to_none=True)
    sw = method.backward(x, y)
    wide = torch.cat([p.grad.reshape(-1) for p in method.parameters()])
    assert "mean_iterations" not in sw
    assert _rel(fast, wide) < 1e-6


def test_rbp_active_set_update_equals_tight_and_batch_wide():
    model, x, y = _rnn(radius=0.9)
    fast, st = _update(model, "rbp", x, y, tol=1e-8, max_iter=5000)
    assert st["mean_iterations"] < st["iterations"]
    wide, sw = _update(model, "rbp", x, y, tol=1e-8, max_iter=5000, stop_rule="batch")
    assert "mean_iterations" not in sw and sw["iterations"] == st["iterations"]
    tight, _ = _update(model, "rbp", x, y, tol=1e-14, max_iter=50000, stop_rule="batch")
    assert _rel(fast, wide) < 1e-6 and _rel(fast, tight) < 1e-6
    # the exact implicit gradient: the adjoint from a dense solve of (I - J_g^T) a = J_h^T grad l
    assert _rel(tight, _dense_rbp(model, x, y)) < 1e-10


def _dense_rbp(model, x, y):
    """Gradient of the loss at the free fixed point by the implicit function theorem, with dense solves."""
    params = list(model.parameters())
    with torch.no_grad():
        c = model.encode(x)
        v = torch.zeros_like(c)
        for _ in range(20000):
            v = model.g(c, v)
    a = []
    for i in range(x.shape[0]):
        Jg = torch.autograd.functional.jacobian(lambda s: model.g(c[i:i + 1], s[None])[0], v[i])
        gl = torch.autograd.functional.jacobian(
            lambda s: torch.nn.functional.cross_entropy(model.h(s[None]), y[i:i + 1]) / x.shape[0], v[i])
        a.append(torch.linalg.solve(torch.eye(Jg.shape[0], dtype=DT) - Jg.T, gl))
    a = torch.stack(a)
    obj = (model.g(model.encode(x), v) * a).sum() + torch.nn.functional.cross_entropy(model.h(v), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(obj, params)])


def test_coupled_models_keep_the_batch_wide_stop(monkeypatch):
    calls = []
    real = solvers.SOLVERS["euler"]

    def spy(step, z0, stop, **kw):
        calls.append(kw.get("active_set", False))
        return real(step, z0, stop, **kw)

    monkeypatch.setitem(solvers.SOLVERS, "euler", spy)
    torch.manual_seed(0)
    conv = build_model("conv-rnn", in_shape=(2, 4, 4), num_classes=3, channels=4, inner=4, groups=2, pool=2).to(DT)
    xc, yc = torch.randn(3, 2, 4, 4, dtype=DT), torch.randint(0, 3, (3,))
    assert not conv.batch_independent and conv.eval().batch_independent  # batch norm couples in train mode only
    conv.train()
    for name, kw in (("lcp-di", dict(solver="reduced", alpha=1.0, k_i=0.3, tol=1e-4)), ("rbp", {})):
        calls.clear()
        _, st = _update(conv, name, xc, yc, max_residual=math.inf, **kw)
        assert calls and not any(calls) and "mean_iterations" not in st
    model, x, y = _rnn()
    for name, kw in (("lcp-di", dict(solver="reduced")), ("rbp", {})):
        calls.clear()
        _update(model, name, x, y, **kw)
        assert calls and all(calls)  # independent samples: the active set
        calls.clear()
        _update(model, name, x, y, stop_rule="batch", **kw)  # the authors' batch-wide stop rule
        assert calls and not any(calls)


@pytest.mark.parametrize("stop_rule", ["per-sample", "batch"])
def test_rbp_adjoint_guard_stops_a_growing_adjoint_and_leaves_parameters(stop_rule):
    # W with spectral radius 1.5 and c = 0: v* = 0 is an exact (unstable) free fixed point, J_g(v*) = W, and
    # the adjoint a <- W^T a + b grows like 1.5^t
    model, x, y = _rnn(radius=1.5)
    with torch.no_grad():
        model.U.weight.zero_()
        model.U.bias.zero_()
    method = make_method("rbp", model, stop_rule=stop_rule, max_residual=math.inf)  # even "apply what you reach"
    before = [p.detach().clone() for p in method.parameters()]
    with pytest.raises(DivergenceError, match=r"adjoint dynamics diverged \(its norm grew to .* times its start.*relative residual"
                       ) as info:
        method.backward(x, y)
    assert info.value.stats.diverged and info.value.stats.iterations < 60  # 1.5^34 ~ 1e6, not the cap of 200
    assert all(p.grad is None for p in method.parameters())
    assert all(torch.equal(p, b) for p, b in zip(method.parameters(), before))
    # without the guard the same solve runs to its cap and hands back a huge adjoint
    no_guard = make_method("rbp", model, stop_rule=stop_rule, max_residual=math.inf, guard_growth=None)
    st = no_guard.backward(x, y)
    assert st["adjoint_iterations"] == 200 and not st["converged"]
    assert max(float(p.grad.abs().max()) for p in no_guard.parameters()) > 1e20


def test_guard_leaves_contracting_solves_alone_and_checks_its_settings():
    model, x, y = _rnn(radius=0.9)
    guarded, _ = _update(model, "rbp", x, y, guard_rising=3)
    plain, _ = _update(model, "rbp", x, y, guard_growth=None)
    assert torch.equal(guarded, plain)
    for bad in (dict(guard_growth=0.5), dict(guard_growth=math.inf), dict(guard_rising=0)):
        with pytest.raises(ValueError, match="DivergenceGuard"):
            make_method("rbp", model, **bad)
    # the rising-residual test: leaving an unstable fixed point p, the relative change rises at every step
    z, st = solve(lambda z: (1.5 * (z[0] - 100.0) + 100.0,), (torch.full((2, 3), 100.0 + 1e-6, dtype=DT),),
                  tol=1e-12, max_iter=500, guard=DivergenceGuard(growth=None, rising=5))
    assert st.diverged and "rose at 5 consecutive checks" in st.reason and st.iterations < 500


def test_auto_fallback_continues_only_the_unsettled_samples(monkeypatch):
    """'auto' after the reduced iteration's half budget: on a batch-independent model only the samples that
    have not converged go on (Anderson from their free equilibrium), with the batch's output-control strength;
    the update is still the tight Euler one, as it is with the whole batch going on."""
    torch.manual_seed(0)  # the chattering tiny ReLU conv-ff of test_supervised_solvers
    model = build_model("conv-ff", in_shape=(2, 20, 20), num_classes=3, channels=(3, 4, 5), fc=(6, 5)).to(DT)
    x, y = torch.randn(8, 2, 20, 20, dtype=DT), torch.randint(0, 3, (8,))  # 4 of 8 settle in the first half
    gains = dict(alpha=0.1, k_i=0.1)
    ref, _ = _update(model, "lcp-di", x, y, solver="euler", tol=1e-14, max_iter=50000, **gains)
    monkeypatch.setattr("lcp_meta.supervised.di.resolve_control_solver", lambda *a: "reduced")
    got, st = _update(model, "lcp-di", x, y, tol=1e-11, max_iter=1000, newton="off", **gains)
    assert st["converged"] and 500 < st["iterations"] <= 1000
    assert st["mean_iterations"] < st["iterations"]  # not every sample went on
    assert _rel(got, ref) < 1e-5
    # per-sample Newton (tests/test_supervised_newton.py) is not used on this ReLU net by default: the same run
    same, sn = _update(model, "lcp-di", x, y, tol=1e-11, max_iter=1000, **gains)
    assert "newton_samples" not in sn and _rel(same, got) < 1e-12
    method = make_method("lcp-di", model, tol=1e-11, max_iter=1000, **gains)
    method.control_options["active_set"] = False
    model.zero_grad(set_to_none=True)
    method.backward(x, y)
    wide = torch.cat([p.grad.reshape(-1) for p in method.parameters()])
    assert _rel(got, wide) < 1e-6
