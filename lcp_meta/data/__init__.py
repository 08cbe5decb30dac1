"""Data sets and tasks: MNIST, CIFAR-10, Omniglot, sinusoid regression, episode samplers."""
from .cifar import load_cifar10
from .episodes import EpisodeIndices, EpisodeSampler, mean_ci95
from .mnist import TensorBatches, load_mnist
from .omniglot import (OmniglotSplits, OneShotRun, download_omniglot, load_characters, load_omniglot_splits,
                       load_one_shot_runs, score_one_shot_runs)
from .sinusoid import SinusoidTasks, TaskTensors
from .tasks import TaskBatch

__all__ = ["load_mnist", "load_cifar10", "TensorBatches", "SinusoidTasks", "TaskBatch", "TaskTensors", "EpisodeSampler",
           "EpisodeIndices", "mean_ci95", "load_characters", "load_omniglot_splits", "load_one_shot_runs",
           "score_one_shot_runs", "download_omniglot", "OneShotRun", "OmniglotSplits"]
