"""Regressions of the meta-learning review: the verdict and residuals of the first-order and energy-based LCP
controllers, and the few-shot runner's curve and skipped-step count."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from lcp_meta.core.solvers import DivergenceError
from lcp_meta.fewshot import run_fewshot
from lcp_meta.meta import LCP, ContrastiveMeta
from lcp_meta.meta.reference import exact_hypergradient

from conftest import sine_tasks, tanh_mlp
from test_fewshot_runner import StandIn, _cfg


def _grad_vec(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _by_hand(model, tasks, lam, beta, phi, u):
    """(control residual of u = -grad l_out, inner residual |f(phi) + beta u| / |f(omega)|) per task, written
    out with autograd from the returned state."""
    omega = {k: v.detach() for k, v in model.named_parameters()}
    xs, ys, xq, yq = tasks

    def loss(p, x, y):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    norm = lambda t: torch.sqrt(sum((v ** 2).sum() for v in t.values()))  # noqa: E731
    rows = []
    for t in range(xs.shape[0]):
        ph, ut = {k: v[t] for k, v in phi.items()}, {k: v[t] for k, v in u.items()}
        g_in, g_out, g0 = grad(loss)(ph, xs[t], ys[t]), grad(loss)(ph, xq[t], yq[t]), grad(loss)(omega, xs[t], ys[t])
        f = {k: -g_in[k] - lam * (ph[k] - omega[k]) for k in ph}
        rows.append((float(norm({k: ut[k] + g_out[k] for k in ut}) / norm(g_out)),
                     float(norm({k: f[k] + beta * ut[k] for k in f}) / norm(g0))))
    return torch.tensor(rows, dtype=torch.float64)


def test_ebd_stops_on_the_control_residual_it_reports():
    """lcp-ebd's descent stopped on the relative change of phi: at a small beta the energy's gradient is
    O(beta), so it stopped at once, far from the minimiser (control residual 0.4, meta-gradient 50% off the
    hypergradient) and reported converged=True.  It now stops on its control residual."""
    model, tasks = tanh_mlp((8,), seed=0), sine_tasks(3, 6, amplitude=(0.5, 1.0), seed=1)
    lam, beta = 1.0, 1e-3
    ref = exact_hypergradient(model, F.mse_loss, *tasks, lam=lam)
    # too few descent steps for the tolerance: refused, .grad untouched
    with pytest.raises(DivergenceError, match="ebd_steps"):
        LCP(model, F.mse_loss, lam=lam, beta=beta, controller="ebd").meta_backward(tasks)
    assert all(p.grad is None for p in model.parameters())
    lcp = LCP(model, F.mse_loss, lam=lam, beta=beta, controller="ebd", ebd_lr=0.01, ebd_steps=20000,
              ebd_momentum=0.9)
    stats = lcp.meta_backward(tasks)
    assert stats.converged and stats.control_residual <= 1e-6 and stats.inner_residual <= 1e-6, stats
    g = _grad_vec(model)
    # O(beta) from the beta -> 0 hypergradient (it was 0.58 off before)
    assert float((g - ref).norm() / ref.norm()) < 5e-3


@pytest.mark.parametrize("leaky", [False, True])
def test_first_order_controllers_report_their_own_residuals(leaky):
    """The direct / leaky controllers were reported with the dynamic-inversion residual |(Hess l_in + lam) u
    + grad l_out| / |grad l_out| (4.5 on this problem, 'converged'), which their u = -grad l_out never meets;
    and the leaky joint dynamics, stopped on the relative change of the state, was accepted with an inner
    residual above tol.  Their residuals are now those of their own equations, at the returned state, and
    below tol when converged."""
    model, tasks = tanh_mlp((8,), seed=0), sine_tasks(3, 6, amplitude=(0.5, 1.0), seed=1)
    lam, beta, tol = 1.0, 0.1, 1e-12
    lcp = LCP(model, F.mse_loss, lam=lam, beta=beta, controller="direct", leaky=leaky,
              inner_steps=5000, tol=tol)
    stats = lcp.meta_backward(tasks)
    res = _by_hand(model, tasks, lam, beta, lcp.last_state["phi"], lcp.last_state["u"])
    assert stats.converged and float(res.max()) <= tol, (stats, res)
    torch.testing.assert_close(torch.tensor([stats.control_residual, stats.inner_residual], dtype=torch.float64),
                               res.amax(0), rtol=1e-3, atol=1e-15)
    if not leaky:
        assert stats.control_residual == 0.0  # u = -grad l_out(phi) exactly


def test_curve_metric_is_taken_before_the_update(tmp_path):
    """The curve's query metric was measured after the optimizer step (on the tasks the step had just used),
    while its comment and the query loss beside it are before the update."""
    snapshots = {}

    def factory(name, model, loss_fn, **kw):
        method = StandIn(model, loss_fn, **kw)
        inner = method.meta_backward

        def recording(tasks):  # the parameters each meta-step starts from
            snapshots[len(snapshots)] = [p.detach().clone() for p in model.parameters()]
            return inner(tasks)

        method.meta_backward = recording
        return method

    cfg = _cfg(tmp_path, methods=("a",), log_every=1, meta_steps=3)
    summary = run_fewshot(cfg, method_factory=factory)
    from lcp_meta.fewshot.tasks import SinusoidSource
    source = SinusoidSource(5, None, 2, 0, 2, 4, torch.device("cpu"), torch.float64)
    curve = summary["results"][0]["curve"]
    assert [r["step"] for r in curve] == [1, 2, 3]
    probe = StandIn(_model_like(cfg), F.mse_loss, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps)
    for row in curve:
        with torch.no_grad():
            for p, v in zip(probe.model.parameters(), snapshots[row["step"] - 1]):
                p.copy_(v)
        batch = source.train_batch(row["step"] - 1)
        expected = float(source.score(probe.predict(tuple(batch)), batch.y_query).mean())
        assert row["query_metric"] == pytest.approx(expected, rel=1e-12, abs=0), row


def _model_like(cfg):
    from lcp_meta.fewshot.tasks import SOURCES
    source = SOURCES[cfg.task].from_config(cfg.resolved(), torch.device("cpu"), torch.float64)
    return source.build_model().to(torch.float64)


def test_a_warned_failure_is_counted_as_skipped(tmp_path):
    """With on_divergence="warn" a method accumulates nothing and returns; the runner stepped on, counted no
    skipped step and logged the failed step's statistics."""
    from lcp_meta.fewshot.runner import common_kwargs, default_method_factory

    def factory(name, model, loss_fn, **kw):
        kw = common_kwargs(name, cfg, default_method_factory)
        kw.update(inner_lr=100.0, on_divergence="warn")  # past the stability limit: every step diverges
        return default_method_factory(name, model, loss_fn, **kw)

    cfg = _cfg(tmp_path, methods=("lcp",), meta_steps=2, log_every=1)
    with pytest.warns(RuntimeWarning):
        run_fewshot(cfg, method_factory=factory)
    result = json.loads((tmp_path / "run" / "lcp.json").read_text())
    assert result["skipped_meta_steps"] == 2 and result["curve"] == []
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "lcp.pt", weights_only=False)
    assert ckpt["optimizer"]["state"] == {}


@pytest.mark.parametrize("make, value", [
    (lambda m, v: LCP(m, F.mse_loss, controller="ebd", ebd_steps=v), 2.5),
    (lambda m, v: LCP(m, F.mse_loss, controller="ebd", ebd_steps=v), True),
    (lambda m, v: ContrastiveMeta(m, F.mse_loss, nudged_steps=v), 2.5),
    (lambda m, v: ContrastiveMeta(m, F.mse_loss, nudged_steps=v), True),
])
def test_step_counts_must_be_integers(make, value):
    """ebd_steps / nudged_steps of 2.5 were silently cut to 2 (inner_steps already refused it)."""
    with pytest.raises(ValueError, match=f"must be an integer >= 1, got {value!r}"):
        make(tanh_mlp(), value)


def test_an_inner_step_past_the_stability_limit_is_named_when_the_run_stays_bounded():
    """At inner_lr 0.2 one task's Hess l_in + lam has 0.2 lam_max > 2 at its solution (dense eigenvalues), so
    gradient descent oscillates about it without blowing up (tanh saturates): the run ended unconverged with a
    residual above 1 and the advice was 'too few steps: raise inner_steps', which cannot help."""
    from lcp_meta.meta import IMAML
    from lcp_meta.meta.reference import flat_loss, flatten_params, inner_solution
    model, tasks = tanh_mlp((8,), seed=0), sine_tasks(3, 6, amplitude=(0.5, 1.0), seed=1)
    lam, lr = 1.0, 0.2
    loss, (omega, _, _) = flat_loss(model, F.mse_loss), flatten_params(model)
    xs, ys = tasks.x_support, tasks.y_support
    top = max(float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(
        lambda v: loss(v, xs[t], ys[t]), inner_solution(loss, omega, lam, xs[t], ys[t]))).max()) + lam
        for t in range(xs.shape[0]))
    assert lr * top > 2  # the reference: past the stability limit at the solution
    for make in (lambda: IMAML(model, F.mse_loss, lam=lam, inner_lr=lr, inner_steps=1000),
                 lambda: LCP(model, F.mse_loss, lam=lam, beta=0.1, controller="direct", inner_lr=lr,
                             inner_steps=1000)):
        with pytest.raises(DivergenceError, match=r"made no progress .* inner_lr=0.2 is likely past their stability"):
            make().meta_backward(tasks)
        assert all(p.grad is None for p in model.parameters())
