"""Command-line flags generated from a config dataclass: one declaration per setting, not a parser beside it.

A field becomes a flag when its metadata carries ``help`` (use :func:`option`).  The flag is ``--field-name``
(or ``flag=``), its type comes from the annotation (``int``, ``float``, ``str``, ``Optional[...]`` of those;
``bool`` fields are switches), and an absent flag leaves the dataclass default in place: flags default to
``argparse.SUPPRESS``, so :func:`config_kwargs` only passes what was given.  ``convert`` turns the raw value into
the field's value after parsing (e.g. ``"a,b"`` -> ``("a", "b")``), so that its error is the library's one-line
:class:`~lcp_meta.utils.errors.UserInputError`, not argparse's usage message.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Dict, Iterable, Optional

__all__ = ["option", "add_arguments", "config_kwargs"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING, flag: Optional[str] = None,
           convert: Optional[Callable[[Any], Any]] = None, group: Optional[str] = None, show_default: bool = True,
           **argparse_kwargs: Any):
    """A dataclass field with a command-line flag.

    flag: the flag's name (default ``--field-name``); a ``bool`` field whose default is True gets ``--no-...``.
    convert: applied to the parsed value (not to the dataclass default).
    group: a label that :func:`add_arguments` can include or leave out (e.g. task-only flags).
    show_default: append "(default: ...)" to the help when the dataclass default is not None.
    argparse_kwargs: passed on (``choices``, ``metavar``, ``action="append"``, ``type``).
    """
    meta = dict(help=help, flag=flag, convert=convert, group=group, show_default=show_default,
                argparse=argparse_kwargs)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(hint) -> Any:
    """``Optional[int]`` -> int; a plain type is returned as it is."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def add_arguments(parser: argparse.ArgumentParser, cls, *, groups: Optional[Iterable[Optional[str]]] = None,
                  defaults: Optional[Dict[str, Any]] = None) -> None:
    """Add a flag for every field of ``cls`` that has ``help`` metadata.

    groups: only fields whose ``group`` is in this collection (default: all).
    defaults: values to show in the help instead of the dataclass defaults (e.g. the task's defaults).
    """
    hints = typing.get_type_hints(cls)
    wanted = None if groups is None else set(groups)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or (wanted is not None and meta.get("group") not in wanted):
            continue
        kind = _base_type(hints[f.name])
        kwargs: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, **meta["argparse"])
        shown = (defaults or {}).get(f.name, f.default)
        help_text = meta["help"]
        if kind is bool:
            on = f.default is not True
            flag = meta["flag"] or ("--" if on else "--no-") + f.name.replace("_", "-")
            kwargs["action"] = "store_true" if on else "store_false"
        else:
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            if kwargs.get("action") != "append":
                kwargs.setdefault("type", kind if kind in (int, float, str) else str)
            if meta["show_default"] and shown not in (None, _MISSING):
                help_text += f" (default: {shown})"
        parser.add_argument(flag, help=help_text.replace("%", "%%"), **kwargs)


def config_kwargs(args: argparse.Namespace, cls) -> Dict[str, Any]:
    """The fields of ``cls`` given on the command line, converted (absent flags are left out)."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata and hasattr(args, f.name):
            value = getattr(args, f.name)
            convert = f.metadata.get("convert")
            out[f.name] = convert(value) if convert is not None and value is not None else value
    return out
