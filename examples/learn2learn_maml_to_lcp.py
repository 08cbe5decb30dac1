r'''A learn2learn MAML script switched to LCP (least-control meta-learning) with a four-line edit.

The script below is an ordinary learn2learn few-shot training loop (``clone()`` per task, support /
query split with ``partition_task``, ``evaluation_error.backward()``, gradient averaged over the
meta-batch, Adam).  Compared with the MAML version it changes only:

1. ``LCPLearner(model, loss, lam, beta, ...)`` replaces ``l2l.algorithms.MAML(model, lr)``;
2. ``learner.adapt(x_support, y_support)`` replaces the loop of ``learner.adapt(loss)`` steps: LCP
   solves the regularised inner problem ``min_phi l_in(phi) + lam/2 |phi - omega|^2`` itself;
3. ``learner.query_loss(x_query, y_query)`` replaces ``loss(learner(x_query), y_query)``: LCP needs the
   query targets in its single controlled phase, and the backward of this loss runs that phase and
   deposits ``-lam psi* / beta`` (the LCP meta-gradient) in ``.grad``, task by task as before;
4. the hidden layer is ``nn.Tanh()`` instead of ``nn.ReLU()``: a ReLU network's inner problem has no smooth
   stationary point for LCP to reach (docs/results.md, "Known limit 2").

The inner step size and number of steps change because LCP's inner dynamics run to their equilibrium,
not for MAML's few large steps: ``fast_lr=None`` lets LCP set its step from a power-iteration estimate of the
curvature, and ``adaptation_steps`` is only a cap (a task that does not reach the residual tolerance raises
``DivergenceError``).  ``LCPLearner(..., method="maml")`` would give
learn2learn's own MAML gradient (checked in ``tests/test_adapters_l2l.py``).  For speed, all tasks of a
meta-batch can also go through one vmapped call: ``maml.meta_backward(task_batch(train_tasks, meta_batch_size, shots))`` with
``task_batch`` from ``lcp_meta.adapters.l2l``.

Needs learn2learn 0.2.0 (``bash scripts/install_adapters.sh``).  Run:
``python examples/learn2learn_maml_to_lcp.py`` (5 iterations of 4 tasks, about a minute on a 2-core CPU;
``--iterations 100 --meta-batch-size 16`` is the learn2learn script's budget).

The edit (``examples/learn2learn_maml_to_lcp.diff``)::

    --- learn2learn_maml.py
    +++ learn2learn_maml_to_lcp.py
    @@ -4,6 +4,8 @@
     import torch
     from torch import nn

    +from lcp_meta.adapters.l2l import LCPLearner
    +

     def make_tasksets(ways, shots, seed=0):
         """Classes are Gaussian blobs in 16 dimensions: 40 meta-train and 20 meta-test classes."""
    @@ -30,20 +32,19 @@
         data, labels = batch
         (adaptation_data, adaptation_labels), (evaluation_data, evaluation_labels) = \
             l2l.data.partition_task(data.to(device), labels.to(device), shots=shots)
    -    for step in range(adaptation_steps):
    -        train_error = loss(learner(adaptation_data), adaptation_labels)
    -        learner.adapt(train_error)
    +    learner.adapt(adaptation_data, adaptation_labels)  # the whole inner problem, to its equilibrium
         predictions = learner(evaluation_data)
    -    evaluation_error = loss(predictions, evaluation_labels)
    +    evaluation_error = learner.query_loss(evaluation_data, evaluation_labels)  # backward() runs LCP
         return evaluation_error, accuracy(predictions, evaluation_labels)


    -def main(ways=5, shots=1, meta_lr=0.003, fast_lr=0.5, meta_batch_size=16, adaptation_steps=5,
    +def main(ways=5, shots=1, meta_lr=0.003, fast_lr=None, meta_batch_size=16, adaptation_steps=1000,
              num_iterations=100, seed=42, device="cpu"):
         torch.manual_seed(seed)
         train_tasks, test_tasks = make_tasksets(ways, shots)
    -    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, ways)).to(device)
    +    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, ways)).to(device)
    -    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    +    maml = LCPLearner(model, nn.CrossEntropyLoss(), lam=1.0, beta=0.01, inner_lr=fast_lr,
    +                      inner_steps=adaptation_steps)
         opt = torch.optim.Adam(maml.parameters(), meta_lr)
         loss = nn.CrossEntropyLoss(reduction="mean")

'''
import argparse

import learn2learn as l2l
import torch
from torch import nn

from lcp_meta.adapters.l2l import LCPLearner


def make_tasksets(ways, shots, seed=0):
    """Classes are Gaussian blobs in 16 dimensions: 40 meta-train and 20 meta-test classes."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(60, 16, generator=g)
    x = means.repeat_interleave(20, 0) + torch.randn(60 * 20, 16, generator=g)
    y = torch.arange(60).repeat_interleave(20)
    tasksets = []
    for lo, hi in ((0, 40 * 20), (40 * 20, 60 * 20)):
        dataset = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x[lo:hi], y[lo:hi]))
        transforms = [l2l.data.transforms.NWays(dataset, ways),
                      l2l.data.transforms.KShots(dataset, 2 * shots),
                      l2l.data.transforms.LoadData(dataset),
                      l2l.data.transforms.RemapLabels(dataset)]
        tasksets.append(l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=2000))
    return tasksets


def accuracy(predictions, targets):
    return (predictions.argmax(dim=1) == targets).float().mean()


def fast_adapt(batch, learner, loss, adaptation_steps, shots, device):
    data, labels = batch
    (adaptation_data, adaptation_labels), (evaluation_data, evaluation_labels) = \
        l2l.data.partition_task(data.to(device), labels.to(device), shots=shots)
    learner.adapt(adaptation_data, adaptation_labels)  # the whole inner problem, to its equilibrium
    predictions = learner(evaluation_data)
    evaluation_error = learner.query_loss(evaluation_data, evaluation_labels)  # backward() runs LCP
    return evaluation_error, accuracy(predictions, evaluation_labels)


def main(ways=5, shots=1, meta_lr=0.003, fast_lr=None, meta_batch_size=16, adaptation_steps=1000,
         num_iterations=100, seed=42, device="cpu"):
    torch.manual_seed(seed)
    train_tasks, test_tasks = make_tasksets(ways, shots)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, ways)).to(device)
    maml = LCPLearner(model, nn.CrossEntropyLoss(), lam=1.0, beta=0.01, inner_lr=fast_lr,
                      inner_steps=adaptation_steps)
    opt = torch.optim.Adam(maml.parameters(), meta_lr)
    loss = nn.CrossEntropyLoss(reduction="mean")

    for iteration in range(num_iterations):
        opt.zero_grad()
        meta_train_error, meta_train_accuracy = 0.0, 0.0
        for task in range(meta_batch_size):
            learner = maml.clone()
            evaluation_error, evaluation_accuracy = fast_adapt(
                train_tasks.sample(), learner, loss, adaptation_steps, shots, device)
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            meta_train_accuracy += evaluation_accuracy.item()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()
        if iteration % 10 == 0 or iteration == num_iterations - 1:
            print(f"iteration {iteration:4d}  meta-train error {meta_train_error / meta_batch_size:.4f}  "
                  f"accuracy {meta_train_accuracy / meta_batch_size:.3f}")

    meta_test_accuracy = 0.0
    for task in range(meta_batch_size):
        learner = maml.clone()
        _, evaluation_accuracy = fast_adapt(test_tasks.sample(), learner, loss, adaptation_steps, shots, device)
        meta_test_accuracy += evaluation_accuracy.item()
    print(f"meta-test accuracy {meta_test_accuracy / meta_batch_size:.3f}")
    return meta_test_accuracy / meta_batch_size


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    # command-line defaults sized for about a minute on a 2-core CPU (every task runs LCP to its equilibrium, about
    # 1-2 s there); main()'s own defaults are the learn2learn script's 100 iterations of 16 tasks
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    main(num_iterations=args.iterations, meta_batch_size=args.meta_batch_size, device=args.device)
