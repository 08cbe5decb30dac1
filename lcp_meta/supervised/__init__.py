"""Supervised LCP: controllers (DI, DI-KP, LF, EBD) and baselines (BP, RBP) for equilibrium networks.

    from lcp_meta.models import build_model
    from lcp_meta.supervised import make_method, default_hparams
    model = build_model("ff")
    method = make_method("lcp-di", model, **default_hparams("ff", "lcp-di"))
    stats = method.backward(x, y); optimizer.step(); method.after_step()
"""
from __future__ import annotations

from ..core.registry import build, method_names, register_method
from .config import METHOD_NAMES, TRAINER_KEYS, default_hparams
from .di import DynamicInversion, KolenPollack
from .ebd import EnergyBased
from .lf import LinearFeedback
from .methods import Backprop, Method, RecurrentBackprop

__all__ = ["make_method", "METHOD_NAMES", "default_hparams", "Method", "Backprop", "RecurrentBackprop",
           "DynamicInversion", "KolenPollack", "LinearFeedback", "EnergyBased"]

for _name, _cls in (("bp", Backprop), ("rbp", RecurrentBackprop), ("lcp-di", DynamicInversion),
                    ("lcp-di-kp", KolenPollack), ("lcp-lf", LinearFeedback), ("lcp-ebd", EnergyBased)):
    register_method("supervised", _name, _cls)
# the published settings (config.py) and the registry name the same methods
assert method_names("supervised") == METHOD_NAMES, (method_names("supervised"), METHOD_NAMES)


def make_method(name: str, model, **hparams) -> Method:
    """Build the method ``name`` (one of :data:`METHOD_NAMES`, or ``"supervised:<name>"``) for ``model``.

    ``hparams`` are the method's settings; trainer settings (``TRAINER_KEYS``, e.g. the output of
    :func:`default_hparams`) are accepted and ignored.  Unknown settings are a TypeError naming them.
    Build the model on its device first: feedback weights are created beside its parameters.
    """
    if isinstance(name, str) and name.startswith("meta:"):
        raise ValueError(f"{name!r} is a meta-learning method: build it with lcp_meta.make_method(name, model, "
                         "loss_fn, **settings)")
    return build(name, model, kind="supervised", ignore=set(TRAINER_KEYS), **hparams)
