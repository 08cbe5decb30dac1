"""``lcp-meta fewshot`` (compare meta-learning methods on few-shot tasks) and ``lcp-meta demo``."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Dict, Optional

from .runner import DEFAULT_METHODS, FewShotConfig, run_fewshot
from .. import distributed
from ..utils.errors import UserInputError
from ..utils.options import parse_option_value

# defaults that depend on the task (a flag given on the command line always wins)
TASK_DEFAULTS: Dict[str, Dict[str, object]] = {
    # inner steps of 0.02 on the MSE of amplitude-5 sinusoids: larger steps make MAML's inner loop diverge
    "sinusoid": dict(shots=10, meta_batch=10, inner_steps=10, inner_lr=0.02, lam=0.5, beta=0.1,
                     outer_lr=2e-3, meta_steps=1000),
    # the contrastive meta-learning Omniglot settings (lam 0.5, beta 0.1) with a 10-step inner loop
    "omniglot": dict(shots=1, meta_batch=16, inner_steps=10, inner_lr=0.1, lam=0.5, beta=0.1,
                     outer_lr=1e-3, meta_steps=2000),
}

EXIT_CODES = ("Exit codes: 0 done; 2 bad input (nothing written); 3 stopped by --stop-after (continue with "
              "--resume); 4 a method skipped more than --max-skipped of its meta-steps (diverged).")

# the demo: the sinusoid comparison sized to finish in a few minutes on a 2-core laptop CPU
DEMO_DEFAULTS: Dict[str, object] = dict(task="sinusoid", shots=10, meta_steps=300, meta_batch=10,
                                        inner_steps=10, test_episodes=300, val_episodes=50)


def _parse_set(items) -> Dict[str, Dict[str, object]]:
    """``["maml.inner_steps=1", "lcp.beta=0.01"]`` -> ``{"maml": {"inner_steps": 1}, "lcp": {"beta": 0.01}}``.

    Values are read strictly (``lcp_meta.utils.options``): ``nan``, ``inf`` or ``1e999`` are refused, not passed on
    as a string or an infinite setting; the runner then checks each known option as it checks the flags."""
    out: Dict[str, Dict[str, object]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        method, dot, option = key.strip().partition(".")
        if not sep or not dot or not method or not option.isidentifier():
            raise UserInputError(f"--set {item!r}: expected METHOD.OPTION=VALUE, e.g. maml.inner_steps=1")
        out.setdefault(method, {})[option] = parse_option_value(raw, f"--set {key.strip()}")
    return out


def _methods(text: str):
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    if not names:
        raise UserInputError(f"--methods {text!r}: expected a comma-separated list such as lcp,imaml,maml")
    return names


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods (default: %(default)s)")
    p.add_argument("--meta-steps", type=int, help="meta-training steps per method")
    p.add_argument("--meta-batch", type=int, help="tasks per meta-step")
    p.add_argument("--inner-steps", type=int, help="steps of the inner dynamics")
    p.add_argument("--inner-lr", type=float, help="step size of the inner dynamics")
    p.add_argument("--lam", type=float, help="proximal strength lam of the inner problem (LCP, iMAML, CML)")
    p.add_argument("--beta", type=float, help="control strength beta (LCP) / nudging strength (CML)")
    p.add_argument("--outer-lr", type=float, help="Adam learning rate of the meta-parameters")
    p.add_argument("--set", action="append", metavar="METHOD.OPTION=VALUE",
                   help="per-method option, repeatable (e.g. --set maml.inner_steps=1 --set lcp.beta=0.01)")
    p.add_argument("--test-episodes", type=int, help="fixed test episodes/tasks (mean and 95%% CI)")
    p.add_argument("--val-episodes", type=int, help="fixed validation episodes/tasks")
    p.add_argument("--val-every", type=int, default=0, help="validate every N meta-steps (default: 10 times)")
    p.add_argument("--log-every", type=int, default=0, help="log the curve every N meta-steps (default: 100 points)")
    p.add_argument("--hidden", type=int, help="hidden width (MLP units / conv-4 channels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task stream and initialisation")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue each method from its checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its results, "
                                                            "checkpoints and plots are deleted first)")
    p.add_argument("--max-skipped", type=float, default=0.1, metavar="SHARE",
                   help="exit with code 4 when a method skipped more than this share of its meta-steps because "
                        "they diverged (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N meta-steps (0: at the end)")
    p.add_argument("--stop-after", type=int, help="stop each method after N meta-steps in this invocation "
                                                  "(continue later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="write tables and JSON/CSV only (no PNG plots)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (the demo uses 1: its tiny MLP runs "
                                               "fastest single-threaded)")


def add_parser(subparsers) -> None:
    fs = subparsers.add_parser("fewshot", help="compare meta-learning methods on few-shot tasks",
                               description="Meta-train each method on the same task stream, evaluate on the same "
                                           "fixed test episodes, and write tables and plots to --out.",
                               epilog="defaults per task: " + "; ".join(
                                   f"{task}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                                   for task, d in TASK_DEFAULTS.items())
                               + ". " + EXIT_CODES)
    fs.add_argument("--task", default="sinusoid", help="sinusoid | omniglot (default: %(default)s)")
    fs.add_argument("--ways", type=int, default=5, help="N classes per episode (omniglot)")
    fs.add_argument("--shots", type=int, help="K support examples per class (sinusoid: points per task)")
    fs.add_argument("--queries", type=int, help="query examples per class (sinusoid: points per task)")
    fs.add_argument("--data-root", help="folder holding omniglot/ (default: $LCP_META_DATA)")
    fs.add_argument("--cache-dir", help="where decoded images are cached (default: $LCP_META_CACHE or "
                                        "~/.cache/lcp_meta)")
    fs.add_argument("--split-seed", type=int, default=0, help="seed of the Omniglot character split")
    _add_common(fs)
    fs.set_defaults(func=run_fewshot_command)

    demo = subparsers.add_parser("demo", help="sinusoid comparison of LCP and the baselines (minutes on a CPU)",
                                 description="The sinusoid regression comparison (lcp, imaml, maml, fomaml, "
                                             "reptile, cml) with defaults sized for a laptop CPU.",
                                 epilog="defaults: " + ", ".join(
                                     f"{k}={v}" for k, v in {**TASK_DEFAULTS["sinusoid"], **DEMO_DEFAULTS}.items())
                                 + ". " + EXIT_CODES)
    _add_common(demo)
    demo.set_defaults(func=run_demo_command)


def _default(value, default):
    # `or` would turn an explicit 0 into the default instead of refusing it
    return default if value is None else value


def config_from_args(args: argparse.Namespace, defaults: Optional[Dict[str, object]] = None) -> FewShotConfig:
    task = getattr(args, "task", None) or (defaults or {}).get("task", "sinusoid")
    if task not in TASK_DEFAULTS:
        raise UserInputError(f"unknown task {task!r}; expected one of {', '.join(TASK_DEFAULTS)}")
    merged = {**TASK_DEFAULTS[task], **(defaults or {})}

    def pick(name: str):
        value = getattr(args, name, None)
        return merged.get(name) if value is None else value

    out = args.out or f"runs/{'demo' if getattr(args, 'func', None) is run_demo_command else task}"
    return FewShotConfig(
        task=task, methods=_methods(args.methods), ways=getattr(args, "ways", 5), shots=pick("shots"),
        queries=getattr(args, "queries", None), meta_steps=pick("meta_steps"), meta_batch=pick("meta_batch"),
        inner_steps=pick("inner_steps"), inner_lr=pick("inner_lr"), lam=pick("lam"), beta=pick("beta"),
        outer_lr=pick("outer_lr"), test_episodes=_default(pick("test_episodes"), 600),
        val_episodes=_default(pick("val_episodes"), 100), val_every=args.val_every, log_every=args.log_every,
        seed=args.seed, split_seed=getattr(args, "split_seed", 0), hidden=args.hidden, device=args.device,
        dtype=args.dtype, data_root=getattr(args, "data_root", None), cache_dir=getattr(args, "cache_dir", None),
        out=out, resume=args.resume, overwrite=args.overwrite, max_skipped=args.max_skipped,
        checkpoint_every=args.checkpoint_every, stop_after=args.stop_after,
        progress=not args.no_progress, plots=not args.no_plots, method_options=_parse_set(args.set))


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
        code = 3
    if summary.get("too_many_skipped"):
        # a method that mostly skipped its updates did not train: its row shows the untrained model
        say(summary["skipped_message"], file=sys.stderr)
        code = 4
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
    cfg = config_from_args(args, DEMO_DEFAULTS)
    # the 1-40-40-1 MLP's operations are far too small to gain from intra-op threads; on a busy or 2-core
    # machine extra threads only contend (measured: ~10x slower meta-steps with 2 threads under load)
    with _threads(1 if args.threads is None else args.threads):
        return _print_summary(run_fewshot(cfg))
