"""``lcp-meta supervised``: train an equilibrium network on MNIST or CIFAR-10 with LCP or a baseline.

Example (a quick CPU check, then the published MNIST ff run)::

    lcp-meta supervised --dataset mnist --model ff --method lcp-di --epochs 1 --max-batches 100 \\
        --data-root ../shared/data --out runs/quick
    lcp-meta supervised --dataset mnist --model ff --method lcp-di --device cuda --out runs/ff_lcp-di

Exit codes: 0 done; 2 bad input (nothing written); 4 more than --max-skipped of the batches were skipped
(diverged).  A run folder that already holds a run is refused unless --resume or --overwrite is given.

Every option left out takes the published setting (spec, section 3).  The run folder receives
``checkpoint.pt``, ``result.json`` and ``curves.png`` (learning curves; ``--no-plots``: none), each rewritten after
every epoch; ``--resume`` continues from the checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from .. import distributed
from ..cli import EXIT_TOO_MANY_SKIPPED
from ..utils.cliargs import add_arguments, config_kwargs
from ..utils.options import parse_assignments
from .trainer import RunConfig, train

__all__ = ["add_parser", "run", "parse_assignments"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "supervised", help="train an equilibrium network (MNIST / CIFAR-10) with LCP or a baseline",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, RunConfig)  # one flag per RunConfig field that has help text
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = RunConfig(**config_kwargs(args, RunConfig))
    result = train(cfg, log=lambda line: print(line, flush=True))
    acc = result.get("final_test_accuracy")
    summary = f"test accuracy {100 * acc:.2f}%" if acc is not None else "no epoch trained"
    skipped = result["skipped_batches"]
    if distributed.launched_rank() == 0:  # under torchrun rank 0 alone reports (it alone wrote the files)
        print(f"done: {summary}; {skipped} batch(es) skipped; results in {result['run_dir']}", flush=True)
    if result.get("too_many_skipped"):
        # most updates were dropped: the accuracy above is that of a barely trained network
        print(f"error: {skipped} of {result['batches_seen']} batches were skipped (more than the allowed share "
              f"{cfg.max_skipped:g}): the dynamics diverged; see the skipped-batch warnings, then lower lr or "
              f"alpha, or raise max_iter", file=sys.stderr)
        return EXIT_TOO_MANY_SKIPPED
    return 0
