"""PNG figures without pyplot: a ``matplotlib.figure.Figure`` on the Agg canvas, so no global pyplot state, no
display, and the caller's matplotlib backend is left alone.  matplotlib is an optional dependency (the ``plots``
extra); :func:`available` says whether it is installed, so that a long run can skip its plots instead of failing
at the end."""
from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["available", "figure", "save", "MISSING"]

MISSING = "matplotlib is not installed: no plots written (pip install 'lcp_meta[plots]')"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def figure(ncols: int, width: float = 5.0, height: float = 3.6):
    """A figure of ``ncols`` panels side by side; returns ``(fig, axes)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save(fig, path: "str | Path", dpi: int = 110) -> Path:
    """Write ``fig`` as PNG to ``path`` through a temporary file (an interrupted write leaves the old plot)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=dpi, format="png")
    tmp.replace(path)
    return path
