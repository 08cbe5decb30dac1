"""lcp_meta: the least-control principle for equilibrium networks and meta-learning.

Supervised equilibrium networks: :mod:`lcp_meta.models`, :mod:`lcp_meta.supervised`.
Meta-learning (LCP and the MAML-style baselines behind one interface): :mod:`lcp_meta.meta`.
Adapters for learn2learn, higher and torchmeta live in :mod:`lcp_meta.adapters` and are never imported here.
"""
from .core import SOLVERS, DivergenceError, SolverStats, register_solver, solve
from .core.system import EquilibriumModel
from .core.registry import method_info, method_names, register_method
from .meta import (FOMAML, IMAML, LCP, MAML, METHOD_NAMES, ContrastiveMeta, MetaGradient, MetaMethod, MetaStats,
                   Reptile, TaskBatch, make_method, method_kwargs)
from .utils import resolve_device

__version__ = "0.1.0"
__all__ = ["EquilibriumModel", "SOLVERS", "DivergenceError", "SolverStats", "register_solver", "solve", "resolve_device",
           "LCP", "MAML", "FOMAML", "Reptile", "IMAML", "ContrastiveMeta", "MetaMethod", "MetaStats", "TaskBatch",
           "MetaGradient", "make_method", "METHOD_NAMES", "method_kwargs", "method_info", "method_names",
           "register_method", "__version__"]
