"""Score a run's checkpointed model again on the test set with today's evaluation (:func:`evaluation_options`).

Why: a change to how prediction is evaluated (e.g. the free equilibrium of a DI run iterated by Euler, as the
authors do, instead of Anderson from 0) should reach finished long runs without training them again.  Training is
untouched: the checkpoint's parameters are evaluated as they are.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..utils import harness, resolve_device
from ..utils.errors import UserInputError
from .trainer import (CHECKPOINT_NAME, RunConfig, build_run_model, evaluate, evaluation_options, load_dataset,
                      resolve_hparams)

__all__ = ["rescore"]


def rescore(run_dir: "str | Path", *, data_root: Optional[str] = None, device: str = "cpu") -> Dict[str, Any]:
    """Test accuracy and loss of the model in ``run_dir/checkpoint.pt`` under today's evaluation.

    Returns ``{"test_accuracy", "test_loss", "epoch", "eval": the evaluation options, "eval_solver": its
    statistics, "date"}``; the checkpoint's own configuration names the data set, model and preset."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise UserInputError(f"no checkpoint to rescore: {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in ckpt["config"].items() if k in known})  # (fields added since: defaults)
    _, method_kwargs = resolve_hparams(cfg)
    dev = resolve_device(device)
    x_train, _, x_test, y_test = load_dataset(cfg.dataset, data_root or cfg.data_root, dev)
    if cfg.test_subset is not None:
        x_test, y_test = x_test[:cfg.test_subset], y_test[:cfg.test_subset]
    model = build_run_model(cfg, tuple(x_train.shape[1:])).to(dev)
    model.load_state_dict(ckpt["model"])
    opts = evaluation_options(cfg, method_kwargs)
    ev = evaluate(model, x_test.to(dev), y_test.to(dev), **opts)
    return {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "epoch": ckpt["epoch"], "eval": opts,
            "eval_solver": {k: ev[k] for k in ("mean_iterations", "converged_fraction", "max_residual")},
            "date": harness.utc_now()}
