"""``KEY=VALUE`` options from the command line (``--set``, ``--model-set``), read as strictly as typed flags.

A value is a Python literal (number, True/False, None, quoted string, tuple/list of those) or a bare word such as
``direct`` or ``anderson``.  Numbers must be finite: ``nan``, ``inf`` and overflowing literals such as ``1e999``
are refused, as they are for flags, instead of silently becoming a string or an infinite setting.
"""
from __future__ import annotations

import ast
import math
import re
from typing import Any, Dict, Iterable, Optional

from .errors import UserInputError

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def _check_finite(value: Any, where: str, raw: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserInputError(f"{where}: {raw!r} is not a finite number; give a finite value")
        return
    if isinstance(value, (tuple, list)):
        for v in value:
            _check_finite(v, where, raw)
        return
    raise UserInputError(f"{where}: {raw!r} is a {type(value).__name__}; expected a number, True/False, None, "
                         f"a word or a tuple/list of those")


def parse_option_value(raw: str, where: str) -> Any:
    """Read one option value; ``where`` (e.g. ``"--set lcp.beta"``) names it in the error message."""
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            value = float(text)  # what a float flag would accept (nan, inf: refused just below)
        except ValueError:
            if _WORD.fullmatch(text):
                return text  # a bare word such as controller=direct
            raise UserInputError(f"{where}: cannot read {raw!r}; expected a number, True/False, None or a word "
                                 f"such as direct") from None
    _check_finite(value, where, raw)
    return value


def parse_assignments(items: Optional[Iterable[str]], flag: str, *, nested: bool = False) -> Dict[str, Any]:
    """``["alpha=0.1", "solver=anderson"]`` -> ``{"alpha": 0.1, "solver": "anderson"}``; with ``nested``,
    ``["maml.inner_steps=1"]`` -> ``{"maml": {"inner_steps": 1}}`` (per-method options).  Every value is read by
    :func:`parse_option_value`; a malformed item is a one-line error naming ``flag`` and the expected form."""
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if nested:
            group, dot, name = key.partition(".")
            if not sep or not dot or not group or not name.isidentifier():
                raise UserInputError(f"{flag} {item!r}: expected METHOD.OPTION=VALUE, e.g. maml.inner_steps=1")
            out.setdefault(group, {})[name] = parse_option_value(raw, f"{flag} {key}")
        else:
            if not sep or not key.isidentifier():
                raise UserInputError(f"{flag} expects KEY=VALUE with KEY a python identifier, got {item!r}")
            out[key] = parse_option_value(raw, f"{flag} {key}")
    return out
