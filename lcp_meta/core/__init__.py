"""The core: solvers for equilibrium dynamics (and, beside them, systems, controllers, local updates)."""
from .solvers import SOLVERS, DivergenceError, SolverStats, register_solver, relative_change, solve

__all__ = ["SOLVERS", "DivergenceError", "SolverStats", "register_solver", "relative_change", "solve"]
