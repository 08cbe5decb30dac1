"""The adapters' shared plumbing, without any third-party library.

- ``import lcp_meta`` (and ``lcp_meta.adapters``) never imports learn2learn, higher or torchmeta.
- LCPLearner's learn2learn-style loop (clone / adapt / query_loss().backward()) deposits exactly what
  ``meta_backward`` computes on the same tasks, and for small beta the iMAML hypergradient obtained by a
  dense linear solve; a diverging task leaves ``.grad`` and the parameters untouched.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lcp_meta.meta", reason="lcp_meta.meta (the meta-learning methods) is not available")
from lcp_meta.adapters.l2l import LCPLearner  # noqa: E402  (needs no learn2learn)
from lcp_meta.meta import DivergenceError, TaskBatch  # noqa: E402
from conftest import gaussian_tasks, tanh_mlp  # noqa: E402

D = torch.float64


def test_import_lcp_meta_imports_no_adapter_library():
    code = ("import sys, lcp_meta, lcp_meta.adapters\n"
            "bad = sorted(m for m in ('learn2learn', 'higher', 'torchmeta', 'gym') if m in sys.modules)\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import lcp_meta pulled in {out.stdout.strip()}"


def test_install_recipe_is_valid_bash():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "install_adapters.sh"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = script.read_text()
    # the pins that keep torch untouched and the 3.11 build fixes must stay in the recipe
    for needle in ("--no-deps \"torchmeta==1.8.0\"", "cython>=3", "--no-build-isolation", "list(set_classes)"):
        assert needle in text, needle


# the learner: tanh_mlp((6,), 2), a 2-6-1 tanh net; the tasks: gaussian_tasks(), whose small inputs and targets
# keep the inner Hessian's negative curvature below lam (strongly convex inner problems, converging in tens of
# steps). lam = 3 exceeds the most negative inner curvature (~ -2) of these tasks; inner_lr (lam + h_max) < 2
STABLE = dict(lam=3.0, inner_lr=0.2, inner_steps=500, tol=1e-12)


def _routed_mean(learner, tb):
    """learn2learn's loop: one clone per task, backward of (query loss / T)."""
    for t in range(tb.num_tasks):
        task = learner.clone()
        task.adapt(tb.x_support[t], tb.y_support[t])
        (task.query_loss(tb.x_query[t], tb.y_query[t]) / tb.num_tasks).backward()
    return {k: p.grad.clone() for k, p in learner.module.named_parameters()}


@pytest.mark.parametrize("method,kw", [
    ("lcp", dict(STABLE, beta=1e-2)),
    ("lcp-direct", dict(STABLE, beta=1e-2)),
    ("maml", dict(inner_lr=0.1, inner_steps=3)),
])
def test_routed_loop_equals_meta_backward(method, kw):
    model, tb = tanh_mlp((6,), 2), gaussian_tasks()
    learner = LCPLearner(model, F.mse_loss, method=method, **kw)
    routed = _routed_mean(learner, tb)
    model.zero_grad()
    stats = learner.meta_backward(tb)
    assert stats.converged
    for k, p in model.named_parameters():
        torch.testing.assert_close(routed[k], p.grad, rtol=1e-9, atol=1e-12)
        assert p.grad.abs().max() > 1e-6  # a real gradient, not zeros on both sides


def test_routed_lcp_matches_dense_implicit_gradient():
    """beta -> 0: the routed LCP gradient is lam (Hess l_in + lam)^-1 grad l_out(phi*) (dense solve)."""
    model, tb = tanh_mlp((6,), 2, seed=3), gaussian_tasks(1, seed=4)
    lam, beta = STABLE["lam"], 1e-6
    learner = LCPLearner(model, F.mse_loss, **dict(STABLE, beta=beta, tol=1e-13))
    task = learner.clone().adapt(tb.x_support[0], tb.y_support[0])
    task.query_loss(tb.x_query[0], tb.y_query[0]).backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    omega = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat, x, y):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            n = s.numel()
            parts[k] = flat[i:i + n].reshape(s)
            i += n
        return F.mse_loss(torch.func.functional_call(model, parts, (x,)), y)

    phi = torch.cat([task.params[k].reshape(-1) for k in names])
    xs, ys, xq, yq = tb.x_support[0], tb.y_support[0], tb.x_query[0], tb.y_query[0]
    stationarity = torch.func.grad(loss)(phi, xs, ys) + lam * (phi - omega)
    assert stationarity.norm() < 1e-9  # phi is the inner equilibrium
    H = torch.func.hessian(loss)(phi, xs, ys)
    ref = lam * torch.linalg.solve(H + lam * torch.eye(len(phi), dtype=D), torch.func.grad(loss)(phi, xq, yq))
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 1 - 1e-9
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-10)  # O(beta) from the exact value


def test_diverging_task_leaves_grad_and_params_untouched():
    model, tb = tanh_mlp((6,), 2), gaussian_tasks()
    learner = LCPLearner(model, F.mse_loss, **dict(STABLE, beta=1e-2))
    _routed_mean(learner, tb)  # a healthy accumulation first
    before = {k: p.grad.clone() for k, p in model.named_parameters()}
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    bad = TaskBatch(tb.x_support * 1e3, tb.y_support * 1e6, tb.x_query, tb.y_query)
    unstable = LCPLearner(learner.method.model, F.mse_loss, **dict(STABLE, beta=1e-2, inner_lr=50.0))
    task = unstable.clone()
    with pytest.raises(DivergenceError) as err:
        task.adapt(bad.x_support[0], bad.y_support[0])
        task.query_loss(bad.x_query[0], bad.y_query[0]).backward()
    assert "residual" in str(err.value)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, before[k]) and torch.equal(p.detach(), params[k])


def test_misuse_gives_clear_errors():
    model, tb = tanh_mlp((6,), 2), gaussian_tasks()
    learner = LCPLearner(model, F.mse_loss, **dict(STABLE, beta=1e-2))
    task = learner.clone()
    with pytest.raises(RuntimeError, match="adapt"):
        task.query_loss(tb.x_query[0], tb.y_query[0])
    with pytest.raises(TypeError, match="adapts on data, not on a loss"):
        task.adapt(F.mse_loss(model(tb.x_support[0]), tb.y_support[0]))
    with pytest.raises(ValueError, match="same N"):
        task.adapt(tb.x_support[0], tb.y_support[0][:3])
    task.adapt(tb.x_support[0], tb.y_support[0])
    pred = task(tb.x_query[0])
    assert pred.shape == (7, 1)
    with pytest.raises(RuntimeError, match="query_loss"):
        F.mse_loss(pred, tb.y_query[0]).backward()
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # evaluation: a plain value, nothing routed
        assert not task.query_loss(tb.x_query[0], tb.y_query[0]).requires_grad
    with pytest.raises(TypeError, match="loss_fn"):
        LCPLearner(model)
    with pytest.raises(TypeError, match="either a built method"):
        LCPLearner(learner.method, F.mse_loss)
