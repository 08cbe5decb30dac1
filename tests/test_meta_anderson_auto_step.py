"""solver="anderson" without an inner_lr: the gradient map it accelerates takes the automatic step (the smallest
task's 1 / (SAFETY lam_max)); it crashed with a TypeError (None * tensor) for lcp-direct, lcp-ebd, imaml and cml.
Anderson reaches the same fixed point as the default relaxation, so the meta-gradients agree."""
import pytest
import torch
import torch.nn.functional as F

from lcp_meta.meta import make_method

from conftest import sine_tasks, tanh_mlp


def _meta_grad(name, **kw):
    model = tanh_mlp((6,), seed=2)
    tb = sine_tasks(T=3, n=6, seed=4)
    make_method(name, model, F.mse_loss, lam=3.0, tol=1e-11, **kw).meta_backward(tb)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name, kw", [
    ("lcp-direct", {"beta": 0.05}),
    ("imaml", {"cg_steps": 60, "cg_tol": 1e-12}),
    ("cml", {"beta": 0.05}),
])
def test_anderson_with_the_automatic_step_reaches_the_default_solvers_result(name, kw):
    ref = _meta_grad(name, **kw)
    got = _meta_grad(name, solver="anderson", **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
