"""LRP rules as custom autograd functions ("modified gradient x input").

Relevance travels backwards as the "gradient" (zennit's convention): the backward of a
rule function receives the relevance R at the layer output and returns the relevance of
the layer input. Definitions are identical to zennit 0.5.1's rules (including which
parameter modifiers touch the bias), but computed with fewer operations than zennit's one
forward per rule term. The algebra: with x+ / x- and w+ / w- the positive / negative
parts, z = w x and A = |w| |x|,

    P := w+ x+ + w- x- = (z + A) / 2        N := w+ x- + w- x+ = (z - A) / 2

and Gamma, ZBox and (where it is accurate) z+ / alpha-beta reduce to
``x * W^T u + |x| * |W|^T v`` for suitable u, v: at most two forward and two transposed
operations (see `relevance_backward`). z+ and alpha-beta need P and N to full relative
precision even when they are tiny next to A, which (z +- A) / 2 cannot give in float32;
they sum P and N term by term unless both keep a margin that bounds the fused error
(`_plus_minus_backward`).

Use from other engines (e.g. the ViT engine), with parameters that need no gradient::

    from pxopt.lrp.rules import lrp_linear, lrp_conv2d
    from pxopt.lrp.config import RuleSpec
    rule = RuleSpec.from_dict({"rule": "gamma", "gamma": 0.25})
    y = lrp_linear(x, layer.weight, layer.bias, rule, recorder=lambda r: store(r))
    # y == F.linear(x, weight, bias); the backward of y applies the rule.
    # `recorder` (optional) is called in the backward with R at the output (same shape as y).

`lrp_layer_norm(x, fn, weight, dim, norm_eps)` a LayerNorm under AttnLRP's rule (std held
constant), `lrp_pass(x, fn)` applies an element-wise function whose relevance passes unchanged
(Pass rule), `lrp_norm(fn, *xs)` a parameter-free linear map (sums, average pools) under
the Norm rule (R_i = x_i * d fn / d x_i * R / stab(fn(x))).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pxopt.errors import ConfigError
from pxopt.lrp import registry
from pxopt.lrp.config import STABILIZER, RuleSpec


def stabilize(z: Tensor, eps: float) -> Tensor:
    """z + eps * sign(z) with sign(0) = +1, also for -0.0 (zennit's `stabilize`, bit for bit).

    sign(sign(z) + 0.5) maps -1/0/+1 to -1/+1/+1 without comparisons or `where`, which
    are an order of magnitude slower on CPU.
    """
    s = z.sign().add_(0.5).sign_()
    return torch.add(z, s, alpha=eps, out=s)


def _div_stab(r: Tensor, d: Tensor, eps: float) -> Tensor:
    """r / stab(d) with a single temporary."""
    e = stabilize(d, eps)
    return torch.div(r, e, out=e)


def _axpy_(y: Tensor, x: Tensor, k: Tensor | float) -> Tensor:
    """y += x * k in place, k a scalar or a broadcastable tensor."""
    return y.addcmul_(x, k) if isinstance(k, Tensor) else y.add_(x, alpha=k)


# ---------------------------------------------------------------------------------------
# Linear operators: how a weight acts forwards and transposed, per layer type
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearOp:
    """A linear map y = op(x, W) (bias excluded) and its transpose, for one layer type.

    `kind` is "linear" (channels last, any leading dims) or "conv2d" (NCHW). `same`: the
    conv pads its input like TensorFlow's "SAME" (timm's Conv2dSame: output size
    ceil(input / stride), the odd pixel of padding at the bottom / right) instead of
    `padding`; the padding is part of the linear map, so rules see the unpadded input
    (ZBox bounds and Flat's ones are padded with zeros, as zennit does via the forward).
    """

    kind: str = "linear"
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    same: bool = False

    def same_pads(self, x: Tensor, w: Tensor) -> list[int]:
        """F.pad amounts (left, right, top, bottom) of TensorFlow "SAME" padding."""
        tot = [max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
               for i, k, s, d in zip(x.shape[-2:], w.shape[-2:], self.stride, self.dilation,
                                     strict=True)]
        return [tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2]

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.same:
            x = F.pad(x, self.same_pads(x, w))
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def transpose(self, w: Tensor, g: Tensor, x: Tensor) -> Tensor:
        """W^T g shaped like the layer input x.

        For convs this is aten's convolution_backward (input gradient only) given the real
        input `x`: `torch.nn.grad.conv2d_input` passes an expanded dummy instead, which
        the kernels copy into a full tensor first.
        """
        if self.kind == "linear":
            return g.matmul(w)
        pads = self.same_pads(x, w) if self.same else None
        xp = F.pad(x, pads) if pads else x
        out = torch.ops.aten.convolution_backward(
            g, xp, w, None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.groups, (True, False, False),
        )[0]
        if pads:  # the padded border's share is dropped: those inputs are constant zeros
            out = out[..., pads[2]:out.shape[-2] - pads[3], pads[0]:out.shape[-1] - pads[1]]
        return out

    def bias(self, b: Tensor, ndim: int) -> Tensor:
        """Bias shaped to broadcast against an output of `ndim` dimensions."""
        if self.kind == "linear":
            return b
        return b.view(-1, *([1] * (ndim - 2)))

    def stack_signs(self, a: Tensor, b: Tensor) -> Tensor:
        """Two per-output-channel tensors (weights or biases) a, b stacked so that channel
        blocks stay in their groups: (groups, 2, n / groups) flattened into 2 n channels."""
        g = self.groups if self.kind == "conv2d" else 1
        return torch.stack([a.unflatten(0, (g, -1)), b.unflatten(0, (g, -1))], 1).flatten(0, 2)

    def split_signs(self, t: Tensor) -> Tensor:
        """A (batch, 2 n, ...) output of a `stack_signs` weight viewed with a sign axis of
        size 2: (batch, groups, 2, n / groups, ...) for convs, (..., 2, n) for linear."""
        if self.kind == "linear":
            return t.unflatten(-1, (2, -1))
        return t.unflatten(1, (self.groups, 2, -1))

    def stacked_shape(self, shape: Sequence[int]) -> list[int]:
        """The shape of an output of a `stack_signs` weight, given the layer's output shape."""
        out = list(shape)
        out[-1 if self.kind == "linear" else 1] *= 2
        return out

    def sign_part(self, t: Tensor, i: int) -> Tensor:
        """Sign block i (0 or 1) of a stacked output, shaped like `sign_axis` of an output."""
        return self.split_signs(t).narrow(-2 if self.kind == "linear" else 2, i, 1)

    def sign_axis(self, t: Tensor) -> Tensor:
        """A (batch, n, ...) output with a size-1 sign axis, to broadcast against
        `split_signs`."""
        if self.kind == "linear":
            return t.unsqueeze(-2)
        return t.unflatten(1, (self.groups, 1, -1))

    def channel_sum(self, r: Tensor) -> Tensor:
        """Per-component relevance (batch, n): sum over every dim but batch and channels."""
        if self.kind == "linear":
            return r.reshape(r.shape[0], -1, r.shape[-1]).sum(1) if r.ndim > 2 else r
        return r.sum(dim=tuple(range(2, r.ndim)))


def conv2d_op(stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
              weight_shape: Sequence[int] | None = None, *, same: bool = False) -> LinearOp:
    """A conv2d LinearOp; string padding ('valid'/'same') is turned into explicit ints.
    `same`: TensorFlow "SAME" padding computed per input (see LinearOp), on top of `padding`."""

    def pair(v: Any) -> tuple[int, int]:
        return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))

    dil = pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same" and weight_shape is not None:
            ks = weight_shape[2:]
            tot = [d * (k - 1) for d, k in zip(dil, ks, strict=True)]
            if any(t % 2 for t in tot):
                raise ConfigError("padding='same' with an even kernel is not supported by LRP")
            padding = (tot[0] // 2, tot[1] // 2)
        else:
            raise ConfigError(f"unsupported conv padding {padding!r}")
    return LinearOp("conv2d", pair(stride), pair(padding), dil, int(groups), same)


# ---------------------------------------------------------------------------------------
# A compiled rule for one layer
# ---------------------------------------------------------------------------------------
@dataclass
class LayerRule:
    """Everything the backward of one layer needs: rule, operator, parameters.

    The effective weight LRP sees is ``weight * out_scale`` (per output channel), so a
    following BatchNorm is merged without materialising a merged weight: `out_scale` is
    gamma / sqrt(var + eps) and `bias` the merged bias. `forward_fn(x)` computes the
    layer's true output (e.g. the original conv, then the original BatchNorm, so the
    model's forward output stays bit-identical); by default op(x, weight, bias).
    `recorder(R)` receives the relevance at the output in the backward.
    """

    rule: RuleSpec
    op: LinearOp
    weight: Tensor
    bias: Tensor | None = None
    out_scale: Tensor | None = None
    forward_fn: Callable[[Tensor], Tensor] | None = None
    recorder: Callable[[Tensor], None] | None = None
    name: str = ""
    _abs: Tensor | None = field(default=None, repr=False)
    _split: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if "layer" not in registry.get_rule(self.rule.name).sites:
            raise ConfigError(
                f"rule {self.rule.name!r} cannot be applied to the linear/conv layer "
                f"{self.name or '?'!r}; use one of {', '.join(registry.rules_for('layer'))}"
            )
        self.weight = self.weight.detach()
        self.bias = None if self.bias is None else self.bias.detach()
        if self.out_scale is not None:
            self.out_scale = self.out_scale.detach()
        if self.forward_fn is None and self.out_scale is not None:
            raise ConfigError("LayerRule: out_scale needs the layer's forward_fn")

    @property
    def abs_weight(self) -> Tensor:
        """|W|, computed once per installed layer (only rules that need it pay for it)."""
        if self._abs is None:
            self._abs = self.weight.abs()
        return self._abs

    def sign_weight(self, part: str) -> Tensor:
        """A sign part of the merged weight W_m = out_scale * W, computed once per installed
        layer (z+ and alpha-beta only): "+" W_m+, "-" W_m-, "+-" W_m+ and W_m- stacked per
        group of output channels (twice the output channels, in the order group, sign,
        channel, so one transposed convolution with the layer's groups sums W+^T a + W-^T c),
        "-+" the other order. Without groups, "+" and "-" are views of a cached "+-"."""
        if part not in self._split:
            n = self.weight.shape[0]
            if part in ("+", "-") and "+-" in self._split and self.op.groups == 1:
                self._split[part] = self._split["+-"][:n] if part == "+" else self._split["+-"][n:]
                return self._split[part]
            w = self.weight
            if self.out_scale is not None:
                w = w * self.out_scale.view(-1, *([1] * (w.ndim - 1)))
            if part == "+":
                self._split[part] = w.clamp(min=0)
            elif part == "-":
                self._split[part] = w.clamp(max=0)
            else:  # stacked parts are not kept separately (memory)
                pos, neg = w.clamp(min=0), w.clamp(max=0)
                self._split[part] = self.op.stack_signs(*((pos, neg) if part == "+-" else (neg, pos)))
        return self._split[part]

    def output(self, x: Tensor) -> Tensor:
        if self.forward_fn is not None:
            return self.forward_fn(x)
        return self.op.forward(x, self.weight, self.bias)

    def bound(self, key: str, x: Tensor) -> Tensor:
        """ZBox bound broadcast to the input (scalar or one value per input channel)."""
        value = self.rule[key]
        t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        if t.ndim == 1:
            t = t.view(-1, 1, 1) if self.op.kind == "conv2d" else t
        return t.expand_as(x)


class _Ops:
    """The four linear maps of the merged layer W_m = s * W (s per output channel):
    forward with W_m or |W_m| = |s| |W|, and their transposes."""

    def __init__(self, layer: LayerRule, x: Tensor, ndim: int) -> None:
        self.layer, self.x, op = layer, x, layer.op
        s = layer.out_scale
        self.s = None if s is None else op.bias(s, ndim)
        self._abs_s: Tensor | None = None

    @property
    def abs_s(self) -> Tensor | None:
        """|s|, computed only by the rules that use it (Epsilon does not)."""
        if self._abs_s is None and self.s is not None:
            self._abs_s = self.s.abs()
        return self._abs_s

    def fw(self, u: Tensor) -> Tensor:
        out = self.layer.op.forward(u, self.layer.weight)
        return out if self.s is None else out * self.s

    def fa(self, u: Tensor) -> Tensor:
        out = self.layer.op.forward(u, self.layer.abs_weight)
        return out if self.abs_s is None else out * self.abs_s

    def tw(self, g: Tensor) -> Tensor:
        g = g if self.s is None else g * self.s
        return self.layer.op.transpose(self.layer.weight, g, self.x)

    def ta(self, g: Tensor) -> Tensor:
        g = g if self.abs_s is None else g * self.abs_s
        return self.layer.op.transpose(self.layer.abs_weight, g, self.x)


#: The fused z+ / alpha-beta form is used only where each sign term holds at least this
#: fraction of |W||x| + |b| (see `_plus_minus_backward`).
FUSED_MARGIN = 1.0 / 64


def _plus_minus_backward(layer: LayerRule, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
    """Relevance of x under z+ or alpha-beta (zennit's definitions), stable in float32.

    With W+ / W- the positive / negative parts of the merged weight and x+ / x- those of x:

        P = W+ x+ + W- x-   (the positive contributions)     g0 = R / stab(P + b+)
        N = W+ x- + W- x+   (the negative contributions)     g2 = R / stab(N + b-)
        R_in = x+ (W+^T a + W-^T c) + x- (W-^T a + W+^T c),  a = alpha g0, c = -beta g2

    (z+ is alpha = 1, beta = 0). Two ways to compute it:

    - split (`_split_plus_minus`): P and N as written, sums of terms of one sign, so they
      keep full relative precision however small, and a neuron with P = 0 (N = 0) adds
      exactly nothing through W+ (W-), as in zennit. Convolutions (forward + transposed):
      z+ 1 + 1, alpha-beta 2 + 2 for x >= 0 (every layer after a ReLU); z+ 2 + 2,
      alpha-beta 4 + 4 for signed x.
    - fused (`_fused_plus_minus`): P, N = (z -+ b +- |W||x|) / 2 and the transposes by W
      and |W|: 1 + 2 convolutions for any x. Where P (or N) is tiny next to
      A = |W||x| + |b| (a neuron with relevance but (almost) no positive, or negative,
      contribution: residual-branch outputs, logits) it is the difference of two large
      numbers; its rounding error (~1e-7 A in float32) is divided by a ~1e-6 stabiliser
      and cancels again in the backward: 14-23 % error against zennit in float32 on one
      Linear layer. With both terms >= FUSED_MARGIN * A at every position that carries
      relevance, the error per neuron is at most ~c eps / FUSED_MARGIN of its relevance
      (c a few tens for the rounding of z, A and the transposes: ~1e-4 in float32,
      ~1e-13 in float64).

    x >= 0 takes the split form (cheaper than fused for z+, one more convolution for
    alpha-beta, and the case where lopsided neurons are common). Signed x (an image, a
    transformer's LayerNorm output) takes the fused form when the margin holds everywhere
    (typical: a sum of signed terms is rarely one-sided), and the split form otherwise.
    """
    signed = x.numel() > 0 and bool(x.amin() < 0)
    if signed:
        out = _fused_plus_minus(layer, x, z, r)
        if out is not None:
            return out
    return _split_plus_minus(layer, x, r, signed)


def _alpha_beta(rule: RuleSpec) -> tuple[float, float]:
    return (1.0, 0.0) if rule.name == "zplus" else (float(rule["alpha"]), float(rule["beta"]))


def _split_plus_minus(layer: LayerRule, x: Tensor, r: Tensor, signed: bool) -> Tensor:
    """z+ / alpha-beta with P and N summed term by term (see `_plus_minus_backward`)."""
    op, b = layer.op, layer.bias
    alpha, beta = _alpha_beta(layer.rule)
    xp, xn = (x.clamp(min=0), x.clamp(max=0)) if signed else (x, None)

    if not beta:  # z+ (alpha-beta with beta = 0 has alpha = 1): P only
        wp = layer.sign_weight("+")
        d = op.forward(xp, wp)
        if xn is not None:
            d.add_(op.forward(xn, layer.sign_weight("-")))
        # P + b+ >= 0, so zennit's stab(P + b+) is P + b+ + eps
        d.add_(STABILIZER if b is None else op.bias(b.clamp(min=0) + STABILIZER, d.ndim))
        g = torch.div(r, d, out=d)
        out = op.transpose(wp, g, x).mul_(xp)
        return out if xn is None else out.addcmul_(xn, op.transpose(layer.sign_weight("-"), g, x))

    # P and N by their own convolutions (one with [W+; W-] is slower on CPU for narrow layers);
    # the gradients go into one stacked tensor for a single transpose with [W+; W-]:
    # [W+; W-]^T [a; c] = W+^T a + W-^T c (and [W-; W+] for x-).
    w_stack = layer.sign_weight("+-")
    wp, wn = layer.sign_weight("+"), layer.sign_weight("-")
    g: Tensor | None = None
    for i, (w1, w2, k) in enumerate(((wp, wn, alpha), (wn, wp, -beta))):
        d = op.forward(xp, w1)
        if xn is not None:
            d.add_(op.forward(xn, w2))
        # stab(P + b+) = P + b+ + eps and stab(N + b-) = N + b- - eps by their signs (zennit
        # adds +eps at N + b- = 0, where every term that this quotient multiplies is 0)
        eps = STABILIZER if i == 0 else -STABILIZER
        if b is None:
            d.add_(eps)
        else:
            d.add_(op.bias((b.clamp(min=0) if i == 0 else b.clamp(max=0)) + eps, d.ndim))
        if g is None:
            g = d.new_empty(op.stacked_shape(d.shape))
        part = op.sign_part(g, i)
        torch.div(op.sign_axis(r), op.sign_axis(d), out=part)
        if k != 1.0:
            part.mul_(k)
    assert g is not None
    out = op.transpose(w_stack, g, x).mul_(xp)
    return out if xn is None else out.addcmul_(xn, op.transpose(layer.sign_weight("-+"), g, x))


def _fused_plus_minus(layer: LayerRule, x: Tensor, z: Tensor, r: Tensor) -> Tensor | None:
    """z+ / alpha-beta from z and |W||x| (see `_plus_minus_backward`); None where that
    would lose precision (a sign term under FUSED_MARGIN of |W||x| + |b| where R != 0)."""
    op, b = layer.op, layer.bias
    m = _Ops(layer, x, z.ndim)
    s = m.s
    bias = op.bias(b, z.ndim) if b is not None else None
    alpha, beta = _alpha_beta(layer.rule)

    def vec(k: float, absolute: bool = False) -> Tensor | float:
        """k * s (or k * |s|) shaped for the output, or plain k without a merged scale."""
        if s is None:
            return k
        return (m.abs_s if absolute else s) * k

    xa = x.abs()
    # z = W_m x + b, A = |W_m| |x|: P + b+ = (z + A + |b|) / 2, N + b- = (z - A - |b|) / 2
    h = op.forward(xa, layer.abs_weight).mul_(vec(0.5, True))  # A / 2
    if bias is not None:
        h.add_(bias.abs().mul_(0.5))  # (A + |b|) / 2
    zh = z * 0.5
    # margin: P + b+ >= 2 m (A + |b|) / 2 <=> z / 2 >= -(1 - 2 m) h, and N + b- likewise
    lim = h * (1.0 - 2.0 * FUSED_MARGIN)
    bad = (zh < -lim) if not beta else (zh.abs() > lim)
    if bool(bad.logical_and_(r != 0).any()):
        return None
    del lim, bad
    g0 = _div_stab(r, zh + h, STABILIZER)
    if not beta:  # z+: R = (x W^T g0 + |x| |W|^T g0) / 2
        u = g0 * vec(0.5)
        v = g0.mul_(vec(0.5, True))
    else:  # alpha-beta: u = (alpha g0 - beta g2) / 2, v = (alpha g0 + beta g2) / 2
        g2 = _div_stab(r, zh.sub_(h), STABILIZER)
        u = _axpy_(g0 * vec(0.5 * alpha), g2, vec(-0.5 * beta))
        v = _axpy_(g0.mul_(vec(0.5 * alpha, True)), g2, vec(0.5 * beta, True))
    out = op.transpose(layer.weight, u, x).mul_(x)  # s is inside u and v
    return out.addcmul_(xa, op.transpose(layer.abs_weight, v, x))


def relevance_backward(layer: LayerRule, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
    """Relevance of the input x of `layer`, given its output z (bias included) and R at z.

    Written with few passes and in-place updates of temporaries (elementwise work, not
    the convolutions, dominates on CPU); tests/test_lrp_rules.py states the same rules
    term by term (`_reference`) and checks both against zennit.
    """
    rule, op, b = layer.rule, layer.op, layer.bias
    name = rule.name
    m = _Ops(layer, x, z.ndim)
    bias = op.bias(b, z.ndim) if b is not None else None
    s = m.s

    def vec(k: float, absolute: bool = False) -> Tensor | float:
        """k * s (or k * |s|) shaped for the output, or plain k without a merged scale."""
        if s is None:
            return k
        return (m.abs_s if absolute else s) * k

    if name in ("epsilon", "norm"):
        eps = rule["epsilon"] if name == "epsilon" else STABILIZER
        g = _div_stab(r, z, eps)
        if s is not None:
            g.mul_(s)
        return op.transpose(layer.weight, g, x).mul_(x)

    if name in ("alphabeta", "zplus"):
        return _plus_minus_backward(layer, x, z, r)

    if name == "gamma":
        # z = W_m x + b; A = |W_m| |x|; P = (zn + A) / 2, N = (zn - A) / 2, zn = z - b
        xa = x.abs()
        a = op.forward(xa, layer.abs_weight)  # |W| |x|, times |s| below
        # zennit: g0 = [z > 0] R / stab(zn + gamma P + b + gamma b+),
        #         g2 = [z < 0] R / stab(zn + gamma N + b + gamma b-);
        # u = (1 + gamma/2)(g0 + g2), v = gamma/2 (g0 - g2). Only one of g0, g2 is
        # nonzero per position, so with sz = sign(z):
        # d = k1 z + c_mid + sz (k A + c_half),  g = R sz / stab(d) * sz.
        # Unlike z+ and alpha-beta this fused form is stable: for z > 0 (z < 0) both terms
        # of d have the sign of z, so d never cancels, and |d| >= |z|.
        gamma = rule["gamma"]
        k, k1 = 0.5 * gamma, 1.0 + 0.5 * gamma
        # With the bias: c_p = b + gamma b+ - k1 b and c_n = b + gamma b- - k1 b, so
        # (c_p + c_n) / 2 = 0 and (c_p - c_n) / 2 = k |b|: d = k1 z + k sz (A + |b|).
        sz = z.sign()
        ka = vec(k, True)  # k |s| (or k)
        if bias is not None:
            t = torch.addcmul(bias.abs().mul_(k), a, ka if s is not None else a.new_tensor(k))
        else:
            t = a.mul_(ka)
        t.mul_(sz).add_(z, alpha=k1)
        gs = _div_stab(r * sz, t, STABILIZER)  # g * sz
        v = gs * ka
        u = gs.mul_(sz).mul_(vec(k1))
        out = op.transpose(layer.weight, u, x).mul_(x)
        return out.addcmul_(xa, op.transpose(layer.abs_weight, v, x))

    if name == "zbox":
        # W+ = (W + |W|) / 2 and W- = (W - |W|) / 2 of the merged weight
        low, high = layer.bound("low", x), layer.bound("high", x)
        zn = z if bias is None else z - bias  # the bias cancels in zennit's ZBox
        # the bounds are the same for every sample: convolve one and broadcast
        fl_w, fl_a, fh_w, fh_a = m.fw(low[:1]), m.fa(low[:1]), m.fw(high[:1]), m.fa(high[:1])
        d = zn - 0.5 * (fl_w + fl_a) - 0.5 * (fh_w - fh_a)
        g = r / stabilize(d, STABILIZER)
        tw, ta = m.tw(g), m.ta(g)
        return x * tw - low * (0.5 * (tw + ta)) - high * (0.5 * (tw - ta))

    if name == "flat":  # all weights 1, bias 0 (zennit)
        ones = torch.ones_like(layer.weight)
        d = op.forward(torch.ones_like(x), ones)
        return op.transpose(ones, r / stabilize(d, STABILIZER), x)

    if name == "wsquare":  # weights and bias squared (zennit)
        w2 = layer.weight * layer.weight
        s2 = None if m.s is None else m.s * m.s
        d = op.forward(torch.ones_like(x), w2)
        d = d if s2 is None else d * s2
        if bias is not None:
            d = d + bias * bias
        g = r / stabilize(d, STABILIZER)
        return op.transpose(w2, g if s2 is None else g * s2, x)

    raise ConfigError(f"unknown layer rule {name!r}")  # pragma: no cover


def layer_backward(layer: LayerRule, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
    """Relevance of the input x of `layer`: the backward its rule registers
    (`pxopt.lrp.registry`), or the built-in kernel `relevance_backward`."""
    kernel = registry.get_rule(layer.rule.name).backward
    return (kernel or relevance_backward)(layer, x, z, r)


# ---------------------------------------------------------------------------------------
# Autograd functions
# ---------------------------------------------------------------------------------------
class LayerRuleFn(torch.autograd.Function):
    """y = layer(x) forwards; the layer's LRP rule backwards (no parameter gradients)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: LayerRule) -> Tensor:  # type: ignore[override]
        z = layer.output(x)
        ctx.layer = layer
        ctx.save_for_backward(x, z)
        return z

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        x, z = ctx.saved_tensors
        layer: LayerRule = ctx.layer
        if layer.recorder is not None:
            layer.recorder(r)
        if not ctx.needs_input_grad[0]:
            return None, None
        return layer_backward(layer, x, z, r), None


class PassFn(torch.autograd.Function):
    """Element-wise activation forwards; relevance passes through unchanged (Pass rule)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        return fn(x)

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return r, None


class NormSumFn(torch.autograd.Function):
    """a + b forwards (explicit residual sum); Norm rule R_a = a R / stab(a + b) backwards."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        out = a + b
        ctx.save_for_backward(a, b, out)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        a, b, out = ctx.saved_tensors
        g = _div_stab(r, out, ctx.eps)
        return a * g, b * g, None


class NormFn(torch.autograd.Function):
    """Parameter-free linear map (average pool, mean) under the Norm rule.

    R_in = x * J^T (R / stab(fn(x))), J the map's Jacobian (the vjp re-runs fn; cheap).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor], eps: float) -> Tensor:  # type: ignore[override]
        out = fn(x)
        ctx.save_for_backward(x, out)
        ctx.fn, ctx.eps = fn, eps
        return out

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x, out = ctx.saved_tensors
        g = _div_stab(r, out, ctx.eps)
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.fn(xd), xd, g)
        return x * gx, None, None


def _layer_norm_rstd(x: Tensor, dim: int, eps: float) -> Tensor:
    """1 / sqrt(var + eps) over `dim`, keepdim, from the fused LayerNorm kernel (several times
    faster than `var_mean` on CPU); a channel dim other than the last is moved there first."""
    last = dim % x.ndim == x.ndim - 1
    xl = x if last else x.movedim(dim, -1)
    rstd = torch.native_layer_norm(xl, xl.shape[-1:], None, None, eps)[2]
    return rstd if last else rstd.movedim(-1, dim)


class LayerNormFn(torch.autograd.Function):
    """LayerNorm forwards (the module's own forward, so outputs stay bit-identical); AttnLRP's
    LayerNorm treatment backwards (Achtibat et al., "AttnLRP", ICML 2024: the identity rule on
    the normalisation; implemented in lxt as `lxt.efficient.patches.layer_norm_forward`, which
    detaches the standard deviation; tests/test_family_convnext.py checks parity with it).

    With the normaliser 1/std held constant, y = w (x - mean x) / std + b is a linear map of
    x; its relevance follows the z-rule of that map, R_i = x_i sum_j J_ji R_j / stab(y_j):
    with h = w R / (std stab(y)), R_i = x_i (h_i - mean h) (J's centring is symmetric).
    sum_i R_i = sum_j (y_j - b_j) R_j / stab(y_j): conserved exactly for b = 0, eps -> 0.
    `dim` is the normalised dimension (-1 channels last, 1 for NCHW's LayerNorm2d).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor], weight: Tensor | None,  # type: ignore[override]
                dim: int, norm_eps: float, eps: float) -> Tensor:
        y = fn(x)
        ctx.save_for_backward(x, y, weight)
        ctx.dim, ctx.norm_eps, ctx.eps = dim, norm_eps, eps
        return y

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor, None, None, None, None, None]:  # type: ignore[override]
        x, y, weight = ctx.saved_tensors
        dim = ctx.dim
        h = _div_stab(r, y, ctx.eps).mul_(_layer_norm_rstd(x, dim, ctx.norm_eps))
        if weight is not None:
            h.mul_(weight.view(-1, *([1] * (x.ndim - 1 - (dim % x.ndim)))))
        h.sub_(h.mean(dim=dim, keepdim=True))
        return h.mul_(x), None, None, None, None, None


class GateFn(torch.autograd.Function):
    """x * s for a gate s broadcast over x (squeeze-excitation); the gate rule backwards.

    `share` is the fraction of the relevance R of the product that goes to the gate:
    0 is "signal-take-all" (Arras et al. 2017: the gate acts as a weight, R_x = R, the
    default), 0.5 is AttnLRP's uniform rule for a product of two inputs (Achtibat et al.
    2024, Prop. 3.3: R_x = R_s = R / 2; R_s summed over the dimensions s is broadcast along).
    Either way R_x + R_s = R: the product conserves relevance.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor, share: float) -> Tensor:  # type: ignore[override]
        ctx.share = share
        ctx.s_shape = s.shape
        return x * s

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        share = ctx.share
        rx = r if share == 0.0 else r * (1.0 - share)
        if share == 0.0 or not ctx.needs_input_grad[1]:
            return rx, None, None  # the gate branch gets nothing (not even a backward pass)
        rs = (r * share).sum_to_size(ctx.s_shape)
        return rx, rs, None


# Names of the autograd nodes these functions create (the engine's graph check allows them).
RULE_NODE_NAMES: set[str] = {
    f"{fn.__name__}Backward"
    for fn in (LayerRuleFn, PassFn, NormSumFn, NormFn, LayerNormFn, GateFn)
}


# ---------------------------------------------------------------------------------------
# Convenience entry points
# ---------------------------------------------------------------------------------------
def lrp_layer(x: Tensor, layer: LayerRule) -> Tensor:
    return LayerRuleFn.apply(x, layer)


def lrp_linear(x: Tensor, weight: Tensor, bias: Tensor | None, rule: RuleSpec | dict | str, *,
               recorder: Callable[[Tensor], None] | None = None, name: str = "") -> Tensor:
    """F.linear(x, weight, bias) whose backward applies `rule` (x may have leading dims)."""
    spec = RuleSpec.from_dict(rule)
    return LayerRuleFn.apply(x, LayerRule(spec, LinearOp("linear"), weight, bias,
                                          recorder=recorder, name=name))


def lrp_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, rule: RuleSpec | dict | str, *,
               stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
               recorder: Callable[[Tensor], None] | None = None, name: str = "") -> Tensor:
    """F.conv2d(x, weight, bias, ...) whose backward applies `rule`."""
    spec = RuleSpec.from_dict(rule)
    op = conv2d_op(stride, padding, dilation, groups, weight.shape)
    return LayerRuleFn.apply(x, LayerRule(spec, op, weight, bias, recorder=recorder, name=name))


def lrp_pass(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """fn(x) for an element-wise fn, relevance passed through unchanged."""
    return PassFn.apply(x, fn)


def lrp_sum(a: Tensor, b: Tensor, eps: float = STABILIZER) -> Tensor:
    """a + b with the Norm rule (explicit residual sum)."""
    return NormSumFn.apply(a, b, eps)


def lrp_norm(x: Tensor, fn: Callable[[Tensor], Tensor], eps: float = STABILIZER) -> Tensor:
    """fn(x) for a parameter-free linear fn (pooling) with the Norm rule."""
    return NormFn.apply(x, fn, eps)


def lrp_affine(x: Tensor, fn: Callable[[Tensor], Tensor], eps: float = STABILIZER) -> Tensor:
    """fn(x) for an element-wise affine fn (s * x + c: a BatchNorm in eval mode that no
    conv / linear layer precedes) with the epsilon rule R_in = s x R / stab(s x + c).

    The shift c absorbs its share, as a layer's bias does under the epsilon rule; this is
    zennit's Epsilon(eps) hook on such a module, and equals merging the BatchNorm into a
    preceding linear layer under the epsilon rule up to the stabiliser. Same kernel as the
    Norm rule (the Jacobian s is diagonal, the shift does not enter it).
    """
    return NormFn.apply(x, fn, eps)


def lrp_layer_norm(x: Tensor, fn: Callable[[Tensor], Tensor], weight: Tensor | None, dim: int,
                   norm_eps: float, eps: float = STABILIZER) -> Tensor:
    """fn(x) for a LayerNorm over `dim` (weight: its affine scale or None) with AttnLRP's
    LayerNorm rule (`LayerNormFn`: the standard deviation held constant)."""
    w = None if weight is None else weight.detach()
    return LayerNormFn.apply(x, fn, w, dim, float(norm_eps), eps)


#: Fraction of a gate product's relevance given to the gate (see `GateFn`); 0 =
#: signal-take-all, the default; 0.5 = AttnLRP's uniform product rule.
GATE_SHARE = 0.0


def lrp_gate(x: Tensor, s: Tensor, share: float | None = None) -> Tensor:
    """x * s (s a gate, e.g. squeeze-excitation's) with the gate rule of `GateFn`.

    Under signal-take-all the gate is detached: its branch gets no relevance, so its
    backward is not run at all (autograd would otherwise push zeros through it).
    """
    k = GATE_SHARE if share is None else float(share)
    return GateFn.apply(x, s.detach() if k == 0.0 else s, k)
