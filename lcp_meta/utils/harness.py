"""The experiment harness shared by ``lcp-meta supervised``, ``lcp-meta fewshot`` and ``benchmarks/``.

One copy of what every run folder needs:

- :func:`prepare_run_folder`: refuse a folder that holds another run unless ``resume`` (continue it) or
  ``overwrite`` (delete that run's files first), refuse a file or an unwritable folder, all before anything is
  written (a refused run changes no file);
- :func:`save_checkpoint` / :func:`load_run_checkpoint`: atomic checkpoints with the RNG states, loaded with
  ``weights_only=True``, checked for the keys a resume needs and for the settings they were written under;
- :func:`provenance` / :func:`provenance_lines`: device, versions, command and date of a result (as JSON / as the
  bullet lines of a markdown results file);
- :func:`write_json` / :func:`write_results`: atomic JSON (and markdown) results, written by rank 0 alone under
  torchrun.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence

import torch

from .checkpoint import atomic_save, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .errors import CheckpointError, RunFolderError, UserInputError

__all__ = ["check_resume_flags", "settings_refused", "prepare_run_folder", "save_checkpoint", "load_run_checkpoint", "settings_diff",
           "provenance", "provenance_lines", "utc_now", "write_json", "write_results"]


@contextlib.contextmanager
def settings_refused(given: bool, what: str):
    """Building a model or method from settings the user gave (``given``): a ValueError/TypeError it raises
    becomes one line, ``what: <reason>`` (a UserInputError).  Without user settings it is a bug and keeps its
    traceback."""
    try:
        yield
    except UserInputError:
        raise
    except (ValueError, TypeError) as exc:
        if not given:
            raise
        raise UserInputError(f"{what}: {' '.join(str(exc).split())}") from exc


def _is_main() -> bool:
    from .. import distributed  # late: distributed imports the method packages
    return distributed.is_main()


def check_resume_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise UserInputError("--resume and --overwrite exclude each other: continue the run in --out, or "
                             "replace it")


def _ensure_writable_folder(out: Path) -> None:
    """Create the run folder ``out`` and prove it writable now (a probe file), so that a bad ``--out`` fails
    before any data is read or any step is run."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"cannot write to --out {out} ({exc.strerror or exc}); choose a writable folder") \
            from None


def prepare_run_folder(out: Path, held: Sequence[Path], *, resume: bool, overwrite: bool) -> Path:
    """Check that ``out`` can take this run, then create it; ``held`` are the files of a run already there.

    Without ``resume`` or ``overwrite`` a folder holding a run is refused; with ``overwrite`` those files (and
    only those) are deleted once the folder is known to be writable."""
    out = Path(out)
    check_resume_flags(resume, overwrite)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is an existing file, not a folder; choose another --out")
    held = [p for p in held if p.is_file()]
    if held and not (resume or overwrite):
        names = ", ".join(str(p.relative_to(out)) for p in held[:3]) + (", ..." if len(held) > 3 else "")
        raise RunFolderError(f"--out {out} already holds a run ({names}); pass --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out")
    _ensure_writable_folder(out)  # an unwritable folder is found now, not after an epoch
    if overwrite:
        for p in held:
            p.unlink(missing_ok=True)
    return out


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write ``state`` plus the RNG states atomically (rank 0 alone: every rank holds the same parameters)."""
    if _is_main():
        atomic_save({**state, "rng": rng_state()}, path)


def settings_diff(stored: Mapping[str, Any], now: Mapping[str, Any]) -> Dict[str, tuple]:
    """``{key: (stored value, requested value)}`` for every key whose values differ."""
    return {k: (stored.get(k), now.get(k)) for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)}


def load_run_checkpoint(path: Path, required: Iterable[str], what: str, *, settings: Mapping[str, Any] = None,
                        stored_settings: Callable[[Dict[str, Any]], Any] = None,
                        restore_rng: bool = True) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` for a resume.

    required: the keys it must hold (else :class:`CheckpointError` naming ``what`` wrote it).
    settings: the settings of the run now; when given, they must equal ``stored_settings(ckpt)`` (default:
        ``ckpt["config"]``); a :class:`UserInputError` lists each difference (checkpoint value, requested value).
    restore_rng: put the RNG states back (after every check has passed); a caller that seeds and builds its
        model first restores them itself (``set_rng_state(ckpt["rng"])``).
    """
    ckpt = load_checkpoint(path, map_location="cpu")  # RNG states must stay CPU tensors
    missing = sorted((set(required) | {"rng"}) - set(ckpt if isinstance(ckpt, dict) else ()))
    if missing or not isinstance(ckpt.get("config", {}), dict):
        raise CheckpointError(f"{path} is not a checkpoint of {what} (missing {', '.join(missing) or 'config'}); "
                              f"delete it or choose another --out")
    if settings is not None:
        stored = ckpt.get("config") if stored_settings is None else stored_settings(ckpt)
        diff = settings_diff(stored if isinstance(stored, Mapping) else {}, settings)
        if diff:
            raise UserInputError(f"cannot resume from {path}: it was written with different settings: " + ", ".join(
                f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    if restore_rng:
        set_rng_state(ckpt["rng"])
    return ckpt


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(device: "torch.device | str" = "cpu", command: "str | Sequence[str]" = None) -> Dict[str, Any]:
    """Where and how a result was produced: device and its name (on a CPU: cores and torch threads), torch and
    python versions, the command (default: this process's ``sys.argv``), the UTC date, the torchrun world size."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads), no GPU used")
    from .. import distributed
    command = sys.argv if command is None else command
    return {"device": str(device), "device_name": name, "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "command": command if isinstance(command, str) else " ".join(command), "date": utc_now(),
            "world_size": distributed.world_size()}


def provenance_lines(prov: Mapping[str, Any]) -> List[str]:
    """The markdown bullet lines of a results file that say how it was produced."""
    return [f"- command: `{prov['command']}`", f"- device: {prov['device_name']} (`{prov['device']}`)",
            f"- torch {prov['torch_version']}, python {prov['python_version']}", f"- date: {prov['date']}"]


def write_json(obj: Any, path: Path) -> None:
    """An atomic JSON file (rank 0 alone writes results; the other ranks computed the same numbers)."""
    if _is_main():
        atomic_write_text(json.dumps(obj, indent=2, default=str) + "\n", path)


def write_results(stem: Path, obj: Any, markdown_lines: Sequence[str]) -> Path:
    """``<stem>.json`` and ``<stem>.md`` of a benchmark, atomically (the folder is created)."""
    stem = Path(stem)
    write_json(obj, stem.with_suffix(".json"))
    if _is_main():
        atomic_write_text("\n".join(markdown_lines) + "\n", stem.with_suffix(".md"))
    return stem.with_suffix(".md")
