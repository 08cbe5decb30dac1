"""Controllers of the least-control principle, registered by name and shared by both systems.

A controller adds a control ``psi`` to a system's free dynamics, ``dz/dt = f(z) + psi``, and steers the
output ``y = h(z)`` to where the loss ``L`` is stationary with as little control as possible (spec sections
1, 2 and 4).  lcp_meta has two systems; both expose the same four terms at a state ``z``
(:meth:`terms`, a :class:`Terms`), and every controller is written against those terms only:

    system                                state z    f(z)                              J_f(z)^T e              h(z)
    network  (core.system.NetworkSystem)  hidden v   g(c, v) - v                       J_g(v)^T e - e          decoder
    inner    (meta.inner_problem)         phi        -grad l_in - lam (phi - omega)    -(Hess l_in + lam) e    phi

So ONE dynamic-inversion controller (:class:`DI`) drives both: its field ``(f + e, J_f^T e + J_h^T u)`` is
the same function of the terms whether ``J_f^T`` is a closed-form transposed weight product or a
Hessian-vector product.  What differs between the systems is how the equilibrium of that field is
reached fastest (structured sweeps for layered nets, relaxation then conjugate gradients for the inner
problem), so a controller reaches it through a *driver* registered per system kind
(:meth:`Controller.drives`); :meth:`Controller.equilibrium` dispatches on ``system.kind``.

Adding a controller is one class and one decorator (see docs/architecture.md)::

    @register_controller("my-controller")
    class Mine(Controller):
        def equilibrium(self, method, system, batch): ...   # or register drivers per system kind

States and controls are trees (a tensor, or a dict name -> tensor); the arithmetic is mapped leaf by leaf.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Type

import torch

from .tree import tree_dot, tree_map

__all__ = ["Terms", "Controller", "CONTROLLERS", "register_controller", "make_controller", "OutputController",
           "OutputGain", "DI", "KP", "LF", "Direct", "Leaky", "EBD"]


class Terms(NamedTuple):
    """A system's terms at a state: free force ``f``, output ``h``, ``J_f^T e`` and ``J_h^T u`` (None when
    the control they act on was not given)."""

    f: Any
    h: Any
    jf: Any = None
    jh: Any = None


CONTROLLERS: Dict[str, Type["Controller"]] = {}


def register_controller(name: str):
    """Class decorator: make the controller class available as ``name`` (``LCP(controller=name)``)."""

    def deco(cls):
        cls.name = name
        CONTROLLERS[name] = cls
        return cls

    return deco


def make_controller(name: str, **settings) -> "Controller":
    if name not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; expected one of {sorted(CONTROLLERS)}")
    return CONTROLLERS[name](**settings)


def _map(fn, *trees):
    """``fn`` leaf by leaf; a plain tensor directly (the network's hot loop: no pytree walk per step)."""
    return fn(*trees) if isinstance(trees[0], torch.Tensor) else tree_map(fn, *trees)


def _add(a, b, gain: float = 1.0):
    if gain == 1.0:
        return _map(torch.add, a, b)
    return _map(lambda x, y: x + gain * y, a, b)


class Controller:
    """The interface: ``equilibrium(method, system, batch)`` returns the controlled equilibrium in the form
    the calling method asks of its system kind (inner problem: ``(phi, u, SolverStats, residuals or None)``
    with ``u = psi / beta``).  The default runs the driver registered for ``system.kind``."""

    name = "controller"
    _drivers: Dict[str, Callable] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._drivers = {}  # drivers are not inherited: KP is not DI on a system without feedback weights

    def __init__(self, **settings):
        self.settings = settings

    @classmethod
    def drives(cls, kind: str):
        """Decorator registering ``fn(controller, method, system, batch)`` as this class's driver on systems of
        ``kind``."""

        def deco(fn):
            cls._drivers[kind] = fn
            return fn

        return deco

    @classmethod
    def can_drive(cls, kind: str) -> bool:
        """A driver for ``kind`` is registered, or the class reaches its equilibrium itself."""
        return kind in cls._drivers or cls.equilibrium is not Controller.equilibrium

    @staticmethod
    def drive(f, e, gain: float = 1.0):
        """``dz/dt = f + gain e``: the controlled dynamics of every controller, the control ``e`` fed into the
        state (the inner problem stores ``u = psi / beta`` and feeds ``beta u``)."""
        return _add(f, e, gain)

    def equilibrium(self, method, system, batch):
        driver = self._drivers.get(system.kind)
        if driver is None:
            raise ValueError(f"controller {self.name!r} does not drive the {system.kind} system; it drives: "
                             f"{', '.join(sorted(self._drivers)) or 'nothing yet'}")
        return driver(self, method, system, batch)


# ------------------------------------------------------------------------------------- output controller
class OutputController:
    """Leaky integral plus proportional control of the output error (spec section 2):
    ``u = k_i u_I - k_p grad L(y)``, ``du_I/dt = -grad L(y) - alpha u_I``.  At its equilibrium
    ``u* = -beta grad L(y*)`` with ``beta = k_i / alpha + k_p`` (``alpha = 0``: exact control, beta = inf).
    The meta side's leaky direct controller is this one with ``k_i = alpha = 1``, ``k_p = 0``."""

    def __init__(self, k_i: float = 1.0, k_p: float = 0.0, alpha: float = 0.1):
        self.k_i, self.k_p, self.alpha = float(k_i), float(k_p), float(alpha)

    @property
    def beta(self) -> float:
        return math.inf if self.alpha == 0 else self.k_i / self.alpha + self.k_p

    def u(self, u_i, grad_l):
        """The control on the output units."""
        if self.k_p:
            return _map(lambda a, g: self.k_i * a - self.k_p * g, u_i, grad_l)
        return _map(lambda a: self.k_i * a, u_i)

    def integrate(self, u_i, grad_l, dt):
        """One Euler step of the integral state."""
        return _map(lambda a, g: a + dt * (-g - self.alpha * a), u_i, grad_l)

    @staticmethod
    def output_step(y, h, u, dt):
        """One Euler step of the controlled output units ``dy/dt = h(z) - y + u``."""
        return y + dt * (h - y + u)


class OutputGain:
    """A method attribute (``k_i``, ``k_p``, ``alpha``) that IS its output controller's: one copy of each gain,
    so that changing it on the method (e.g. the distributed shard rule scaling the gains) changes the dynamics."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj.output, self.name)

    def __set__(self, obj, value):
        setattr(obj.output, self.name, float(value))


# ----------------------------------------------------------------------------------------- controllers
@register_controller("di")
class DI(Controller):
    """Dynamic inversion (exact): a control circuit that inverts the Jacobian as it runs,
    ``dz/dt = f(z) + gain e``, ``de/dt = J_f(z)^T e + J_h(z)^T u``.  At its equilibrium
    ``J_f^T e* = -J_h^T u*``: the stationarity of the least-control problem (spec section 1)."""

    @staticmethod
    def inversion(t: Terms):
        """``de/dt = J_f^T e + J_h^T u`` from terms taken at ``(z, e, u)``."""
        return _add(t.jf, t.jh)

    @classmethod
    def field(cls, t: Terms, e, gain: float = 1.0):
        """``(dz/dt, de/dt)`` from the terms at ``(z, e, u)``."""
        return cls.drive(t.f, e, gain), cls.inversion(t)


@register_controller("kp")
class KP(DI):
    """DI with Kolen-Pollack feedback weights: the same field, with the transposed forward weights in
    ``J^T`` replaced by learned feedback weights (the network system's ``fb``)."""


@register_controller("lf")
class LF(Controller):
    """Linear feedback (approximate): the control on the state is a fixed linear map of the output control,
    ``e = Q u`` (LCP-LF learns Q in a noisy phase); ``dz/dt = f(z) + Q u``."""

    @staticmethod
    def feedback(u: torch.Tensor, Q: Optional[torch.Tensor] = None):
        """``e = Q u`` (batch first: ``u Q^T``); ``Q = None`` is the identity."""
        return u if Q is None else u @ Q.t()


@register_controller("direct")
class Direct(LF):
    """Direct (first-order) control: ``e = u = -beta grad L(y)`` fed straight into the state, i.e. LF with
    ``Q = I``; exact only when ``J_f`` is proportional to the identity.  On the inner problem (``h`` the
    identity) its equilibrium solves ``grad l_in + lam (phi - omega) + beta grad l_out = 0``."""


@register_controller("leaky")
class Leaky(Direct):
    """Direct control through the leaky integral :class:`OutputController` (``k_i = alpha = 1``): the same
    equilibrium, smoother dynamics."""

    output = OutputController(k_i=1.0, k_p=0.0, alpha=1.0)


@register_controller("ebd")
class EBD(Controller):
    """Energy-based: minimise ``E = 1/2 |f(z)|^2 + 1/2 |y - h(z)|^2 + beta L(y)`` over the states; at the
    minimiser ``psi* = -f``.  Its gradient in ``z`` is minus the DI field's control part evaluated at
    ``e = -f``, ``u = y - h`` (so no autograd graph is needed where the system has closed-form terms)."""

    @staticmethod
    def energy(f, beta: float, loss: torch.Tensor, out_err=None) -> torch.Tensor:
        """``E = 1/2 |f|^2 + 1/2 |y - h|^2 + beta L(y)`` from ``f``, ``out_err = y - h`` (None where the output
        map is the identity, as on the inner problem) and the loss value ``L(y)``."""
        e = 0.5 * tree_dot(f, f)
        if out_err is not None:
            e = e + 0.5 * tree_dot(out_err, out_err)
        return e + beta * loss

    @staticmethod
    def state_grad(t: Terms):
        """``dE/dz = -(J_f^T e + J_h^T u)`` from terms taken at ``e = -f``, ``u = y - h``."""
        return _map(lambda a, b: -(a + b), t.jf, t.jh)
