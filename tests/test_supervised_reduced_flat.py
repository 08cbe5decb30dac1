"""The rnn's reduced LCP-DI map on one flat state (issue 9: fewer torch ops per step, ``core/control.py``).

It must reach the fixed point of the joint dynamics: the update equals the tight-tolerance Euler simulation's
(relative error < 1e-5, float64, tiny rnns) for weak and strong control, the cross-entropy and MSE losses, KP
feedback weights and the authors' recurrent bias, with samples leaving the active set at different steps; and,
where samples stall and go to per-sample Newton, it gives the update of the generic (``step_terms``) reduced map.
"""
import pytest
import torch

from lcp_meta.models import build_model
from lcp_meta.supervised import make_method

DT = torch.float64


def _rnn(seed=0, batch=8, radius=0.9, hidden=6, activation="tanh", recurrent_bias=False):
    torch.manual_seed(seed)
    model = build_model("rnn", in_shape=(4,), num_classes=3, hidden=hidden, activation=activation,
                        recurrent_bias=recurrent_bias).to(DT)
    with torch.no_grad():
        W = torch.randn(hidden, hidden, dtype=DT)
        model.W.weight.copy_(W / torch.linalg.eigvals(W).abs().max() * radius)
    return model, torch.randn(batch, 4, dtype=DT), torch.randint(0, 3, (batch,))


def _update(model, name, x, y, generic=False, **kw):
    """The update (all parameter gradients) and statistics; ``generic``: the reduced map of ``step_terms``."""
    if generic:
        model.controlled_terms = None  # (the instance attribute hides the method: _reduced takes the generic map)
    try:
        torch.manual_seed(1)  # (KP's feedback weights)
        method = make_method(name, model, **kw)
        model.zero_grad(set_to_none=True)
        stats = method.backward(x, y)
    finally:
        if generic:
            del model.controlled_terms
    return torch.cat([p.grad.reshape(-1) for p in method.parameters()]), stats


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("act", ["tanh", "relu", "linear"])
@pytest.mark.parametrize("kp", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_controlled_terms_equal_step_terms(act, kp, bias):
    model, x, _ = _rnn(activation=act, recurrent_bias=bias)
    torch.manual_seed(3)
    c = model.encode(x)
    v, e, u = torch.randn_like(c), 0.1 * torch.randn_like(c), torch.randn(x.shape[0], 3, dtype=DT)
    fb = {"W": torch.randn(6, 6, dtype=DT), "readout": torch.randn(6, 3, dtype=DT)} if kp else None
    with torch.no_grad():
        vn, en, h = model.controlled_terms(c, v, e, u, fb)
        g, h_ref, jg, jh = model.step_terms(c, v, e, u, fb)
    torch.testing.assert_close(vn, g + e, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(en, jg + jh, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(h, h_ref, rtol=1e-13, atol=1e-13)


CASES = {  # (method, gains, loss): weak control (plain output step), strong (Newton output step), MSE, KP
    "weak-ce": ("lcp-di", dict(alpha=0.5, k_i=1.0, k_p=0.5), "ce"),
    "strong-ce": ("lcp-di", dict(alpha=0.1, k_i=1.0, k_p=0.0), "ce"),
    "mse": ("lcp-di", dict(alpha=0.5, k_i=1.0, k_p=0.5), "mse"),
    "kp": ("lcp-di-kp", dict(alpha=0.5, k_i=1.0, k_p=0.5), "ce"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bias", [False, True])
def test_flat_reduced_update_equals_tight_euler(case, bias):
    name, gains, loss = CASES[case]
    model, x, y = _rnn(recurrent_bias=bias)
    # beta / batch: 2 / 8 (weak, plain output step) or 10 / 8 (strong: the Newton output step)
    got, st = _update(model, name, x, y, solver="reduced", tol=1e-10, loss=loss, **gains)
    assert st["converged"] and st["mean_iterations"] < st["iterations"]  # samples left at different steps
    ref, _ = _update(model, name, x, y, solver="euler", tol=1e-13, max_iter=200000, loss=loss, **gains)
    assert _rel(got, ref) < 1e-5
    generic, _ = _update(model, name, x, y, generic=True, solver="reduced", tol=1e-10, loss=loss, **gains)
    assert _rel(got, generic) < 1e-7


def test_flat_reduced_with_stalled_samples_and_newton_equals_the_generic_map():
    # seed 8, spectral radius 1.5, beta = 3: two of the 8 samples do not settle under the reduced iteration and
    # go to per-sample Newton (tests/test_supervised_newton.py checks its point against the fixed-point equations)
    gains = dict(alpha=0.1, k_i=0.3, tol=1e-11, max_iter=2000)
    model, x, y = _rnn(seed=8, radius=1.5)
    got, st = _update(model, "lcp-di", x, y, **gains)
    assert st["converged"] and st["newton_samples"] >= 1 and st["newton_solved"] == st["newton_samples"]
    generic, sg = _update(model, "lcp-di", x, y, generic=True, **gains)
    assert sg["converged"] and sg["newton_samples"] == st["newton_samples"]
    assert _rel(got, generic) < 1e-7


def test_flat_reduced_on_settling_samples_with_newton_hand_overs_equals_tight_euler():
    # every sample looks stalled from step 10 on (window 1): all of them go to Newton through the flat state
    gains = dict(alpha=0.5, k_i=1.0, k_p=0.5)
    model, x, y = _rnn(seed=0)
    ref, _ = _update(model, "lcp-di", x, y, solver="euler", tol=1e-13, max_iter=200000, **gains)
    got, st = _update(model, "lcp-di", x, y, tol=1e-12, newton_options={"window": 1, "min_iter": 10}, **gains)
    assert st["converged"] and st["newton_samples"] == 8 and st["newton_solved"] == 8
    assert _rel(got, ref) < 1e-8


def test_the_batch_wide_stop_of_the_paper_preset_keeps_the_generic_map(monkeypatch):
    model, x, y = _rnn()
    gains = dict(alpha=0.5, k_i=1.0, k_p=0.5, tol=1e-10)
    flat, _ = _update(model, "lcp-di", x, y, **gains)  # the default: per-sample stop, flat map

    def refuse(*args, **kw):
        raise AssertionError("the batch-wide stop must not take the flat map")

    monkeypatch.setattr(type(model), "controlled_terms", refuse)
    wide, st = _update(model, "lcp-di", x, y, stop_rule="batch", **gains)
    assert st["converged"] and "mean_iterations" not in st
    generic, _ = _update(model, "lcp-di", x, y, generic=True, stop_rule="batch", **gains)
    torch.testing.assert_close(wide, generic, rtol=0, atol=0)
    assert _rel(wide, flat) < 1e-7
