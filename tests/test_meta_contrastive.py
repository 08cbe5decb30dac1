"""Contrastive meta-learning as published: SGD-momentum phases and Polyak averaging of the meta-parameters.

References are hand-written loops with ``torch.optim`` (float64, tiny problems): the authors' phases (free phase
from omega, then +beta and -beta phases each from the free end point with a fresh momentum buffer) and the
authors' averaging of omega over outer steps (smonsays/contrastive-meta-learning, fewshot/train.py).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from lcp_meta.data.tasks import TaskBatch
from lcp_meta.meta import ContrastiveMeta
from lcp_meta.models.fewshot import Conv4

from conftest import DT, gaussian_tasks, sine_tasks, tanh_mlp


def _conv_bn(seed=0):
    torch.manual_seed(seed)
    return Conv4(n_ways=3, in_channels=1, hidden=3, image_size=8, n_blocks=2).to(DT)


def _image_tasks(T=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(T, 6, 1, 8, 8, generator=g, dtype=DT), torch.randn(T, 6, 1, 8, 8, generator=g, dtype=DT)
    ys = torch.arange(3).repeat(2).expand(T, 6).clone()
    return TaskBatch(xs, ys, xq, ys.clone())


PROBLEMS = {"tanh-mlp": (lambda: tanh_mlp((6,), seed=4), lambda seed=4: sine_tasks(3, 5, seed=seed), F.mse_loss),
            "conv-bn": (_conv_bn, _image_tasks, F.cross_entropy)}


def _sgd_phase(model, loss_fn, omega, start, lam, lr, steps, x, y, xq=None, yq=None, b=0.0):
    """``steps`` of torch.optim.SGD (momentum 0.9, a fresh buffer) on l_in + lam/2 |phi - omega|^2 + b l_out."""
    phi = {k: v.clone().requires_grad_() for k, v in start.items()}
    opt = torch.optim.SGD(list(phi.values()), lr=lr, momentum=0.9)
    for _ in range(steps):
        e = loss_fn(torch.func.functional_call(model, phi, (x,)), y)
        e = e + lam / 2 * sum(((phi[k] - omega[k]) ** 2).sum() for k in phi)
        if b:
            e = e + b * loss_fn(torch.func.functional_call(model, phi, (xq,)), yq)
        opt.zero_grad()
        e.backward()
        opt.step()
    return {k: v.detach() for k, v in phi.items()}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("vmap", [True, False])
def test_published_phases_equal_sgd_momentum_loop(problem, vmap):
    """Fixed-step symmetric CML (inner SGD momentum 0.9) = the authors' three phases written with torch.optim."""
    build, tasks_of, loss_fn = PROBLEMS[problem]
    model, tb = build(), tasks_of()
    lam, beta, lr, free, nudged = 0.5, 0.1, 0.05, 12, 7
    omega = {k: p.detach().clone() for k, p in model.named_parameters()}
    ref = {k: torch.zeros_like(v) for k, v in omega.items()}
    for t in range(tb.num_tasks):
        x, y, xq, yq = tb.x_support[t], tb.y_support[t], tb.x_query[t], tb.y_query[t]
        phi0 = _sgd_phase(model, loss_fn, omega, omega, lam, lr, free, x, y)
        plus = _sgd_phase(model, loss_fn, omega, phi0, lam, lr, nudged, x, y, xq, yq, beta)
        minus = _sgd_phase(model, loss_fn, omega, phi0, lam, lr, nudged, x, y, xq, yq, -beta)
        for k in ref:
            ref[k] += lam * (minus[k] - plus[k]) / (2 * beta) / tb.num_tasks
    method = ContrastiveMeta(model, loss_fn, lam=lam, beta=beta, symmetric=True, inner_lr=lr, momentum=0.9,
                             inner_steps=free, nudged_steps=nudged, tol=None, vmap=vmap)
    stats = method.meta_backward(tb)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    want = torch.cat([ref[k].reshape(-1) for k, _ in model.named_parameters()])
    assert float((got - want).norm() / want.norm()) < 1e-10
    # a fixed number of steps is never an equilibrium; the residual of the returned point is reported
    assert stats.iterations == free + 2 * nudged and not stats.converged and stats.inner_residual > 0


def test_momentum_cml_at_small_beta_matches_exact_hypergradient():
    """The published inner optimizer (heavy-ball 0.9, lr 0.01) run to its tolerance: symmetric CML at small beta
    is iMAML's gradient (dense solve).  (Plain gradient descent and the beta -> 0 trend: test_meta_hypergrad.)"""
    from lcp_meta.meta.reference import exact_hypergradient
    model, tasks = tanh_mlp((10,), seed=2), sine_tasks(amplitude=(0.5, 1.0), seed=2)
    ref = exact_hypergradient(model, F.mse_loss, *tasks, lam=2.0)
    stats = ContrastiveMeta(model, F.mse_loss, lam=2.0, beta=1e-3, symmetric=True, inner_lr=0.01, momentum=0.9,
                            inner_steps=20000, tol=1e-9).meta_backward(tasks)
    assert stats.converged
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    cos = float(got @ ref / (got.norm() * ref.norm()))
    assert cos > 1 - 1e-9 and float((got - ref).norm() / ref.norm()) < 1e-4, cos


# ------------------------------------------------------------------------------------------ Polyak averaging
def _train(method, tb_of_step, steps, lr=0.05, evaluate_at=()):
    """Outer loop with Adam; returns omega after each outer step (index k: after k steps)."""
    opt = torch.optim.Adam(list(method.parameters()), lr=lr)
    snap = lambda: {k: p.detach().clone() for k, p in method.model.named_parameters()}  # noqa: E731
    iterates = [snap()]
    for k in range(steps):
        if k in evaluate_at:  # evaluating in between must not change the average
            method.predict(tb_of_step(k))
        opt.zero_grad()
        method.meta_backward(tb_of_step(k))
        opt.step()
        iterates.append(snap())
    return iterates


def _mean(trees):
    return {k: sum(t[k] for t in trees) / len(trees) for k in trees[0]}


def _rel(a, b):
    num = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))
    return num / math.sqrt(sum(float((b[k] ** 2).sum()) for k in b))


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_polyak_mean_and_prediction_equal_hand_written(problem):
    build, tasks_of, loss_fn = PROBLEMS[problem]
    model = build()
    kw = dict(lam=0.5, beta=0.1, symmetric=True, inner_lr=0.05, momentum=0.9, inner_steps=6, nudged_steps=4, tol=None)
    method = ContrastiveMeta(model, loss_fn, polyak_start=2, **kw)
    tasks = [tasks_of(seed=s) for s in range(6)]
    assert method.polyak_params() is None  # not started: predictions come from omega itself
    iterates = _train(method, lambda k: tasks[k], 6, evaluate_at=(1, 3, 4))
    want = _mean(iterates[2:])  # omega after outer steps 2..6
    got = method.polyak_params()
    assert int(method.polyak_count) == 5 and _rel(got, want) < 1e-12
    assert _rel(got, iterates[-1]) > 1e-3  # the mean is not the last iterate
    # evaluation adapts from the mean: a plain method whose meta-parameters ARE the mean predicts the same
    plain = ContrastiveMeta(build(), loss_fn, **kw)
    with torch.no_grad():
        for k, p in plain.model.named_parameters():
            p.copy_(want[k])
    a, b = method.predict(tasks[0]), plain.predict(tasks[0])
    assert float((a - b).norm() / b.norm()) < 1e-10
    # the meta-gradient is still taken at the current omega, not at the mean
    plain_now = ContrastiveMeta(build(), loss_fn, **kw)
    with torch.no_grad():
        for k, p in plain_now.model.named_parameters():
            p.copy_(iterates[-1][k])
    method.zero_grad()
    method.meta_backward(tasks[1])
    plain_now.meta_backward(tasks[1])
    for p, q in zip(method.model.parameters(), plain_now.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-14)


def _authors_average(iterates, start_epoch, per_epoch):
    """The averaging of the authors' script, written with their structure: an epoch of ``per_epoch`` outer steps
    folds omega once before its first step and after each step; the count is an int the epoch function gets BY
    VALUE, so every epoch after the first starts it again at 1 (and at the start epoch the mean is set to omega
    with count 1 first)."""
    mean, count_outside = None, None
    epochs = (len(iterates) - 1) // per_epoch
    for epoch in range(epochs):
        if epoch == start_epoch:
            mean, count_outside = dict(iterates[epoch * per_epoch]), 1
        if epoch < start_epoch:
            continue
        n = count_outside  # by value: the epoch's increments are lost when it returns
        for j in range(per_epoch + 1):  # fold before the first step, then after each step
            n += 1
            it = iterates[epoch * per_epoch + j]
            mean = {k: ((n - 1) * mean[k] + it[k]) / n for k in mean}
    return mean


def test_polyak_restart_reproduces_the_authors_epoch_average():
    model = tanh_mlp((5,), seed=1)
    tasks = [sine_tasks(2, 5, seed=s) for s in range(12)]
    kw = dict(lam=0.5, beta=0.1, symmetric=True, inner_lr=0.05, momentum=0.9, inner_steps=5, tol=None)
    method = ContrastiveMeta(model, F.mse_loss, polyak_start=3, polyak_restart=3, **kw)
    iterates = _train(method, lambda k: tasks[k], 12, evaluate_at=(4, 7))
    want = _authors_average(iterates, start_epoch=1, per_epoch=3)
    got = method.polyak_params()
    assert _rel(got, want) < 1e-12
    # and it differs from the uniform Polyak-Ruppert mean of the same iterates
    assert _rel(got, _mean(iterates[3:])) > 1e-4


def test_polyak_state_travels_with_the_method_state_dict():
    kw = dict(lam=0.5, beta=0.1, inner_lr=0.05, momentum=0.9, inner_steps=5, tol=None, polyak_start=1)
    tasks = [sine_tasks(2, 5, seed=s) for s in range(4)]
    a = ContrastiveMeta(tanh_mlp((5,), seed=3), F.mse_loss, **kw)
    _train(a, lambda k: tasks[k], 4)
    b = ContrastiveMeta(tanh_mlp((5,), seed=9), F.mse_loss, **kw)
    b.load_state_dict(a.state_dict())
    assert int(b.polyak_count) == int(a.polyak_count) and _rel(b.polyak_params(), a.polyak_params()) == 0


def test_polyak_reduces_the_noise_of_stochastic_outer_steps():
    """Linear learner, quadratic losses: the exact minimiser of the mean meta-objective over a pool of tasks by a
    dense solve; constant-step SGD on one random task per step hovers around it, and its Polyak mean is closer."""
    torch.manual_seed(0)
    d, lam, pool = 3, 1.0, gaussian_tasks(8, n=4, n_query=6, d_in=3, d_out=1, seed=5, x_scale=1.0, y_scale=1.0)
    model = torch.nn.Linear(d, 1, bias=False).to(DT)
    # phi*(w) = (H + lam)^-1 (b + lam w) for l_in = mean (X phi - y)^2 = phi^T H phi / 2 - b^T phi + c
    A, rhs = torch.zeros(d, d, dtype=DT), torch.zeros(d, dtype=DT)
    for t in range(pool.num_tasks):
        X, y, Xq, yq = pool.x_support[t], pool.y_support[t, :, 0], pool.x_query[t], pool.y_query[t, :, 0]
        H, b = 2 * X.T @ X / len(y), 2 * X.T @ y / len(y)
        M = torch.linalg.inv(H + lam * torch.eye(d, dtype=DT))
        J, c = lam * M, M @ b  # phi* = J w + c
        Q, q = 2 * Xq.T @ Xq / len(yq), 2 * Xq.T @ yq / len(yq)
        A += J.T @ Q @ J
        rhs += J.T @ (q - Q @ c)
    w_star = torch.linalg.solve(A, rhs)
    # automatic accelerated inner step, tolerance 1e-6: the contrastive gradient's error is far below the noise
    method = ContrastiveMeta(model, F.mse_loss, lam=lam, beta=1e-4, symmetric=True, tol=1e-6, polyak_start=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(1)
    errors = []
    for k in range(60):
        t = int(torch.randint(pool.num_tasks, (1,), generator=g))
        opt.zero_grad()
        method.meta_backward(pool.slice(t, t + 1))
        opt.step()
        if k + 1 >= 20:  # the iterates that enter the mean
            errors.append(float((model.weight.detach()[0] - w_star).norm()))
    avg_error = float((method.polyak_params()["weight"][0] - w_star).norm())
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert avg_error < 0.5 * rms and avg_error < errors[-1], (avg_error, rms, errors[-1])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(polyak_start=-1), "polyak_start must be None or an integer >= 0"),
    (dict(polyak_start=2.5), "got 2.5"),
    (dict(polyak_start=True), "got True"),
    (dict(polyak_start="10"), "got '10'"),
    (dict(polyak_start=float("nan")), "got nan"),
    (dict(polyak_start=5, polyak_restart=0), "polyak_restart must be None or an integer >= 1"),
    (dict(polyak_restart=5), "polyak_restart=5 needs polyak_start"),
])
def test_bad_polyak_values_raise_one_line(kwargs, needle):
    with pytest.raises(ValueError) as info:
        ContrastiveMeta(tanh_mlp(), F.mse_loss, **kwargs)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def test_integral_float_is_accepted():
    assert ContrastiveMeta(tanh_mlp(), F.mse_loss, polyak_start=4.0).polyak_start == 4


def test_fewshot_runner_passes_the_polyak_options(tmp_path):
    """``--set cml.polyak_start=...`` reaches the constructor; the run's evaluations adapt from the average."""
    from lcp_meta.fewshot.config import FewShotConfig
    from lcp_meta.fewshot.runner import default_method_factory, run_fewshot
    built = {}

    def factory(name, model, loss_fn, **kw):
        built[name] = default_method_factory(name, model, loss_fn, **kw)
        return built[name]

    cfg = FewShotConfig(task="sinusoid", methods=("cml",), shots=5, meta_steps=3, meta_batch=2, inner_steps=2,
                        inner_lr=0.05, test_episodes=4, val_episodes=2, dtype="float64", device="cpu",
                        out=str(tmp_path / "run"), progress=False, plots=False,
                        method_options={"cml": {"polyak_start": 1, "polyak_restart": 2, "tol": None}})
    summary = run_fewshot(cfg, factory)
    method = built["cml"]
    assert (method.polyak_start, method.polyak_restart) == (1, 2)
    assert summary["results"][0]["method_kwargs"]["polyak_start"] == 1 and summary["results"][0]["skipped_meta_steps"] == 0
    assert int(method.polyak_last) == 3  # the iterate after the last outer step entered the mean before the test
