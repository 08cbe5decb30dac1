"""``lcp-meta fewshot`` (compare meta-learning methods on few-shot tasks) and ``lcp-meta demo``."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Dict, Optional

from . import defaults
from .config import FewShotConfig
from .runner import run_fewshot
from .. import distributed
from ..cli import EXIT_STOPPED, EXIT_TOO_MANY_SKIPPED
from ..utils.cliargs import add_arguments, config_kwargs
from ..utils.errors import UserInputError

EXIT_CODES = ("Exit codes: 0 done; 2 bad input (nothing written); 3 stopped by --stop-after (continue with "
              "--resume); 4 a method skipped more than --max-skipped of its meta-steps (diverged).")


def _listing(values: Dict[str, object]) -> str:
    return ", ".join(f"{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in values.items() if v is not None)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for torch (the demo uses 1: its tiny MLP runs "
                                               "fastest single-threaded)")


def add_parser(subparsers) -> None:
    fs = subparsers.add_parser("fewshot", help="compare meta-learning methods on few-shot tasks",
                               description="Meta-train each method on the same task stream, evaluate on the same "
                                           "fixed test episodes, and write tables and plots to --out.",
                               epilog="defaults per task: " + "; ".join(
                                   f"{task}: {_listing(d)}" for task, d in defaults.TASKS.items())
                               + ". " + EXIT_CODES)
    add_arguments(fs, FewShotConfig)
    _add_threads(fs)
    fs.set_defaults(func=run_fewshot_command)

    demo_defaults = {**defaults.TASKS["sinusoid"], **defaults.DEMO}
    demo = subparsers.add_parser("demo", help="sinusoid comparison of LCP and the baselines (minutes on a CPU)",
                                 description="The sinusoid regression comparison (" + ", ".join(
                                     defaults.SINUSOID_METHODS) + ") with defaults sized for a laptop CPU.",
                                 epilog=f"defaults: {_listing(demo_defaults)}. " + EXIT_CODES)
    add_arguments(demo, FewShotConfig, groups=(None,), defaults=demo_defaults)
    _add_threads(demo)
    demo.set_defaults(func=run_demo_command)


def config_from_args(args: argparse.Namespace, preset: Optional[Dict[str, object]] = None) -> FewShotConfig:
    """The config of the flags given, over ``preset`` (the demo's settings), over the task's defaults."""
    return FewShotConfig(**{**(preset or {}), **config_kwargs(args, FewShotConfig)})


def _print_summary(summary: Dict[str, object]) -> int:
    # under torchrun every rank returns the same code, and rank 0 alone prints (it alone wrote the files)
    say = print if distributed.launched_rank() == 0 else (lambda *a, **k: None)
    if summary.get("table"):
        say(summary["table"])
    if summary.get("plots"):
        say("plots: " + ", ".join(summary["plots"]))
    say(f"results: {summary['out']}/results.md (per-method JSON/CSV beside it)")
    code = 0
    if summary.get("message"):
        say(summary["message"], file=sys.stderr)
        code = EXIT_STOPPED
    if summary.get("too_many_skipped"):
        # a method that mostly skipped its updates did not train: its row shows the untrained model
        say(summary["skipped_message"], file=sys.stderr)
        code = EXIT_TOO_MANY_SKIPPED
    return code


@contextlib.contextmanager
def _threads(threads: Optional[int]):
    """Run with ``threads`` torch CPU threads, restoring the previous count (the CLI may run in-process)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise UserInputError(f"--threads must be a positive integer, got {threads}")
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_fewshot_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    with _threads(args.threads):
        return _print_summary(run_fewshot(cfg))


def run_demo_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, defaults.DEMO)
    # the 1-40-40-1 MLP's operations are far too small to gain from intra-op threads; on a busy or 2-core
    # machine extra threads only contend (measured: ~10x slower meta-steps with 2 threads under load)
    with _threads(1 if args.threads is None else args.threads):
        return _print_summary(run_fewshot(cfg))
