"""The ``lcp-meta`` command line.

Sub-commands live beside the code they drive; each module exposes ``add_parser(subparsers)`` which
registers its parser and sets ``func`` to the function that runs it:

- ``supervised``: train an equilibrium network by LCP or a baseline (``lcp_meta.supervised.cli``)
- ``fewshot``:    compare meta-learning methods on few-shot tasks (``lcp_meta.fewshot.cli``)
- ``demo``:       the sinusoid comparison with defaults that finish in minutes on a laptop CPU
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .utils import UserInputError
from .utils.interrupt import Interrupted

# Only the library's own user-input errors (UserInputError and its subclasses: data format, checkpoint, run
# folder, missing data) become one-line messages: a ValueError or TypeError raised anywhere else is a bug and
# keeps its traceback.  Exit codes: 0 done, 2 bad input (nothing written or changed), 3 stopped by --stop-after
# (continue with --resume), 4 too many meta-steps/batches skipped (diverged), 130 interrupted.
EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_TOO_MANY_SKIPPED = 2, 3, 4

# (module, description) of each sub-command family
_COMMAND_MODULES = ["lcp_meta.supervised.cli", "lcp_meta.fewshot.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcp-meta", description="Least-control principle: equilibrium networks and meta-learning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # a family that failed to import must not hide the others
            print(f"warning: commands of {name} unavailable: {exc}", file=sys.stderr)
            continue
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except Interrupted as exc:  # stopped at a step boundary, its checkpoint saved
        print(f"interrupted by {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; run again with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    except UserInputError as exc:  # bad input: one clear line, no traceback
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"lcp-meta {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
