"""Explainable building blocks of a vision transformer (AttnLRP and its variants).

Every op here follows the "modified gradient times input" convention of the LRP
engine: the value flowing backward through autograd is a (modified) gradient g, and
the relevance of any tensor t is ``t * g``. The forward values are those of the plain
ops, so a patched model computes the same outputs; only the backward pass changes.

Why custom autograd Functions: attention needs rules on ops that have no module
boundary (q·kᵀ, softmax, A·V), batched over heads without a Python loop, and the
per-head relevance is read inside the backward at no extra pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

Softmax = str  # one of pxopt.lrp.registry.SOFTMAX_RULES


def stabilise(z: Tensor, eps: float) -> Tensor:
    """z + eps * sign(z) with sign(+0) = +1 (the epsilon rule's denominator); one allocation."""
    return z.abs().add_(eps).copysign_(z)


def _share(z: Tensor, eps: float) -> Tensor | float:
    """z / stab(z) = |z| / (|z| + eps): the fraction of relevance the epsilon rule passes on
    (1 when eps = 0; 0 at z = 0). Two allocations, in place otherwise (runs on every layer)."""
    if eps == 0.0:
        return 1.0
    a = z.abs()
    return a.div_(a + eps)


def _epsilon_grad(g: Tensor, z: Tensor, eps: float) -> Tensor:
    """g · z / stab(z), the gradient-convention epsilon factor on an output."""
    if eps == 0.0:
        return g
    return _share(z, eps).mul_(g)  # type: ignore[union-attr]


class _UniformMatmul(Function):
    """z = a @ b, relevance split between the operands (AttnLRP's uniform rule).

    Epsilon rule on the bilinear map: operand a receives ``share_a`` of R_z through
    R_a[i,k] = Σ_j a[i,k] b[k,j] / stab(z[i,j]) · R_z[i,j] · share_a, likewise for b.
    With share 0 an operand is treated as constant (CP-LRP on A·V). When a recorder is
    given, the relevance that operand a receives (AttnLRP: the attention map) is summed
    over its last dim (the keys) and recorded per row (query), shape (..., rows), computed
    from z without an (N×N) product.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, eps: float, share_a: float, share_b: float,
                record: Callable[[Tensor], None] | None) -> Tensor:
        z = a @ b
        ctx.save_for_backward(a, b, z)
        ctx.eps, ctx.share_a, ctx.share_b, ctx.record = eps, share_a, share_b, record
        return z

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        a, b, z = ctx.saved_tensors
        gz = _epsilon_grad(g, z, ctx.eps)  # R_z / stab(z)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0] and ctx.share_a:
            grad_a = (gz @ b.transpose(-2, -1)) * ctx.share_a
        if ctx.needs_input_grad[1] and ctx.share_b:
            grad_b = (a.transpose(-2, -1) @ gz) * ctx.share_b
        if ctx.record is not None:
            # Σ_k a[i,k] (gz @ bᵀ)[i,k] = Σ_j z[i,j] gz[i,j] per row i; half of it under the
            # uniform rule, also when a is held constant (CP), so variants share a scale.
            ctx.record((z * gz).sum(dim=-1) * 0.5)
        return grad_a, grad_b, None, None, None, None


def uniform_matmul(a: Tensor, b: Tensor, *, eps: float = 0.0, share_a: float = 0.5,
                   share_b: float = 0.5, record: Callable[[Tensor], None] | None = None) -> Tensor:
    """a @ b with the uniform (½/½, epsilon-stabilised) LRP rule; batched over leading dims."""
    return _UniformMatmul.apply(a, b, eps, share_a, share_b, record)


class _ZPlusSoftmax(Function):
    """Softmax whose backward is the z+ rule on its linearisation.

    Linearised around x, output j receives contributions x_i J_ji with
    J_ji = s_j (δ_ij − s_i). Keeping only positive contributions,
    R_i = (x_i (1−s_i))⁺ r_i + (−x_i s_i)⁺ (Σ_j r_j − r_i) with r_j = s_j R_j / D_j and
    D_j = s_j [(x_j (1−s_j))⁺ + Σ_{i≠j} (−x_i s_i)⁺]: O(N) per row, conservative
    wherever D_j > 0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        s = torch.softmax(x, dim=-1)
        ctx.save_for_backward(x, s)
        ctx.eps = eps
        return s

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, s = ctx.saved_tensors
        diag = (x * (1 - s)).clamp(min=0)
        off = (-x * s).clamp(min=0)
        d = diag + off.sum(dim=-1, keepdim=True) - off  # D_j / s_j
        # R_j = s_j g_j, r_j = s_j R_j / D_j = s_j g_j / (D_j / s_j)
        r = torch.where(d > 0, s * g / stabilise(d, ctx.eps), torch.zeros_like(d))
        pos = (x > 0).to(x.dtype)
        neg = (x < 0).to(x.dtype)
        # gradient such that x * grad = R_i
        grad = (1 - s) * pos * r - s * neg * (r.sum(dim=-1, keepdim=True) - r)
        return grad, None


def softmax(x: Tensor, rule: Softmax, *, eps: float = 1e-12) -> Tensor:
    """Softmax over the last dim with the chosen LRP treatment.

    attnlrp: the plain gradient, which in gradient×input form is exactly AttnLRP's
    R_in = x ⊙ (R − s·ΣR) (not conservative: s·x acts as a bias);
    cp: output detached, no relevance through the attention weights (CP-LRP);
    zplus: z+ on the linearised softmax.
    """
    if rule == "attnlrp":
        return torch.softmax(x, dim=-1)
    if rule == "cp":
        return torch.softmax(x, dim=-1).detach()
    if rule == "zplus":
        return _ZPlusSoftmax.apply(x, eps)
    raise ValueError(f"unknown softmax rule {rule!r}")


class _PassAct(Function):
    """Element-wise activation with the identity (Pass) rule: R_in = R_out.

    Optionally records the relevance at its output, per token (MLP neurons: (batch,
    tokens, hidden)); the recorder reduces it.
    """

    @staticmethod
    def forward(ctx, fn: Callable[[Tensor], Tensor], x: Tensor,
                record: Callable[[Tensor], None] | None) -> Tensor:
        y = fn(x)
        ctx.save_for_backward(y / stabilise(x, 1e-12))
        ctx.y = y if record is not None else None
        ctx.record = record
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        if ctx.record is not None:
            ctx.record(ctx.y * g)
            ctx.y = None
        return None, g * ratio, None


def pass_activation(fn: Callable[[Tensor], Tensor], x: Tensor,
                    record: Callable[[Tensor], None] | None = None) -> Tensor:
    """fn(x) with relevance passed through unchanged (GELU and other element-wise ops)."""
    return _PassAct.apply(fn, x, record)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm with its normaliser held constant (identity rule on it; lxt's choice).

    The mean subtraction stays in the graph: it is linear and conserves relevance
    (Σ x_i (h_i − mean h) = Σ (x_i − mean x) h_i), the affine bias absorbs its share.
    """
    with torch.no_grad():  # the fused kernel's 1/std (var_mean is ~6x slower on CPU)
        _, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
    y = (x - x.mean(dim=-1, keepdim=True)) * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _ResidualAdd(Function):
    """a + b with the epsilon-stabilised z-rule (Norm): R_a = a R / stab(a + b)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, eps: float) -> Tensor:
        y = a + b
        ctx.save_for_backward(y)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        gz = _epsilon_grad(g, y, ctx.eps)
        return gz, gz, None


def residual_add(a: Tensor, b: Tensor, eps: float = 0.0) -> Tensor:
    """Residual sum with its own rule; eps = 0 is the plain gradient (lxt's choice), exact z-rule."""
    if eps == 0.0:
        return a + b
    return _ResidualAdd.apply(a, b, eps)


class _EpsilonLinear(Function):
    """Fallback epsilon rule for a linear map given weight and bias tensors."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
        z = F.linear(x, weight, bias)
        ctx.save_for_backward(weight, z)
        ctx.eps = eps
        return z

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        weight, z = ctx.saved_tensors
        return _epsilon_grad(g, z, ctx.eps) @ weight, None, None, None


def epsilon_linear(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-6) -> Tensor:
    """F.linear with the epsilon rule (gradient×input form)."""
    return _EpsilonLinear.apply(x, weight, bias, eps)


class _Record(Function):
    """Identity that records the relevance of its value (summed over tokens) in backward."""

    @staticmethod
    def forward(ctx, y: Tensor, record: Callable[[Tensor], None],
                dims: tuple[int, ...] | None) -> Tensor:
        ctx.save_for_backward(y)
        ctx.record, ctx.dims = record, dims
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        rel = y * g
        dims = ctx.dims if ctx.dims is not None else tuple(range(1, rel.dim() - 1))
        ctx.record(rel.sum(dim=dims) if dims else rel)
        return g, None, None


def record_relevance(y: Tensor, record: Callable[[Tensor], None],
                     dims: tuple[int, ...] | None = None) -> Tensor:
    """y unchanged; its relevance summed over `dims` (default: the token dims, giving
    (batch, features); `()`: per token, unsummed) goes to `record` in the backward."""
    return _Record.apply(y, record, dims)


class _ScaleGrad(Function):
    """Identity forwards; the incoming gradient scaled by `factor` backwards."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """x unchanged; relevance through it scaled by `factor` (lxt's `divide_gradient`)."""
    return _ScaleGrad.apply(x, factor)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, rule: str,
                    record: Callable[[Tensor], None] | None = None,
                    attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v through the fused kernel, for the rules that allow it.

    With the uniform rule at epsilon 0, the relevance split is a constant factor on each
    operand's gradient (q, k: ¼, v: ½ for AttnLRP; q, k detached for CP) and the softmax
    rule is its plain gradient, so scaled_dot_product_attention's own backward gives the
    exact AttnLRP / CP-LRP relevance (lxt's construction). Head relevance: half the head
    output's per query (summed over the head's channels), as in `uniform_matmul`:
    (batch, heads, queries). attn_mask: a constant added to the logits (see
    `biased_attention`).
    """
    if rule == "attnlrp":
        q, k, v = scale_grad(q, 0.25), scale_grad(k, 0.25), scale_grad(v, 0.5)
    elif rule == "cp":
        q, k = q.detach(), k.detach()
    else:
        raise ValueError(f"softmax rule {rule!r} needs the explicit attention")
    mask = None if attn_mask is None else attn_mask.detach()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if record is not None:
        out = record_relevance(out, lambda r: record(r * 0.5), dims=(-1,))
    return out


def biased_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None,
                     rule: str, *, eps: float = 0.0, fused: bool = True,
                     record: Callable[[Tensor], None] | None = None) -> Tensor:
    """softmax(q kᵀ · scale + bias) v with the attention rules on every op.

    `bias` is a constant added to the logits (Swin's relative position bias, its shifted
    window mask): it gets no gradient, so in the gradient×input convention it takes its
    share of the logits' relevance, (bias ⊙ g), and passes none on, like the bias of a
    linear layer. This is lxt's treatment of a constant addend (its rules wrap only ops
    whose operands both carry relevance); AttnLRP's softmax rule R = x ⊙ (R_out − s ΣR_out)
    then runs on the biased logits x. Masked logits (−100) have s ≈ 0: no relevance.
    With the uniform rule at eps 0 and softmax "attnlrp" / "cp", the fused kernel with the
    bias as its additive mask gives exactly the same relevance (`fused_attention`).
    """
    if eps == 0.0 and rule in ("attnlrp", "cp") and fused:
        return fused_attention(q, k, v, scale, rule, record, attn_mask=bias)
    if rule == "cp":
        with torch.no_grad():
            logits = (q * scale) @ k.transpose(-2, -1)
            a = torch.softmax(logits if bias is None else logits + bias, dim=-1)
        return uniform_matmul(a, v, eps=eps, share_a=0.0, share_b=1.0, record=record)
    logits = uniform_matmul(q * scale, k.transpose(-2, -1), eps=eps)
    if bias is not None:
        logits = logits + bias.detach()
    return uniform_matmul(softmax(logits, rule), v, eps=eps, record=record)
