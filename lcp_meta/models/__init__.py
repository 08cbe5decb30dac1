"""Models: supervised equilibrium networks (ff, rnn, conv-ff, conv-rnn) and few-shot learners (conv-4, MLP)."""
from .fewshot import Conv4, MetaMLP
from .networks import MODEL_NAMES, ConvDEQ, LayeredEquilibrium, RecurrentEquilibrium, build_model

__all__ = ["build_model", "MODEL_NAMES", "LayeredEquilibrium", "RecurrentEquilibrium", "ConvDEQ", "Conv4", "MetaMLP"]
