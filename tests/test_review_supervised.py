"""Regression tests of the review of the supervised side and the core (each failed before its fix).

Tiny problems; every check compares with an exact reference (the evaluation by the plain free iteration, the
step map applied to a known point, the parameters before the batch).
"""
import math
import warnings

import pytest
import torch

import lcp_meta.core.system

from lcp_meta.core.solvers import relative_change, solve
from lcp_meta.models.supervised import build_model
from lcp_meta.supervised import make_method
from lcp_meta.supervised.trainer import RunConfig, evaluate, train

DT = torch.float64


def _rnn_data(n=48, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, x[:24], y[:24]


@pytest.mark.filterwarnings("ignore::lcp_meta.supervised.trainer.SkippedBatchWarning")  # (6 steps settle nothing)
@pytest.mark.parametrize("solver", ["euler-flat", "auto", "reduced"])
def test_trainer_evaluates_a_controlled_strategy_run_by_the_free_euler_iteration(tmp_path, monkeypatch, solver):
    """A DI run whose solver is a controlled-equilibrium strategy (the paper preset's euler-flat on the rnn, or
    auto/reduced) was evaluated by Anderson from 0 (``free_equilibrium`` maps those names to it): on the trained
    MNIST rnn of the paper preset that left 173 of 2000 test samples unsettled (Euler: 5) and changed 14
    predictions, and the authors evaluate by plain iteration.  The evaluation must be the free Euler iteration."""
    data = _rnn_data()
    cfg = RunConfig(dataset="mnist", model="rnn", method="lcp-di", epochs=1, batch_size=8, max_batches=2, seed=0,
                    device="cpu", out=str(tmp_path / solver), progress=False, plots=False, solver=solver,
                    model_kwargs={"hidden": 8}, max_iter=6)  # (a few steps: Anderson and Euler end apart)
    seen = []

    def spy(step, state, solver="euler", **kw):  # the solver the free dynamics actually run under
        if kw.get("name") == "free dynamics":
            seen.append(solver)
        return solve(step, state, solver=solver, **kw)

    monkeypatch.setattr(lcp_meta.core.system, "solve", spy)
    res = train(cfg, data=data, log=lambda s: None)
    monkeypatch.undo()
    assert seen and set(seen) == {"euler"}, seen
    # the recorded test loss is exactly that of the Euler evaluation of the trained model
    model = build_model("rnn", in_shape=(4,), num_classes=10, hidden=8)
    ck = torch.load(tmp_path / solver / "checkpoint.pt", weights_only=False)
    model.load_state_dict(ck["model"])
    ref = evaluate(model, data[2], data[3], solver="euler", tol=1e-6, max_iter=6)
    assert res["epochs"][-1]["test_loss"] == ref["loss"]
    assert res["epochs"][-1]["test_accuracy"] == ref["accuracy"]


@pytest.mark.parametrize("solver", ["euler-flat", "auto", "reduced", "warm-anderson"])
def test_model_predict_with_a_controlled_strategy_is_the_free_euler_iteration(solver):
    """``model.predict(x, solver=<LCP-DI strategy>)`` took Anderson from 0 while the trainer scored by the Euler
    iteration, so a user's own evaluation of a run could disagree with its recorded accuracy: the free equilibrium
    of a strategy name is the Euler iteration's, exactly (stopped after 6 steps, where Anderson ends elsewhere)."""
    torch.manual_seed(0)
    model = build_model("rnn", in_shape=(4,), num_classes=10, hidden=8).to(DT)
    x = _rnn_data()[0].to(DT)
    ref, ref_stats = model.predict(x, solver="euler", tol=1e-12, max_iter=6)
    got, stats = model.predict(x, solver=solver, tol=1e-12, max_iter=6)
    assert torch.equal(got, ref) and stats.iterations == ref_stats.iterations
    assert not torch.allclose(model.predict(x, solver="anderson", tol=1e-12, max_iter=6)[0], ref, atol=1e-6)


def test_anderson_that_stops_unsettled_returns_the_point_its_residual_describes():
    """At its iteration cap Anderson returned its next extrapolated point, which the step map never evaluated, with
    the residual of the previous point: the returned state must be an evaluated step-map output ``z = T(x)`` whose
    relative change ``|z - x| / |z|`` is the reported residual (the Euler convention)."""
    g = torch.Generator().manual_seed(1)
    d = 6
    A = 0.9 * torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0]  # a slow rotation-contraction
    b = torch.randn(3, d, generator=g, dtype=DT)

    def step(z):
        return (z[0] @ A.T + b,)

    (z,), stats = solve(step, (torch.zeros(3, d, dtype=DT),), solver="anderson", tol=1e-14, max_iter=4)
    assert not stats.converged and not stats.diverged
    x = torch.linalg.solve(A, (z - b).T).T  # the point whose step-map output z is
    torch.testing.assert_close(step((x,))[0], z, rtol=0, atol=1e-12)
    torch.testing.assert_close(relative_change((z,), (x,)), stats.per_sample.to(DT), rtol=1e-9, atol=0)


def _tiny_ff(seed=0):
    torch.manual_seed(seed)
    model = build_model("ff", in_shape=(6,), num_classes=3, hidden=(5, 4)).to(DT)
    return model, torch.randn(4, 6, dtype=DT), torch.randint(0, 3, (4,))


def test_ebd_that_misses_its_stop_tol_is_not_reported_converged():
    """EBD with ``stop_tol`` reported ``converged=True`` whenever its state stayed finite, also when its steps ran
    out with the relative change far above ``stop_tol``."""
    model, x, y = _tiny_ff()
    m = make_method("lcp-ebd", model, alpha=0.1, ebd_lr=0.01, ebd_steps=3, stop_tol=1e-12)
    stats = m.backward(x, y)
    assert stats["iterations"] == 3 and stats["residual"] > 1e-12
    assert stats["converged"] is False
    # one that meets it stops there and says so
    m = make_method("lcp-ebd", model, alpha=0.1, ebd_lr=0.01, ebd_steps=5000, stop_tol=1e-3)
    stats = m.backward(x, y)
    assert stats["residual"] < 1e-3 and stats["iterations"] < 5000 and stats["converged"] is True


@pytest.mark.parametrize("method,key", [("lcp-lf", "sigma"), ("lcp-lf", "tau_Q"), ("lcp-lf", "k_i"),
                                        ("lcp-lf", "alpha"), ("lcp-ebd", "alpha"), ("lcp-ebd", "ebd_lr"),
                                        ("lcp-ebd", "stop_tol")])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_lf_and_ebd_refuse_non_finite_settings_with_one_line(method, key, bad):
    """LF and EBD accepted NaN settings (``min(nan, ...) <= 0`` and ``nan <= 0`` are False): every batch then failed
    deep inside (or trained with a NaN control).  DI already refused them by name."""
    model, _, _ = _tiny_ff()
    with pytest.raises(ValueError, match=key):
        make_method(method, model, **{key: bad})


def test_kp_before_batch_decay_is_undone_when_the_batch_is_refused_with_a_warning(monkeypatch):
    """KP with ``kp_decay='before-batch'`` decays before the dynamics and restored the parameters only when the batch
    raised: under ``on_divergence='warn'`` a refused (non-finite) update left them decayed."""
    model, x, y = _tiny_ff()
    m = make_method("lcp-di-kp", model, kp_wd=0.1, kp_decay="before-batch")
    m.on_divergence = "warn"
    before = [p.detach().clone() for p in m.parameters()]
    monkeypatch.setattr(m, "_update", lambda *a: [torch.full_like(p, math.nan) for p in a[-1]])
    with pytest.warns(RuntimeWarning, match="turned NaN"):
        m.backward(x, y)
    assert not m.accumulated
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q) and p.grad is None


def test_warm_start_that_spends_the_whole_budget_settling_is_not_reported_as_a_settled_control():
    """warm-anderson: when the free phase settled exactly at the iteration cap, the control never started (e = 0), yet
    the solve reported the free phase's statistics, converged with its tiny residual, so the default policy accepted
    the update of a controller that never ran.  The reported residual must be the reduced map's relative change at
    the returned state (the stop rule's own measure), and the solve not converged."""
    torch.manual_seed(0)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=5).to(DT)
    x, y = torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,))
    with torch.no_grad():
        c = model.encode(x)
    # the iterations the free phase of warm-anderson takes (Euler to max(tol, warm_tol = 1e-4))
    _, free = model.free_equilibrium(c, solver="euler", tol=1e-4, max_iter=800, freeze_converged=False)
    assert free.converged
    method = make_method("lcp-di", model, solver="warm-anderson", max_iter=free.iterations, max_residual=1.0)
    with torch.no_grad():
        (v, yc, e, u), stats = method.controlled_equilibrium(c, y)
        assert torch.equal(e, torch.zeros_like(e))  # the control never ran
        # reference: one step of the reduced map (v <- g + e, e <- J_g^T e + J_h^T u, y <- the output solve) there
        g, _, jg, jh = model.step_terms(c, v, e, u)
        ref = relative_change((g + e, jg + jh, yc), (v, e, yc))
    assert not stats.converged
    torch.testing.assert_close(stats.per_sample.to(DT), ref, rtol=1e-12, atol=0)
    assert stats.residual == pytest.approx(float(ref.max()), rel=1e-12)


def test_ebd_free_start_follows_the_batch_stop_rule(monkeypatch):
    """EBD's free-equilibrium start (``ebd_init='free'``, the rnn's) froze each sample at its own stop whatever the
    method's ``stop_rule``; under the paper preset's ``stop_rule='batch'`` (the authors' solver: the whole batch
    iterates until its largest change is below tol) it must be the batch-wide iteration."""
    torch.manual_seed(2)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=6).to(DT)
    with torch.no_grad():
        model.W.weight.mul_(2.0)  # slower, sample-dependent settling
    x = torch.randn(5, 4, dtype=DT) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0], dtype=DT)[:, None]
    y = torch.randint(0, 3, (5,))
    with torch.no_grad():
        c = model.encode(x)
    kw = dict(alpha=0.1, ebd_lr=1e-3, ebd_steps=5, ebd_init="free", tol=1e-4, max_iter=200, stop_rule="batch")
    # reference start: the whole batch iterated together (no sample frozen)
    (ref_v,), st = solve(lambda z: (model.g(c, z[0]),), (torch.zeros_like(c),), solver="euler", tol=1e-4,
                         max_iter=200, freeze_converged=False)
    (v_per,), _ = solve(lambda z: (model.g(c, z[0]),), (torch.zeros_like(c),), solver="euler", tol=1e-4,
                        max_iter=200, freeze_converged=True)
    assert st.converged and not torch.equal(ref_v, v_per)  # the two rules give different starts here
    seen = []
    free = type(model).free_equilibrium

    def spy(self, c_, **kw_):
        v, s = free(self, c_, **kw_)
        seen.append(v.clone())
        return v, s

    monkeypatch.setattr(type(model), "free_equilibrium", spy)
    make_method("lcp-ebd", model, **kw).controlled_equilibrium(c, y)
    monkeypatch.undo()
    assert torch.equal(seen[0], ref_v)


@pytest.mark.parametrize("method", ["bp", "rbp", "lcp-lf", "lcp-ebd"])
@pytest.mark.parametrize("solver", ["reduced", "auto", "euler-flat", "eulr"])
def test_methods_without_structured_solvers_refuse_them_when_built(method, solver):
    """RBP, LF, EBD (and BP) accepted any solver name: RBP and LF then failed at the first batch (after the data
    were loaded), and EBD's free start silently ran Anderson for a structured name (``free_equilibrium``'s mapping)
    or ignored it.  The structured solvers are LCP-DI/DI-KP's; the others must refuse them when built."""
    model = _tiny_ff()[0]
    with pytest.raises(ValueError, match=f"{method}: unknown solver '{solver}'"):
        make_method(method, model, solver=solver)
    make_method(method, model, solver="anderson")  # (a solver of their dynamics is fine)


@pytest.mark.parametrize("method", ["bp", "lcp-di", "lcp-di-kp", "lcp-lf", "lcp-ebd"])
def test_train_loss_says_where_it_is_measured(method):
    """The trainer's "train loss" is ``stats["loss"]``: BP's is the free network's loss, an LCP method's the loss of
    its controlled output y*, which the controller pushed towards the target (lower than the free loss).  The log
    printed it as "train loss" for both, so LCP looked better trained than BP at the same test accuracy."""
    from lcp_meta.core.system import output_loss
    from lcp_meta.supervised.report import train_loss_label
    model, x, y = _tiny_ff()
    m = make_method(method, model)
    stats = m.backward(x, y)
    with torch.no_grad():
        free = float(output_loss(model.logits(x), y, "ce"))
    label = train_loss_label({"train_loss_at": m.loss_at})
    if method == "bp":
        assert stats["loss"] == pytest.approx(free, rel=1e-12) and label == "train loss"
    else:
        assert stats["loss"] < free and label == "train loss (controlled output)"
