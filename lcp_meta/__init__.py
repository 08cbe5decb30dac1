"""lcp_meta: the least-control principle for equilibrium networks and meta-learning."""
from .core import SOLVERS, DivergenceError, SolverStats, solve
from .utils import resolve_device

__version__ = "0.1.0"
__all__ = ["SOLVERS", "DivergenceError", "SolverStats", "solve", "resolve_device", "__version__"]
