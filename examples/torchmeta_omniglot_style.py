"""Omniglot-style few-shot training with torchmeta's data pipeline and models, meta-learned by LCP.

torchmeta 1.8.0 cannot download its Omniglot here (nor install on torch 2.x without
``lcp_meta.adapters.torchmeta_compat``), so this example builds the same pipeline torchmeta's
``omniglot(...)`` helper builds, over the offline zip ``omniglot/images_background_small1.zip``:

    ClassDataset (one class per character, 28x28, ink bright)
      -> CombinationMetaDataset(ways, target_transform=Categorical(ways))
      -> ClassSplitter(num_train_per_class=shots, num_test_per_class=queries)
      -> BatchMetaDataLoader -> batch['train'], batch['test']  -> torchmeta_compat.task_batch -> TaskBatch

The network is a torchmeta ``MetaSequential`` conv net (MetaConv2d, MetaBatchNorm2d without running
statistics); lcp_meta calls it through ``torch.func.functional_call``.  Characters are split in two:
the first 100 for meta-training, the rest for meta-testing.

The default method is ``lcp-truncated`` (the LCP controller stopped after its 20 joint steps, reported
unconverged with its residuals), as in the package's Omniglot runner: ``lcp`` at its controlled equilibrium
raises ``DivergenceError`` on this ReLU / max-pool / BatchNorm net, whose inner problem does not settle
(docs/results.md, "Known limit").

Needs torchmeta (``bash scripts/install_adapters.sh``).  Run (about a minute on a 2-core CPU: 5 meta-steps
of 4 tasks): ``python examples/torchmeta_omniglot_style.py --data-root ../shared/data``.  A longer run, e.g.
``--steps 100 --meta-batch 8``, costs about 20 s per meta-step there under heavy load (10 steps: 3 min 41 s).
"""
import argparse
import io
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lcp_meta.adapters import torchmeta_compat  # patches torchmeta for torch 2.x, then imports it
from lcp_meta.meta import make_method
from lcp_meta.utils import find_data_root
from torchmeta.modules import MetaBatchNorm2d, MetaConv2d, MetaLinear, MetaSequential
from torchmeta.transforms import Categorical, ClassSplitter
from torchmeta.utils.data import BatchMetaDataLoader, ClassDataset, CombinationMetaDataset
from torchmeta.utils.data.task import Dataset as TaskDataset

ZIP = "images_background_small1.zip"


def load_characters(path, size=28):
    """Float tensor (characters, drawings, 1, size, size) in [0, 1], ink = 1 (as torchmeta's Omniglot)."""
    groups = {}
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            if name.endswith(".png"):
                img = Image.open(io.BytesIO(zf.read(name))).convert("L").resize((size, size), Image.LANCZOS)
                groups.setdefault(name.rsplit("/", 1)[0], []).append(1.0 - np.asarray(img, np.float32) / 255.0)
    drawings = min(len(v) for v in groups.values())
    return torch.tensor(np.stack([np.stack(v[:drawings]) for v in groups.values()]))[:, :, None]


class Character(TaskDataset):
    """All drawings of one character (a torchmeta task dataset: (image, target) pairs)."""

    def __init__(self, index, images, target_transform=None):
        super().__init__(index, target_transform=target_transform)
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        target = self.index if self.target_transform is None else self.target_transform(self.index)
        return self.images[i], target


class Characters(ClassDataset):
    def __init__(self, images, meta_split):
        super().__init__(meta_split=meta_split)
        self.images = images

    @property
    def num_classes(self):
        return len(self.images)

    def __getitem__(self, i):
        return Character(i, self.images[i], target_transform=self.get_target_transform(i))


def loader(images, split, ways, shots, queries, batch_size):
    dataset = CombinationMetaDataset(Characters(images, split), ways, target_transform=Categorical(ways),
                                     dataset_transform=ClassSplitter(shuffle=True, num_train_per_class=shots,
                                                                     num_test_per_class=queries))
    return BatchMetaDataLoader(dataset, batch_size=batch_size, num_workers=0)


def conv_net(ways, channels=32):
    def block(cin):
        return [MetaConv2d(cin, channels, 3, padding=1), MetaBatchNorm2d(channels, track_running_stats=False),
                torch.nn.ReLU(), torch.nn.MaxPool2d(2)]

    return MetaSequential(*block(1), *block(channels), *block(channels), torch.nn.Flatten(),
                          MetaLinear(channels * 9, ways))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="folder holding omniglot/ (else $LCP_META_DATA)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--method", default="lcp-truncated", help="any of lcp_meta.meta.METHOD_NAMES")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    images = load_characters(find_data_root(args.data_root, "omniglot", [ZIP]) / ZIP)
    train = loader(images[:100], "train", args.ways, args.shots, args.queries, args.meta_batch)
    test = loader(images[100:], "test", args.ways, args.shots, args.queries, args.meta_batch)
    torch.manual_seed(0)
    net = conv_net(args.ways).to(args.device)
    kw = dict(lam=0.5, beta=0.1, inner_lr=0.1, inner_steps=20) if args.method.startswith("lcp") else \
        dict(inner_lr=0.4, inner_steps=3)
    method = make_method(args.method, net, F.cross_entropy, **kw)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step, batch in enumerate(train):
        if step >= args.steps:
            break
        opt.zero_grad()
        stats = method.meta_backward(torchmeta_compat.task_batch(batch, device=args.device))
        opt.step()
        if step % 10 == 0:
            # for LCP the "after" state is the controlled one, nudged towards the query set by beta
            print(f"step {step:4d}  query loss {stats.query_loss_before:.3f} at omega, "
                  f"{stats.query_loss_after:.3f} adapted  (inner iterations {stats.iterations})")
    correct = total = 0
    for i, batch in enumerate(test):
        if i >= 5:
            break
        tb = torchmeta_compat.task_batch(batch, device=args.device)
        pred = method.predict(tb).argmax(-1)
        correct += int((pred == tb.y_query).sum())
        total += tb.y_query.numel()
    print(f"meta-test accuracy on held-out characters ({args.ways}-way {args.shots}-shot): {correct / total:.3f}")


if __name__ == "__main__":
    main()
