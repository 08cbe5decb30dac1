"""The fixed-point solvers against a dense linear solve, plus their stop rule and failure reporting."""
import math

import pytest
import torch

from lcp_meta.core.solvers import SOLVERS, DivergenceError, SolverStats, check_divergence, relative_change, solve


def _affine_problem(batch=3, dim=8, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g, dtype=torch.float64) * scale
    b = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    x_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - A, b)
    step = lambda z: ((A @ z[0][..., None])[..., 0] + b, z[1] * 0.5 + 1.0)  # two components
    z0 = (torch.zeros(batch, dim, dtype=torch.float64), torch.zeros(batch, 2, 3, dtype=torch.float64))
    return step, z0, x_star


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solver_reaches_dense_solution(solver):
    step, z0, x_star = _affine_problem()
    z, stats = solve(step, z0, solver=solver, tol=1e-12, max_iter=2000)
    assert stats.converged and not stats.diverged
    assert stats.residual < 1e-12
    torch.testing.assert_close(z[0], x_star, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z[1], torch.full_like(z[1], 2.0), rtol=1e-9, atol=1e-9)
    assert z[1].shape == (3, 2, 3)


def test_anderson_needs_fewer_iterations_on_slow_contraction():
    # seed 3: spectral radii 0.77, 0.78, 0.97 (slow but contracting; seed 1 had a sample at 1.40 whose Euler
    # iterate overflowed, which the old stop rule read as relative change 0, i.e. "converged")
    step, z0, x_star = _affine_problem(scale=0.3, seed=3)
    _, s_e = solve(step, z0, solver="euler", tol=1e-10, max_iter=5000)
    _, s_a = solve(step, z0, solver="anderson", tol=1e-10, max_iter=5000, m=8)
    assert s_a.converged and s_e.converged
    assert s_a.iterations < s_e.iterations


def test_per_sample_freezing_makes_results_batch_independent():
    step, z0, _ = _affine_problem(batch=4, seed=2)
    z_all, _ = solve(step, z0, solver="euler", tol=1e-6, max_iter=500)

    # the same first sample solved alone (restrict the step map to it)
    def step_one(z):
        full = step((z[0].expand(4, -1).clone(), z[1].expand(4, -1, -1).clone()))
        return full[0][:1], full[1][:1]
    z_one, _ = solve(step_one, (z0[0][:1], z0[1][:1]), solver="euler", tol=1e-6, max_iter=500)
    assert torch.equal(z_all[0][:1], z_one[0])


def test_no_graph_is_kept_across_iterations():
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    z, _ = solve(lambda z: (w * z[0] + 1,), (torch.zeros(2, 1, dtype=torch.float64),), tol=1e-10, max_iter=200)
    assert not z[0].requires_grad and z[0].grad_fn is None


def test_divergence_is_reported_with_residual():
    step = lambda z: (2.0 * z[0] + 1.0,)  # unstable: blows up
    z, stats = solve(step, (torch.ones(2, 3),), tol=1e-6, max_iter=5000)
    assert stats.diverged and not stats.converged
    with pytest.raises(DivergenceError, match="NaN/inf.*relative residual") as err:
        solve(step, (torch.ones(2, 3),), tol=1e-6, max_iter=5000, raise_on_fail=True, name="test dynamics")
    assert err.value.stats.diverged


def test_non_convergence_is_reported():
    step = lambda z: (-z[0],)  # oscillates forever
    with pytest.raises(DivergenceError, match="did not converge after 50 iterations"):
        solve(step, (torch.ones(1, 2),), max_iter=50, raise_on_fail=True)


def test_overflowing_state_is_divergence_not_convergence():
    # the Euler iterate of a sample with spectral radius 1.4 overflows; its relative change must read NaN
    step, z0, _ = _affine_problem(scale=0.3, seed=1)
    _, stats = solve(step, z0, solver="euler", tol=1e-10, max_iter=5000)
    assert stats.diverged and not stats.converged
    big = (torch.full((1, 4), 1e200, dtype=torch.float64),)  # entries whose norm overflows float64
    assert math.isnan(float(relative_change(big, (torch.zeros(1, 4, dtype=torch.float64),))[0]))
    # float32 entries near the dtype's limit are still measured (the norms are accumulated in float64)
    assert float(relative_change((torch.full((1, 4), 1e38),), (torch.zeros(1, 4),))[0]) == 1.0


def test_relative_change_per_sample():
    a = (torch.tensor([[3.0, 4.0], [1.0, 0.0]]),)
    b = (torch.tensor([[3.0, 4.0], [0.0, 0.0]]),)
    r = relative_change(a, b)
    assert r[0] == 0 and math.isclose(float(r[1]), 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        solve(lambda z: z, (torch.zeros(1, 1),), solver="newton")
    with pytest.raises(TypeError, match="tuple of tensors"):
        solve(lambda z: z, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="max_iter >= 1"):
        solve(lambda z: z, (torch.zeros(1, 1),), max_iter=0)


def test_anderson_survives_exactly_zero_residuals():
    # sample 0 starts at its fixed point (all residuals exactly zero: a singular least-squares system);
    # sample 1 needs a few steps
    b = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    step = lambda z: (0.5 * z[0] + b,)
    z, stats = solve(step, (torch.zeros(2, 2, dtype=torch.float64),), solver="anderson", tol=1e-12, max_iter=50)
    assert stats.converged and not stats.diverged
    torch.testing.assert_close(z[0], 2 * b)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_fixed_steps_mode_runs_exactly_max_iter_steps(solver):
    # a contraction that reaches its fixed point to round-off long before 40 steps: a tol would stop it early;
    # tol=None must run every step, say so, and never call the result converged
    step, z0, x_star = _affine_problem(scale=0.05)
    calls = []
    counted = lambda z: (calls.append(1), step(z))[1]  # noqa: E731
    z, stats = solve(counted, z0, solver=solver, tol=None, max_iter=40)
    assert len(calls) == 40 and stats.iterations == 40
    assert stats.fixed and not stats.converged and not stats.diverged
    torch.testing.assert_close(z[0], x_star, rtol=1e-12, atol=1e-12)
    if solver == "euler":  # plain iteration: exactly the hand-run iterate, bit for bit
        ref = z0
        for _ in range(40):
            ref = step(ref)
        assert torch.equal(z[0], ref[0]) and torch.equal(z[1], ref[1])
    _, stopped = solve(step, z0, solver=solver, tol=1e-10, max_iter=40)
    assert stopped.converged and not stopped.fixed and stopped.iterations < 40


def test_fixed_steps_mode_still_reports_divergence():
    step = lambda z: (2.0 * z[0] + 1.0,)
    _, stats = solve(step, (torch.ones(1, 3),), tol=None, max_iter=2000)
    assert stats.fixed and stats.diverged and stats.iterations == 2000
    with pytest.raises(DivergenceError, match="turned NaN/inf after 2000 iterations"):
        solve(step, (torch.ones(1, 3),), tol=None, max_iter=2000, raise_on_fail=True)
    # a fixed run that stays finite is accepted by raise_on_fail: it was asked for no tolerance
    solve(lambda z: (-z[0],), (torch.ones(1, 2),), tol=None, max_iter=7, raise_on_fail=True)


def test_divergence_policy_decides_and_words_every_refusal():
    ok = SolverStats(iterations=12, residual=3e-7, converged=True)
    far = SolverStats(iterations=800, residual=0.5, converged=False)
    nan = SolverStats(iterations=5, residual=math.nan, converged=False)
    assert check_divergence("x", ok, max_residual=1e-2, require_converged=True)
    assert check_divergence("x", far, max_residual=1.0)  # unsettled but below the accepted residual
    assert check_divergence("x", far, max_residual=math.inf)  # inf: only NaN/inf is refused
    with pytest.raises(DivergenceError, match=r"^m: x did not settle after 800 iterations \(relative residual "
                                              r"5.000e-01, max_residual 1.0e-02\); .grad and parameters") as err:
        check_divergence("x", far, who="m", max_residual=1e-2)
    assert err.value.stats is far
    with pytest.raises(DivergenceError, match=r"x did not converge after 800 iterations .*tol 1.0e-06"):
        check_divergence("x", far, tol=1e-6, require_converged=True)
    with pytest.raises(DivergenceError, match="x turned NaN/inf after 5 iterations"):
        check_divergence("x", nan, max_residual=math.inf)
    with pytest.raises(DivergenceError, match=r"^the update turned NaN/inf; Q untouched\. lower lr$"):
        check_divergence("the update", finite=False, left="Q untouched", advice="lower lr")
    with pytest.warns(RuntimeWarning, match="did not converge"):
        assert not check_divergence("x", far, tol=1e-6, require_converged=True, on_fail="warn")
