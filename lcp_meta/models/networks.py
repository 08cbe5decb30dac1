"""The supervised equilibrium networks of the LCP paper (spec section 3), cast as ``g``/``h`` systems.

- ``ff``: 784-256-256-10 tanh MLP.  State = stacked pre-activations of the hidden layers; the first block
  is the encoder's drive ``W1 x + b1``, block ``l+1`` is ``W_{l+1} s(v_l) + b_{l+1}``, ``h = D s(v_L) + d``.
  Being layered, ``g`` reaches its exact fixed point from 0 in ``L`` steps (one forward pass).
- ``rnn``: ``v = W s(v) + U x + b`` with 256 tanh units, ``h = D s(v) + d``.
- ``conv-ff``: conv 3->96 k5 (+ max-pool 3/2) as the encoder, then conv 96->128 k5 s2, conv 128->256 k5 s2,
  fc ->2048 ->2048 and the readout, ReLU; the same layered layout as ``ff`` (as in the official code).
- ``conv-rnn``: the single-layer convolutional DEQ of the "Deep Implicit Layers" tutorial,
  ``g(c, v) = GN3(relu(v + GN2(c + conv2(GN1(relu(conv1(v)))))))`` with the encoder ``c = BN(conv(x))`` and
  the decoder ``h = fc(flatten(avgpool(BN(v))))``.  Here the *state* goes through the convolutions, as in
  the tutorial.  (The public LCP code calls the layer as ``f(encoding, state)`` with the arguments swapped,
  so there the convolutions act on the input drive and the state only enters additively; that model is
  available as ``build_model("conv-rnn", variant="authors")``.)  Its state is post-normalisation, not a vector of pre-activations, so its VJPs are the
  generic autograd ones and LCP-LF / LCP-DI-KP are not defined for it (nor are they in the official code).

Initialisation follows the official code: PyTorch's default ``nn.Linear``/``nn.Conv2d`` init, and
``N(0, 0.01)`` for the two DEQ convolutions.  Every size is configurable so tests can use tiny versions.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.system import EquilibriumModel

__all__ = ["build_model", "MODEL_NAMES", "LayeredEquilibrium", "RecurrentEquilibrium", "ConvDEQ"]

MODEL_NAMES = ("ff", "rnn", "conv-ff", "conv-rnn")

_ACTS = ("tanh", "relu", "linear")


def _act(v: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "tanh":
        return torch.tanh(v)
    if kind == "relu":
        return torch.relu(v)
    return v


def _act_prime(v: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    """s'(v), reusing s = s(v) where that is cheaper (tanh' = 1 - s^2)."""
    if kind == "tanh":
        return 1 - s * s
    if kind == "relu":
        return (v > 0).to(v.dtype)
    return torch.ones_like(v)


def _check_act(activation: str) -> str:
    if activation not in _ACTS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {_ACTS}")
    return activation


class LayeredEquilibrium(EquilibriumModel):
    """A feedforward net written as an equilibrium system over the stacked hidden pre-activations.

    ``maps[i]`` (an ``nn.Linear`` on the flattened block or an ``nn.Conv2d`` on the block's image shape)
    takes ``s(block i)`` to ``block i+1``; block 0 is the encoder's output.  ``J_g^T e`` is computed in
    closed form: ``s'(v_i) * (W_i^T e_{i+1})`` (a transposed convolution for conv maps).
    """

    samples_independent = True  # its maps never mix samples (batch norm in training mode aside)

    def __init__(self, in_shape, num_classes: int, encoder: nn.Module, maps: Sequence[nn.Module],
                 readout: nn.Linear, activation: str):
        super().__init__()
        self.in_shape, self.num_classes = tuple(in_shape), int(num_classes)
        self.activation = _check_act(activation)
        self.encoder, self.maps, self.readout = encoder, nn.ModuleList(maps), readout
        with torch.no_grad():  # block shapes by a dry run (the sizes depend on in_shape)
            p = next(encoder.parameters())
            b = encoder(torch.zeros(1, *self.in_shape, dtype=p.dtype, device=p.device))
            shapes = [tuple(b.shape[1:])]
            for m in self.maps:
                b = self._apply_map(m, b.reshape(1, *shapes[-1]))
                shapes.append(tuple(b.shape[1:]))
        self.block_shapes = shapes
        self.block_sizes = [math.prod(s) for s in shapes]
        self.state_shape = (sum(self.block_sizes),)
        self.depth = len(shapes)  # g reaches the exact fixed point from 0 in this many steps
        if readout.in_features != self.block_sizes[-1]:
            raise ValueError(f"readout expects {readout.in_features} inputs, last block has {self.block_sizes[-1]}")

    @staticmethod
    def _apply_map(m: nn.Module, s: torch.Tensor) -> torch.Tensor:
        return m(s.flatten(1) if isinstance(m, nn.Linear) else s)

    def _blocks(self, t: torch.Tensor):
        return [b.reshape(t.shape[0], *sh) for b, sh in zip(t.split(self.block_sizes, 1), self.block_shapes)]

    def encode(self, x):
        b0 = self.encoder(x.reshape(x.shape[0], *self.in_shape)).flatten(1)
        return F.pad(b0, (0, self.state_shape[0] - b0.shape[1]))

    def _g_from_s(self, c, s_blocks):
        cb = c.split(self.block_sizes, 1)
        out = [cb[0]] + [self._apply_map(m, s).flatten(1) + ci for m, s, ci in zip(self.maps, s_blocks[:-1], cb[1:])]
        return torch.cat(out, 1)

    def g(self, c, v):
        return self._g_from_s(c, [_act(b, self.activation) for b in self._blocks(v)])

    def h(self, v, update_stats=False):
        last = v[:, v.shape[1] - self.block_sizes[-1]:]
        return self.readout(_act(last, self.activation))

    def act_derivative(self, v):
        return _act_prime(v, _act(v, self.activation), self.activation)

    # ---- layer-ordered sweeps: block l depends only on block l-1, so one pass solves each system exactly
    def logits(self, x, update_stats=False):
        """Plain forward pass ``x -> h(v*)`` (what BP differentiates): no stacked state, no padding."""
        b = self.encoder(x.reshape(x.shape[0], *self.in_shape))
        for m in self.maps:
            b = self._apply_map(m, _act(b, self.activation))
        return self.readout(_act(b, self.activation).flatten(1))

    def forward_sweep(self, c, e=None):
        """The exact solution of ``v = g(c, v) + e``, one layer after the other."""
        B, cb = c.shape[0], c.split(self.block_sizes, 1)
        eb = e.split(self.block_sizes, 1) if e is not None else None
        out = [cb[0] + eb[0] if eb else cb[0]]
        for i, m in enumerate(self.maps):
            s = _act(out[-1].reshape(B, *self.block_shapes[i]), self.activation)
            nxt = self._apply_map(m, s).flatten(1) + cb[i + 1]
            out.append(nxt + eb[i + 1] if eb else nxt)
        return torch.cat(out, 1)

    def backward_sweep(self, c, v, u, fb=None):
        """The exact solution of ``e = J_g(v)^T e + J_h(v)^T u``, from the readout down: ``e_L = s'(v_L) D^T u``,
        ``e_l = s'(v_l) W_l^T e_{l+1}`` (``J_g`` is strictly block-lower-triangular)."""
        vb = self._blocks(v)
        sp = [_act_prime(b, _act(b, self.activation), self.activation).flatten(1) for b in vb]
        M = self.readout.weight if not fb else fb["readout"].t()
        parts = [sp[-1] * (u @ M)]
        for i in reversed(range(len(self.maps))):
            parts.insert(0, sp[i] * self._transpose_map(i, parts[0], fb))
        return torch.cat(parts, 1)

    def encoder_parameters(self):
        return list(self.encoder.parameters())

    def feedback_pairs(self):
        pairs = {f"map{i}": (m.weight, isinstance(m, nn.Linear)) for i, m in enumerate(self.maps)}
        pairs["readout"] = (self.readout.weight, True)
        return pairs

    # ---- closed-form VJPs
    def _transpose_map(self, i: int, e_next: torch.Tensor, fb) -> torch.Tensor:
        """``W_i^T e_{i+1}`` (or with the learned feedback weight in place of ``W_i^T``)."""
        m = self.maps[i]
        B = e_next.shape[0]
        if isinstance(m, nn.Linear):
            M = m.weight if not fb else fb[f"map{i}"].t()
            return e_next.flatten(1) @ M
        weight = m.weight if not fb else fb[f"map{i}"]
        return torch.nn.grad.conv2d_input((B, *self.block_shapes[i]), weight, e_next.reshape(B, *self.block_shapes[i + 1]),
                                          stride=m.stride, padding=m.padding, dilation=m.dilation,
                                          groups=m.groups).flatten(1)

    def _jg(self, sp_blocks, e, fb):
        eb = e.split(self.block_sizes, 1)
        parts = [sp.flatten(1) * self._transpose_map(i, eb[i + 1], fb) for i, sp in enumerate(sp_blocks[:-1])]
        return torch.cat(parts + [torch.zeros_like(eb[-1])], 1)

    def _jh(self, sp_blocks, u, fb):
        M = self.readout.weight if not fb else fb["readout"].t()
        last = sp_blocks[-1].flatten(1) * (u @ M)
        return F.pad(last, (self.state_shape[0] - last.shape[1], 0))

    def step_terms(self, c, v, e, u, fb=None):
        vb = self._blocks(v)
        s = [_act(b, self.activation) for b in vb]
        sp = [_act_prime(b, sb, self.activation) for b, sb in zip(vb, s)]
        g = self._g_from_s(c, s)
        h = self.readout(s[-1].flatten(1))
        jg = None if e is None else self._jg(sp, e, fb)
        jh = None if u is None else self._jh(sp, u, fb)
        return g, h, jg, jh

    def g_vjp(self, c, v, e, fb=None):
        vb = self._blocks(v)
        return self._jg([_act_prime(b, _act(b, self.activation), self.activation) for b in vb], e, fb)

    def h_vjp(self, v, u, fb=None):
        vb = self._blocks(v)
        return self._jh([_act_prime(b, _act(b, self.activation), self.activation) for b in vb], u, fb)


class RecurrentEquilibrium(EquilibriumModel):
    """Fully recurrent net ``v = W s(v) + U x + b`` (``c = U x + b``), readout ``h = D s(v) + d``.

    The LCP update is the local rule ``dW ∝ e* s(v*)^T``, ``dU ∝ e* x^T``, ``dD ∝ u* s(v*)^T``."""

    accepts_flat = True
    samples_independent = True  # its maps never mix samples (batch norm in training mode aside)

    def __init__(self, in_shape, num_classes: int, hidden: int = 256, activation: str = "tanh",
                 recurrent_bias: bool = False):
        super().__init__()
        self.in_shape, self.num_classes = tuple(in_shape), int(num_classes)
        self.activation = _check_act(activation)
        self.U = nn.Linear(math.prod(self.in_shape), hidden)  # its bias is b
        # the authors' recurrent layer has a bias of its own (functionally redundant with b, but it has its own
        # init, its own Adam statistics and is decayed by KP with the implicit module): recurrent_bias=True
        self.W = nn.Linear(hidden, hidden, bias=bool(recurrent_bias))
        self.readout = nn.Linear(hidden, num_classes)
        self.state_shape = (hidden,)
        self.depth = 0

    def encode(self, x):
        return self.U(x.reshape(x.shape[0], -1))

    def g(self, c, v):
        return self.W(_act(v, self.activation)) + c

    def h(self, v, update_stats=False):
        return self.readout(_act(v, self.activation))

    def act_derivative(self, v):
        return _act_prime(v, _act(v, self.activation), self.activation)

    def feedback_pairs(self):
        return {"W": (self.W.weight, True), "readout": (self.readout.weight, True)}

    def encoder_parameters(self):
        return list(self.U.parameters())

    def step_terms(self, c, v, e, u, fb=None):
        s = _act(v, self.activation)
        sp = _act_prime(v, s, self.activation)
        g = s @ self.W.weight.t() + c
        if self.W.bias is not None:
            g = g + self.W.bias
        h = self.readout(s)
        jg = None if e is None else sp * (e @ (self.W.weight if not fb else fb["W"].t()))
        jh = None if u is None else sp * (u @ (self.readout.weight if not fb else fb["readout"].t()))
        return g, h, jg, jh

    def g_vjp(self, c, v, e, fb=None):
        return self.step_terms(c, v, e, None, fb)[2]

    def h_vjp(self, v, u, fb=None):
        return self.step_terms(torch.zeros_like(v), v, None, u, fb)[3]

    def controlled_terms(self, c, v, e, u, fb=None):
        """``(g(c, v) + e, J_g(v)^T e + J_h(v)^T u, h(v))``: the terms of one step of LCP-DI's reduced map, in as
        few torch ops as possible (two fused matrix products for ``g + e`` and ``J^T (e, u)``), because the
        iteration of the last few unsettled samples costs per op, not per number (``step_terms`` gives the
        same four terms separately)."""
        s = _act(v, self.activation)
        sp = _act_prime(v, s, self.activation)
        ce = c + e if self.W.bias is None else c + e + self.W.bias
        M, N = self._feedback(fb)
        return torch.addmm(ce, s, self.W.weight.t()), sp * torch.addmm(u @ N, e, M), self.readout(s)

    def _feedback(self, fb):
        """``(M, N)``: the matrices of ``J_g^T e = s' (e M)`` and ``J_h^T u = s' (u N)`` (``W``, ``D``; KP: ``B^T``)."""
        return (self.W.weight if not fb else fb["W"].t()), (self.readout.weight if not fb else fb["readout"].t())

    def fixed_point_residual(self, c, v, u, fb=None):
        """LCP-DI's fixed-point equation in ``v`` for a given output control ``u``, and ``h(v)``:
        ``r_v = e - J_g(v)^T e - J_h(v)^T u`` with ``e = v - g(c, v)`` (per-sample Newton, supervised/newton.py;
        in few ops: Newton's steps on a few samples cost per op)."""
        s = _act(v, self.activation)
        sp = _act_prime(v, s, self.activation)
        M, N = self._feedback(fb)
        e = v - torch.addmm(c if self.W.bias is None else c + self.W.bias, s, self.W.weight.t())
        return e - sp * torch.addmm(u @ N, e, M), self.readout(s)

    def fixed_point_jacobian(self, c, v, u, fb=None, cache=None):
        """The Jacobians of :meth:`fixed_point_residual` in closed form, per sample: ``d r_v / d v`` (B, n, n),
        ``d r_v / d u`` (B, n, K) and ``d h / d v`` (B, K, n).  With ``S = diag(s')``, ``q = M e + N u``::

            d r_v / d v = (I - S M^T)(I - W S) - diag(s'' q) = I - W S - S M^T + S (M^T W) S - diag(s'' q)
            d r_v / d u = -S N^T,     d h / d v = D S

        ``M^T W`` is formed once per ``cache`` (a dict the caller keeps while the parameters stay), so a Jacobian
        costs elementwise operations on n x n matrices, not an n^3 product per sample (~0.6 ms by the product vs
        ~8 ms by forward mode for the MNIST rnn on one CPU thread; the Jacobian is what Newton's cost is)."""
        W, D = self.W.weight, self.readout.weight
        M, N = self._feedback(fb)
        s = _act(v, self.activation)
        sp = _act_prime(v, s, self.activation)
        cache = {} if cache is None else cache
        if "mtw" not in cache:
            cache["mtw"] = M.t() @ W
        e = v - torch.addmm(c if self.W.bias is None else c + self.W.bias, s, W.t())
        spc = sp[:, :, None]
        jvv = spc * (cache["mtw"] * sp[:, None, :] - M.t()) - W * sp[:, None, :]  # S M^T W S - S M^T - W S
        spp = -2 * s * sp if self.activation == "tanh" else torch.zeros_like(s)  # s'' (0 a.e. for relu, linear)
        jvv.diagonal(dim1=1, dim2=2).add_(1 - spp * torch.addmm(u @ N, e, M))  # + I - diag(s'' q)
        return jvv, -(spc * N.t()), D * sp[:, None, :]


def _batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, update: bool) -> torch.Tensor:
    """Batch norm that, in training mode, uses the batch statistics *without* moving the running ones
    unless ``update`` (the dynamics evaluate ``h`` hundreds of times per batch; the statistics are
    updated once, at the equilibrium)."""
    if bn.training and not update:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return bn(x)


class ConvDEQ(EquilibriumModel):
    """The single-layer convolutional DEQ.  ``variant``:

    - ``"tutorial"`` (default): the tutorial's layer, the state goes through the convolutions,
      ``g(c, v) = GN3(relu(v + GN2(c + conv2(GN1(relu(conv1(v)))))))``;
    - ``"authors"``: the layer as the public LCP code calls it (input and state swapped), the convolutions act
      on the input drive and the state enters only additively,
      ``g(c, v) = GN3(relu(c + GN2(v + conv2(GN1(relu(conv1(c)))))))``.  Its published settings (alpha 1,
      k_i 0.3, lr 0.05) were tuned for this model.
    """

    VARIANTS = ("tutorial", "authors")
    samples_independent = True  # its maps never mix samples (batch norm in training mode aside)

    def __init__(self, in_shape, num_classes: int, channels: int = 48, inner: int = 64, groups: int = 8,
                 kernel: int = 3, pool: int = 8, variant: str = "tutorial"):
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown conv-rnn variant {variant!r}; expected one of {self.VARIANTS}")
        self.variant = variant
        self.in_shape, self.num_classes = tuple(in_shape), int(num_classes)
        if len(self.in_shape) != 3:
            raise ValueError(f"conv-rnn needs an image in_shape (C, H, W), got {self.in_shape}")
        if channels % groups or inner % groups:
            raise ValueError(f"channels ({channels}) and inner ({inner}) must be divisible by groups ({groups})")
        C, H, W = self.in_shape
        if H % pool or W % pool:
            raise ValueError(f"image size {H}x{W} must be divisible by the pool size {pool}")
        self.enc_conv = nn.Conv2d(C, channels, 3, padding=1, bias=True)
        self.enc_bn = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, inner, kernel, padding=kernel // 2, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, kernel, padding=kernel // 2, bias=False)
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(groups, inner), nn.GroupNorm(groups, channels),
                                              nn.GroupNorm(groups, channels))
        with torch.no_grad():  # the tutorial's small init keeps g contractive at the start
            self.conv1.weight.normal_(0, 0.01)
            self.conv2.weight.normal_(0, 0.01)
        self.dec_bn = nn.BatchNorm2d(channels)
        self.pool = pool
        self.readout = nn.Linear(channels * (H // pool) * (W // pool), num_classes)
        self.state_shape = (channels, H, W)
        self.depth = 0

    def encode(self, x):
        return self.enc_bn(self.enc_conv(x))

    def g(self, c, v):
        if self.variant == "authors":  # their forward(z=encoding, x=state): the state only enters additively
            y = self.norm1(torch.relu(self.conv1(c)))
            return self.norm3(torch.relu(c + self.norm2(v + self.conv2(y))))
        y = self.norm1(torch.relu(self.conv1(v)))
        return self.norm3(torch.relu(v + self.norm2(c + self.conv2(y))))

    def encoder_parameters(self):
        return list(self.enc_conv.parameters()) + list(self.enc_bn.parameters())

    def h(self, v, update_stats=False):
        z = F.avg_pool2d(_batch_norm(self.dec_bn, v, update_stats), self.pool)
        return self.readout(z.flatten(1))


def build_model(name: str, in_shape: Tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                **overrides) -> EquilibriumModel:
    """Build one of :data:`MODEL_NAMES` with the spec's sizes, or smaller ones through ``overrides``.

    ff: ``hidden=(256, 256)``, ``activation='tanh'``; rnn: ``hidden=256``, ``activation='tanh'``,
    ``recurrent_bias=False`` (True: the authors' second bias in the recurrent layer);
    conv-ff: ``channels=(96, 128, 256)``, ``fc=(2048, 2048)``, ``activation='relu'``;
    conv-rnn: ``channels=48``, ``inner=64``, ``groups=8``, ``kernel=3``, ``pool=8``, ``variant='tutorial'``
    (``'authors'``: the public LCP code's layer, state only additive; see :class:`ConvDEQ`).
    ``in_shape`` is (C, H, W), e.g. (1, 28, 28) for MNIST or (3, 32, 32) for CIFAR-10.
    """
    allowed = {"ff": {"hidden", "activation"}, "rnn": {"hidden", "activation", "recurrent_bias"},
               "conv-ff": {"channels", "fc", "activation"},
               "conv-rnn": {"channels", "inner", "groups", "kernel", "pool", "variant"}}
    if name not in allowed:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    unknown = set(overrides) - allowed[name]
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for model {name!r}; allowed: {sorted(allowed[name])}")
    in_shape = tuple(int(s) for s in in_shape)
    if not in_shape or any(s <= 0 for s in in_shape) or int(num_classes) < 1:
        raise ValueError(f"expected a positive in_shape like (1, 28, 28) and num_classes >= 1, "
                         f"got {in_shape} and {num_classes}")
    if name == "ff":
        hidden = overrides.get("hidden", (256, 256))
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not hidden:
            raise ValueError("ff needs at least one hidden layer")
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), hidden[0]))
        maps = [nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:])]
        model = LayeredEquilibrium(in_shape, num_classes, encoder, maps, nn.Linear(hidden[-1], num_classes),
                                   overrides.get("activation", "tanh"))
        model.accepts_flat = True
        return model
    if name == "rnn":
        return RecurrentEquilibrium(in_shape, num_classes, int(overrides.get("hidden", 256)),
                                    overrides.get("activation", "tanh"), overrides.get("recurrent_bias", False))
    if name == "conv-ff":
        if len(in_shape) != 3:
            raise ValueError(f"conv-ff needs an image in_shape (C, H, W), got {in_shape}")
        c1, c2, c3 = overrides.get("channels", (96, 128, 256))
        fc = tuple(overrides.get("fc", (2048, 2048)))
        encoder = nn.Sequential(nn.Conv2d(in_shape[0], c1, 5, padding=2), nn.MaxPool2d(3, stride=2))
        with torch.no_grad():
            hw = nn.Sequential(encoder, nn.Conv2d(c1, c2, 5, 2, 1), nn.Conv2d(c2, c3, 5, 2, 1))(
                torch.zeros(1, *in_shape)).shape[2:]
        if min(hw) < 1:
            raise ValueError(f"input {in_shape} is too small for conv-ff")
        maps = [nn.Conv2d(c1, c2, 5, stride=2, padding=1), nn.Conv2d(c2, c3, 5, stride=2, padding=1)]
        widths = (c3 * hw[0] * hw[1],) + fc
        maps += [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
        return LayeredEquilibrium(in_shape, num_classes, encoder, maps, nn.Linear(widths[-1], num_classes),
                                  overrides.get("activation", "relu"))
    return ConvDEQ(in_shape, num_classes, **overrides)
