"""The core: solvers for equilibrium dynamics (and, beside them, systems, controllers, local updates)."""
from .control import CONTROL_SOLVERS, register_control_solver
from .solvers import SOLVERS, DivergenceError, SolverStats, register_solver, relative_change, solve

__all__ = ["SOLVERS", "CONTROL_SOLVERS", "DivergenceError", "SolverStats", "register_solver",
           "register_control_solver", "relative_change", "solve"]
