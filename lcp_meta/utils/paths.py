"""Locating data sets: ``--data-root``, else ``$LCP_META_DATA``; never the network at test time."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserInputError


class DataNotFoundError(UserInputError, FileNotFoundError):
    """A data set is missing or incomplete; the message names the files that were expected (a user-input error
    for the command line, and still a FileNotFoundError for code that catches that)."""


def find_data_root(data_root: Optional[str], subdir: str, expected: Iterable[str]) -> Path:
    """Return ``<root>/<subdir>`` after checking that every file in ``expected`` is there.

    ``data_root`` wins; otherwise the environment variable ``LCP_META_DATA`` is used.
    """
    root = data_root or os.environ.get("LCP_META_DATA")
    expected = list(expected)
    if not root:
        raise DataNotFoundError(
            f"no data root given: pass --data-root DIR (or set LCP_META_DATA) to a folder holding "
            f"{subdir}/ with {', '.join(expected)}")
    folder = Path(root).expanduser() / subdir
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"data set incomplete in {folder}: missing {', '.join(missing)} "
            f"(expected {', '.join(expected)})")
    return folder
