"""The library's own error types for input a user can fix.

The command line turns exactly these (and :class:`~lcp_meta.utils.paths.DataNotFoundError`) into a one-line
message and exit code 2; any other exception is a bug and keeps its traceback.  Each subclasses ValueError, so
code that catches ValueError around the Python API keeps working.
"""
from __future__ import annotations


class UserInputError(ValueError):
    """A bad value, option or file given by the user; the message names it and says what was expected."""


class DataFormatError(UserInputError):
    """A data file that exists but is not in the expected format (corrupt archive, image, header)."""


class CheckpointError(UserInputError):
    """A checkpoint that cannot be trusted or read (unsafe content, truncated, not a checkpoint)."""


class RunFolderError(UserInputError):
    """An output folder that cannot be used: a file, unwritable, or holding another run."""
