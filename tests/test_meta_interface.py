"""The meta-learning interface: vmap vs per-task loop, BatchNorm conv-4, memory, divergence, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from lcp_meta.core.solvers import DivergenceError
from lcp_meta.meta import (FOMAML, IMAML, LCP, MAML, METHOD_NAMES, ContrastiveMeta, MetaMethod, MetaStats, Reptile,
                           TaskBatch, make_method)
from lcp_meta.models.fewshot import Conv4

from conftest import DT, sine_tasks, tanh_mlp
KW = {"lcp": {}, "lcp-direct": {}, "lcp-ebd": {"ebd_lr": 0.01, "ebd_steps": 5}, "imaml": {"cg_steps": 3},
      "maml": {}, "fomaml": {}, "reptile": {}, "cml": {}, "lcp-truncated": {}}
# interface tests run the equilibrium methods for a fixed number of steps (tol=None: reported unconverged);
# lcp has no such mode (that is lcp-truncated), so it runs to its equilibrium under a larger cap
def _steps(name, k):
    if name == "lcp":
        return {"inner_steps": 400}
    return {"inner_steps": k, "tol": None} if name not in ("maml", "fomaml", "reptile") else {"inner_steps": k}


def _conv_tasks(seed=0, T=2, ways=3, shots=2):
    torch.manual_seed(seed)
    model = Conv4(n_ways=ways, hidden=4, image_size=16, n_blocks=4).to(DT)
    lab = torch.arange(ways).repeat(shots)
    x = lambda: torch.randn(T, ways * shots, 1, 16, 16, dtype=DT)
    return model, TaskBatch(x(), lab.expand(T, -1).clone(), x(), lab.expand(T, -1).clone())


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_vmap_equals_per_task_loop(name):
    model, tasks = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    out = []
    for use_vmap in (True, False):
        model.zero_grad()
        m = make_method(name, model, F.mse_loss, inner_lr=0.1, vmap=use_vmap, **_steps(name, 6), **KW[name])
        stats = m.meta_backward(tasks)
        out.append((_grads(model), stats))
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert out[0][0][0].abs().max() > 0
    sa, sb = out[0][1].as_dict(), out[1][1].as_dict()
    for k in ("inner_loss_after", "query_loss_after", "meta_grad_norm", "control_norm"):
        assert abs(sa[k] - sb[k]) < 1e-10, k
    assert isinstance(out[0][1], MetaStats) and set(MetaStats.__dataclass_fields__) - {"extra"} <= set(sa)


# a fixed number of steps (the BatchNorm conv-4 inner problem does not settle in a few steps): lcp-truncated
@pytest.mark.parametrize("name", ["lcp-truncated", "imaml", "cml", "maml"])
def test_batchnorm_conv4_under_vmap(name):
    model, tasks = _conv_tasks()
    grads = []
    for use_vmap in (True, False):
        model.zero_grad()
        m = make_method(name, model, F.cross_entropy, inner_lr=0.05, vmap=use_vmap, **_steps(name, 3), **KW[name])
        stats = m.meta_backward(tasks)
        grads.append(_grads(model))
        assert stats.inner_loss_after < stats.inner_loss_before
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    preds = m.predict(tasks)
    assert preds.shape == (2, 6, 3)


def test_maml_conv4_batchnorm_matches_unrolled_autograd():
    """torch's vmap gets affine BatchNorm's double backward wrong, so MAML takes a hand-written reverse
    pass (vmapped HVPs) for such models; check it against a plain create_graph loop, with momentum and lam."""
    model, tasks = _conv_tasks(1)
    lam, mom = 0.3, 0.5
    names = [k for k, _ in model.named_parameters()]
    total = 0
    for t in range(tasks.num_tasks):
        omega = list(model.parameters())
        phi, vel = omega, [torch.zeros_like(p) for p in omega]
        for _ in range(3):
            out = torch.func.functional_call(model, dict(zip(names, phi)), (tasks.x_support[t],))
            g = torch.autograd.grad(F.cross_entropy(out, tasks.y_support[t]), phi, create_graph=True)
            vel = [mom * v - gi - lam * (p - o) for v, gi, p, o in zip(vel, g, phi, omega)]
            phi = [p + 0.05 * v for p, v in zip(phi, vel)]
        out = torch.func.functional_call(model, dict(zip(names, phi)), (tasks.x_query[t],))
        total = total + F.cross_entropy(out, tasks.y_query[t]) / tasks.num_tasks
    ref = torch.autograd.grad(total, list(model.parameters()))
    stats = MAML(model, F.cross_entropy, inner_lr=0.05, inner_steps=3, lam=lam, momentum=mom).meta_backward(tasks)
    for a, b in zip(_grads(model), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert stats.extra["graph_bytes"] == 3 * tasks.num_tasks * sum(p.numel() * 8 for p in model.parameters())


def test_batchnorm_with_running_stats_is_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)).to(DT)
    tasks = sine_tasks(3, 5, n_query=7)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        LCP(model, F.mse_loss, inner_steps=2).meta_backward(tasks)


def test_lcp_memory_constant_in_inner_steps_maml_grows():
    """Bytes saved for backward in the autograd graph alive when the meta-gradient is taken."""
    model, tasks = tanh_mlp(), sine_tasks(2, 5, n_query=7)
    lcp = [LCP(model, F.mse_loss, inner_lr=0.05, inner_steps=k, truncated=True).meta_backward(tasks).extra["graph_bytes"]
           for k in (10, 200)]
    maml = [MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=k).meta_backward(tasks).extra["graph_bytes"]
            for k in (10, 200)]
    assert lcp[0] == lcp[1] == 0
    assert maml[0] > 0 and maml[1] > 10 * maml[0]  # MAML keeps the whole unrolled graph
    # the graph measure itself: y = (x * w).sum() saves x and w when both need gradients
    x, w = torch.ones(100, dtype=DT, requires_grad=True), torch.ones(100, dtype=DT, requires_grad=True)
    from lcp_meta.meta import graph_saved_bytes
    assert graph_saved_bytes((x * w).sum()) == 2 * 100 * 8


@pytest.mark.parametrize("name", ["lcp", "imaml", "maml", "cml"])
def test_divergence_raises_and_leaves_grad_untouched(name):
    model, tasks = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = _grads(model)
    m = make_method(name, model, F.mse_loss, inner_lr=1e4, inner_steps=100, **KW[name])
    with pytest.raises(DivergenceError, match="residual") as info:
        m.meta_backward(tasks)
    assert info.value.stats is not None
    for a, b in zip(_grads(model), before):
        assert torch.equal(a, b)
    params = [p.detach().clone() for p in model.parameters()]
    m = make_method(name, model, F.mse_loss, inner_lr=1e4, inner_steps=100, on_divergence="warn", **KW[name])
    with pytest.warns(RuntimeWarning, match="residual"):
        stats = m.meta_backward(tasks)
    assert not stats.converged
    for a, b in zip(_grads(model), before):
        assert torch.equal(a, b)
    for a, p in zip(params, model.parameters()):
        assert torch.equal(a, p)


def test_unconverged_with_tol_raises():
    model, tasks = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    with pytest.raises(DivergenceError, match="did not converge"):
        LCP(model, F.mse_loss, inner_lr=0.01, inner_steps=3, tol=1e-10).meta_backward(tasks)
    assert all(p.grad is None for p in model.parameters())


def test_grad_accumulates_like_backward_and_optimizer_steps():
    model, tasks = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    m = LCP(model, F.mse_loss, inner_lr=0.1, inner_steps=1000, learn_lam="scalar")
    m.meta_backward(tasks)
    once = _grads(model) + [m.lam_raw.grad.clone()]
    m.meta_backward(tasks)
    twice = _grads(model) + [m.lam_raw.grad.clone()]
    for a, b in zip(once, twice):
        torch.testing.assert_close(b, 2 * a, rtol=1e-12, atol=0)
    assert {id(p) for p in m.parameters()} == {id(p) for p in model.parameters()} | {id(m.lam_raw)}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    lam0 = m.lam
    opt.step()
    assert m.lam != lam0 and m.lam > 0


def test_adapt_predict_leave_model_untouched():
    model, tasks = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    m = IMAML(model, F.mse_loss, inner_lr=0.1, inner_steps=1000)
    phi = m.adapt_params(tasks.x_support, tasks.y_support)
    assert set(phi) == {k for k, _ in model.named_parameters()} and phi["net.0.weight"].shape == (3, 8, 1)
    clone = m.adapt(tasks.x_support[1], tasks.y_support[1])
    for k, p in clone.named_parameters():
        torch.testing.assert_close(p.detach(), phi[k][1], rtol=0, atol=1e-12)
    preds = m.predict((tasks.x_support, tasks.y_support, tasks.x_query))
    torch.testing.assert_close(preds[1], clone(tasks.x_query[1]).detach(), rtol=0, atol=1e-12)
    assert torch.equal(preds, m.predict(tasks))
    assert F.mse_loss(preds, tasks.y_query) < F.mse_loss(model(tasks.x_query), tasks.y_query)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(p.grad is None for p in model.parameters())


def test_taskbatch_forms_and_shape_errors():
    model, tb = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    xs, ys, xq, yq = tb.x_support, tb.y_support, tb.x_query, tb.y_query
    assert TaskBatch.coerce(((xs, ys), (xq, yq))).num_tasks == 3
    assert TaskBatch.coerce([xs, ys, xq, yq]).x_query is xq
    with pytest.raises(ValueError, match="tasks, shots"):
        TaskBatch(xs[0], ys[0], xq[0], yq[0])
    with pytest.raises(ValueError, match="number of tasks"):
        TaskBatch(xs, ys, xq[:2], yq[:2])
    with pytest.raises(ValueError, match=r"\(tasks, shots\)"):
        TaskBatch(xs, ys[:, :2], xq, yq)
    with pytest.raises(ValueError, match="x_shape"):
        TaskBatch(xs, ys, torch.randn(3, 4, 2, dtype=DT), yq[:, :4])
    with pytest.raises(TypeError, match="TaskBatch"):
        TaskBatch.coerce({"x": xs})
    m = LCP(model, F.mse_loss, inner_steps=2)
    with pytest.raises(ValueError, match="tasks, shots"):
        m.adapt_params(xs[0], ys[0])


def test_make_method_errors_and_names():
    model = tanh_mlp()
    assert METHOD_NAMES == ("lcp", "lcp-direct", "lcp-ebd", "imaml", "maml", "fomaml", "reptile", "cml",
                            "lcp-truncated")
    kinds = {n: type(make_method(n, model, F.mse_loss)) for n in METHOD_NAMES}
    assert kinds["lcp-ebd"] is LCP and kinds["cml"] is ContrastiveMeta and kinds["reptile"] is Reptile
    assert make_method("lcp-direct", model, F.mse_loss).controller == "direct"
    assert all(issubclass(k, MetaMethod) for k in kinds.values())
    with pytest.raises(TypeError, match="cg_steps"):
        make_method("maml", model, F.mse_loss, cg_steps=5)
    with pytest.raises(ValueError, match="unknown meta-learning method"):
        make_method("foo", model, F.mse_loss)
    with pytest.raises(ValueError, match="controller"):
        LCP(model, F.mse_loss, controller="lf")
    with pytest.raises(ValueError, match="learn_lam"):
        MAML(model, F.mse_loss, learn_lam="scalar")
    with pytest.raises(ValueError, match="on_divergence"):
        FOMAML(model, F.mse_loss, on_divergence="ignore")


def test_leaky_direct_control_reaches_the_direct_equilibrium():
    model, tasks = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    grads = []
    for leaky in (False, True):
        model.zero_grad()
        LCP(model, F.mse_loss, controller="direct", leaky=leaky, beta=0.1, inner_lr=0.2, psi_lr=0.5,
            inner_steps=2000, tol=1e-12).meta_backward(tasks)
        grads.append(_grads(model))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="direct"):
        LCP(model, F.mse_loss, controller="di", leaky=True)


def test_anderson_solver_reaches_the_same_lcp_fixed_point():
    model, tasks = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    grads, iters = [], []
    for solver in ("euler", "anderson"):
        model.zero_grad()
        st = LCP(model, F.mse_loss, lam=2.0, inner_lr=0.1, inner_steps=3000, tol=1e-11,
                 solver=solver).meta_backward(tasks)
        grads.append(_grads(model))
        iters.append(st.iterations)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    assert iters[1] < iters[0]


def test_nan_meta_gradient_is_reported_and_not_accumulated():
    model, tb = tanh_mlp(), sine_tasks(3, 5, n_query=7)
    bad = TaskBatch(tb.x_support, tb.y_support, tb.x_query, torch.full_like(tb.y_query, float("nan")))
    with pytest.raises(DivergenceError, match="meta-gradient turned NaN"):
        FOMAML(model, F.mse_loss, inner_steps=3).meta_backward(bad)
    with pytest.raises(DivergenceError, match="inner dynamics turned NaN"):
        LCP(model, F.mse_loss, inner_steps=3, truncated=True).meta_backward(bad)  # the control integrates the NaN
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ one integrator, one tree toolkit
def test_integrators_equal_torch_optim_and_carry_their_state():
    """heavy_ball is torch.optim.SGD(momentum) and adam is torch.optim.Adam, on the force -grad E; momentum 0
    is Euler bit for bit, and a per-task (tensor) momentum of zero gives the same numbers with a velocity."""
    from lcp_meta.core.integrators import adam, apply, euler, heavy_ball
    torch.manual_seed(0)
    x0 = {"a": torch.randn(3, dtype=DT), "b": torch.randn(2, 2, dtype=DT)}

    def energy(t):
        return sum((v ** 4 - v).sum() for v in t)

    for ours, theirs in ((heavy_ball(0.01, 0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
                         (adam(0.02, 0.8, 0.99), lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99)))):
        params = [torch.nn.Parameter(v.clone()) for v in x0.values()]
        opt, x, state = theirs(params), dict(x0), ours.init(x0)
        for _ in range(25):
            opt.zero_grad()
            energy(params).backward()
            opt.step()
            g = torch.func.grad(lambda t: energy(list(t.values())))(x)
            delta, state = ours.update({k: -v for k, v in g.items()}, state)
            x = apply(x, delta)
        for p, v in zip(params, x.values()):
            torch.testing.assert_close(v, p.detach(), rtol=1e-13, atol=1e-15)
    for hb in (heavy_ball(0.1, 0.0), heavy_ball(0.1, torch.zeros((), dtype=DT))):
        eu = euler(0.1)
        xs, ys, vel, none = dict(x0), dict(x0), hb.init(x0), eu.init(x0)
        for _ in range(5):
            d1, vel = hb.update({k: -4 * v ** 3 for k, v in xs.items()}, vel)
            d2, none = eu.update({k: -4 * v ** 3 for k, v in ys.items()}, none)
            xs, ys = apply(xs, d1), apply(ys, d2)
        assert all(torch.equal(xs[k], ys[k]) for k in xs)


def test_integrator_under_vmap_with_a_step_per_task():
    from lcp_meta.core.integrators import apply, heavy_ball
    torch.manual_seed(1)
    x, lr = {"w": torch.randn(4, 3, dtype=DT)}, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT)

    def run(x, lr):
        hb = heavy_ball(lr, 0.5)
        vel = hb.init(x)
        for _ in range(3):
            delta, vel = hb.update({"w": -x["w"]}, vel)
            x = apply(x, delta)
        return x

    batched = torch.func.vmap(run)(x, lr)
    for t in range(4):
        torch.testing.assert_close(batched["w"][t], run({"w": x["w"][t]}, float(lr[t]))["w"], rtol=1e-15, atol=0)


def test_tree_pack_round_trip_and_batched_norm():
    from lcp_meta.core.tree import tree_norm, tree_pack
    a = {"x": torch.randn(3, 2, dtype=DT), "y": torch.randn(3, dtype=DT)}
    state = [a, torch.ones(3, dtype=DT), dict(a)]
    flat, rebuild = tree_pack(state)
    assert len(flat) == 5 and all(isinstance(t, torch.Tensor) for t in flat)
    back = rebuild(tuple(2 * t for t in flat))
    assert torch.equal(back[0]["x"], 2 * a["x"]) and torch.equal(back[1], 2 * torch.ones(3, dtype=DT))
    want = torch.sqrt(a["x"].pow(2).sum(1) + a["y"].pow(2))
    torch.testing.assert_close(tree_norm(a, batched=True), want, rtol=1e-15, atol=0)


# ------------------------------------------------------ a new meta method: one class + one register call
def test_a_registered_toy_method_is_built_by_name_and_its_meta_gradient_is_exact():
    """The worked example of docs/architecture.md: a first-order, one-step method is one class (its
    ``_meta_gradient``) and one ``register_method`` call; ``make_method`` builds it, the shared template
    accumulates its meta-gradient, which equals the closed form for linear least squares in float64."""
    from lcp_meta.core import registry
    from lcp_meta.core.solvers import SolverStats
    from lcp_meta.core.tree import tree_detach, tree_map
    from lcp_meta.meta import MetaGradient, method_kwargs, register_method

    class OneStepFirstOrder(MetaMethod):
        """grad l_out(phi), phi = omega - eta grad l_in(omega): one inner step, no second derivatives."""
        name = "one-step-fo"
        equilibrium, proximal, supports_learned_lam = False, False, False

        def __init__(self, model, loss_fn=None, *, eta: float = 0.1, **kwargs):
            super().__init__(model, loss_fn, lam=0.0, **kwargs)
            self.eta = eta

        def _meta_gradient(self, system, params, tb):
            omega = tree_detach(params)
            phi = system.tmap(lambda x, y: tree_map(lambda w, g: w - self.eta * g, omega, system.grad(omega, x, y)),
                              (0, 0))(tb.x_support, tb.y_support)
            grads = tree_map(lambda g: g.mean(0), system.grads(phi, tb.x_query, tb.y_query))
            return MetaGradient(grads, SolverStats(iterations=1, residual=0.0, converged=True),
                                MetaStats(iterations=1), phi)

    register_method("meta", "one-step-fo", OneStepFirstOrder)
    try:
        torch.manual_seed(4)
        model = torch.nn.Linear(3, 1, bias=False).to(DT)
        T, n = 3, 6
        xs, xq = torch.randn(T, n, 3, dtype=DT), torch.randn(T, n + 1, 3, dtype=DT)
        ys, yq = torch.randn(T, n, 1, dtype=DT), torch.randn(T, n + 1, 1, dtype=DT)
        method = make_method("one-step-fo", model, F.mse_loss, eta=0.05)
        assert type(method) is OneStepFirstOrder and "eta" in method_kwargs("one-step-fo")
        with pytest.raises(TypeError, match="unknown setting"):
            make_method("one-step-fo", model, F.mse_loss, beta=1.0)
        stats = method.meta_backward(TaskBatch(xs, ys, xq, yq))
        # by hand: l(w) = mean((X w - y)^2), grad l(w) = 2/N X^T (X w - y)
        w = model.weight.detach().t()
        want = torch.zeros_like(w)
        for t in range(T):
            phi = w - 0.05 * 2 / n * xs[t].t() @ (xs[t] @ w - ys[t])
            want += 2 / (n + 1) * xq[t].t() @ (xq[t] @ phi - yq[t]) / T
        torch.testing.assert_close(model.weight.grad, want.t(), rtol=1e-12, atol=1e-14)
        assert stats.converged and stats["iterations"] == 1  # the template filled the statistics
        assert stats.meta_grad_norm == pytest.approx(float(want.norm()), rel=1e-12)
        assert math.isfinite(stats.query_loss_after) and stats.query_loss_after < stats.query_loss_before
        method.meta_backward(TaskBatch(xs, ys, xq, yq))  # accumulates, like loss.backward()
        torch.testing.assert_close(model.weight.grad, 2 * want.t(), rtol=1e-12, atol=1e-14)
    finally:
        registry._REGISTRY.pop(("meta", "one-step-fo"))


def test_one_registry_with_qualified_names():
    """'lcp-ebd' names a different method on each side: the qualified names say which."""
    from lcp_meta import make_method as top_make_method
    from lcp_meta.core.registry import method_info, method_names
    from lcp_meta.models import build_model
    from lcp_meta.supervised import EnergyBased
    from lcp_meta.supervised import make_method as sup_make_method
    model = tanh_mlp()
    assert type(top_make_method("meta:lcp-ebd", model, F.mse_loss)) is LCP
    assert top_make_method("lcp-ebd", model, F.mse_loss).controller == "ebd"
    assert type(sup_make_method("supervised:lcp-ebd", build_model("ff", in_shape=(4,), num_classes=3))) is EnergyBased
    assert method_info("supervised:lcp-ebd").cls is EnergyBased and method_info("lcp-ebd").cls is LCP
    assert {"meta:lcp", "supervised:lcp-di"} <= set(method_names(None))
    assert method_info("lcp").proximal and not method_info("maml").proximal
    with pytest.raises(ValueError, match="supervised method"):
        top_make_method("supervised:lcp-ebd", model, F.mse_loss)
    with pytest.raises(ValueError, match="fixes controller"):
        top_make_method("lcp-direct", model, F.mse_loss, controller="di")
