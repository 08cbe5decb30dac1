"""learn2learn 0.2.0 as a front end for LCP: its ``clone()`` / ``adapt()`` loop and its task datasets.

A learn2learn MAML script keeps its structure; three lines change (``examples/learn2learn_maml_to_lcp.py``
shows the diff)::

    maml = LCPLearner(model, loss, lam=1.0, beta=1e-2, inner_lr=fast_lr, inner_steps=100)   # was MAML(model, lr)
    learner = maml.clone()                                   # unchanged
    learner.adapt(x_support, y_support)                      # was: adapt(loss) inside a step loop
    evaluation_error = learner.query_loss(x_query, y_query)  # was: loss(learner(x_query), y_query)
    evaluation_error.backward()                              # unchanged: routed through LCP

Why the data and not a loss: LCP (like iMAML) solves the inner problem to its equilibrium and its
single controlled phase also needs the *query* data (the controller steers the inner dynamics towards
low query loss).  So ``adapt`` takes the support set, and the query loss is a node whose backward runs
``meta_backward`` on the task instead of backpropagating through an unrolled inner loop.
Predictions of ``learner(x)`` are for metrics (accuracy); backpropagating into them raises an error that
says to use :meth:`TaskLearner.query_loss`.

Any method of :func:`lcp_meta.meta.make_method` can sit behind the same loop (``method="maml"`` gives
exactly learn2learn's second-order MAML gradient, which the tests check).

learn2learn itself: ``scripts/install_adapters.sh`` builds 0.2.0 on Python 3.11 (C sources regenerated
with Cython 3, ``random.sample`` on a set in ``NWays`` fixed before that).  Importing this module checks
that fix is present and raises with the recipe otherwise.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from lcp_meta.meta import TaskBatch, make_method
from lcp_meta.meta.base import MetaMethod

from ._routing import guarded, meta_gradient, routed_loss, trainable

__all__ = ["LCPLearner", "TaskLearner", "task_batch", "require_learn2learn"]

_RECIPE = "bash scripts/install_adapters.sh (builds learn2learn 0.2.0 for Python 3.11, see docs/adapters.md)"


@functools.lru_cache(maxsize=None)
def require_learn2learn():
    """Import learn2learn, with the install recipe in the error when it is missing or mis-built."""
    try:
        l2l = importlib.import_module("learn2learn")
    except ImportError as exc:
        raise ImportError(f"learn2learn is not importable ({exc}); install it with {_RECIPE}") from exc
    _check_nways(l2l)
    return l2l


def _check_nways(l2l) -> None:
    """A build without the NWays fix fails at the first filtered task with a bare TypeError: fail early."""
    ds = l2l.data.MetaDataset(torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1])))
    t = l2l.data.transforms
    try:
        t.NWays(ds, 1)([l2l.data.DataDescription(0), l2l.data.DataDescription(2)])
    except TypeError as exc:
        raise ImportError(f"this learn2learn build predates the Python 3.11 fix of NWays ({exc}); "
                          f"rebuild it with {_RECIPE}") from exc


def _method(model_or_method, loss_fn, method: str, kwargs):
    if isinstance(model_or_method, MetaMethod):
        if loss_fn is not None or kwargs:
            raise TypeError("pass either a built method alone, or a model with loss_fn and method settings")
        return model_or_method
    if loss_fn is None:
        raise TypeError("LCPLearner(model, loss_fn, ...) needs the per-task loss loss_fn(pred, target) -> scalar")
    return make_method(method, model_or_method, loss_fn, **kwargs)


class LCPLearner(nn.Module):
    """Drop-in for ``l2l.algorithms.MAML``: same ``parameters()`` / ``clone()`` / ``module`` surface.

    Args:
        model: the network (its trainable parameters are the meta-parameters omega), or an already
            built :class:`lcp_meta.meta.base.MetaMethod` (then nothing else).
        loss_fn: per-task loss ``loss_fn(pred, target) -> scalar``, the ``loss`` of the l2l script.
        method: a name of :data:`lcp_meta.meta.METHOD_NAMES` (default ``"lcp"``).
        **method_kwargs: the method's settings: ``lam`` (proximal strength of the inner problem),
            ``beta`` (control strength), ``controller``, ``inner_lr``, ``inner_steps``, ``tol``, ...
    """

    def __init__(self, model, loss_fn=None, method: str = "lcp", **method_kwargs):
        super().__init__()
        self.method = _method(model, loss_fn, method, method_kwargs)

    @property
    def module(self) -> nn.Module:
        """The wrapped network (as ``MAML.module``)."""
        return self.method.model

    def forward(self, *args, **kwargs):
        """The network at the meta-parameters (un-adapted), as ``MAML.forward``."""
        return self.method.model(*args, **kwargs)

    def clone(self) -> "TaskLearner":
        """A per-task learner; it shares (does not copy) the meta-parameters."""
        return TaskLearner(self.method)

    def meta_backward(self, tasks):
        """All tasks at once (vmapped): accumulate the mean meta-gradient into ``.grad``; see
        :meth:`lcp_meta.meta.base.MetaMethod.meta_backward`.  ``tasks`` may come from :func:`task_batch`."""
        return self.method.meta_backward(tasks)


class TaskLearner:
    """One task's learner, from :meth:`LCPLearner.clone`.

    ``adapt(x_support, y_support)`` computes the adapted parameters (the free inner equilibrium);
    ``learner(x)`` predicts with them; ``query_loss(x_query, y_query)`` is the task's query loss at
    them, and its ``backward()`` accumulates this task's meta-gradient (times the upstream gradient,
    so ``(loss / n).backward()`` works) into the meta-parameters' ``.grad``.
    ``stats`` holds the :class:`lcp_meta.meta.base.MetaStats` of the last backward.
    """

    def __init__(self, method):
        self.method = method
        self.support = None
        self.params = None  # adapted parameters: name -> tensor (no task dim)
        self.stats = None

    # learn2learn's adapt(loss) cannot be honoured: the loss does not carry the data LCP needs
    def adapt(self, x_support: torch.Tensor, y_support: Optional[torch.Tensor] = None) -> "TaskLearner":
        """Adapt to one task's support set ``x_support (N, *x_shape)``, ``y_support (N, *y_shape)``.

        Runs the method's whole inner problem (one call replaces learn2learn's loop of ``adapt(loss)``
        steps); calling it again replaces the support set.
        """
        if y_support is None:
            raise TypeError("LCP adapts on data, not on a loss: call learner.adapt(x_support, y_support) "
                            "once instead of learner.adapt(loss) in a loop (the inner problem is solved to "
                            "its equilibrium; see lcp_meta.adapters.l2l)")
        if not isinstance(x_support, torch.Tensor) or not isinstance(y_support, torch.Tensor):
            raise TypeError(f"expected tensors x_support, y_support, got {type(x_support).__name__}, "
                            f"{type(y_support).__name__}")
        if x_support.dim() < 1 or x_support.shape[0] != y_support.shape[0] or x_support.shape[0] == 0:
            raise ValueError(f"expected x_support (N, *x_shape) and y_support (N, *y_shape) with the same N > 0, "
                             f"got {tuple(x_support.shape)} and {tuple(y_support.shape)}")
        phi = self.method.adapt_params(x_support.unsqueeze(0), y_support.unsqueeze(0))
        self.support = (x_support, y_support)
        self.params = {k: v[0] for k, v in phi.items()}
        return self

    def _need_adapt(self):
        if self.params is None:
            raise RuntimeError("call learner.adapt(x_support, y_support) before predicting or query_loss")

    def _like(self, t: torch.Tensor) -> torch.Tensor:
        p = next(iter(self.params.values()))
        t = t.to(p.device)
        return t.to(p.dtype) if t.is_floating_point() else t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions of the adapted network (for metrics: no meta-gradient flows through them)."""
        self._need_adapt()
        with torch.no_grad():
            out = functional_call(self.method.model, self.params, (self._like(x),), strict=False)
        if not torch.is_grad_enabled():
            return out
        return guarded(out, trainable(self.method),
                       "the predictions of an LCP TaskLearner carry no meta-gradient (LCP needs the query "
                       "targets in its controlled phase): use learner.query_loss(x_query, y_query).backward()")

    def query_loss(self, x_query: torch.Tensor, y_query: torch.Tensor) -> torch.Tensor:
        """The query loss at the adapted parameters; ``backward()`` runs the method's meta-gradient."""
        self._need_adapt()
        xs, ys = self.support
        tb = TaskBatch(xs.unsqueeze(0), ys.unsqueeze(0), x_query.unsqueeze(0), y_query.unsqueeze(0))
        with torch.no_grad():
            pred = functional_call(self.method.model, self.params, (self._like(x_query),), strict=False)
            value = self.method.loss_fn(pred, self._like(y_query))
        if not torch.is_grad_enabled():
            return value

        def compute():
            grads, self.stats = meta_gradient(self.method, tb)
            return grads

        return routed_loss(value, trainable(self.method), compute)


def task_batch(taskset, num_tasks: int, shots: int, device=None):
    """Sample ``num_tasks`` tasks from a learn2learn ``TaskDataset`` and split each with
    ``l2l.data.partition_task`` (``shots`` support samples per class, the rest query) into one
    :class:`lcp_meta.meta.TaskBatch` (for :meth:`LCPLearner.meta_backward`).

    Also accepts a sequence of ``(data, labels)`` pairs already sampled.
    """
    l2l = require_learn2learn()
    if num_tasks < 1 or shots < 1:
        raise ValueError(f"expected num_tasks >= 1 and shots >= 1, got {num_tasks}, {shots}")
    if isinstance(taskset, Sequence):
        samples = list(taskset)[:num_tasks]
        if len(samples) < num_tasks:
            raise ValueError(f"asked for {num_tasks} tasks, got a sequence of {len(samples)}")
    elif hasattr(taskset, "sample"):
        samples = [taskset.sample() for _ in range(num_tasks)]
    else:
        raise TypeError(f"expected a learn2learn TaskDataset (with .sample()) or a sequence of (data, labels), "
                        f"got {type(taskset).__name__}")
    parts = [l2l.data.partition_task(x, y, shots=shots) for x, y in samples]
    shapes = {(tuple(s[0].shape), tuple(q[0].shape)) for s, q in parts}
    if len(shapes) != 1:
        raise ValueError(f"tasks of different sizes cannot be batched: {sorted(shapes)}; use the same ways "
                         f"and shots for every task")
    tensors = [torch.stack([p[i][j] for p in parts]) for i in (0, 1) for j in (0, 1)]
    return TaskBatch(*(t.to(device) if device is not None else t for t in tensors))
