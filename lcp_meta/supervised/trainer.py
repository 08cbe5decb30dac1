"""Training loop of the supervised experiments: data, optimizer, schedule, evaluation, checkpoints, results.

The learning rule itself lives in a *method* (``lcp_meta.supervised.make_method``): ``method.backward(x, y)``
fills ``.grad`` of ``method.parameters()`` (BP, RBP, or an LCP controller's local update) and raises
:class:`~lcp_meta.core.DivergenceError` when its dynamics diverge, leaving the gradients alone.  This module
only turns those gradients into optimizer steps, the way the official experiments do (section 3 of the spec;
the published settings are in ``supervised/config.py``): Adam or SGD, a per-batch cosine schedule, optional
gradient clipping of the model's and the feedback parameters separately.  The run folder (refusal of another
run, checkpoints, provenance, JSON) is ``utils.harness``.

Prediction (test accuracy) always uses the free equilibrium (``model.predict``).

Reproducibility: the shuffle of epoch ``e`` depends only on ``(seed, e)`` and every checkpoint holds the
model, method, optimizer, scheduler and RNG states plus the position (epoch, batch), so a run resumed from a
checkpoint ends with exactly the parameters of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import distributed
from ..core import DivergenceError
from ..core.method import grads_finite
from ..core.system import free_solver
from ..utils import harness, resolve_device, set_rng_state
from ..utils.errors import UserInputError
from ..utils.interrupt import CheckpointClock, DeferredInterrupts, Interrupted
from ..utils.cliargs import option
from ..utils.options import parse_assignments
from .config import DATASETS, INVENTED, METHOD_NAMES, MODEL_NAMES, TRAINER_KEYS, _check_choice, trainer_defaults
from .faithful import PRESETS
from .report import train_loss_label

__all__ = ["DATASETS", "MODEL_NAMES", "TRAINER_KEYS", "RunConfig", "trainer_defaults", "resolve_hparams",
           "load_dataset", "evaluate", "train", "SkippedBatchWarning"]

CHECKPOINT_NAME, RESULT_NAME, PLOT_NAME = "checkpoint.pt", "result.json", "curves.png"
# what a resume needs from a checkpoint (the harness adds the RNG states)
_STATE = ("model", "method", "optimizer", "scheduler", "epoch", "batch", "step", "history", "skipped", "config")


class SkippedBatchWarning(RuntimeWarning):
    """A training batch was skipped because the method's dynamics diverged or produced NaN."""


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a supervised run (``None`` means: the published default).

    dataset/model/method: names (``mnist|cifar10``, ``ff|rnn|conv-ff|conv-rnn``, a key of METHOD_NAMES).
    epochs, batch_size, lr, lr_final, optimizer, weight_decay, grad_clip: trainer settings.
    max_batches: train on at most this many batches per epoch (quick runs, tests).
    seed: seeds the model initialisation, the method's noise and the per-epoch shuffles.
    solver/tol/max_iter: fixed-point solver used by the method and for prediction.
    test_subset: evaluate on the first N test images only (a fixed subset).
    checkpoint_every: also checkpoint every N batches inside an epoch (0: only at epoch ends).
    method_kwargs/model_kwargs: overrides of the method's and model's settings.
    resume/overwrite: continue the run in ``out`` / replace it (without either, a folder holding a run is refused).
    max_skipped: the share of batches that may be skipped (diverged) before the result is flagged
        ``too_many_skipped`` (exit code 4 on the command line).
    preset: 'default' (the library's settings) or 'paper' (trained as the authors' code trains: updates from
        the state reached, batch-wide stop rule, their rnn bias, EBD tolerances, KP decay, conv-rnn layer and
        evaluation; see ``supervised/faithful.py``).  Every batch's final residual is summarised per epoch.
    """

    dataset: str = option("mnist", f"one of {', '.join(DATASETS)}")
    model: str = option("ff", f"one of {', '.join(MODEL_NAMES)}")
    method: str = option("lcp-di", f"one of {', '.join(METHOD_NAMES)}. Combinations the authors never ran have "
                               f"invented defaults: {', '.join(f'{mo} {me}' for mo, me in INVENTED)}")
    epochs: Optional[int] = option(None, "training epochs (default: 30; conv-rnn 75)")
    batch_size: Optional[int] = option(None, "mini-batch size (default 64)")
    lr: Optional[float] = option(None, "initial learning rate (default: Adam 1e-3 on MNIST, SGD 0.1/0.05 on CIFAR)")
    lr_final: Optional[float] = option(None, "end of the per-batch cosine schedule (default lr/10)")
    optimizer: Optional[str] = option(None, "optimizer (default: adam on MNIST, sgd on CIFAR)",
                                      choices=("adam", "sgd"))
    weight_decay: Optional[float] = option(None, "optimizer weight decay (default 0; conv-ff 1e-3)")
    grad_clip: Optional[float] = option(None, "gradient norm clip, 0 for none (default: 10 for rnn and "
                                              "conv-rnn, none otherwise)")
    max_batches: Optional[int] = option(None, "train on at most N batches per epoch (quick runs)")
    seed: int = option(0, "seed of initialisation, shuffles and noise")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    data_root: Optional[str] = option(None, "folder holding mnist/ or cifar-10-batches-py/ (default $LCP_META_DATA)")
    out: Optional[str] = option(None, "run folder (default runs/DATASET_MODEL_METHOD_seedSEED)")
    resume: bool = option(False, "continue the run checkpointed in --out")
    overwrite: bool = option(False, "replace the run already in --out (its checkpoint and result are deleted "
                                    "first)")
    max_skipped: float = option(0.1, "exit with code 4 when more than this share of the trained batches was "
                                     "skipped because the dynamics diverged", metavar="SHARE")
    solver: Optional[str] = option(
        None, "solver of the dynamics (default: the method's; LCP-DI: auto, the fastest exact solver; euler: the "
              "published simulation; euler-flat: the same simulation on one flat state per sample (rnn, faster); "
              "sweep/reduced/warm-anderson/euler-flat: LCP-DI/DI-KP only)",
        choices=("auto", "euler", "anderson", "sweep", "reduced", "warm-anderson", "euler-flat"))
    tol: Optional[float] = option(None, "solver stop threshold on the relative change (default: the method's)")
    max_iter: Optional[int] = option(None, "solver iteration cap (default: the method's)")
    test_subset: Optional[int] = option(None, "evaluate on the first N test images only")
    eval_batch_size: int = 1000
    checkpoint_every: int = option(0, "also checkpoint every N batches within an epoch")
    checkpoint_minutes: float = option(10.0, "also checkpoint within an epoch once this many minutes have passed since "
                                             "the last checkpoint (0: off); Ctrl-C or SIGTERM saves at the end of the "
                                             "batch in flight and stops")
    progress: bool = option(True, "no progress bars (log lines only)")
    plots: bool = option(True, "no PNG plot of the learning curves (curves.png in the run folder, redrawn after "
                               "every epoch; needs matplotlib)")
    method_kwargs: Dict[str, Any] = option(
        help="override a method setting, e.g. --set alpha=0.1 (repeatable)", default_factory=dict, flag="--set",
        action="append", metavar="KEY=VALUE", convert=lambda items: parse_assignments(items, "--set"))
    model_kwargs: Dict[str, Any] = option(
        help="override a model setting, e.g. --model-set hidden=128 (repeatable)", default_factory=dict,
        flag="--model-set", action="append", metavar="KEY=VALUE",
        convert=lambda items: parse_assignments(items, "--model-set"))
    preset: str = option("default", "'paper': train as the authors' code does (updates applied from the state "
                                    "reached, with every batch's residual summarised per epoch; batch-wide stop "
                                    "rule; their rnn bias, EBD tolerances, KP decay, conv-rnn layer and "
                                    "evaluation); see docs/fidelity.md", choices=PRESETS)


def _method_api():
    """The colleague-provided method registry (imported late: it pulls in the models)."""
    from . import METHOD_NAMES, default_hparams, make_method
    return METHOD_NAMES, default_hparams, make_method


def resolve_hparams(cfg: RunConfig) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(trainer settings, method kwargs)`` for a config: published defaults, then the config's overrides."""
    method_names, default_hparams, _ = _method_api()
    _check_choice("method", cfg.method, method_names)
    published = dict(default_hparams(cfg.model, cfg.method))
    # the method registry knows the method settings; the trainer table is authoritative for the data set
    method_kwargs = {k: v for k, v in published.items() if k not in TRAINER_KEYS}
    from .faithful import preset_overrides  # the preset goes between the published defaults and the user's own
    method_kwargs.update(preset_overrides(cfg.dataset, cfg.model, cfg.method, cfg.preset)[0])
    for key in ("solver", "tol", "max_iter"):
        if getattr(cfg, key) is not None:
            method_kwargs[key] = getattr(cfg, key)
    method_kwargs.update(cfg.method_kwargs)
    return trainer_settings(cfg), method_kwargs


def trainer_settings(cfg: RunConfig) -> Dict[str, Any]:
    """The published optimizer settings of the run (``config.trainer_defaults``), then the config's own; checked."""
    trainer = trainer_defaults(cfg.dataset, cfg.model, cfg.method)
    trainer.update({k: getattr(cfg, k) for k in TRAINER_KEYS if getattr(cfg, k, None) is not None})
    _validate_trainer(trainer)
    return trainer


def _validate_trainer(t: Dict[str, Any]) -> None:
    _check_choice("optimizer", t["optimizer"], ("adam", "sgd"))
    for key in ("epochs", "batch_size"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise UserInputError(f"{key} must be a positive integer, got {t[key]!r}")
    for key in ("lr", "lr_final"):
        if not (isinstance(t[key], (int, float)) and t[key] > 0 and math.isfinite(t[key])):
            raise UserInputError(f"{key} must be a positive number, got {t[key]!r}")
    if t["grad_clip"] is not None and not t["grad_clip"] >= 0:
        raise UserInputError(f"grad_clip must be >= 0 (0 or None: no clipping), got {t['grad_clip']!r}")


def load_dataset(name: str, data_root: Optional[str], device: torch.device):
    """``(x_train, y_train, x_test, y_test)`` on ``device``, normalised as in the official code."""
    _check_choice("dataset", name, DATASETS)
    if name == "mnist":
        from ..data.mnist import load_mnist as load
    else:
        from ..data.cifar import load_cifar10 as load
    return (*load(data_root, "train", device=device), *load(data_root, "test", device=device))


def _stats_dict(stats: Any) -> Dict[str, Any]:
    if stats is None:
        return {}
    if hasattr(stats, "as_dict"):
        return stats.as_dict()
    return dict(stats)


def build_run_model(cfg: RunConfig, in_shape: Tuple[int, ...]):
    """The run's model by name: the preset's model settings, then the config's own (10 classes)."""
    from ..models.supervised import build_model
    from .faithful import preset_overrides
    preset_model_kwargs = preset_overrides(cfg.dataset, cfg.model, cfg.method, cfg.preset)[1]
    return build_model(cfg.model, in_shape=in_shape, num_classes=10, **{**preset_model_kwargs, **cfg.model_kwargs})


def evaluation_options(cfg: RunConfig, method_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments of :func:`evaluate` for a run: the method's solver settings for the free equilibrium,
    and the preset's evaluation convention."""
    from .faithful import preset_overrides
    preset_eval = preset_overrides(cfg.dataset, cfg.model, cfg.method, cfg.preset)[2]
    # (a controlled-equilibrium strategy of LCP-DI names the Euler iteration: model.predict would run it as well)
    solver = free_solver(method_kwargs.get("solver", cfg.solver or "euler"))
    return {"solver": solver, "tol": float(method_kwargs.get("tol", 1e-6) if cfg.tol is None else cfg.tol),
            "max_iter": int(method_kwargs.get("max_iter", 800) if cfg.max_iter is None else cfg.max_iter),
            "batch_size": preset_eval.get("eval_batch_size", cfg.eval_batch_size),
            "batch_stats": bool(preset_eval.get("batch_stats", False))}


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000, solver: str = "euler",
             tol: float = 1e-6, max_iter: int = 800, batch_stats: bool = False) -> Dict[str, float]:
    """Accuracy and mean cross-entropy of the free-equilibrium prediction, with the solver's statistics.

    ``batch_stats``: the authors' convention, no ``model.eval()``: batch norm normalises with each test batch's
    own statistics (so ``batch_size`` matters); the running statistics are left as they were."""
    correct, loss, iters, conv, residual, n = 0, 0.0, 0.0, 0, 0.0, x.shape[0]
    chunks = 0
    if getattr(model, "layered", False):
        # a layered net reaches its free equilibrium exactly in `depth` Euler steps; Anderson gains nothing
        # there and its least-squares system turns singular once the residuals are exactly zero
        solver = "euler"
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms] if batch_stats else []
    if batch_stats:
        model.train()
    else:
        model.eval()  # normalisation layers use their running statistics at test time
    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        logits, stats = model.predict(xb, solver=solver, tol=tol, max_iter=max_iter)
        correct += int((logits.argmax(-1) == yb).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
        s = _stats_dict(stats)
        iters += float(s.get("iterations", 0))
        conv += int(bool(s.get("converged", True)))
        residual = max(residual, float(s.get("residual", 0.0)))
        chunks += 1
    for m, buffers in zip(norms, saved):  # training-mode batch norm moved them: put them back
        for k, b in buffers.items():
            getattr(m, k).copy_(b)
    model.train(was_training)
    return {"accuracy": correct / n, "loss": loss / n, "mean_iterations": iters / max(chunks, 1),
            "converged_fraction": conv / max(chunks, 1), "max_residual": residual}


def _split_clip(params: List[torch.nn.Parameter], model: torch.nn.Module, max_norm: float) -> None:
    """Clip the model's and the auxiliary (feedback) parameters separately, as the official code does."""
    own = {id(p) for p in model.parameters()}
    groups = [[p for p in params if id(p) in own], [p for p in params if id(p) not in own]]
    for group in groups:
        group = [p for p in group if p.grad is not None]
        if group:
            torch.nn.utils.clip_grad_norm_(group, max_norm=max_norm)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _comparable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a config that must match for a resumed run to be the same run."""
    ignore = {"device", "data_root", "out", "resume", "progress", "eval_batch_size", "checkpoint_every", "overwrite",
              "max_skipped", "plots", "checkpoint_minutes"}
    return {k: v for k, v in cfg.items() if k not in ignore}


def train(cfg: RunConfig, *, model=None, method=None, data: Optional[Tuple[torch.Tensor, ...]] = None,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or resume) a supervised training run and return its result dict (also written as JSON).

    Args:
        cfg: the run's configuration.
        model, method: already built objects to train instead of ``build_model``/``make_method`` by name
            (the names in ``cfg`` are then labels only).
        data: ``(x_train, y_train, x_test, y_test)`` instead of loading ``cfg.dataset``.
        log: where progress lines go.
    Returns:
        the result dict: config, hyper-parameters, per-epoch records, skipped batches, device, versions.
    """
    device = distributed.setup(resolve_device(cfg.device))  # under torchrun: join the group (gloo/nccl)
    distributed.check_agreement(dataclasses.asdict(cfg), "configuration")
    log = log if distributed.is_main() else (lambda _line: None)
    _check_choice("dataset", cfg.dataset, DATASETS)
    _check_choice("model", cfg.model, MODEL_NAMES)
    if model is None or method is None:
        trainer_hp, method_kwargs = resolve_hparams(cfg)
    else:  # built outside the registry: the names are labels, the config's method settings are the method's
        trainer_hp, method_kwargs = trainer_settings(cfg), dict(cfg.method_kwargs)
    for key in ("max_batches", "test_subset"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserInputError(f"{key} must be a positive integer, got {getattr(cfg, key)}")
    if cfg.checkpoint_every < 0 or cfg.eval_batch_size < 1 or not (0 <= cfg.checkpoint_minutes < math.inf):
        raise UserInputError(f"expected checkpoint_every >= 0, eval_batch_size >= 1 and a finite checkpoint_minutes "
                             f">= 0, got {cfg.checkpoint_every}, {cfg.eval_batch_size} and {cfg.checkpoint_minutes}")
    if cfg.tol is not None and not (math.isfinite(cfg.tol) and cfg.tol > 0):
        raise UserInputError(f"tol must be a positive finite number, got {cfg.tol!r}")
    if cfg.max_iter is not None and cfg.max_iter < 1:
        raise UserInputError(f"max_iter must be a positive integer, got {cfg.max_iter!r}")
    for key, value in {**cfg.method_kwargs, **cfg.model_kwargs}.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"{key} must be a finite number, got {value!r}")
    if not 0 <= cfg.max_skipped <= 1:
        raise UserInputError(f"max_skipped must be a share between 0 and 1, got {cfg.max_skipped!r}")
    out = Path(cfg.out or f"runs/{cfg.dataset}_{cfg.model}_{cfg.method}_seed{cfg.seed}")
    ckpt_path = out / CHECKPOINT_NAME
    harness.check_resume_flags(cfg.resume, cfg.overwrite)
    if out.exists() and not out.is_dir():  # before reading a checkpoint there
        harness.prepare_run_folder(out, [], resume=cfg.resume, overwrite=cfg.overwrite)
    checkpoint = None
    if ckpt_path.is_file() and cfg.resume:
        # the RNG states go back once the model is built (building it draws from them)
        checkpoint = harness.load_run_checkpoint(
            ckpt_path, _STATE, "lcp-meta supervised", settings=_comparable(dataclasses.asdict(cfg)),
            stored_settings=lambda ck: _comparable(ck["config"]), restore_rng=False)
    elif cfg.resume:
        log(f"no checkpoint in {out}; starting a new run there")
    # before any data is read or any batch trained
    harness.prepare_run_folder(out, [ckpt_path, out / RESULT_NAME, out / PLOT_NAME], resume=cfg.resume,
                               overwrite=cfg.overwrite)

    # data first: a missing data set is reported before any model is built
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_root, device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in data)
    if cfg.test_subset is not None:
        x_test, y_test = x_test[:cfg.test_subset], y_test[:cfg.test_subset]
    distributed.check_agreement({"data": [(tuple(t.shape), float(t.double().sum())) for t in (x_train, y_train)]},
                                "training data (same --data-root and files on every rank)")

    _seed_everything(cfg.seed)
    from .faithful import preset_overrides, residual_summary
    _, preset_model_kwargs, preset_eval = preset_overrides(cfg.dataset, cfg.model, cfg.method, cfg.preset)
    if model is None:
        given = bool(cfg.model_kwargs or cfg.method_kwargs or cfg.tol is not None or cfg.max_iter is not None
                     or cfg.solver)
        with harness.settings_refused(given, "the model or method refused the given settings (--set/--model-set/"
                                             "--tol/--max-iter/--solver)"):
            model = build_run_model(cfg, tuple(x_train.shape[1:])).to(device)
            method = _method_api()[2](cfg.method, model, **method_kwargs)
    method = distributed.wrap_supervised(method)  # under torchrun: this rank's shard, all-reduced
    params = list(method.parameters())
    if not params:
        raise UserInputError(f"method {cfg.method!r} exposes no parameters to train")

    from .. data.mnist import TensorBatches
    loader = TensorBatches(x_train, y_train, trainer_hp["batch_size"], shuffle=True, drop_last=False,
                           seed=cfg.seed)
    per_epoch = min(len(loader), cfg.max_batches or len(loader))
    if trainer_hp["optimizer"] == "adam":
        optimizer = torch.optim.Adam(params, lr=trainer_hp["lr"], weight_decay=trainer_hp["weight_decay"])
    else:
        optimizer = torch.optim.SGD(params, lr=trainer_hp["lr"], weight_decay=trainer_hp["weight_decay"],
                                    momentum=trainer_hp.get("momentum") or 0.0)
    # per-batch cosine annealing over the whole run, as in the official code
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(trainer_hp["epochs"] * per_epoch, 1), eta_min=trainer_hp["lr_final"])
    eval_opts = evaluation_options(cfg, method_kwargs)

    where = harness.provenance(device)
    where["date_started"] = where.pop("date")
    result: Dict[str, Any] = {
        "config": dataclasses.asdict(cfg), "run_dir": str(out), "trainer": trainer_hp, "method_kwargs": method_kwargs,
        **where,
        "batches_per_epoch": per_epoch, "epochs": [], "skipped_batches": 0, "status": "running",
        "preset": cfg.preset, "model_kwargs": {**preset_model_kwargs, **cfg.model_kwargs},
        "eval_batch_stats": bool(preset_eval.get("batch_stats", False)),
        "train_loss_at": getattr(method, "loss_at", "network output"),
    }
    epoch, start_batch, step = 0, 0, 0
    partial: Dict[str, Any] = {}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        method.load_state_dict(checkpoint["method"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        epoch, start_batch, step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        result.update(epochs=checkpoint["history"], skipped_batches=checkpoint["skipped"],
                      date_started=checkpoint.get("date_started", result["date_started"]))
        partial = checkpoint.get("partial", {})
        set_rng_state(checkpoint["rng"])
        log(f"resuming {out} at epoch {epoch + 1}, batch {start_batch} (step {step})")

    distributed.check_agreement({"epoch": epoch, "batch": start_batch, "step": step}, "resume point (every rank "
                                "must read the same checkpoint: put --out on a shared file system)")

    def save(ep: int, batch: int, part: Dict[str, Any]) -> None:
        harness.save_checkpoint({"model": model.state_dict(), "method": method.state_dict(),
                                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "epoch": ep, "batch": batch, "step": step, "history": result["epochs"],
                                 "skipped": result["skipped_batches"], "partial": part,
                                 "config": dataclasses.asdict(cfg), "date_started": result["date_started"]}, ckpt_path)

    plotting = {"on": cfg.plots and distributed.is_main()}

    def write_result() -> None:
        harness.write_json(result, out / RESULT_NAME)
        if plotting["on"] and result["epochs"]:
            plotting["on"] = _plot(result, out / PLOT_NAME, log)

    from ..utils.progress import progress as progress_bar
    clock = CheckpointClock(cfg.checkpoint_minutes, cfg.checkpoint_every)

    def interrupted(where: str) -> Interrupted:
        # the checkpoint just written is the state an uninterrupted run had here: --resume continues it exactly
        result["status"] = "interrupted"
        write_result()
        distributed.any_rank(False)  # (a barrier: no rank exits before rank 0 has written its files)
        return Interrupted(f"{stop.name}: stopped {where}; checkpoint saved in {ckpt_path}; continue with --resume",
                           stop.signum)

    with DeferredInterrupts() as stop:
        while epoch < trainer_hp["epochs"]:
            acc = partial or {"n": 0, "loss": 0.0, "iterations": 0.0, "residual": 0.0, "converged": 0,
                              "skipped": 0, "seconds": 0.0, "residuals": [], "settled": []}
            partial = {}
            t0 = time.perf_counter()
            bar = progress_bar(total=per_epoch, initial=start_batch, disable=not cfg.progress, leave=False,
                       desc=f"epoch {epoch + 1}/{trainer_hp['epochs']}", dynamic_ncols=True)
            batch = start_batch
            for x, y in loader.batches(epoch, start_batch):
                if batch >= per_epoch:
                    break
                optimizer.zero_grad(set_to_none=True)
                stats, reason = _try_batch(method, params, x, y)
                if reason is None:
                    if trainer_hp["grad_clip"]:
                        _split_clip(params, model, trainer_hp["grad_clip"])
                    optimizer.step()
                    method.after_step()
                    acc["n"] += 1
                    acc["loss"] += float(stats["loss"])
                    acc["iterations"] += float(stats.get("iterations", 0))
                    acc["residual"] = max(acc["residual"], float(stats.get("residual", 0.0)))
                    acc["converged"] += int(bool(stats.get("converged", True)))
                    # every applied batch's final residual (an update from an unsettled state is counted, not hidden)
                    acc.setdefault("residuals", []).append(float(stats.get("residual", 0.0)))
                    acc.setdefault("settled", []).append(bool(stats.get("converged", True)))
                    bar.set_postfix(loss=f"{float(stats['loss']):.3f}", it=stats.get("iterations", "-"),
                                    res=f"{acc['residuals'][-1]:.1e}")
                else:
                    # the update is dropped: parameters and optimizer state stay as they were
                    optimizer.zero_grad(set_to_none=True)
                    acc["skipped"] += 1
                    result["skipped_batches"] += 1
                    warnings.warn(f"epoch {epoch + 1} batch {batch}: skipped, {reason}", SkippedBatchWarning)
                scheduler.step()  # the schedule follows the batch counter, skipped batches included
                batch += 1
                step += 1
                bar.update(1)
                # a signal stops every rank at the same batch (the others would wait for it in the next exchange)
                halt = distributed.any_rank(stop.requested)
                if batch < per_epoch and clock.tick(batch, force=halt):
                    save(epoch, batch, dict(acc, seconds=acc["seconds"] + time.perf_counter() - t0))
                    if halt:
                        bar.close()
                        raise interrupted(f"in epoch {epoch + 1} after batch {batch} of {per_epoch}")
            bar.close()
            train_seconds = acc["seconds"] + time.perf_counter() - t0
            t1 = time.perf_counter()
            ev = evaluate(model, x_test, y_test, **eval_opts)
            res_sum = residual_summary(acc.get("residuals", []), acc.get("settled", []),
                                       getattr(method, "tol", eval_opts["tol"]))
            n = max(acc["n"], 1)
            record = {"epoch": epoch + 1, "train_loss": acc["loss"] / n, "test_accuracy": ev["accuracy"],
                      "test_loss": ev["loss"], "mean_iterations": acc["iterations"] / n,
                      "max_residual": acc["residual"], "converged_fraction": acc["converged"] / n,
                      "batches": acc["n"], "skipped_batches": acc["skipped"], "lr": scheduler.get_last_lr()[0],
                      "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t1,
                      "eval_solver": {k: ev[k] for k in ("mean_iterations", "converged_fraction", "max_residual")},
                      "residuals": res_sum}
            if cfg.preset != "default":  # the faithful runs keep every batch's residual
                record["batch_residuals"] = list(acc.get("residuals", []))
            result["epochs"].append(record)
            log(f"epoch {epoch + 1}/{trainer_hp['epochs']}: {train_loss_label(result)} {record['train_loss']:.4f}, "
                f"test accuracy {100 * ev['accuracy']:.2f}%, mean iterations {record['mean_iterations']:.1f}, "
                f"{train_seconds:.1f}s" + (f", {acc['skipped']} batches skipped" if acc["skipped"] else "")
                + (f", {res_sum['above_tol']}/{res_sum['batches']} solves ended above tol {res_sum['tol']:.0e} "
                   f"(residual max {res_sum['max']:.2e}, median {res_sum['median']:.2e}; updates applied)"
                   if res_sum["above_tol"] else ""))
            epoch, start_batch = epoch + 1, 0
            save(epoch, 0, {})
            clock.reset()
            result["final_test_accuracy"] = ev["accuracy"]
            if epoch < trainer_hp["epochs"]:
                if distributed.any_rank(stop.requested):
                    raise interrupted(f"after epoch {epoch}")
                write_result()
        result["status"] = "finished"
        seen = sum(r["batches"] + r["skipped_batches"] for r in result["epochs"])
        result["batches_seen"] = seen
        result["too_many_skipped"] = result["skipped_batches"] > cfg.max_skipped * seen
        result["date_finished"] = harness.utc_now()
        if result["epochs"]:
            result["final_test_accuracy"] = result["epochs"][-1]["test_accuracy"]
        write_result()
        if distributed.any_rank(stop.requested):  # it came during the last epoch: the caller still stops
            raise Interrupted(f"{stop.name} during the last epoch: the run finished and its results are written in "
                              f"{out}", stop.signum)
    return result


def _try_batch(method, params, x, y) -> Tuple[Any, Optional[str]]:
    """``method.backward`` on one batch: ``(stats, None)``, or ``(stats or None, why)`` when its update must be
    dropped (the dynamics failed, or the loss or a gradient is not finite)."""
    try:
        stats = method.backward(x, y)
    except DivergenceError as exc:
        res = exc.stats.residual if exc.stats is not None else float("nan")
        return None, f"dynamics failed (residual {res:.3e}): {exc}"
    if not (math.isfinite(float(stats["loss"])) and grads_finite([p.grad for p in params if p.grad is not None])):
        return stats, f"non-finite loss/gradient (loss {float(stats['loss']):.3e})"
    return stats, None


def _plot(result: Dict[str, Any], path: Path, log: Callable[[str], None]) -> bool:
    """Redraw the run's learning curves; where matplotlib is missing, say so and return False (no more tries).
    A run goes on where a figure fails: it is not worth a lost training run."""
    from ..utils import plots
    if not plots.available():
        log(plots.MISSING)
        return False
    from .report import plot_run
    try:
        plot_run(result, path)
    except Exception as exc:  # (reported, not hidden)
        log(f"could not draw {path.name}: {type(exc).__name__}: {exc}")
    return True
