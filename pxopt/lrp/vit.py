"""AttnLRP for vision transformers: torchvision and timm `VisionTransformer`.

The model is made explainable by temporary instance-level `forward` replacements
(attention, LayerNorm, MLP activations, Linear layers, patch embedding, optionally the
blocks for the residual rule); `explainable_vit` removes them on exit, so the model is
restored exactly. Attention is computed as explicit q·kᵀ, softmax and A·V ops that
carry rules (see `pxopt.lrp.attention`), batched over heads; for AttnLRP and CP-LRP with
the uniform rule at epsilon 0 (the default) the fused attention kernel gives exactly the
same relevance and is used instead.

Relevance convention: modified gradient × input, as in lxt: the value flowing backward is
a gradient and the relevance of a tensor t is t ⊙ grad. Every op left unpatched (reshapes,
class token, position embedding, pooling, LayerScale, plain residual sums) then gets the
exact z-rule automatically, which is why transformers use this convention. The CNN
engine's layer rules (relevance convention) are bridged by `_RelevanceRule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from pxopt.errors import ConfigError, NonFiniteRelevanceError, UnsupportedLayerError
from pxopt.layers import Layer, LayerMap, register_discoverer
from pxopt.lrp import attention as ops
from pxopt.lrp import vit_check
from pxopt.lrp.config import RuleConfig, RuleSpec
from pxopt.lrp.explain import Explanation, _seed
from pxopt.lrp.rules import LayerRule, LinearOp, conv2d_op, layer_backward
from pxopt.scores import ComponentScores, ScoreAccumulator, default_ranking

LinearRule = Callable[[Tensor], Tensor]
Recorder = Callable[[Tensor], None]



# --------------------------------------------------------------------------- structure


@dataclass
class ViTBlock:
    """One transformer block: where its attention and MLP live, and its depth group."""

    name: str
    module: nn.Module
    index: int
    group: str
    attn_name: str
    attn: nn.Module
    fc1_name: str
    fc1: nn.Linear
    act: nn.Module
    fc2_name: str
    fc2: nn.Linear
    num_heads: int


@dataclass
class ViTStructure:
    """The parts of a ViT that LRP needs, in forward order."""

    family: str  # "torchvision" | "timm"
    patch_embed_name: str
    patch_embed: nn.Conv2d
    blocks: list[ViTBlock]
    head_names: list[str]  # classifier Linear layers (group "fc")
    extra_acts: list[nn.Module] = field(default_factory=list)  # e.g. pre-logits Tanh


def depth_group(index: int, depth: int, boundaries: tuple[float, float] = (0.25, 0.75)) -> str:
    """Depth group of block `index` of `depth`: 12 blocks give 0-2 low, 3-8 mid, 9-11 high."""
    frac = index / depth
    if frac < boundaries[0] - 1e-9:
        return "low"
    if frac >= boundaries[1] - 1e-9:
        return "high"
    return "mid"


def _tv_vit_class() -> type | None:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return None
    return VisionTransformer


def _timm_vit_class() -> type | None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return None
    return VisionTransformer


def is_vit(model: nn.Module) -> bool:
    """True for the torchvision and timm ViT families this module explains."""
    classes = tuple(c for c in (_tv_vit_class(), _timm_vit_class()) if c is not None)
    return isinstance(model, classes)


def vit_structure(model: nn.Module, boundaries: tuple[float, float] = (0.25, 0.75)) -> ViTStructure:
    """Find blocks, attention, MLPs, patch embedding and head; raise on unsupported parts."""
    vit_check.check_vit(model)  # exact classes only: refuse what the engine would get wrong silently
    tv, tm = _tv_vit_class(), _timm_vit_class()
    if tv is not None and isinstance(model, tv):
        struct = _tv_structure(model, boundaries)
    elif tm is not None and isinstance(model, tm):
        struct = _timm_structure(model, boundaries)
    else:
        raise UnsupportedLayerError(
            f"{type(model).__name__} is not a torchvision or timm VisionTransformer")
    vit_check.check_vit_coverage(model, struct)
    return struct


def _tv_structure(model: nn.Module, boundaries: tuple[float, float]) -> ViTStructure:
    layers = list(model.encoder.layers.named_children())
    blocks = []
    for i, (child, blk) in enumerate(layers):
        name = f"encoder.layers.{child}"
        mha = blk.self_attention
        mlp = blk.mlp
        if not isinstance(mlp[0], nn.Linear) or not isinstance(mlp[3], nn.Linear):
            raise UnsupportedLayerError(f"{name}.mlp: expected Linear, act, Dropout, Linear, Dropout")
        blocks.append(ViTBlock(
            name=name, module=blk, index=i, group=depth_group(i, len(layers), boundaries),
            attn_name=f"{name}.self_attention", attn=mha,
            fc1_name=f"{name}.mlp.0", fc1=mlp[0], act=mlp[1], fc2_name=f"{name}.mlp.3", fc2=mlp[3],
            num_heads=mha.num_heads))
    heads = [f"heads.{n}" for n, m in model.heads.named_children() if isinstance(m, nn.Linear)]
    acts = [m for m in model.heads.children() if not isinstance(m, nn.Linear)]
    return ViTStructure("torchvision", "conv_proj", model.conv_proj, blocks, heads, acts)


def _timm_structure(model: nn.Module, boundaries: tuple[float, float]) -> ViTStructure:
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedLayerError("attn_pool: attention pooling ('map') is not supported")
    blocks = []
    n = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        name = f"blocks.{i}"
        mlp = getattr(blk, "mlp", None)
        if mlp is None or not all(hasattr(mlp, a) for a in ("fc1", "act", "fc2")) or \
                not isinstance(mlp.fc1, nn.Linear):
            raise UnsupportedLayerError(f"{name}.mlp: only timm Mlp (fc1, act, fc2) is supported")
        attn = blk.attn
        if not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
            raise UnsupportedLayerError(f"{name}.attn: only timm Attention with qkv (no gate) is supported")
        blocks.append(ViTBlock(
            name=name, module=blk, index=i, group=depth_group(i, n, boundaries),
            attn_name=f"{name}.attn", attn=attn, fc1_name=f"{name}.mlp.fc1", fc1=mlp.fc1,
            act=mlp.act, fc2_name=f"{name}.mlp.fc2", fc2=mlp.fc2, num_heads=attn.num_heads))
    heads = ["head"] if isinstance(model.head, nn.Linear) else []
    proj = model.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        raise UnsupportedLayerError("patch_embed.proj: expected a Conv2d")
    return ViTStructure("timm", "patch_embed.proj", proj, blocks, heads, [])


# --------------------------------------------------------------------------- rules


@dataclass
class ViTRules:
    """A `RuleConfig` plus the two ViT-only stabilisers that the JSON format leaves out.

    matmul_eps: epsilon of the uniform rule on q·kᵀ and A·V (0 = lxt's choice);
    residual_eps: epsilon of the z-rule on residual sums (0 = plain gradient = lxt's choice,
    exactly conservative).
    """

    config: RuleConfig
    matmul_eps: float = 0.0
    residual_eps: float = 0.0
    fused: bool = True  # fused attention kernel where the rule allows it (exactly equal)

    @classmethod
    def from_config(cls, rules: Any, *, matmul_eps: float = 0.0, residual_eps: float = 0.0,
                    fused: bool = True) -> ViTRules:
        """Accept a `RuleConfig`, its JSON dict or string, or None (defaults)."""
        if isinstance(rules, ViTRules):
            return rules
        for value, label in ((matmul_eps, "matmul_eps"), (residual_eps, "residual_eps")):
            if not value >= 0:
                raise ConfigError(f"{label}: must be >= 0, got {value}")
        return cls(RuleConfig.coerce(rules), matmul_eps, residual_eps, fused)

    @property
    def softmax(self) -> str:
        return self.config.softmax

    def rule_for(self, name: str, group: str) -> RuleSpec:
        return self.config.rule_for(name, group)


class _RelevanceRule(Function):
    """Bridge to `pxopt.lrp.rules` (relevance convention) from the gradient convention.

    Backward: R_out = z ⊙ g, the engine's rule gives R_in, and R_in / x goes on as the
    gradient (0 where x = 0, where every layer rule but the input-only ones gives 0).
    `record_input` receives R_in itself, for the patch embedding whose R_in is the
    explanation (Flat / WSquare / ZBox give relevance also to zero pixels).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: LayerRule,
                record_input: Recorder | None) -> Tensor:  # type: ignore[override]
        z = layer.output(x)
        ctx.save_for_backward(x, z)
        ctx.layer, ctx.record_input = layer, record_input
        return z

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x, z = ctx.saved_tensors
        r_in = layer_backward(ctx.layer, x, z, z * g)
        if ctx.record_input is not None:
            ctx.record_input(r_in)
        return torch.where(x != 0, r_in / x, torch.zeros_like(x)), None, None


def linear_rule(spec: RuleSpec, name: str, weight: Tensor, bias: Tensor | None) -> LinearRule:
    """Rule function F(x) for a linear map with the given parameters (gradient convention).

    Epsilon runs as its own lean Function (ε = 0: the plain gradient, LRP-0); every other
    rule is the CNN engine's implementation through `_RelevanceRule`.
    """
    if spec.name == "epsilon":
        eps = float(spec["epsilon"])
        if eps == 0.0:
            return lambda x: F.linear(x, weight, bias)
        return lambda x: ops.epsilon_linear(x, weight, bias, eps)
    layer = LayerRule(spec, LinearOp("linear"), weight, bias, name=name)
    return lambda x: _RelevanceRule.apply(x, layer, None)


def conv_rule(spec: RuleSpec, name: str, conv: nn.Conv2d,
              record_input: Recorder | None) -> Callable[[Tensor], Tensor]:
    """Rule function for the patch-embedding conv; records the input relevance."""
    if spec.name == "epsilon" and float(spec["epsilon"]) == 0.0:
        return conv.forward  # LRP-0 is the plain gradient
    op = conv2d_op(conv.stride, conv.padding, conv.dilation, conv.groups, conv.weight.shape)
    layer = LayerRule(spec, op, conv.weight, conv.bias, forward_fn=conv.forward, name=name)
    return lambda x: _RelevanceRule.apply(x, layer, record_input)


# --------------------------------------------------------------------------- patching


@dataclass
class Recording:
    """Relevances collected during one backward pass, keyed by module name.

    heads, mlp, mlp_out: (batch, n) summed over tokens; `token_abs` holds the same layers'
    sum over tokens of |R| (see `pxopt.scores`), and `tokens`, when not None, the per-token
    relevance itself, (batch, tokens, n). A head's token is its query: its relevance there
    is that of its attention weights of the query, summed over the keys.
    """

    heads: dict[str, Tensor] = field(default_factory=dict)
    mlp: dict[str, Tensor] = field(default_factory=dict)
    mlp_out: dict[str, Tensor] = field(default_factory=dict)
    input: dict[str, Tensor] = field(default_factory=dict)
    conv: dict[str, Tensor] = field(default_factory=dict)
    token_abs: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, Tensor] | None = None

    def recorder(self, store: dict[str, Tensor], name: str) -> Recorder:
        def rec(t: Tensor) -> None:
            store[name] = t.detach()
        return rec

    def token_recorder(self, store: dict[str, Tensor], name: str, *, heads: bool = False) -> Recorder:
        """Receives per-token relevance, (batch, tokens, n) or for heads (batch, heads,
        queries), and stores both aggregations over the tokens (and the tokens if kept)."""
        def rec(t: Tensor) -> None:
            t = t.detach()
            if heads:
                t = t.transpose(1, 2)  # (batch, queries, heads), like the MLP's layout
            dims = tuple(range(1, t.dim() - 1))
            store[name] = t.sum(dim=dims)
            self.token_abs[name] = torch.linalg.vector_norm(t, 1, dim=dims)  # Σ|t|, no |t| copy
            if self.tokens is not None:
                self.tokens[name] = t
        return rec


def _set_forward(module: nn.Module, fn: Callable[..., Any], saved: list) -> None:
    saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
    module.forward = fn  # type: ignore[method-assign]


def _attention_core(q: Tensor, k: Tensor, v: Tensor, scale: float, rules: ViTRules,
                    record: Recorder | None) -> Tensor:
    """softmax(q kᵀ · scale) v over (batch, heads, tokens, dim), rules on every op."""
    eps = rules.matmul_eps
    if eps == 0.0 and rules.softmax in ("attnlrp", "cp") and rules.fused:
        return ops.fused_attention(q, k, v, scale, rules.softmax, record)
    if rules.softmax == "cp":
        with torch.no_grad():
            a = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        return ops.uniform_matmul(a, v, eps=eps, share_a=0.0, share_b=1.0, record=record)
    logits = ops.uniform_matmul(q * scale, k.transpose(-2, -1), eps=eps)
    a = ops.softmax(logits, rules.softmax)  # type: ignore[arg-type]
    return ops.uniform_matmul(a, v, eps=eps, record=record)


def _qkv_fn(spec: RuleSpec, name: str, weight: Tensor, bias: Tensor | None, heads: int,
            head_dim: int, cp: bool) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """x -> q, k, v (batch, heads, tokens, head_dim) through the packed in-projection.

    Under CP-LRP no relevance reaches q and k, so only the v rows carry the rule and q, k
    are computed without a graph: the backward skips two thirds of the in-projection.
    """
    if not cp:
        rule = linear_rule(spec, name, weight, bias)

        def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            b, n, _ = x.shape
            t = rule(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            return t[0], t[1], t[2]
        return qkv
    width = heads * head_dim
    w_qk, w_v = weight[: 2 * width], weight[2 * width:]
    b_qk, b_v = (None, None) if bias is None else (bias[: 2 * width], bias[2 * width:])
    v_rule = linear_rule(spec, name, w_v, b_v)

    def qkv_cp(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        with torch.no_grad():
            qk = F.linear(x, w_qk, b_qk).reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        v = v_rule(x).reshape(b, n, heads, head_dim).transpose(1, 2)
        return qk[0], qk[1], v
    return qkv_cp


def _patch_tv_attention(blk: ViTBlock, rules: ViTRules, rec: Recorder | None,
                        saved: list) -> None:
    mha: nn.MultiheadAttention = blk.attn  # type: ignore[assignment]
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedLayerError(f"{blk.attn_name}: only packed self-attention is supported")
    heads = mha.num_heads
    head_dim = mha.embed_dim // heads
    qkv = _qkv_fn(rules.rule_for(blk.attn_name, blk.group), blk.attn_name, mha.in_proj_weight,
                  mha.in_proj_bias, heads, head_dim, rules.softmax == "cp")
    out_name = f"{blk.attn_name}.out_proj"
    out_rule = linear_rule(rules.rule_for(out_name, blk.group), out_name,
                           mha.out_proj.weight, mha.out_proj.bias)

    def forward(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        if not (query is key and key is value) or key_padding_mask is not None \
                or attn_mask is not None or is_causal:
            raise UnsupportedLayerError(f"{blk.attn_name}: only unmasked self-attention is supported")
        x = query if mha.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        q, k, v = qkv(x)
        out = _attention_core(q, k, v, head_dim ** -0.5, rules, rec)
        out = out.transpose(1, 2).reshape(b, n, d)
        out = out_rule(out)
        return (out if mha.batch_first else out.transpose(0, 1)), None

    _set_forward(mha, forward, saved)


def _patch_timm_attention(blk: ViTBlock, rules: ViTRules, rec: Recorder | None,
                          saved: list) -> None:
    attn = blk.attn
    name = f"{blk.attn_name}.qkv"
    qkv = _qkv_fn(rules.rule_for(name, blk.group), name, attn.qkv.weight, attn.qkv.bias,
                  attn.num_heads, attn.head_dim, rules.softmax == "cp")

    def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise UnsupportedLayerError(f"{blk.attn_name}: masked attention is not supported")
        b, n, _ = x.shape
        q, k, v = qkv(x)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = _attention_core(q, k, v, attn.scale, rules, rec)
        out = out.transpose(1, 2).reshape(b, n, -1)
        out = attn.norm(out)
        out = attn.proj(out)
        return attn.proj_drop(out)

    _set_forward(attn, forward, saved)


def _patch_residual_blocks(struct: ViTStructure, eps: float, saved: list) -> None:
    """Blocks rewritten so their residual sums carry the epsilon z-rule."""
    for blk in struct.blocks:
        m = blk.module
        if struct.family == "torchvision":
            def forward(inp: Tensor, m: nn.Module = m) -> Tensor:
                x, _ = m.self_attention(*(m.ln_1(inp),) * 3, need_weights=False)
                x = ops.residual_add(m.dropout(x), inp, eps)
                return ops.residual_add(x, m.mlp(m.ln_2(x)), eps)
        else:
            def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                        m: nn.Module = m) -> Tensor:
                y = m.drop_path1(m.ls1(m.attn(m.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
                x = ops.residual_add(x, y, eps)
                return ops.residual_add(x, m.drop_path2(m.ls2(m.mlp(m.norm2(x)))), eps)
        _set_forward(m, forward, saved)


def _patch_linear(module: nn.Linear, name: str, spec: RuleSpec, saved: list,
                  rec: Recorder | None = None) -> None:
    """Linear layer with its group's rule; with `rec`, its output relevance is recorded
    per token."""
    rule = linear_rule(spec, name, module.weight, module.bias)
    if rec is None:
        _set_forward(module, rule, saved)
    else:
        _set_forward(module, lambda x: ops.record_relevance(rule(x), rec, dims=()), saved)


def _patch_act(module: nn.Module, rec: Recorder | None, saved: list) -> None:
    if not vit_check.is_pass_activation(module):
        raise UnsupportedLayerError(f"activation {type(module).__name__} is not supported")
    fn = module.forward
    _set_forward(module, lambda x: ops.pass_activation(fn, x, rec), saved)


@contextmanager
def explainable_vit(model: nn.Module, rules: ViTRules, recording: Recording | None = None, *,
                    kinds: set[str] | None = None, mlp_outputs: bool = False,
                    boundaries: tuple[float, float] = (0.25, 0.75)) -> Iterator[ViTStructure]:
    """Patch `model` in place so its backward computes LRP; undo every patch on exit."""
    struct = vit_structure(model, boundaries)
    want = kinds if kinds is not None else {"heads", "mlp"}
    saved: list = []
    try:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                if len(m.normalized_shape) != 1:
                    raise UnsupportedLayerError("LayerNorm over more than the last dim is not supported")
                _set_forward(m, lambda x, m=m: ops.layer_norm(x, m.weight, m.bias, m.eps), saved)
        for blk in struct.blocks:
            rec_h = recording.token_recorder(recording.heads, blk.attn_name, heads=True) \
                if recording is not None and "heads" in want else None
            if struct.family == "torchvision":
                _patch_tv_attention(blk, rules, rec_h, saved)
            else:
                _patch_timm_attention(blk, rules, rec_h, saved)
                name = f"{blk.attn_name}.proj"  # qkv runs inside the patched attention
                _patch_linear(blk.attn.proj, name, rules.rule_for(name, blk.group), saved)
            rec_m = recording.token_recorder(recording.mlp, blk.fc1_name) \
                if recording is not None and "mlp" in want else None
            _patch_act(blk.act, rec_m, saved)
            _patch_linear(blk.fc1, blk.fc1_name, rules.rule_for(blk.fc1_name, blk.group), saved)
            rec_o = recording.token_recorder(recording.mlp_out, blk.fc2_name) \
                if recording is not None and mlp_outputs else None
            _patch_linear(blk.fc2, blk.fc2_name, rules.rule_for(blk.fc2_name, blk.group), saved, rec_o)
        for name in struct.head_names:
            _patch_linear(model.get_submodule(name), name, rules.rule_for(name, "fc"), saved)
        for act in struct.extra_acts:
            _patch_act(act, None, saved)
        rec_in = recording.recorder(recording.input, "input") if recording is not None else None
        pe_name = struct.patch_embed_name
        pe_rule = conv_rule(rules.rule_for(pe_name, "input"), pe_name, struct.patch_embed, rec_in)
        if recording is not None and "conv" in want:
            rec_c = recording.recorder(recording.conv, pe_name)
            _set_forward(struct.patch_embed,
                         lambda x: ops.record_relevance(pe_rule(x), rec_c, dims=(2, 3)), saved)
        else:
            _set_forward(struct.patch_embed, pe_rule, saved)
        if rules.residual_eps:
            _patch_residual_blocks(struct, rules.residual_eps, saved)
        yield struct
    finally:
        for module, had, fn in reversed(saved):
            if had:
                module.forward = fn
            else:
                del module.forward


# --------------------------------------------------------------------------- explain


def _start_gradient(output: Tensor, targets: Any, start: str) -> Tensor:
    """Initial gradient g0 with output ⊙ g0 = the CNN engine's starting relevance."""
    seed = _seed(output, targets, start)
    return seed / ops.stabilise(output.detach(), 1e-30)


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Parameters without grad and every module in eval mode, restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


def _explain(model: nn.Module, inputs: Tensor, targets: Any, vr: ViTRules, start: str,
             kinds: set[str], mlp_outputs: bool, boundaries: tuple[float, float],
             tokens: bool = False) -> Explanation:
    rec = Recording(tokens={} if tokens else None)
    x = inputs.detach()
    if x.is_inference():
        x = x.clone()
    x.requires_grad_(True)
    with explainable_vit(model, vr, rec, kinds=kinds, mlp_outputs=mlp_outputs,
                         boundaries=boundaries) as struct:
        out = model(x)
        (grad,) = torch.autograd.grad(out, x, _start_gradient(out, targets, start))
    relevance = rec.input.get("input", x.detach() * grad)
    components: dict[str, Tensor] = {}
    if "conv" in kinds and struct.patch_embed_name in rec.conv:
        components[struct.patch_embed_name] = rec.conv[struct.patch_embed_name]
    for blk in struct.blocks:  # forward order
        for store, name in ((rec.heads, blk.attn_name), (rec.mlp, blk.fc1_name),
                            (rec.mlp_out, blk.fc2_name)):
            if name in store:
                components[name] = store[name]
    if "head" in kinds and struct.head_names:
        components[struct.head_names[-1]] = _seed(out, targets, start)
    total = relevance.sum() + sum((c.sum() for c in components.values()), relevance.new_zeros(()))
    total = total + sum((c.sum() for c in rec.token_abs.values()), relevance.new_zeros(()))
    if not bool(torch.isfinite(total)):
        raise NonFiniteRelevanceError(
            "relevances became NaN or infinite: raise epsilon / the stabiliser, or check the "
            "model's outputs")
    token_abs = {name: rec.token_abs[name] for name in components if name in rec.token_abs}
    per_token = None if rec.tokens is None else \
        {name: rec.tokens[name] for name in components if name in rec.tokens}
    return Explanation(relevance.detach(), components, out.detach(), token_abs, per_token)


def _kinds(kinds: Any) -> set[str]:
    return set(kinds) if kinds is not None else {"heads", "mlp"}


def explain_vit(model: nn.Module, inputs: Tensor, targets: Any = None, rules: Any = None, *,
                start: str = "target", kinds: Any = None, mlp_outputs: bool = False,
                matmul_eps: float = 0.0, residual_eps: float = 0.0, fused: bool = True,
                boundaries: tuple[float, float] = (0.25, 0.75),
                tokens: bool = False) -> Explanation:
    """LRP of a ViT in one forward and one backward pass (`pxopt.lrp.explain` for ViTs).

    components (kinds, default heads and mlp): per attention module (batch, heads), per MLP
    fc1 (batch, hidden), with `mlp_outputs` per fc2 (batch, dim), all summed over tokens;
    "conv" adds the patch embedding's channels, "head" the relevance at the logits.
    A head's relevance is that of its attention weights (the softmax output; half the head
    output's under the uniform rule), an MLP neuron's that of fc1's output (= the
    activation's output under the Pass rule). `token_abs` holds, for heads and MLP layers,
    sum over tokens of |R| (queries for heads), and with `tokens` the per-token relevance
    (batch, tokens, n) comes back in `tokens`.
    fused: run AttnLRP / CP-LRP attention through the fused kernel when matmul_eps is 0
    (exactly the same rule); False forces the explicit q·kᵀ, softmax, A·V ops.
    `output` equals the model's logits within 1e-5 (explicit attention and LayerNorm round
    differently from the fused kernels).
    """
    vr = ViTRules.from_config(rules, matmul_eps=matmul_eps, residual_eps=residual_eps,
                              fused=fused)
    vr.config.check_overrides({n for n, _ in model.named_modules() if n})
    with torch.inference_mode(False), torch.enable_grad(), _frozen_eval(model):
        return _explain(model, inputs, targets, vr, start, _kinds(kinds), mlp_outputs, boundaries,
                        tokens)


def component_relevance_vit(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                            rules: Any = None, *, kinds: Any = None, start: str = "target",
                            mlp_outputs: bool = False, matmul_eps: float = 0.0,
                            residual_eps: float = 0.0) -> ComponentScores:
    """Mean over all samples of |R|, R and sum_t |R_t| per component (`component_relevance`
    for ViTs); ranks by sum_t |R_t| ("token-abs", the reference's) unless told otherwise."""
    vr = ViTRules.from_config(rules, matmul_eps=matmul_eps, residual_eps=residual_eps)
    vr.config.check_overrides({n for n, _ in model.named_modules() if n})
    sums = ScoreAccumulator()
    with torch.inference_mode(False), torch.enable_grad(), _frozen_eval(model):
        for images, labels in batches:
            exp = _explain(model, images, labels, vr, start, _kinds(kinds), mlp_outputs,
                           (0.25, 0.75))
            sums.add(exp.components, images.shape[0], exp.token_abs)
    return sums.result("lrp", {"rules": vr.config.to_dict(), "digest": vr.config.digest(),
                               "start": start, "matmul_eps": vr.matmul_eps,
                               "residual_eps": vr.residual_eps},
                       default_ranking=default_ranking("vit"))


# --------------------------------------------------------------------------- layer map


def discover_vit(model: nn.Module, boundaries: tuple[float, float] = (0.25, 0.75)) -> LayerMap | None:
    """Layer map of a ViT (None for other models): patch embedding `input`, per block the
    attention ("heads") and MLP fc1 ("mlp") in the block's depth group, the classifier `fc`."""
    if not is_vit(model):
        return None
    struct = vit_structure(model, boundaries)
    pe = struct.patch_embed
    layers = LayerMap([Layer(struct.patch_embed_name, pe, "conv", "input", int(pe.out_channels), -1)])
    for blk in struct.blocks:
        layers.append(Layer(blk.attn_name, blk.attn, "heads", blk.group, blk.num_heads, blk.index))
        layers.append(Layer(blk.fc1_name, blk.fc1, "mlp", blk.group, int(blk.fc1.out_features),
                            blk.index))
    n = len(struct.blocks)
    for i, name in enumerate(struct.head_names):
        mod = model.get_submodule(name)
        kind = "head" if i == len(struct.head_names) - 1 else "linear"
        layers.append(Layer(name, mod, kind, "fc", int(mod.out_features), n + i))
    return layers


register_discoverer(discover_vit)
