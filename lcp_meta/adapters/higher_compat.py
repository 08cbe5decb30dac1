"""higher 0.2.1: its functional models as lcp_meta models, and its MAML meta-gradient as a reference.

- :class:`HigherModel` wraps a functional model ``fmodel = higher.patch.monkeypatch(model)`` (called as
  ``fmodel(x, params=[...])``) into an ``nn.Module`` whose parameters are ``model``'s, so any lcp_meta
  method (which calls models through ``torch.func.functional_call``) accepts it and the meta-gradient
  lands in ``model``'s ``.grad``.
- :func:`higher_maml_gradient` computes MAML's meta-gradient with ``higher.innerloop_ctx`` (a
  differentiable SGD inner loop, independent of our implementation): the cross-check of
  :class:`lcp_meta.meta.MAML` (``tests/test_adapters_higher.py`` asserts agreement to 1e-10 in float64).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

import torch
import torch.nn as nn

__all__ = ["HigherModel", "higher_maml_gradient", "require_higher"]


def require_higher():
    """Import higher, with the install command in the error when it is missing."""
    try:
        return importlib.import_module("higher")
    except ImportError as exc:
        raise ImportError(f"higher is not installed ({exc}); run `bash scripts/install_adapters.sh` "
                          "or `pip install --no-deps higher==0.2.1`") from exc


higher = require_higher()


class HigherModel(nn.Module):
    """An ``nn.Module`` view of a higher functional model, for lcp_meta's methods.

    Args:
        fmodel: ``higher.patch.monkeypatch(module)`` (any ``copy_initial_weights``): called as
            ``fmodel(x, params=[...])`` with one tensor per parameter of ``module``, in order.
        module: the module it was built from; it owns the meta-parameters (leaf tensors, names
            ``module.<name>``).  higher's own initial fast weights are clones, not leaves, so they
            cannot hold a ``.grad``: the wrapper passes ``module``'s parameters instead.

    ``forward(x)`` is ``fmodel(x, params=list(module.parameters()))``; under
    ``functional_call(wrapper, {"module.0.weight": t, ...})`` those are the substituted tensors, so
    grad / vmap / functional_call see an ordinary module.  Buffers are higher's copies (synced when the
    functional model was built): use normalisation without running statistics, as few-shot nets do.
    """

    def __init__(self, fmodel: nn.Module, module: nn.Module):
        super().__init__()
        if not isinstance(fmodel, higher.patch._MonkeyPatchBase):
            raise TypeError("expected a higher functional model, e.g. higher.patch.monkeypatch(model); "
                            f"got {type(fmodel).__name__}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected the nn.Module the functional model was built from, got {type(module).__name__}")
        n_fast, n_own = len(fmodel.fast_params or []), len(list(module.parameters()))
        if n_fast != n_own:
            raise ValueError(f"the functional model has {n_fast} fast weights but the module {n_own} parameters; "
                             "pass the module that higher.patch.monkeypatch was given")
        self.module = module
        object.__setattr__(self, "fmodel", fmodel)  # not a submodule: its fast weights are not meta-parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmodel(x, params=list(self.module.parameters()))

    @classmethod
    def from_module(cls, module: nn.Module) -> "HigherModel":
        """Monkeypatch ``module`` and wrap it."""
        return cls(higher.patch.monkeypatch(module), module)


def higher_maml_gradient(model: nn.Module, loss_fn: Callable, tasks, inner_lr: float,
                         inner_steps: int, momentum: float = 0.0) -> Dict[str, torch.Tensor]:
    """MAML's mean-over-tasks meta-gradient through ``higher.innerloop_ctx`` (plain SGD inner loop).

    ``tasks``: a :class:`lcp_meta.meta.TaskBatch` (or 4-tuple).  Returns a dict name -> gradient of
    ``mean_t loss_fn(model_{phi_K,t}(x_query_t), y_query_t)`` with respect to the model's trainable
    parameters, where ``phi_K,t`` is ``inner_steps`` SGD steps of size ``inner_lr`` (heavy-ball
    ``momentum`` as in ``torch.optim.SGD``) on the support loss of task t from the current parameters.
    ``.grad`` is not touched.
    """
    from lcp_meta.meta import TaskBatch

    tb = TaskBatch.coerce(tasks)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    inner_opt = torch.optim.SGD(params, lr=inner_lr, momentum=momentum)
    total = 0.0
    with torch.enable_grad():
        for t in range(tb.num_tasks):
            # copy_initial_weights=False: the fast weights start as the model's own parameters, so the
            # query loss is differentiable with respect to them (the MAML meta-gradient)
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(loss_fn(fmodel(tb.x_support[t]), tb.y_support[t]))
                total = total + loss_fn(fmodel(tb.x_query[t]), tb.y_query[t])
        grads = torch.autograd.grad(total / tb.num_tasks, params, allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for k, p, g in zip(names, params, grads)}
