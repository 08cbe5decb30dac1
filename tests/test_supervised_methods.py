"""Supervised methods beyond exactness: KP alignment, LF's learned feedback, divergence, bad input, the API."""
import math

import pytest
import torch

from lcp_meta.core.solvers import DivergenceError
from lcp_meta.models import MODEL_NAMES, build_model
from lcp_meta.supervised import METHOD_NAMES, default_hparams, make_method
from lcp_meta.supervised.config import SUPPORTED

DT = torch.float64


def test_kp_feedback_aligns_with_forward_weights():
    torch.manual_seed(0)
    model = build_model("ff", in_shape=(6,), num_classes=3, hidden=(5, 4)).to(DT)
    kp = make_method("lcp-di-kp", model, kp_wd=0.1, tol=1e-6, max_iter=200, max_residual=1.0)
    # B receives exactly the transpose of its forward weight's update
    x, y = torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,))
    kp.backward(x, y)
    for key, (w, lin) in kp.pairs.items():
        torch.testing.assert_close(kp.feedback.B[key].grad, w.grad.t() if lin else w.grad)
    before = kp.alignment_angles()
    opt = torch.optim.SGD(kp.parameters(), lr=0.05)
    for _ in range(30):
        x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))
        opt.zero_grad()
        kp.backward(x, y)
        opt.step()
        kp.after_step()
    after = kp.alignment_angles()
    # decay shrinks B - W^T while both receive the same updates: every angle shrinks markedly
    # (the readout's, which gets the largest updates, from ~90 degrees to under 30)
    for key in before:
        assert after[key] < 0.7 * before[key], (before, after)
    assert after["readout"] < 30.0, (before, after)


def test_lf_learns_feedback_in_the_optimal_control_column_space():
    """Linear rnn around an equilibrium whose output already sits at the target (u* = 0): one noisy phase
    from Q = 0 must point Q along Q* = (I - W^T)^{-1} D^T, the feedback that satisfies the optimal-control
    condition J_f^T Q u + J_h^T u = 0 for every u."""
    torch.manual_seed(0)
    n = 4
    model = build_model("rnn", in_shape=(3,), num_classes=1, hidden=n, activation="linear").to(DT)
    with torch.no_grad():
        model.W.weight.mul_(0.5)
        v_star = torch.linalg.solve(torch.eye(n, dtype=DT) - model.W.weight, model.U.bias)
        model.readout.bias.copy_(1.0 - model.readout.weight @ v_star)  # free output = one-hot target
        q_star = torch.linalg.solve(torch.eye(n, dtype=DT) - model.W.weight.T, model.readout.weight.T)
    lf = make_method("lcp-lf", model, loss="mse", alpha=0.1, tau_Q=1.0, sigma=0.1, wd_Q=0.0, noise_steps=200,
                     tol=1e-12, max_iter=5000)
    cos = lambda q: float(q.flatten() @ q_star.flatten() / (q.norm() * q_star.norm()))
    assert abs(cos(lf.Q)) < 0.5  # the random init is not aligned
    lf.Q.zero_()
    x, y = torch.zeros(2048, 3, dtype=DT), torch.zeros(2048, dtype=torch.long)
    lf.backward(x, y)
    assert float(lf.Q.norm()) > 0
    assert cos(lf.Q) > 0.9
    # the state dict carries Q
    state = lf.state_dict()
    lf2 = make_method("lcp-lf", model, loss="mse")
    lf2.load_state_dict(state)
    torch.testing.assert_close(lf2.Q, lf.Q)


def test_lf_update_uses_modulated_hidden_error():
    torch.manual_seed(1)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=5).to(DT)
    lf = make_method("lcp-lf", model, learn_Q=False, tol=1e-12, max_iter=5000)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    lf.backward(x, y)
    with torch.no_grad():
        c = model.encode(x)
    (v, yc, u_i, u), _ = lf.controlled_equilibrium(c, y)
    e_mod = (u @ lf.Q.t()) * (1 - torch.tanh(v) ** 2)
    torch.testing.assert_close(model.W.weight.grad, -e_mod.T @ torch.tanh(v), rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(model.readout.weight.grad, -u.T @ torch.tanh(v), rtol=1e-9, atol=1e-13)
    # at the controlled equilibrium the hidden control is e = Q u
    torch.testing.assert_close(v - model.g(c, v), u @ lf.Q.t(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method_name", ["lcp-di", "lcp-di-kp", "rbp", "lcp-ebd", "lcp-lf"])
def test_divergence_raises_and_leaves_grads_untouched(method_name):
    torch.manual_seed(2)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=6, activation="linear")
    with torch.no_grad():
        model.W.weight.copy_(1.5 * torch.eye(6))  # unstable dynamics: the state overflows to inf/NaN
    method = make_method(method_name, model, max_iter=300, **({"ebd_steps": 300} if method_name == "lcp-ebd" else {}))
    sentinel = [torch.full_like(p, 7.0) for p in method.parameters()]
    for p, s in zip(method.parameters(), sentinel):
        p.grad = s.clone()
    before = [p.detach().clone() for p in method.parameters()]
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    if method_name == "lcp-ebd":  # the linear energy is convex, Adam would cope: feed a NaN instead
        x[0, 0] = float("nan")
    with pytest.raises(DivergenceError, match="residual|NaN"):
        method.backward(x, y)
    for p, s, b in zip(method.parameters(), sentinel, before):
        assert torch.equal(p.grad, s)
        assert torch.equal(p.detach(), b)


def test_divergence_message_names_the_residual():
    torch.manual_seed(3)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=6)
    with torch.no_grad():
        model.W.weight.copy_(4.0 * torch.linalg.qr(torch.randn(6, 6))[0])  # bounded (tanh) but chaotic
    method = make_method("lcp-di", model, max_iter=200)
    with pytest.raises(DivergenceError) as info:
        method.backward(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert "relative residual" in str(info.value)
    assert info.value.stats is not None and info.value.stats.iterations == 200
    assert all(p.grad is None for p in method.parameters())


@pytest.mark.parametrize("name,shape", [("ff", (1, 28, 28)), ("rnn", (1, 28, 28)), ("conv-rnn", (3, 32, 32))])
def test_bad_input_is_a_clear_value_error(name, shape):
    model = build_model(name, in_shape=shape, num_classes=10, **({"channels": 8, "inner": 8} if name == "conv-rnn" else {}))
    method = make_method("lcp-di", model)
    good_y = torch.randint(0, 10, (2,))
    with pytest.raises(ValueError, match=r"\(B, " + ", ".join(map(str, shape))):
        method.backward(torch.randn(2, 3, 5, 5), good_y)
    with pytest.raises(ValueError, match="dtype"):
        method.backward(torch.randn(2, *shape, dtype=DT), good_y)
    with pytest.raises(ValueError, match="dtype"):
        model.predict(torch.zeros(2, *shape, dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels"):
        method.backward(torch.randn(2, *shape), torch.randint(0, 10, (3,)))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        method.backward(torch.randn(2, *shape), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="labels"):
        method.backward(torch.randn(2, *shape), torch.zeros(2))
    assert all(p.grad is None for p in model.parameters())


def test_api_names_and_hparams():
    assert METHOD_NAMES == ("bp", "rbp", "lcp-di", "lcp-di-kp", "lcp-lf", "lcp-ebd")
    hp = default_hparams("ff", "lcp-di")
    assert (hp["alpha"], hp["k_i"], hp["k_p"], hp["tol"], hp["max_iter"]) == (0.1, 1.0, 0.0, 1e-6, 800)
    assert (hp["optimizer"], hp["lr"], hp["lr_final"], hp["batch_size"], hp["epochs"]) == ("adam", 1e-3, 1e-4, 64, 30)
    assert default_hparams("rnn", "rbp")["grad_clip"] == 10.0 and default_hparams("rnn", "rbp")["max_iter"] == 200
    assert default_hparams("rnn", "lcp-ebd")["ebd_init"] == "free"
    assert default_hparams("conv-rnn", "lcp-di")["k_i"] == 0.3
    assert default_hparams("conv-ff", "lcp-di-kp")["kp_wd"] == 1e-5
    with pytest.raises(ValueError, match="not available"):
        default_hparams("rnn", "bp")
    with pytest.raises(ValueError, match="unknown method"):
        make_method("lcp-xx", build_model("rnn", in_shape=(4,), hidden=3))
    with pytest.raises(TypeError, match="alpah"):
        make_method("lcp-di", build_model("rnn", in_shape=(4,), hidden=3), alpah=1.0)
    with pytest.raises(TypeError, match="unknown option"):
        build_model("ff", hiden=3)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("mlp")


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_supported_method_runs_on_tiny_models(model_name):
    """Each (model, method) pair with its published settings: one backward fills every .grad and returns
    the agreed statistics; predict gives logits."""
    small = {"ff": dict(hidden=(8, 8)), "rnn": dict(hidden=8), "conv-ff": dict(channels=(4, 4, 4), fc=(8, 8)),
             "conv-rnn": dict(channels=4, inner=4, groups=2)}[model_name]
    shape = (1, 28, 28) if model_name in ("ff", "rnn") else (3, 20, 20) if model_name == "conv-ff" else (3, 8, 8)
    torch.manual_seed(4)
    x, y = torch.rand(2, *shape), torch.randint(0, 10, (2,))
    for method_name in SUPPORTED[model_name]:
        model = build_model(model_name, in_shape=shape, num_classes=10, **small)
        hp = default_hparams(model_name, method_name)
        hp.update({k: 50 for k in ("max_iter", "ebd_steps") if k in hp}, max_residual=1.0)
        if method_name == "lcp-lf":
            hp["noise_steps"] = 20
        method = make_method(method_name, model, **hp)
        stats = method.backward(x, y)
        assert {"loss", "iterations", "residual", "converged", "control_norm"} <= set(stats)
        assert math.isfinite(stats["loss"])
        for p in method.parameters():
            assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()
        logits, pstats = model.predict(x, max_iter=50)
        assert logits.shape == (2, 10)
        method.after_step()


@pytest.mark.parametrize("method_name", ["bp", "rbp", "lcp-di", "lcp-lf", "lcp-ebd"])
def test_backward_accumulates_like_loss_backward(method_name):
    """The one method contract: backward adds its update to .grad (a second call on the same batch doubles it,
    bit for bit up to the addition), and its statistics are a dict with attribute access."""
    torch.manual_seed(5)
    model = build_model("ff", in_shape=(4,), num_classes=3, hidden=(5,)).to(DT)
    kw = {"ebd_steps": 50} if method_name == "lcp-ebd" else {"learn_Q": False} if method_name == "lcp-lf" else {}
    method = make_method(method_name, model, tol=1e-12, max_iter=5000, **kw)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    stats = method.backward(x, y)
    first = [p.grad.clone() for p in method.parameters()]
    assert stats["loss"] == stats.loss and dict(stats)["loss"] == stats.loss and math.isfinite(stats.loss)
    method.backward(x, y)
    for p, g in zip(method.parameters(), first):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=1e-15)


def test_method_template_refuses_non_finite_updates_under_both_policies():
    """core.method.GradientMethod: a non-finite gradient is refused (raise, or warn) before any .grad is
    touched and before on_accept runs; a finite one is added to .grad, then on_accept runs."""
    from lcp_meta.core.method import GradientMethod, Gradients, StepStats

    class Toy(GradientMethod):
        name = "toy"

        def __init__(self, params, policy):
            self.params, self.on_divergence, self.accepted = params, policy, 0

        def _gradients(self, batch):
            return Gradients(self.params, [batch * torch.ones_like(p) for p in self.params], StepStats(loss=1.0),
                             on_accept=lambda: setattr(self, "accepted", self.accepted + 1))

    p = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    p.grad = torch.full_like(p, 7.0)
    with pytest.raises(DivergenceError, match="toy: update turned NaN/inf"):
        Toy([p], "raise")._backward(float("nan"))
    with pytest.warns(RuntimeWarning, match="toy: update turned NaN/inf"):
        toy = Toy([p], "warn")
        assert toy._backward(float("inf")).loss == 1.0 and not toy.accumulated
    assert torch.equal(p.grad, torch.full_like(p, 7.0)) and toy.accepted == 0
    toy._backward(2.0)
    assert torch.equal(p.grad, torch.full_like(p, 9.0)) and toy.accepted == 1 and toy.accumulated
