"""``lcp-meta supervised``: train an equilibrium network on MNIST or CIFAR-10 with LCP or a baseline.

Example (a quick CPU check, then the published MNIST ff run)::

    lcp-meta supervised --dataset mnist --model ff --method lcp-di --epochs 1 --max-batches 100 \\
        --data-root ../shared/data --out runs/quick
    lcp-meta supervised --dataset mnist --model ff --method lcp-di --device cuda --out runs/ff_lcp-di

Exit codes: 0 done; 2 bad input (nothing written); 4 more than --max-skipped of the batches were skipped
(diverged).  A run folder that already holds a run is refused unless --resume or --overwrite is given.

Every option left out takes the published setting (spec, section 3).  The run folder receives
``checkpoint.pt`` (after every epoch) and ``result.json``; ``--resume`` continues from the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

from .. import distributed
from .config import INVENTED
from .trainer import DATASETS, MODEL_NAMES, RunConfig, train
from ..utils.errors import UserInputError
from ..utils.options import parse_option_value

__all__ = ["add_parser", "run", "parse_assignments"]

_METHODS_HELP = "bp, rbp, lcp-di, lcp-di-kp, lcp-lf, lcp-ebd"
_INVENTED_HELP = ", ".join(f"{mo} {me}" for mo, me in INVENTED)


def parse_assignments(items: Optional[List[str]], flag: str) -> Dict[str, Any]:
    """``["alpha=0.1", "solver=anderson"]`` -> ``{"alpha": 0.1, "solver": "anderson"}``.

    Values are read as strictly as typed flags (``lcp_meta.utils.options``): python literals or bare words;
    ``nan``, ``inf`` and overflowing numbers are refused."""
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserInputError(f"{flag} expects KEY=VALUE with KEY a python identifier, got {item!r}")
        out[key.strip()] = parse_option_value(value, f"{flag} {key.strip()}")
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "supervised", help="train an equilibrium network (MNIST / CIFAR-10) with LCP or a baseline",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASETS)} (default mnist)")
    p.add_argument("--model", default="ff", help=f"one of {', '.join(MODEL_NAMES)} (default ff)")
    p.add_argument("--method", default="lcp-di", help=f"one of {_METHODS_HELP} (default lcp-di). Combinations "
                   f"the authors never ran have invented defaults: {_INVENTED_HELP}")
    p.add_argument("--epochs", type=int, help="training epochs (default: 30; conv-rnn 75)")
    p.add_argument("--batch-size", type=int, help="mini-batch size (default 64)")
    p.add_argument("--lr", type=float, help="initial learning rate (default: Adam 1e-3 on MNIST, SGD 0.1/0.05 on CIFAR)")
    p.add_argument("--lr-final", type=float, help="end of the per-batch cosine schedule (default lr/10)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), help="optimizer (default: adam on MNIST, sgd on CIFAR)")
    p.add_argument("--weight-decay", type=float, help="optimizer weight decay (default 0; conv-ff 1e-3)")
    p.add_argument("--grad-clip", type=float, help="gradient norm clip, 0 for none (default: 10 for rnn and conv-rnn, none otherwise)")
    p.add_argument("--max-batches", type=int, help="train on at most N batches per epoch (quick runs)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test images only")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffles and noise (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--data-root", help="folder holding mnist/ or cifar-10-batches-py/ (default $LCP_META_DATA)")
    p.add_argument("--out", help="run folder (default runs/DATASET_MODEL_METHOD_seedSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its checkpoint "
                                                            "and result are deleted first)")
    p.add_argument("--max-skipped", type=float, default=0.1, metavar="SHARE",
                   help="exit with code 4 when more than this share of the trained batches was skipped because "
                        "the dynamics diverged (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N batches within an epoch")
    p.add_argument("--solver", choices=("auto", "euler", "anderson", "sweep", "reduced", "warm-anderson"),
                   help="solver of the dynamics (default: the method's; LCP-DI: auto, the fastest exact solver; "
                        "euler: the published simulation; sweep/reduced/warm-anderson: LCP-DI/DI-KP only)")
    p.add_argument("--tol", type=float, help="solver stop threshold on the relative change (default: the method's)")
    p.add_argument("--max-iter", type=int, help="solver iteration cap (default: the method's)")
    p.add_argument("--set", dest="method_set", action="append", metavar="KEY=VALUE",
                   help="override a method setting, e.g. --set alpha=0.1 (repeatable)")
    p.add_argument("--model-set", action="append", metavar="KEY=VALUE",
                   help="override a model setting, e.g. --model-set hidden=128 (repeatable)")
    p.add_argument("--preset", choices=("default", "paper"), default="default",
                   help="'paper': train as the authors' code does (updates applied from the state reached, with "
                        "every batch's residual summarised per epoch; batch-wide stop rule; their rnn bias, EBD "
                        "tolerances, KP decay, conv-rnn layer and evaluation); see docs/fidelity.md "
                        "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = RunConfig(
        dataset=args.dataset, model=args.model, method=args.method, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, lr_final=args.lr_final, optimizer=args.optimizer,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, max_batches=args.max_batches, seed=args.seed,
        device=args.device, data_root=args.data_root, out=args.out, resume=args.resume, overwrite=args.overwrite,
        max_skipped=args.max_skipped, solver=args.solver,
        tol=args.tol, max_iter=args.max_iter, test_subset=args.test_subset,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
        method_kwargs=parse_assignments(args.method_set, "--set"),
        model_kwargs=parse_assignments(args.model_set, "--model-set"), preset=args.preset)
    result = train(cfg, log=lambda line: print(line, flush=True))
    acc = result.get("final_test_accuracy")
    summary = f"test accuracy {100 * acc:.2f}%" if acc is not None else "no epoch trained"
    skipped = result["skipped_batches"]
    if distributed.launched_rank() == 0:  # under torchrun rank 0 alone reports (it alone wrote the files)
        print(f"done: {summary}; {skipped} batch(es) skipped; results in {result['run_dir']}", flush=True)
    if result.get("too_many_skipped"):
        # most updates were dropped: the accuracy above is that of a barely trained network
        print(f"error: {skipped} of {result['batches_seen']} batches were skipped (more than the allowed share "
              f"{args.max_skipped:g}): the dynamics diverged; see the skipped-batch warnings, then lower lr or "
              f"alpha, or raise max_iter", file=sys.stderr)
        return 4
    return 0
