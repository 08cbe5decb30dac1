"""The core of the least-control principle, shared by the supervised networks and meta-learning: the
step-map solvers (one stop rule, one divergence policy), the controllers, the output loss, the network system
and its local update, integrators and trees, the method template and registry (docs/architecture.md)."""
from .control import CONTROL_SOLVERS, register_control_solver
from .controllers import CONTROLLERS, Controller, OutputController, Terms, make_controller, register_controller
from .solvers import (SOLVERS, DivergenceError, SolverStats, StopRule, check_divergence, register_solver,
                      relative_change, solve)

__all__ = ["SOLVERS", "CONTROL_SOLVERS", "CONTROLLERS", "Controller", "OutputController", "Terms", "DivergenceError",
           "SolverStats", "StopRule", "check_divergence", "make_controller", "register_controller", "register_solver",
           "register_control_solver", "relative_change", "solve"]
