"""The ``paper`` preset (issue 12): supervised LCP trained as the authors' code trains it.

float64, tiny nets.  Every check compares against an independent reference: a hand-written step from the
equations, the unfrozen joint iteration, finite differences, or the parameters before the update.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lcp_meta.core.solvers import DivergenceError, relative_change
from lcp_meta.core.system import output_loss
from lcp_meta.models.supervised import build_model
from lcp_meta.supervised import make_method
from lcp_meta.supervised.faithful import preset_overrides, residual_summary
from lcp_meta.supervised.trainer import RunConfig, SkippedBatchWarning, evaluate, resolve_hparams, train

DT = torch.float64


def tiny_conv_rnn(variant, seed=0, scale=0.08):
    torch.manual_seed(seed)
    model = build_model("conv-rnn", in_shape=(2, 4, 4), num_classes=3, channels=4, inner=4, groups=2, pool=2,
                        variant=variant).to(DT)
    with torch.no_grad():
        model.conv1.weight.normal_(0, scale)
        model.conv2.weight.normal_(0, scale)
    return model


def tiny_rnn(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=5, **kw).to(DT)
    return model, torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,))


# ------------------------------------------------------------------------- no batch is ever skipped
def test_unsettled_solve_still_updates_and_default_still_refuses():
    model, x, y = tiny_rnn(recurrent_bias=True)
    kw = {**preset_overrides("mnist", "rnn", "lcp-di", "paper")[0], "solver": "euler", "max_iter": 2}
    method = make_method("lcp-di", model, **kw)
    before = [p.detach().clone() for p in method.parameters()]
    stats = method.backward(x, y)
    assert not stats["converged"] and stats["residual"] > 1e-2
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    opt.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, method.parameters())]
    assert all(changed)  # every parameter (the second bias included) moved
    with pytest.raises(DivergenceError):  # the library default refuses the same solve
        make_method("lcp-di", model, solver="euler", max_iter=2).backward(x, y)


@pytest.mark.parametrize("preset", ["paper", "default"])
def test_trainer_counts_unsettled_batches_instead_of_skipping(tmp_path, preset):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 10, (40,), generator=g)
    cfg = RunConfig(dataset="mnist", model="rnn", method="lcp-di", epochs=1, batch_size=8, solver="euler",
                    max_iter=2, device="cpu", out=str(tmp_path / preset), progress=False, preset=preset,
                    model_kwargs={"hidden": 6}, max_skipped=1.0)
    if preset == "default":
        with pytest.warns(SkippedBatchWarning):
            result = train(cfg, data=(x, y, x[:16], y[:16]), log=lambda _: None)
    else:
        result = train(cfg, data=(x, y, x[:16], y[:16]), log=lambda _: None)
    rec = result["epochs"][0]
    if preset == "default":  # the library default drops these batches (and says so)
        assert result["skipped_batches"] == 5 and rec["batches"] == 0
        return
    assert result["skipped_batches"] == 0 and rec["batches"] == 5
    summary = rec["residuals"]
    assert summary["above_tol"] == 5 and summary["share_above_tol"] == 1.0 and summary["tol"] == 1e-6
    assert len(rec["batch_residuals"]) == 5 and summary["max"] == max(rec["batch_residuals"]) > 1e-2
    assert result["model_kwargs"] == {"recurrent_bias": True, "hidden": 6}
    # the trained parameters are not the initial ones
    torch.manual_seed(0)
    init = build_model("rnn", in_shape=(1, 4, 4), num_classes=10, hidden=6, recurrent_bias=True).state_dict()
    trained = torch.load(tmp_path / preset / "checkpoint.pt", weights_only=False)["model"]
    assert set(init) == set(trained) and all(not torch.equal(init[k], trained[k]) for k in init)


def test_residual_summary():
    s = residual_summary([1e-7, 3e-3, 5e-2, 2e-7], [True, False, False, True], 1e-6)
    assert s["above_tol"] == 2 and s["share_above_tol"] == 0.5 and s["max"] == 5e-2
    assert s["median"] == pytest.approx((2e-7 + 3e-3) / 2) and s["median_above_tol"] == pytest.approx(2.65e-2)
    assert residual_summary([], [], 1e-6)["batches"] == 0


# ------------------------------------------------- batch-wide stop rule with batch-norm-coupled samples
def test_batch_stop_rule_keeps_batch_norm_coupled_samples_iterating_together():
    # (the authors' layer at their conv-rnn gains: the Euler dynamics settle on this tiny net in ~50 steps)
    model = tiny_conv_rnn("authors", seed=1)
    torch.manual_seed(11)
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    target = torch.randint(0, 3, (3,))
    with torch.no_grad():
        c = model.encode(x)
    tol = 1e-7
    batch = make_method("lcp-di", model, solver="euler", stop_rule="batch", tol=tol, max_iter=3000, alpha=1.0,
                        k_i=0.3)
    (v, yc, e, u), stats = batch.controlled_equilibrium(c, target)
    assert stats.converged
    n = stats.iterations
    # reference: the joint Euler iteration of the whole batch, by hand, recording when each sample first settles
    step = batch.controlled_step(c, target)
    z = (torch.zeros_like(c), torch.zeros_like(yc), torch.zeros_like(c), torch.zeros_like(yc))
    first, states = [None] * 3, []
    with torch.no_grad():
        for it in range(1, n + 1):
            z_new = step(z)
            rel = relative_change(z_new, z)
            for i in range(3):
                if first[i] is None and rel[i] < tol:
                    first[i] = it
            z = z_new
            states.append(z[0].clone())
    torch.testing.assert_close(v, z[0], rtol=0, atol=0)  # exactly the full-batch iteration to the same count
    torch.testing.assert_close(e, z[2], rtol=0, atol=0)
    early = min(range(3), key=lambda i: first[i])
    assert first[early] < n  # one sample settled early under the per-sample rule's test ...
    moved = (v[early] - states[first[early] - 1][early]).norm() / v[early].norm()
    assert moved > tol  # ... and kept moving with its batch under the batch rule (more than one step's tol)
    # freezing it there would leave it off the joint iteration (its state at its own stop differs from the final
    # one by more than tol, above); so the per-sample rule, on this coupled model, iterates the batch together too
    assert not model.batch_independent
    per = make_method("lcp-di", model, solver="euler", stop_rule="per-sample", tol=tol, max_iter=3000, alpha=1.0,
                      k_i=0.3)
    (vp, _, ep, _), sp = per.controlled_equilibrium(c, target)
    assert sp.iterations == n
    torch.testing.assert_close(vp, v, rtol=0, atol=0)
    torch.testing.assert_close(ep, e, rtol=0, atol=0)


# ------------------------------------------------------ the authors' conv-rnn against a hand-written step
def _group_norm(x, gn):
    B, C = x.shape[:2]
    xg = x.reshape(B, gn.num_groups, -1)
    xg = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + gn.eps)
    return xg.reshape(x.shape) * gn.weight.view(1, C, 1, 1) + gn.bias.view(1, C, 1, 1)


def _batch_norm(x, bn):
    mu = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def test_authors_conv_rnn_equals_a_hand_written_step():
    m = tiny_conv_rnn("authors", seed=3, scale=0.3)
    m.train()
    with torch.no_grad():  # non-trivial affine parameters
        for norm in (m.norm1, m.norm2, m.norm3, m.dec_bn, m.enc_bn):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    torch.manual_seed(4)
    x, target = torch.randn(3, 2, 4, 4, dtype=DT), torch.tensor([2, 0, 1])

    def conv(t, layer):
        return F.conv2d(t, layer.weight, layer.bias, padding=layer.padding)

    def g_ref(c, v):  # the state enters only additively; the convolutions see the input drive
        inner = _group_norm(torch.relu(conv(c, m.conv1)), m.norm1)
        return _group_norm(torch.relu(c + _group_norm(v + conv(inner, m.conv2), m.norm2)), m.norm3)

    def h_ref(v):
        z = F.avg_pool2d(_batch_norm(v, m.dec_bn), 2)
        return z.flatten(1) @ m.readout.weight.t() + m.readout.bias

    c = _batch_norm(conv(x, m.enc_conv), m.enc_bn)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x), c, rtol=1e-12, atol=1e-12)
    v, e = torch.randn_like(c), 0.1 * torch.randn_like(c)
    yv, u_i = torch.randn(3, 3, dtype=DT), 0.1 * torch.randn(3, 3, dtype=DT)
    alpha, k_i = 1.0, 0.3
    method = make_method("lcp-di", m, solver="euler", alpha=alpha, k_i=k_i)
    with torch.no_grad():
        got = method.controlled_step(c.detach(), target)((v, yv, e, u_i))
    # the reference LCP-DI Euler step (dt = 1) from the equations, with autograd VJPs of the reference maps
    vv = v.clone().requires_grad_(True)
    g, h = g_ref(c.detach(), vv), h_ref(vv)
    yy = yv.clone().requires_grad_(True)
    gl = torch.autograd.grad(output_loss(yy, target), yy)[0]
    u = k_i * u_i
    jg = torch.autograd.grad(g, vv, e, retain_graph=True)[0]
    jh = torch.autograd.grad(h, vv, u)[0]
    want = (v + (g - v + e), yv + (h - yv + u), e + (jg - e + jh), u_i + (-gl - alpha * u_i))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    # and it is not the tutorial layer (the state through the convolutions)
    tut = tiny_conv_rnn("tutorial", seed=3, scale=0.3)
    tut.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert not torch.allclose(tut.g(c, v), m.g(c, v))
    with pytest.raises(ValueError, match="variant"):
        build_model("conv-rnn", in_shape=(2, 4, 4), channels=4, inner=4, groups=2, pool=2, variant="swapped")


def test_batch_stat_evaluation_uses_each_test_batch_and_keeps_running_stats():
    m = tiny_conv_rnn("authors", seed=5)
    torch.manual_seed(6)
    x, y = torch.randn(8, 2, 4, 4, dtype=DT) * 2 + 1, torch.randint(0, 3, (8,))
    buffers = {k: b.clone() for k, b in m.named_buffers()}
    ev = evaluate(m, x, y, batch_size=4, tol=1e-12, max_iter=500, batch_stats=True)
    assert all(torch.equal(buffers[k], b) for k, b in m.named_buffers())  # running statistics untouched
    m.train()
    with torch.no_grad():  # reference: each batch of 4 predicted in training mode (batch statistics)
        logits = torch.cat([m.predict(x[i:i + 4], tol=1e-12, max_iter=500)[0] for i in (0, 4)])
    assert ev["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    assert ev["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-9)
    assert evaluate(m, x, y, batch_size=4, tol=1e-12, max_iter=500)["loss"] != pytest.approx(ev["loss"], rel=1e-6)


# --------------------------------------------------------------------------- the rnn's second bias
def test_rnn_second_bias_gradient_equals_finite_differences():
    torch.manual_seed(7)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=5, recurrent_bias=True).to(DT)
    with torch.no_grad():
        model.W.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    rbp = make_method("rbp", model, solver="euler", tol=1e-14, max_iter=5000)
    rbp.backward(x, y)
    grad = model.W.bias.grad.clone()

    def loss():
        with torch.no_grad():
            logits, stats = model.predict(x, tol=1e-15, max_iter=5000)
        return float(output_loss(logits, y))

    fd = torch.zeros_like(grad)
    for i in range(grad.numel()):
        old = model.W.bias[i].item()
        with torch.no_grad():
            model.W.bias[i] = old + 1e-6
            lp = loss()
            model.W.bias[i] = old - 1e-6
            lm = loss()
            model.W.bias[i] = old
        fd[i] = (lp - lm) / 2e-6
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    # LCP-DI: the second bias gets the same local update as the input bias (both -sum_batch e*)
    di = make_method("lcp-di", model, solver="euler", tol=1e-12, max_iter=5000)
    di.backward(x, y)
    torch.testing.assert_close(model.W.bias.grad, model.U.bias.grad, rtol=1e-12, atol=1e-15)
    assert model.W.bias.grad.abs().max() > 0


# ------------------------------------------------------------------------------------ KP decay
def test_kp_decay_before_batch_decays_implicit_decoder_and_feedback_not_encoder():
    model, x, y = tiny_rnn(seed=8, recurrent_bias=True)
    kp = make_method("lcp-di-kp", model, solver="euler", tol=1e-10, max_iter=3000, kp_wd=0.1,
                     kp_decay="before-batch")
    enc = {id(p) for p in model.U.parameters()}
    before = {id(p): p.detach().clone() for p in kp.parameters()}
    kp.backward(x, y)
    for p in kp.parameters():
        want = before[id(p)] if id(p) in enc else 0.9 * before[id(p)]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)
    assert {id(model.W.bias), id(model.readout.bias)} <= {id(p) for p in kp.decayed_parameters()}
    kp.after_step()  # no second decay
    assert torch.equal(model.W.weight, 0.9 * before[id(model.W.weight)])
    # a failing batch restores the decayed parameters exactly
    failing = make_method("lcp-di-kp", model, solver="euler", max_iter=1, kp_wd=0.1, kp_decay="before-batch")
    snap = [p.detach().clone() for p in failing.parameters()]
    with pytest.raises(DivergenceError):
        failing.backward(x, y)
    assert all(torch.equal(a, p) for a, p in zip(snap, failing.parameters()))
    with pytest.raises(ValueError, match="kp_decay"):
        make_method("lcp-di-kp", model, kp_decay="never")


# ------------------------------------------------------------------------------ the preset itself
def test_paper_rbp_applies_a_grown_but_finite_adjoint_like_the_authors():
    """Paper preset: RBP's adjoint runs its 200 iterations and the finite result is applied (the authors'
    behaviour), where a guard refuses it once it has grown past its factor."""
    torch.manual_seed(0)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=6, recurrent_bias=True).to(torch.float64)
    with torch.no_grad():  # spectral radius 1.05: 1.05^200 ~ 2e4, finite and far from settled
        W = torch.randn(6, 6, dtype=torch.float64)
        model.W.weight.copy_(W / torch.linalg.eigvals(W).abs().max() * 1.05)
        model.U.weight.zero_()
        model.U.bias.zero_()
        model.W.bias.zero_()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    kw = preset_overrides("mnist", "rnn", "rbp", "paper")[0]
    assert kw["guard_growth"] is None
    paper = make_method("rbp", model, **kw)
    st = paper.backward(x, y)
    assert st["adjoint_iterations"] == 200 and not st["converged"]
    grads = [p.grad.clone() for p in paper.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    strict = make_method("rbp", model, **{**kw, "guard_growth": 10.0})
    model.zero_grad(set_to_none=True)
    with pytest.raises(DivergenceError, match="adjoint"):
        strict.backward(x, y)
    # what was applied is the grown adjoint's gradient (far larger than at a contracting W), not a refusal
    assert float(max(g.abs().max() for g in grads)) > 10 * float(max(
        g.abs().max() for g in _rbp_grads_settled(model, x, y)))


def _rbp_grads_settled(model, x, y):
    """RBP's gradient with W scaled into the contracting regime (a finite, settled reference scale)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.W.weight.mul_(0.5 / 1.05)
    method = make_method("rbp", m)
    method.backward(x, y)
    return [p.grad for p in method.parameters()]


@pytest.mark.parametrize("name", ["lcp-di", "lcp-di-kp"])
def test_paper_preset_rnn_update_is_the_authors_simulation(name):
    """The preset's rnn DI / KP update equals the Euler simulation of the joint dynamics with the batch-wide stop
    (the authors' computation), float64, here where the solve settles."""
    model, x, y = tiny_rnn(recurrent_bias=True)
    preset = {**preset_overrides("mnist", "rnn", name, "paper")[0], "tol": 1e-9, "max_iter": 20000}
    grads = []
    for kw in (preset, {**preset, "solver": "euler"}):
        m = copy.deepcopy(model)
        torch.manual_seed(1)  # KP draws its feedback weights: the same for both
        method = make_method(name, m, **kw)
        stats = method.backward(x, y)
        assert stats["converged"]
        grads.append(torch.cat([p.grad.reshape(-1) for p in method.parameters()]))
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-8


def test_paper_preset_settings_and_default_unchanged():
    assert preset_overrides("mnist", "rnn", "lcp-di", "default") == ({}, {}, {})
    meth, mod, ev = preset_overrides("mnist", "rnn", "lcp-ebd", "paper")
    assert meth == {"max_residual": math.inf, "stop_rule": "batch", "tol": 1e-4, "max_iter": 200}
    assert mod == {"recurrent_bias": True} and ev == {}
    assert preset_overrides("mnist", "ff", "lcp-di-kp", "paper")[0]["kp_decay"] == "before-batch"
    for name in ("lcp-di", "lcp-di-kp"):  # the authors' simulation (flat state) on the rnn, not a structured solver
        assert preset_overrides("mnist", "rnn", name, "paper")[0]["solver"] == "euler-flat"
        assert "solver" not in preset_overrides("mnist", "ff", name, "paper")[0]
    assert preset_overrides("mnist", "ff", "bp", "paper")[0] == {}
    _, mod, ev = preset_overrides("cifar10", "conv-rnn", "lcp-di", "paper")
    assert mod == {"variant": "authors"} and ev == {"batch_stats": True, "eval_batch_size": 64}
    _, kw = resolve_hparams(RunConfig(model="rnn", method="lcp-ebd", preset="paper"))
    assert kw["tol"] == 1e-4 and kw["max_iter"] == 200 and kw["max_residual"] == math.inf
    _, kw = resolve_hparams(RunConfig(model="rnn", method="lcp-ebd"))
    assert kw["tol"] == 1e-6 and "max_residual" not in kw and "stop_rule" not in kw
    _, kw = resolve_hparams(RunConfig(model="rnn", method="lcp-ebd", preset="paper", tol=1e-5))
    assert kw["tol"] == 1e-5  # the user's own settings still win
    with pytest.raises(Exception, match="preset"):
        preset_overrides("mnist", "ff", "bp", "authors")


def test_auto_keeps_the_reduced_state_when_the_anderson_retry_ends_worse(monkeypatch):
    """'auto' on a recurrent net: a reduced solve that stalls near settling is retried by warm-anderson; when
    that retry ends farther from settling, the reduced state is the one used (with max_residual=inf the
    update is applied from it, so it must be the better of the two)."""
    import lcp_meta.core.control as control
    from lcp_meta.core.solvers import SolverStats
    model, x, y = tiny_rnn(seed=9)
    with torch.no_grad():
        c = model.encode(x)
    kw = dict(tol=1e-14, max_iter=40, max_residual=math.inf, alpha=1.0)  # beta / batch small: auto picks reduced
    reduced_only = make_method("lcp-di", model, solver="reduced", **dict(kw, max_iter=20))
    (v_ref, _, e_ref, _), s_ref = reduced_only.controlled_equilibrium(c, y)
    assert not s_ref.converged and s_ref.residual < 1e-2

    def worse(p):
        v = p.model.init_state(p.c)
        return (v, v, v, v), SolverStats(iterations=p.max_iter, residual=0.5, converged=False)

    monkeypatch.setitem(control.CONTROL_SOLVERS, "warm-anderson", worse)
    (v, _, e, _), stats = make_method("lcp-di", model, solver="auto", **kw).controlled_equilibrium(c, y)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    torch.testing.assert_close(e, e_ref, rtol=0, atol=0)
    assert stats.residual == s_ref.residual and stats.iterations == 40


def test_ebd_free_start_iterates_batch_norm_coupled_samples_together():
    """EBD's free-equilibrium start (Euler) on a model whose samples batch norm couples: the per-sample rule
    must not freeze a settled sample (it would leave the joint free equilibrium), so it equals the batch rule."""
    model = tiny_conv_rnn("authors", seed=1)
    assert not model.batch_independent
    torch.manual_seed(11)
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    target = torch.randint(0, 3, (3,))
    with torch.no_grad():
        c = model.encode(x)
    out = {}
    for rule in ("per-sample", "batch"):
        m = make_method("lcp-ebd", model, solver="euler", stop_rule=rule, tol=1e-9, max_iter=3000, ebd_init="free",
                        ebd_steps=5)
        out[rule], _ = m.controlled_equilibrium(c, target)
    for a, b in zip(out["per-sample"], out["batch"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
