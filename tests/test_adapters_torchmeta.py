"""torchmeta 1.8.0 on torch 2.x through lcp_meta.adapters.torchmeta_compat.

Skipped when torchmeta is not installed.  When it is, the package is imported only through our patch, so
a failure here is a real incompatibility (pytest.importorskip would hide the ImportError it raises
unpatched).  No torchmeta data set can be downloaded: tasks come from a synthetic ClassDataset run
through torchmeta's own CombinationMetaDataset / Categorical / ClassSplitter / BatchMetaDataLoader.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("torchmeta") is None:
    pytest.skip("torchmeta not installed (bash scripts/install_adapters.sh)", allow_module_level=True)
pytest.importorskip("lcp_meta.meta", reason="lcp_meta.meta (the meta-learning methods) is not available")

from lcp_meta.adapters import torchmeta_compat  # noqa: E402  (patches, then imports torchmeta)
from lcp_meta.meta import make_method  # noqa: E402
from torchmeta.modules import MetaBatchNorm2d, MetaConv2d, MetaLinear, MetaSequential  # noqa: E402
from torchmeta.transforms import Categorical, ClassSplitter  # noqa: E402
from torchmeta.utils.data import BatchMetaDataLoader, ClassDataset, CombinationMetaDataset  # noqa: E402
from torchmeta.utils.data.task import Dataset as TaskDataset  # noqa: E402

pytestmark = pytest.mark.adapters
D = torch.float64
WAYS, SHOTS, QUERIES, CLASSES, PER_CLASS = 3, 1, 2, 6, 5


class _OneClass(TaskDataset):
    """All examples of one class; targets go through torchmeta's target transforms."""

    def __init__(self, index, images, target_transform=None):
        super().__init__(index, target_transform=target_transform)
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        target = self.index if self.target_transform is None else self.target_transform(self.index)
        return self.images[i], target


class _Classes(ClassDataset):
    def __init__(self, images):
        super().__init__(meta_train=True)
        self.images = images

    @property
    def num_classes(self):
        return len(self.images)

    def __getitem__(self, i):
        return _OneClass(i, self.images[i], target_transform=self.get_target_transform(i))


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(CLASSES, PER_CLASS, 1, 4, 4, generator=g, dtype=D)  # (class, example, C, H, W)


@pytest.fixture()
def loader(images):
    torch.manual_seed(0)
    ds = CombinationMetaDataset(_Classes(images), WAYS, target_transform=Categorical(WAYS),
                                dataset_transform=ClassSplitter(shuffle=True, num_train_per_class=SHOTS,
                                                                num_test_per_class=QUERIES))
    return BatchMetaDataLoader(ds, batch_size=2, num_workers=0)


def _conv(seed=0):
    torch.manual_seed(seed)
    return MetaSequential(MetaConv2d(1, 2, 3, padding=1), MetaBatchNorm2d(2, track_running_stats=False),
                          torch.nn.Tanh(), torch.nn.Flatten(), MetaLinear(2 * 16, WAYS)).to(D)


def _plain(meta):
    """The same network out of plain torch modules, with the same weights."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2, track_running_stats=False),
                              torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(2 * 16, WAYS)).to(D)
    net.load_state_dict(meta.state_dict())
    return net


def test_patch_fixes_the_two_torch2_breakages():
    from torch.utils.data import Subset
    from torchmeta.utils.data.task import SubsetTask
    import torchvision.datasets.utils as tv_utils

    assert hasattr(tv_utils, "_get_confirm_token") and hasattr(tv_utils, "_save_response_content")
    if hasattr(Subset, "__getitems__"):
        assert SubsetTask.__getitems__ is not Subset.__getitems__
    assert torchmeta_compat.patch() is not None  # idempotent
    assert len(torchmeta_compat.PATCHES) == len(set(torchmeta_compat.PATCHES))


def test_batches_convert_to_task_batches(loader, images):
    batch = next(iter(loader))
    tb = torchmeta_compat.task_batch(batch)
    assert tb.x_support.shape == (2, WAYS * SHOTS, 1, 4, 4) and tb.x_query.shape == (2, WAYS * QUERIES, 1, 4, 4)
    flat = images.reshape(CLASSES * PER_CLASS, -1)
    for t in range(2):
        assert sorted(tb.y_support[t].tolist()) == list(range(WAYS))
        # every example is a real image of the data set, and a label always means the same class
        label_to_class = {}
        for xs, ys in ((tb.x_support[t], tb.y_support[t]), (tb.x_query[t], tb.y_query[t])):
            for x, y in zip(xs, ys):
                hit = (flat == x.reshape(1, -1)).all(1).nonzero()
                assert len(hit) == 1
                cls = int(hit[0]) // PER_CLASS
                assert label_to_class.setdefault(int(y), cls) == cls
        assert len(set(label_to_class.values())) == WAYS
    with pytest.raises(TypeError, match="'train' and 'test'"):
        torchmeta_compat.task_batch({"support": batch["train"]})


@pytest.mark.parametrize("method,kw", [
    # a fixed number of joint steps: lcp-truncated (this BatchNorm net's inner problem does not settle, so
    # lcp at its equilibrium raises); truncated runs are reported unconverged, with their residuals
    ("lcp-truncated", dict(lam=3.0, beta=1e-2, inner_lr=0.2, inner_steps=8)),
    ("maml", dict(inner_lr=0.2, inner_steps=2)),
])
def test_meta_module_equals_plain_module(loader, method, kw):
    tb = torchmeta_compat.task_batch(next(iter(loader)))
    meta = _conv()
    x = tb.x_query[0]
    params = {k: v.detach() * 1.1 for k, v in meta.named_parameters()}
    torch.testing.assert_close(meta(x, params=params), torch.func.functional_call(meta, params, (x,)))
    plain = _plain(meta)
    s1 = make_method(method, meta, F.cross_entropy, **kw).meta_backward(tb)
    s2 = make_method(method, plain, F.cross_entropy, **kw).meta_backward(tb)
    assert (s1.converged and s2.converged) if method != "lcp-truncated" else (
        s1.control_residual == pytest.approx(s2.control_residual, rel=1e-9) and not s1.converged)
    for a, b in zip(meta.parameters(), plain.parameters()):
        assert b.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_meta_training_steps_from_a_torchmeta_loader(loader):
    net = _conv()
    method = make_method("lcp-truncated", net, F.cross_entropy, lam=3.0, beta=1e-2, inner_lr=0.2, inner_steps=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    start = [p.detach().clone() for p in net.parameters()]
    for step, batch in enumerate(loader):
        opt.zero_grad()
        stats = method.meta_backward(torchmeta_compat.task_batch(batch))
        assert stats.control_residual > 0 and not stats.converged and stats.meta_grad_norm > 0
        opt.step()
        if step == 1:
            break
    assert all(torch.isfinite(p).all() and not torch.equal(p, s) for p, s in zip(net.parameters(), start))
