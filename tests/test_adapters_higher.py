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
from lcp_meta.meta import TaskBatch, make_method  # noqa: E402

pytestmark = pytest.mark.adapters
D = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(D)


def _tasks(T=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    return TaskBatch(0.5 * r(T, 5, 2), 0.3 * r(T, 5, 1), 0.5 * r(T, 7, 2), 0.3 * r(T, 7, 1))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_our_maml_equals_higher_innerloop(momentum):
    model, tb = _mlp(), _tasks()
    ref = higher_maml_gradient(model, F.mse_loss, tb, inner_lr=0.3, inner_steps=4, momentum=momentum)
    assert all(p.grad is None for p in model.parameters())  # the reference leaves .grad alone
    make_method("maml", model, F.mse_loss, inner_lr=0.3, inner_steps=4, momentum=momentum).meta_backward(tb)
    for k, p in model.named_parameters():
        assert ref[k].abs().max() > 1e-3
        torch.testing.assert_close(p.grad, ref[k], rtol=0, atol=1e-10)


def test_first_order_maml_is_not_higher_second_order():
    """The comparison above can fail: FOMAML drops the second-order terms higher differentiates."""
    model, tb = _mlp(), _tasks()
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
    plain, tb = _mlp(), _tasks(T=2)
    make_method(method, plain, F.mse_loss, **kw).meta_backward(tb)
    model = _mlp()
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
    model = _mlp()
    with pytest.raises(TypeError, match="higher functional model"):
        HigherModel(model, model)
    with pytest.raises(ValueError, match="fast weights"):
        HigherModel(higher.patch.monkeypatch(model), torch.nn.Linear(2, 1))
