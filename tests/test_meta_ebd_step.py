"""The automatic step of the energy-based meta controller (lcp-ebd, ``ebd_lr=None``, the default).

The descent on E(phi) = 1/2 |f(phi)|^2 + beta l_out(phi) is stable only for steps below ~2 / lam_max(Hess l_in +
lam)^2; the former fixed default ebd_lr = 0.01 diverged wherever lam_max > ~14 (issue 9: 19 of 20 sinusoid
meta-steps skipped).  The default step now comes from a power-iteration estimate of E's curvature, with
heavy-ball momentum and the inner relaxation's guards."""
import json

import pytest
import torch
import torch.nn.functional as F

from lcp_meta.core.solvers import DivergenceError
from lcp_meta.fewshot import FewShotConfig, run_fewshot
from lcp_meta.meta import LCP
from lcp_meta.meta.reference import _newton, flat_loss, flatten_params, inner_solution

from conftest import sine_tasks, tanh_mlp

LAM, BETA = 15.0, 1e-3


def _problem():
    """lam_max(Hess l_in + lam) ~ 20 here: E's curvature ~ 400, so a fixed step of 0.01 (> 2 / 400) diverges."""
    return tanh_mlp((8,), seed=0), sine_tasks(2, 6, amplitude=(1.0, 2.0), x_range=(-3.0, 3.0), seed=1)


def _dense_reference(model, tasks, lam, beta):
    """Mean over tasks of -lam u* with u* = -f(phi_beta) / beta, phi_beta the minimiser of 1/2 |f|^2 + beta l_out
    by Newton with dense Hessians (float64): the meta-gradient lcp-ebd returns at its equilibrium."""
    loss = flat_loss(model, F.mse_loss)
    omega, _, _ = flatten_params(model)
    xs, ys, xq, yq = tasks
    out = []
    for t in range(xs.shape[0]):
        def force(p, t=t):
            g, = torch.autograd.grad(loss(p, xs[t], ys[t]), p, create_graph=True)
            return -g - lam * (p - omega)

        def energy(phi, t=t):
            with torch.enable_grad():
                p = phi if phi.requires_grad else phi.detach().requires_grad_(True)
                f = force(p)
                return 0.5 * (f * f).sum() + beta * loss(p, xq[t], yq[t])

        phi = _newton(energy, inner_solution(loss, omega, lam, xs[t], ys[t]), 50, tol=1e-12)
        with torch.enable_grad():
            f = force(phi.detach().requires_grad_(True)).detach()
        out.append(lam * f / beta)  # -lam u with u = -f / beta
    return torch.stack(out).mean(0)


def _grad_vec(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_default_step_reaches_the_exact_meta_gradient_where_a_fixed_step_diverges():
    model, tasks = _problem()
    ref = _dense_reference(model, tasks, LAM, BETA)
    # the former default step diverges on this problem: refused with its cause, .grad left untouched
    with pytest.raises(DivergenceError, match="ebd_lr=0.01 is above the stable step"):
        LCP(model, F.mse_loss, lam=LAM, beta=BETA, controller="ebd", ebd_lr=0.01).meta_backward(tasks)
    assert all(p.grad is None for p in model.parameters())
    lcp = LCP(model, F.mse_loss, lam=LAM, beta=BETA, controller="ebd")
    stats = lcp.meta_backward(tasks)
    assert stats.converged and stats.control_residual <= 1e-6 and stats.inner_residual <= 1e-6, stats
    # the estimate: E's curvature is above 200 (so 0.01 > 2 / L) and the step below its stability limit
    assert lcp._info["ebd_curvature"] > 200 and lcp._info["ebd_lr"] < 1.0 / lcp._info["ebd_curvature"]
    g = _grad_vec(model)
    assert float((g - ref).norm() / ref.norm()) < 1e-5
    # and the dynamic-inversion controller at its equilibrium agrees (same beta, tight tolerance)
    for p in model.parameters():
        p.grad = None
    LCP(model, F.mse_loss, lam=LAM, beta=BETA, tol=1e-10).meta_backward(tasks)
    assert float((g - _grad_vec(model)).norm() / ref.norm()) < 1e-5


def test_given_step_keeps_its_dynamics():
    """A given ebd_lr / ebd_momentum still runs plain heavy-ball steps: the same numbers as before the automatic
    step existed (the equilibrium is the same: compared with the dense reference)."""
    model, tasks = tanh_mlp((8,), seed=0), sine_tasks(2, 6, amplitude=(0.5, 1.0), seed=1)
    ref = _dense_reference(model, tasks, 1.0, BETA)
    lcp = LCP(model, F.mse_loss, lam=1.0, beta=BETA, controller="ebd", ebd_lr=0.01, ebd_momentum=0.9,
              ebd_steps=5000)
    stats = lcp.meta_backward(tasks)
    assert stats.converged and "ebd_lr" not in lcp._info
    assert float((_grad_vec(model) - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("kw, match", [
    (dict(ebd_lr=0.0), "ebd_lr"), (dict(ebd_lr=float("nan")), "ebd_lr"), (dict(ebd_lr="0.1"), "ebd_lr"),
    (dict(ebd_momentum=0.5), "needs a given ebd_lr"), (dict(ebd_lr=0.01, ebd_momentum=1.0), r"\[0, 1\)"),
    (dict(ebd_lr=0.01, ebd_momentum="0.5"), r"\[0, 1\)"),
])
def test_bad_settings_are_refused_in_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        LCP(tanh_mlp((4,)), F.mse_loss, controller="ebd", **kw)
    assert "\n" not in str(err.value)


def test_budget_descent_cannot_diverge_on_the_sinusoid_run(tmp_path):
    """The few-shot sinusoid setting (tanh 1-40-40-1, inner_lr 0.02, 10 inner steps, lam 0.5, beta 0.1, tol None:
    the shared budget): meta-steps of ebd_lr = 0.01 diverged (19 of 20 in the command of issue 9); the automatic
    step skips none, and reports finite residuals."""
    def cfg(out, **opts):
        return FewShotConfig(task="sinusoid", methods=("lcp-ebd",), meta_steps=2, meta_batch=10, test_episodes=2,
                             val_episodes=2, device="cpu", out=str(tmp_path / out), progress=False, plots=False,
                             log_every=1, max_skipped=1.0,
                             method_options={"lcp-ebd": opts} if opts else {})

    run_fewshot(cfg("fixed", ebd_lr=0.01))
    fixed = json.loads((tmp_path / "fixed" / "lcp-ebd.json").read_text())
    assert fixed["skipped_meta_steps"] >= 1
    run_fewshot(cfg("auto"))
    auto = json.loads((tmp_path / "auto" / "lcp-ebd.json").read_text())
    assert auto["skipped_meta_steps"] == 0 and len(auto["curve"]) == 2
    for row in auto["curve"]:
        assert 0 <= row["control_residual"] < 10 and 0 <= row["inner_residual"] < 1e-6, row


def test_vmapped_and_looped_runs_agree():
    """The per-task step, momentum and guards enter the mapped step as data: a Python loop over the tasks gives
    the same meta-gradient (and the same per-task step) as vmap."""
    model, tasks = _problem()
    out = []
    for vmap in (True, False):
        for p in model.parameters():
            p.grad = None
        lcp = LCP(model, F.mse_loss, lam=LAM, beta=BETA, controller="ebd", vmap=vmap)
        stats = lcp.meta_backward(tasks)
        out.append((_grad_vec(model).clone(), lcp._info["ebd_lr"], stats.iterations))
    assert out[0][2] == out[1][2] and out[0][1] == pytest.approx(out[1][1], rel=1e-12, abs=0)
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-12)


def test_guards_hold_a_step_above_the_stability_limit(monkeypatch):
    """The estimate may be low (power iteration approaches lam_max from below, the curvature changes along the
    path): a step 10x the estimate's (4x the limit 2 / L) still converges to the exact meta-gradient, because a
    rise of E restarts the momentum and shortens the step; plain heavy-ball steps of that size diverge."""
    import lcp_meta.meta.lcp as lcp_module
    model, tasks = _problem()
    ref = _dense_reference(model, tasks, LAM, BETA)
    estimate = lcp_module._ebd_step

    def too_large(*args):
        a, m, L = estimate(*args)
        return 10 * a, m, L

    monkeypatch.setattr(lcp_module, "_ebd_step", too_large)
    lcp = LCP(model, F.mse_loss, lam=LAM, beta=BETA, controller="ebd", ebd_steps=2000)
    stats = lcp.meta_backward(tasks)
    assert lcp._info["ebd_lr"] > 2 / lcp._info["ebd_curvature"]
    assert stats.converged and stats.control_residual <= 1e-6, stats
    assert float((_grad_vec(model) - ref).norm() / ref.norm()) < 1e-5
    for p in model.parameters():
        p.grad = None
    with pytest.raises(DivergenceError):  # the same step without the guards
        LCP(model, F.mse_loss, lam=LAM, beta=BETA, controller="ebd", ebd_lr=lcp._info["ebd_lr"],
            ebd_steps=2000).meta_backward(tasks)
