"""Task sources of the few-shot comparison: a deterministic meta-training stream and fixed evaluation sets.

The training batch of meta-step ``s`` is drawn from a generator seeded by ``(seed, stream, s)``: every method
sees the same tasks at the same step, and a resumed run sees exactly the tasks an uninterrupted one would.
Validation and test sets are fixed by the seed as well (the same episodes for every method).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.episodes import EpisodeSampler
from ..data.sinusoid import SinusoidBatch, SinusoidTasks
from ..data.tasks import TaskBatch

TRAIN, VAL, TEST = 0, 1, 2
# how the protocol names the learner's nonlinearity (kept as it always read for ReLU)
_ACTIVATION_NAMES = {"relu": "ReLU", "tanh": "tanh", "softplus": "softplus", "gelu": "GELU"}


def derive_seed(seed: int, stream: int, step: int = 0) -> int:
    """A well-mixed 63-bit seed for (run seed, stream, step); neighbouring steps get unrelated generators."""
    return int(np.random.SeedSequence([int(seed), int(stream), int(step)]).generate_state(2, np.uint64)[0] >> 1)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy: pred (T, M, C) logits, target (T, M) labels -> (T,)."""
    return (pred.argmax(-1) == target).to(torch.float64).mean(-1)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-task mean squared error: (T, M, ...) -> (T,)."""
    return ((pred - target) ** 2).reshape(pred.shape[0], -1).to(torch.float64).mean(-1)


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error written out: ``F.mse_loss`` has no forward-over-reverse (Hessian-vector) rule in
    torch 2.14 ("ZeroTensors are immutable"), which LCP's dynamic inversion and iMAML need."""
    return ((pred - target) ** 2).mean()


class SinusoidSource:
    """K-shot sinusoid regression with the MLP of the few-shot models (1 -> hidden -> hidden -> 1)."""

    metric = "mse"
    loss_fn = staticmethod(mse_loss)

    def __init__(self, shots: int, queries: Optional[int], meta_batch: int, seed: int, val_tasks: int,
                 test_tasks: int, device: torch.device, dtype: torch.dtype, hidden: int = 40,
                 activation: str = "relu"):
        self.tasks = SinusoidTasks(shots=shots, queries=queries)
        self.meta_batch, self.seed, self.device, self.dtype, self.hidden = meta_batch, seed, device, dtype, hidden
        self.activation = activation
        self.val_tasks, self.test_tasks = val_tasks, test_tasks
        self.protocol: Dict[str, object] = {
            "task": "sinusoid", "amplitude": list(self.tasks.amplitude), "phase": list(self.tasks.phase),
            "x_range": list(self.tasks.x_range), "shots": self.tasks.shots, "queries": self.tasks.queries,
            "model": f"MLP 1-{hidden}-{hidden}-1 {_ACTIVATION_NAMES.get(activation, activation)}", "loss": "mse"}

    @classmethod
    def from_config(cls, cfg, device: torch.device, dtype: torch.dtype) -> "SinusoidSource":
        """The source a validated ``FewShotConfig`` describes."""
        return cls(cfg.shots, cfg.queries, cfg.meta_batch, cfg.seed, cfg.val_episodes, cfg.test_episodes, device,
                   dtype, hidden=cfg.hidden, activation=cfg.activation)

    def build_model(self) -> torch.nn.Module:
        from ..models.fewshot import MetaMLP
        return MetaMLP(in_features=1, hidden=(self.hidden, self.hidden), out_features=1, activation=self.activation)

    def _sample(self, n: int, seed: int):
        return self.tasks.sample(n, seed=seed, device=self.device, dtype=self.dtype)

    def train_batch(self, step: int) -> TaskBatch:
        return self._sample(self.meta_batch, derive_seed(self.seed, TRAIN, step)).tasks

    def _fixed(self, n: int, stream: int, batch: int) -> Iterator[TaskBatch]:
        full = self._sample(n, derive_seed(self.seed, stream)).tasks
        for start in range(0, n, batch):
            yield full.slice(start, start + batch)

    def val_batches(self, batch: int) -> Iterator[TaskBatch]:
        return self._fixed(self.val_tasks, VAL, batch)

    def test_batches(self, batch: int) -> Iterator[TaskBatch]:
        return self._fixed(self.test_tasks, TEST, batch)

    def num_test(self) -> int:
        return self.test_tasks

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse(pred, target)

    def fit_tasks(self, count: int = 3):
        """The first ``count`` test tasks with their true amplitude and phase (for the plot of adapted fits)."""
        sampled = self._sample(self.test_tasks, derive_seed(self.seed, TEST))
        count = min(count, self.test_tasks)  # fewer test tasks than curves asked for
        return SinusoidBatch(sampled.tasks.slice(0, count), sampled.amplitude[:count],
                             sampled.phase[:count])


class OmniglotSource:
    """N-way K-shot Omniglot episodes on the seeded character split, with the conv-4 network."""

    metric = "accuracy"
    loss_fn = staticmethod(F.cross_entropy)

    def __init__(self, ways: int, shots: int, queries: int, meta_batch: int, seed: int, val_episodes: int,
                 test_episodes: int, device: torch.device, dtype: torch.dtype, hidden: int = 64,
                 data_root: Optional[str] = None, split_seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.25, cache_dir: Optional[str] = None, progress: bool = False):
        from ..data.omniglot import load_omniglot_splits

        splits = load_omniglot_splits(data_root, seed=split_seed, val_fraction=val_fraction,
                                      test_fraction=test_fraction, cache_dir=cache_dir, progress=progress)
        self.data_root, self.ways, self.shots = data_root, ways, shots
        self.meta_batch, self.seed, self.device, self.dtype, self.hidden = meta_batch, seed, device, dtype, hidden
        # the uint8 images live on the device: episodes are gathered there without host round-trips
        self.train = EpisodeSampler(splits.train.images.to(device), ways, shots, queries)
        self.val = EpisodeSampler(splits.val.images.to(device), ways, shots, queries)
        self.test = EpisodeSampler(splits.test.images.to(device), ways, shots, queries)
        self.val_idx = self.val.sample_indices(val_episodes, seed=derive_seed(seed, VAL))
        self.test_idx = self.test.sample_indices(test_episodes, seed=derive_seed(seed, TEST))
        self.protocol = {"task": "omniglot", "ways": ways, "shots": shots, "queries_per_class": queries,
                         "model": f"conv-4 ({hidden} channels, BatchNorm without running statistics)",
                         "loss": "cross-entropy", **splits.protocol}

    @classmethod
    def from_config(cls, cfg, device: torch.device, dtype: torch.dtype) -> "OmniglotSource":
        """The source a validated ``FewShotConfig`` describes."""
        return cls(cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch, cfg.seed, cfg.val_episodes, cfg.test_episodes,
                   device, dtype, hidden=cfg.hidden, data_root=cfg.data_root, split_seed=cfg.split_seed,
                   val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, cache_dir=cfg.cache_dir,
                   progress=cfg.progress)

    def build_model(self) -> torch.nn.Module:
        from ..models.fewshot import Conv4
        return Conv4(n_ways=self.ways, in_channels=1, hidden=self.hidden)

    @staticmethod
    def _with_channel(t: TaskBatch) -> TaskBatch:
        # (E, M, 28, 28) -> (E, M, 1, 28, 28): the conv net takes one input channel
        return TaskBatch(t.x_support.unsqueeze(2), t.y_support, t.x_query.unsqueeze(2), t.y_query)

    def train_batch(self, step: int) -> TaskBatch:
        return self._with_channel(self.train.sample(self.meta_batch, seed=derive_seed(self.seed, TRAIN, step),
                                                    dtype=self.dtype))

    def val_batches(self, batch: int) -> Iterator[TaskBatch]:
        return (self._with_channel(t) for t in self.val.iter_batches(self.val_idx, batch, self.dtype))

    def test_batches(self, batch: int) -> Iterator[TaskBatch]:
        return (self._with_channel(t) for t in self.test.iter_batches(self.test_idx, batch, self.dtype))

    def num_test(self) -> int:
        return len(self.test_idx)

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return accuracy(pred, target)

    def one_shot_runs(self) -> Optional[List]:
        """The 20 official one-shot runs when they fit this model (20-way) and ``all_runs.zip`` is present."""
        from ..data.omniglot import RUNS_ZIP, load_one_shot_runs, omniglot_folder

        if self.ways != 20 or not (omniglot_folder(self.data_root) / RUNS_ZIP).is_file():
            return None
        return load_one_shot_runs(zip_path=omniglot_folder(self.data_root) / RUNS_ZIP)

    def one_shot_batch(self, runs) -> TaskBatch:
        """All runs as one batch of 20-way 1-shot tasks: support = the 20 training images labelled 0..19."""
        xs = torch.stack([r.train_images for r in runs]).to(self.device, self.dtype).unsqueeze(2) / 255.0
        xq = torch.stack([r.test_images for r in runs]).to(self.device, self.dtype).unsqueeze(2) / 255.0
        ys = torch.arange(xs.shape[1], device=self.device).expand(len(runs), -1).contiguous()
        yq = torch.stack([r.answers for r in runs]).to(self.device)
        return TaskBatch(xs, ys, xq, yq)


SOURCES: Dict[str, Callable] = {"sinusoid": SinusoidSource, "omniglot": OmniglotSource}
