"""learn2learn 0.2.0 (built by scripts/install_adapters.sh) with LCP behind its clone()/adapt() loop.

Real learn2learn objects throughout: a MetaDataset over a TensorDataset, a TaskDataset with NWays /
KShots / LoadData / RemapLabels, partition_task, and learn2learn's own MAML as the reference gradient.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

# skip only when absent: an installed learn2learn that fails to import is a failure, not a skip
if importlib.util.find_spec("learn2learn") is None:
    pytest.skip("learn2learn not installed (bash scripts/install_adapters.sh)", allow_module_level=True)
import learn2learn as l2l  # noqa: E402
pytest.importorskip("lcp_meta.meta", reason="lcp_meta.meta (the meta-learning methods) is not available")

from lcp_meta.adapters.l2l import LCPLearner, require_learn2learn, task_batch  # noqa: E402
from lcp_meta.meta import make_method  # noqa: E402
from conftest import tanh_mlp  # noqa: E402

pytestmark = pytest.mark.adapters
D = torch.float64
WAYS, SHOTS, QUERIES = 3, 1, 2


@pytest.fixture()
def taskset():
    """6 classes of 8 four-dimensional points (class means far apart), as learn2learn tasks."""
    g = torch.Generator().manual_seed(0)
    means = 0.8 * torch.randn(6, 4, generator=g, dtype=D)
    x = (means.repeat_interleave(8, 0) + 0.2 * torch.randn(48, 4, generator=g, dtype=D))
    y = torch.arange(6).repeat_interleave(8)
    ds = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x, y))
    t = l2l.data.transforms
    return l2l.data.Taskset(ds, task_transforms=[
        t.NWays(ds, WAYS), t.KShots(ds, SHOTS + QUERIES), t.LoadData(ds), t.RemapLabels(ds)], num_tasks=20)


def test_learn2learn_build_works_on_this_python(taskset):
    """The pieces the adapter uses, including NWays after FilterLabels (random.sample on a set, 3.11)."""
    require_learn2learn()  # raises ImportError with the recipe on an unpatched build
    x, y = taskset.sample()
    assert x.shape == (WAYS * (SHOTS + QUERIES), 4) and sorted(y.unique().tolist()) == list(range(WAYS))
    ds = taskset.dataset
    t = l2l.data.transforms
    filtered = l2l.data.Taskset(ds, [t.FilterLabels(ds, [0, 1, 2, 3]), t.NWays(ds, 2), t.KShots(ds, 2),
                                     t.LoadData(ds)], num_tasks=4)
    fx, fy = filtered.sample()
    assert fx.shape == (4, 4) and set(fy.tolist()) <= {0, 1, 2, 3} and len(set(fy.tolist())) == 2


def test_task_batch_from_taskdataset(taskset):
    tb = task_batch(taskset, num_tasks=4, shots=SHOTS)
    assert tb.x_support.shape == (4, WAYS * SHOTS, 4) and tb.x_query.shape == (4, WAYS * QUERIES, 4)
    for i in range(4):  # partition_task: every class once in the support set, QUERIES times in the query set
        assert sorted(tb.y_support[i].tolist()) == list(range(WAYS))
        assert sorted(tb.y_query[i].tolist()) == sorted(list(range(WAYS)) * QUERIES)
    with pytest.raises(TypeError, match="TaskDataset"):
        task_batch(42, 2, 1)


def test_lcp_meta_training_step_equals_meta_backward(taskset):
    """The learn2learn loop with LCP: .grad equals LCP.meta_backward on the same tasks; Adam steps."""
    model = tanh_mlp((5,), 4, WAYS)
    samples = [taskset.sample() for _ in range(3)]
    tb = task_batch(samples, 3, SHOTS)
    kw = dict(lam=3.0, beta=1e-2, inner_lr=0.2, inner_steps=400, tol=1e-10)
    maml = LCPLearner(model, F.cross_entropy, **kw)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-2)
    opt.zero_grad()
    for (xs, ys), (xq, yq) in (l2l.data.partition_task(x, y, shots=SHOTS) for x, y in samples):
        learner = maml.clone()
        learner.adapt(xs, ys)
        evaluation_error = learner.query_loss(xq, yq)
        evaluation_error.backward()
        assert learner.stats.converged and torch.isfinite(evaluation_error)
        acc = (learner(xq).argmax(1) == yq).double().mean()
        assert 0 <= float(acc) <= 1
    for p in maml.parameters():
        p.grad.mul_(1.0 / len(samples))
    routed = [p.grad.clone() for p in model.parameters()]

    reference = tanh_mlp((5,), 4, WAYS)  # same initial weights, our method called directly on the batch
    make_method("lcp", reference, F.cross_entropy, **kw).meta_backward(tb)
    for a, b in zip(routed, reference.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-9, atol=1e-13)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_maml_through_the_adapter_equals_learn2learn_maml(taskset):
    """method='maml' behind the same loop reproduces learn2learn's own second-order MAML gradient."""
    samples = [taskset.sample() for _ in range(2)]
    parts = [l2l.data.partition_task(x, y, shots=SHOTS) for x, y in samples]
    ours, theirs = tanh_mlp((5,), 4, WAYS), tanh_mlp((5,), 4, WAYS)
    maml = LCPLearner(ours, F.cross_entropy, method="maml", inner_lr=0.5, inner_steps=3)
    ref = l2l.algorithms.MAML(theirs, lr=0.5, first_order=False)
    for (xs, ys), (xq, yq) in parts:
        learner = maml.clone()
        learner.adapt(xs, ys)
        (learner.query_loss(xq, yq) / len(parts)).backward()
        clone = ref.clone()
        for _ in range(3):
            clone.adapt(F.cross_entropy(clone(xs), ys))
        (F.cross_entropy(clone(xq), yq) / len(parts)).backward()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert b.grad.abs().max() > 1e-4
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)
