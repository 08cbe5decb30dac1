"""The one registry of learning methods, supervised and meta-learning alike.

Every method is registered once, under its kind and its name: ``("meta", "lcp")``, ``("supervised", "lcp-di")``.
The unambiguous name is the qualified one, ``"meta:lcp-ebd"`` or ``"supervised:lcp-ebd"`` (the two sides each
have an energy-based LCP, and they are different methods).  A bare name is looked up within one kind: the
meta-learning entry points (:func:`lcp_meta.make_method`, :func:`lcp_meta.meta.make_method`) default to
``"meta"``, :func:`lcp_meta.supervised.make_method` to ``"supervised"``.

Adding a method is one class and one call::

    register_method("meta", "my-method", MyMethod)                  # then make_method("my-method", ...)
    register_method("meta", "lcp-direct", LCP, controller="direct")  # a class with fixed settings
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

__all__ = ["MethodSpec", "KINDS", "register_method", "method_info", "method_names", "method_kwargs", "build"]

KINDS = ("meta", "supervised")
# the positional arguments every constructor of a kind takes before its settings
_POSITIONAL = {"meta": ("self", "model", "loss_fn"), "supervised": ("self", "model")}


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: ``cls(model, ...)`` with ``fixed`` settings it always gets."""

    kind: str
    name: str
    cls: type
    fixed: Dict[str, Any] = field(default_factory=dict)

    @property
    def qualified(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def proximal(self) -> bool:
        """Meta-learning: whether the inner problem has the proximal term lam/2 |phi - omega|^2 by default
        (the equilibrium methods; MAML, FOMAML and Reptile default to lam = 0)."""
        return bool(getattr(self.cls, "proximal", False))

    def kwargs(self) -> Tuple[str, ...]:
        """The settings the method accepts, by keyword (besides the model and, for meta-learning, loss_fn)."""
        keys = []
        for klass in self.cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object or klass.__module__.split(".")[0] == "torch":
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _POSITIONAL[self.kind] \
                        and p.name not in keys:
                    keys.append(p.name)
        return tuple(keys)


_REGISTRY: Dict[Tuple[str, str], MethodSpec] = {}


def register_method(kind: str, name: str, cls: type, **fixed) -> MethodSpec:
    """Register ``cls`` as method ``name`` of ``kind`` ("meta" or "supervised"); ``fixed``: settings it is
    always built with (a user who passes a different value gets a ValueError)."""
    if kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r}; expected one of {KINDS}")
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a method name must be a non-empty string without ':', got {name!r}")
    spec = MethodSpec(kind, name, cls, dict(fixed))
    _REGISTRY[(kind, name)] = spec
    return spec


def _load(kind: str) -> None:
    """Import the package that registers the methods of ``kind`` (registration happens at import)."""
    importlib.import_module(f"lcp_meta.{kind}")


def method_names(kind: str = "meta", qualified: bool = False) -> Tuple[str, ...]:
    """Registered names of ``kind`` (``None``: every kind, qualified), in registration order."""
    kinds = KINDS if kind is None else (kind,)
    for k in kinds:
        _load(k)
    return tuple(s.qualified if (qualified or kind is None) else s.name
                 for s in _REGISTRY.values() if s.kind in kinds)


def method_info(name: str, kind: str = "meta") -> MethodSpec:
    """The :class:`MethodSpec` of ``name``: qualified (``"supervised:lcp-ebd"``) or bare within ``kind``."""
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string, got {type(name).__name__}")
    if ":" in name:
        kind, name = name.split(":", 1)
        if kind not in KINDS:
            raise ValueError(f"unknown method kind {kind!r} in the method name; expected one of {KINDS}")
    _load(kind)
    spec = _REGISTRY.get((kind, name))
    if spec is None:
        what = f"meta-learning method {name!r}" if kind == "meta" else f"method {name!r} (supervised)"
        raise ValueError(f"unknown {what}; expected one of {method_names(kind)}")
    return spec


def method_kwargs(name: str, kind: str = "meta") -> Tuple[str, ...]:
    """The keyword settings the named method accepts."""
    return method_info(name, kind).kwargs()


def build(name: str, model, *args, kind: str = "meta", ignore: Optional[set] = None, **kwargs):
    """Build the named method: ``cls(model, *args, **fixed, **kwargs)``.

    Keyword arguments the method does not take are a TypeError that lists the ones it does (``ignore``:
    names dropped silently, e.g. trainer settings); a fixed setting given with another value is a ValueError.
    """
    spec = method_info(name, kind)
    if ignore:
        kwargs = {k: v for k, v in kwargs.items() if k not in ignore}
    allowed = spec.kwargs()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"method {spec.name!r} got unknown setting(s) {unknown} (unexpected keyword argument); "
                        f"it accepts {sorted(allowed)}")
    for k, v in spec.fixed.items():
        if k in kwargs and kwargs[k] != v:
            raise ValueError(f"method {spec.name!r} fixes {k}={v!r}; got {k}={kwargs[k]!r}")
        kwargs.setdefault(k, v)
    return spec.cls(model, *args, **kwargs)
