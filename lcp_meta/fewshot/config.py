"""The configuration of a few-shot comparison (``FewShotConfig``): every setting, its flag and its check.

The flags of ``lcp-meta fewshot`` / ``lcp-meta demo`` are generated from the fields (``utils.cliargs``); a field
left at ``None`` takes the task's default from :mod:`lcp_meta.fewshot.defaults` when the config is validated.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..utils import harness
from ..utils.cliargs import option
from ..utils.errors import UserInputError
from ..utils.options import parse_assignments
from .defaults import OMNIGLOT_METHODS, SINUSOID_METHODS, task_defaults
from .tasks import SOURCES

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# fields that define what is trained: a checkpoint written under other values cannot be resumed
_TRAINING_FIELDS = ("task", "ways", "shots", "queries", "meta_batch", "inner_steps", "inner_lr", "lam", "beta",
                    "outer_lr", "seed", "split_seed", "val_fraction", "test_fraction", "dtype", "hidden",
                    "activation", "method_options")
_TASK = "task"  # flags of `lcp-meta fewshot` that `lcp-meta demo` does not have (its task is fixed)


def _methods(text: str) -> Tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    if not names:
        raise UserInputError(f"--methods {text!r}: expected a comma-separated list such as lcp,imaml,maml")
    return names


def _parse_set(items) -> Dict[str, Dict[str, object]]:
    """``--set maml.inner_steps=1`` -> ``{"maml": {"inner_steps": 1}}``, values read strictly (``utils.options``:
    ``nan``, ``inf`` or ``1e999`` are refused); the config then checks each known option as it checks the flags."""
    return parse_assignments(items, "--set", nested=True)


@dataclass
class FewShotConfig:
    """Everything a comparison run needs; the flags of ``lcp-meta fewshot`` are generated from these fields.

    A field left at ``None`` takes the task's default (``lcp_meta.fewshot.defaults.TASKS``) when the config is
    validated (:meth:`validate` returns the completed copy).
    lam: proximal strength of the inner problem ``l_in(phi) + lam/2 |phi - omega|^2`` (LCP, iMAML, CML).
    beta: control strength of LCP / nudging strength of CML (the meta-gradient is reported divided by beta).
    inner_lr, inner_steps: step size and number of steps of the inner dynamics (every method).
    These four are the shared settings: a method's tuned per-task setting (``defaults.METHODS``) and lcp's
    equilibrium rule (automatic step, ``EQUILIBRIUM_CAP``) take precedence, and the run warns which given one a
    method does not use; ``method_options`` always wins.
    method_options: per-method overrides, e.g. ``{"maml": {"inner_steps": 1}}``.
    stop_after: stop each method after this many meta-steps in this invocation (an interruption on purpose,
        e.g. to fit a job's time slice); ``resume=True`` continues from there.
    overwrite: replace a run already in ``out`` (without it, and without ``resume``, such a folder is refused).
    max_skipped: the share of a method's meta-steps that may be skipped (diverged) before the run is reported
        as failed (``summary["too_many_skipped"]``, exit code 4 on the command line).
    """

    task: str = option("sinusoid", "sinusoid | omniglot", group=_TASK)
    methods: Optional[Tuple[str, ...]] = option(None, "comma-separated methods (default per task: sinusoid "
                                                + ",".join(SINUSOID_METHODS) + "; omniglot "
                                                + ",".join(OMNIGLOT_METHODS) + ")", convert=_methods,
                                                show_default=False)
    ways: Optional[int] = option(None, "N classes per episode (omniglot)", group=_TASK)
    shots: Optional[int] = option(None, "K support examples per class (sinusoid: points per task)", group=_TASK)
    queries: Optional[int] = option(None, "query examples per class (sinusoid: points per task)", group=_TASK)
    meta_steps: Optional[int] = option(None, "meta-training steps per method")
    meta_batch: Optional[int] = option(None, "tasks per meta-step")
    inner_steps: Optional[int] = option(None, "steps of the inner dynamics (a method's tuned setting, or lcp's cap, wins: see --set)")
    inner_lr: Optional[float] = option(None, "step size of the inner dynamics (a method's tuned setting, or lcp's automatic step, wins: see --set)")
    lam: Optional[float] = option(None, "proximal strength lam of the inner problem (LCP, iMAML, CML; a method's tuned setting wins: see --set)")
    beta: Optional[float] = option(None, "control strength beta (LCP) / nudging strength (CML) (a method's tuned setting wins: see --set)")
    outer_lr: Optional[float] = option(None, "Adam learning rate of the meta-parameters")
    test_episodes: Optional[int] = option(None, "fixed test episodes/tasks (mean and 95% CI)")
    val_episodes: Optional[int] = option(None, "fixed validation episodes/tasks")
    val_every: int = option(0, "validate every N meta-steps (0: 10 times)")
    log_every: int = option(0, "log the curve every N meta-steps (0: 100 points)")
    seed: int = option(0, "seed of the task stream and initialisation")
    split_seed: int = option(0, "seed of the Omniglot character split", group=_TASK)
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    hidden: Optional[int] = option(None, "hidden width (MLP units / conv-4 channels)")
    activation: Optional[str] = option(None, "nonlinearity of the sinusoid MLP (relu, tanh, ...)", group=_TASK)
    device: str = option("auto", "auto | cpu | cuda")
    dtype: str = option("float32", "", choices=tuple(DTYPES), show_default=False)
    data_root: Optional[str] = option(None, "folder holding omniglot/ (default: $LCP_META_DATA)", group=_TASK)
    cache_dir: Optional[str] = option(None, "where decoded images are cached (default: $LCP_META_CACHE or "
                                            "~/.cache/lcp_meta)", group=_TASK)
    out: Optional[str] = option(None, "run folder (default: runs/TASK)", show_default=False)
    resume: bool = option(False, "continue each method from its checkpoint in --out")
    overwrite: bool = option(False, "replace the run already in --out (its results, checkpoints and plots are "
                                    "deleted first)")
    max_skipped: float = option(0.1, "exit with code 4 when a method skipped more than this share of its "
                                     "meta-steps because they diverged", metavar="SHARE")
    checkpoint_every: int = option(100, "checkpoint every N meta-steps (0: at the end)")
    checkpoint_minutes: float = option(10.0, "also checkpoint once this many minutes have passed since the last "
                                             "checkpoint (0: off); Ctrl-C or SIGTERM saves after the meta-step in "
                                             "flight and stops")
    stop_after: Optional[int] = option(None, "stop each method after N meta-steps in this invocation (continue "
                                             "later with --resume)")
    progress: bool = option(True, "no progress bars")
    plots: bool = option(True, "write tables and JSON/CSV only (no PNG plots)")
    method_options: Dict[str, Dict[str, object]] = option(
        help="per-method option, repeatable (e.g. --set maml.inner_steps=1 --set lcp.beta=0.01)",
        default_factory=dict, flag="--set", action="append", metavar="METHOD.OPTION=VALUE", convert=_parse_set)

    def resolved(self) -> "FewShotConfig":
        """A copy with every ``None`` that the task has a default for filled in (``defaults.TASKS``)."""
        fill = {k: v for k, v in task_defaults(self.task).items() if getattr(self, k, None) is None}
        if self.out is None:
            fill["out"] = f"runs/{self.task}"
        return dataclasses.replace(self, **fill)

    def validate(self) -> "FewShotConfig":
        """Check every setting (one-line errors naming the bad value); returns the completed copy."""
        if self.task not in SOURCES:
            raise UserInputError(f"unknown task {self.task!r}; expected one of {', '.join(SOURCES)}")
        return self.resolved()._check()

    def _check(self) -> "FewShotConfig":
        if not self.methods:
            raise UserInputError("no methods given; expected a comma-separated list such as lcp,imaml,maml")
        if len(set(self.methods)) != len(self.methods):
            raise UserInputError(f"methods listed twice: {', '.join(self.methods)}")
        for name in ("ways", "shots", "meta_steps", "meta_batch", "inner_steps", "test_episodes", "val_episodes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("queries", "hidden", "stop_after"):  # optional, but when given a positive integer
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.checkpoint_minutes, (int, float)) and 0 <= self.checkpoint_minutes < math.inf):
            raise UserInputError(f"checkpoint_minutes must be a finite number >= 0, got {self.checkpoint_minutes!r}")
        for name in ("checkpoint_every", "log_every", "val_every"):  # 0: the default schedule
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise UserInputError(f"{name} must be a non-negative integer (0: default), got {value!r}")
        from ..models.fewshot import _ACTIVATIONS
        if self.activation not in _ACTIVATIONS:
            raise UserInputError(f"unknown activation {self.activation!r}; expected one of "
                                 f"{', '.join(sorted(_ACTIVATIONS))}")
        if self.task == "omniglot" and self.ways < 2:
            raise UserInputError(f"ways must be at least 2 (with one class every answer is right), got {self.ways}")
        for name in ("inner_lr", "lam", "beta", "outer_lr"):
            _check_option(name, getattr(self, name), name)
        if not (isinstance(self.max_skipped, (int, float)) and 0 <= self.max_skipped <= 1):
            raise UserInputError(f"max_skipped must be a share between 0 and 1, got {self.max_skipped!r}")
        harness.check_resume_flags(self.resume, self.overwrite)
        if self.dtype not in DTYPES:
            raise UserInputError(f"unknown dtype {self.dtype!r}; expected float32 or float64")
        for method, options in self.method_options.items():
            for name, value in options.items():
                _check_option(name, value, f"--set {method}.{name}")
        unknown = set(self.method_options) - set(self.methods)
        if unknown:
            raise UserInputError(f"options given for methods not in the run: {', '.join(sorted(unknown))} "
                                 f"(methods: {', '.join(self.methods)})")
        return self

    def training_dict(self) -> Dict[str, object]:
        return {k: jsonable(getattr(self, k)) for k in _TRAINING_FIELDS}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# per-method options (--set) checked exactly as the flags of the same name; other values only need to be finite
_POSITIVE = ("inner_lr", "lam", "beta", "outer_lr", "tol")
_POSITIVE_INT = ("inner_steps", "cg_steps", "max_iter")


def _check_option(name: str, value, what: str) -> None:
    if name in _POSITIVE and not (name == "tol" and value is None):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UserInputError(f"{what} must be a positive finite number, got {value!r}")
    elif name in _POSITIVE_INT and (not _is_int(value) or value < 1):
        raise UserInputError(f"{what} must be a positive integer, got {value!r}")
    elif name == "momentum" and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise UserInputError(f"{what} must be in [0, 1), got {value!r}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise UserInputError(f"{what} must be a finite number, got {value!r}")


def jsonable(value):
    """Tuples as lists, recursively: what JSON and a checkpoint give back, so that stored settings compare equal."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value
