"""Supervised LCP: controllers (DI, DI-KP, LF, EBD) and baselines (BP, RBP) for equilibrium networks.

    from lcp_meta.models.supervised import build_model
    from lcp_meta.supervised import make_method, default_hparams
    model = build_model("ff")
    method = make_method("lcp-di", model, **default_hparams("ff", "lcp-di"))
    stats = method.backward(x, y); optimizer.step(); method.after_step()
"""
from __future__ import annotations

from .config import METHOD_NAMES, SUPPORTED, TRAINER_KEYS, default_hparams
from .di import DynamicInversion, KolenPollack
from .ebd import EnergyBased
from .lf import LinearFeedback
from .methods import Backprop, Method, RecurrentBackprop

__all__ = ["make_method", "METHOD_NAMES", "default_hparams", "Method", "Backprop", "RecurrentBackprop",
           "DynamicInversion", "KolenPollack", "LinearFeedback", "EnergyBased"]

_CLASSES = {"bp": Backprop, "rbp": RecurrentBackprop, "lcp-di": DynamicInversion, "lcp-di-kp": KolenPollack,
            "lcp-lf": LinearFeedback, "lcp-ebd": EnergyBased}


def make_method(name: str, model, **hparams) -> Method:
    """Build the method ``name`` (one of :data:`METHOD_NAMES`) for ``model``.

    ``hparams`` are the method's settings; trainer settings (``TRAINER_KEYS``, e.g. the output of
    :func:`default_hparams`) are accepted and ignored.  Unknown settings are a TypeError naming them.
    Build the model on its device first: feedback weights are created beside its parameters.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown method {name!r}; expected one of {METHOD_NAMES}")
    kw = {k: v for k, v in hparams.items() if k not in TRAINER_KEYS}
    try:
        return _CLASSES[name](model, **kw)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise TypeError(f"method {name!r} got an unknown setting: {exc}") from None
        raise
