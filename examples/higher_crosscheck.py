"""Cross-check lcp_meta's MAML against higher's differentiable inner loop, and run LCP on a higher model.

1. The MAML meta-gradient of lcp_meta (vmapped over tasks, unrolled with torch.func) and the one of
   ``higher.innerloop_ctx`` (a differentiable SGD optimizer, task by task) on sinusoid regression tasks,
   in float64: they agree to rounding (~1e-16), with plain SGD and with momentum.
2. A higher functional model (``higher.patch.monkeypatch``) wrapped by :class:`HigherModel` trains with
   LCP exactly like the plain module: same meta-gradient, landing in the original module's ``.grad``.
   LCP runs to its controlled equilibrium, which needs a smooth learner (tanh; a ReLU learner's inner problem
   has no smooth stationary point, docs/results.md "Known limit 2"), at the few-shot runner's sinusoid
   setting lam 10, beta 0.01.

Needs higher 0.2.1 (``bash scripts/install_adapters.sh``).  Run: ``python examples/higher_crosscheck.py``.
"""
import argparse
import math

import higher
import torch
import torch.nn.functional as F

from lcp_meta.adapters.higher_compat import HigherModel, higher_maml_gradient
from lcp_meta.meta import TaskBatch, make_method


def sinusoid_tasks(num_tasks, shots, queries, seed=0, dtype=torch.float64):
    """y = a sin(x + b), a in [0.1, 5], b in [0, pi], x in [-5, 5] (the MAML sinusoid benchmark)."""
    g = torch.Generator().manual_seed(seed)
    a = 0.1 + 4.9 * torch.rand(num_tasks, 1, 1, generator=g, dtype=dtype)
    b = math.pi * torch.rand(num_tasks, 1, 1, generator=g, dtype=dtype)
    x = 10 * torch.rand(num_tasks, shots + queries, 1, generator=g, dtype=dtype) - 5
    y = a * torch.sin(x + b)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def mlp(seed=0, dtype=torch.float64, activation=torch.nn.ReLU):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, 40), activation(), torch.nn.Linear(40, 40), activation(),
                               torch.nn.Linear(40, 1)).to(dtype)


def main(tasks=4, shots=10, inner_lr=0.01, inner_steps=5):
    """Print and return the largest differences: {"maml, momentum M": ..., "lcp, higher vs plain": ...}."""
    tb = sinusoid_tasks(tasks, shots, queries=10)
    errors = {}
    for momentum in (0.0, 0.9):
        model = mlp()
        ref = higher_maml_gradient(model, F.mse_loss, tb, inner_lr, inner_steps, momentum=momentum)
        make_method("maml", model, F.mse_loss, inner_lr=inner_lr, inner_steps=inner_steps,
                    momentum=momentum).meta_backward(tb)
        err = max(float((p.grad - ref[k]).abs().max()) for k, p in model.named_parameters())
        scale = max(float(g.abs().max()) for g in ref.values())
        print(f"MAML, momentum {momentum}: max |lcp_meta - higher| = {err:.2e} (gradient scale {scale:.2e})")
        errors[f"maml, momentum {momentum}"] = err / scale

    kw = dict(lam=10.0, beta=0.01)  # to the controlled equilibrium (tol 1e-6 in float64), automatic step
    plain, model = mlp(activation=torch.nn.Tanh), mlp(activation=torch.nn.Tanh)
    make_method("lcp", plain, F.mse_loss, **kw).meta_backward(tb)
    wrapped = HigherModel(higher.patch.monkeypatch(model), model)
    stats = make_method("lcp", wrapped, F.mse_loss, **kw).meta_backward(tb)
    err = max(float((a.grad - b.grad).abs().max()) for a, b in zip(model.parameters(), plain.parameters()))
    print(f"LCP on a higher functional model vs the plain module: max difference {err:.2e}; "
          f"query loss {stats.query_loss_before:.3f} -> {stats.query_loss_after:.3f} after adaptation "
          f"({stats.iterations} iterations, inner / control residual {stats.inner_residual:.1e} / "
          f"{stats.control_residual:.1e})")
    errors["lcp, higher vs plain"] = err
    return errors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=5)
    args = parser.parse_args()
    main(tasks=args.tasks, inner_steps=args.inner_steps)
