"""higher 0.2.1 as an independent reference for our MAML, and its functional models as our models."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("higher") is None:
    pytest.skip("higher not installed (bash scripts/install_adapters.sh)", allow_module_level=True)
import higher  # noqa: E402
pytest.importorskip("lcp_meta.meta", reason="lcp_meta.meta (the meta-learning methods) is not available")

from lcp_meta.adapters.higher_compat import HigherModel, higher_maml_gradient  # noqa: E402
from lcp_meta.meta import make_method  # noqa: E402
from conftest import gaussian_tasks, tanh_mlp  # noqa: E402

pytestmark = pytest.mark.adapters


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_our_maml_equals_higher_innerloop(momentum):
    model, tb = tanh_mlp((6,), 2), gaussian_tasks(3)
    ref = higher_maml_gradient(model, F.mse_loss, tb, inner_lr=0.3, inner_steps=4, momentum=momentum)
    assert all(p.grad is None for p in model.parameters())  # the reference leaves .grad alone
    make_method("maml", model, F.mse_loss, inner_lr=0.3, inner_steps=4, momentum=momentum).meta_backward(tb)
    for k, p in model.named_parameters():
        assert ref[k].abs().max() > 1e-3
        torch.testing.assert_close(p.grad, ref[k], rtol=0, atol=1e-10)


def test_first_order_maml_is_not_higher_second_order():
    """The comparison above can fail: FOMAML drops the second-order terms higher differentiates."""
    model, tb = tanh_mlp((6,), 2), gaussian_tasks(3)
    ref = higher_maml_gradient(model, F.mse_loss, tb, inner_lr=0.3, inner_steps=4)
    make_method("fomaml", model, F.mse_loss, inner_lr=0.3, inner_steps=4).meta_backward(tb)
    diff = max(float((p.grad - ref[k]).abs().max()) for k, p in model.named_parameters())
    assert diff > 1e-6


@pytest.mark.parametrize("method,kw", [
    ("maml", dict(inner_lr=0.3, inner_steps=4)),
    ("lcp", dict(lam=3.0, beta=1e-2, inner_lr=0.2, inner_steps=400, tol=1e-12)),
])
def test_higher_functional_model_as_our_model(method, kw):
    """A monkeypatched model gives the same meta-gradient as the plain one, in the original .grad."""
    plain, tb = tanh_mlp((6,), 2), gaussian_tasks()
    make_method(method, plain, F.mse_loss, **kw).meta_backward(tb)
    model = tanh_mlp((6,), 2)
    fmodel = higher.patch.monkeypatch(model)  # default copy_initial_weights=True: fast weights are copies
    wrapped = HigherModel(fmodel, model)
    assert [k for k, _ in wrapped.named_parameters()] == ["module." + k for k, _ in model.named_parameters()]
    x = tb.x_query[0]
    torch.testing.assert_close(wrapped(x), model(x), rtol=0, atol=0)
    stats = make_method(method, wrapped, F.mse_loss, **kw).meta_backward(tb)
    assert stats.converged
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_higher_model_rejects_wrong_inputs():
    model = tanh_mlp((6,), 2)
    with pytest.raises(TypeError, match="higher functional model"):
        HigherModel(model, model)
    with pytest.raises(ValueError, match="fast weights"):
        HigherModel(higher.patch.monkeypatch(model), torch.nn.Linear(2, 1))
