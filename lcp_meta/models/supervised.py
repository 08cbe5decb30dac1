"""Former name of :mod:`lcp_meta.models.networks` (the supervised equilibrium networks), kept so that existing
``from lcp_meta.models.supervised import build_model`` lines work; the name read as a twin of the
``lcp_meta.supervised`` package (methods), which it is not.  New code imports ``lcp_meta.models``."""
from .networks import MODEL_NAMES, ConvDEQ, LayeredEquilibrium, RecurrentEquilibrium, build_model  # noqa: F401

__all__ = ["build_model", "MODEL_NAMES", "LayeredEquilibrium", "RecurrentEquilibrium", "ConvDEQ"]
