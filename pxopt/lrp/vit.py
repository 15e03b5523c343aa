"""AttnLRP for vision transformers (the engine of `pxopt.families.transformer.TransformerFamily`).

What a family's transformer looks like (its blocks, attention layout, allow-list,
residual forwards) is the family's answer (`pxopt.families.torchvision_vit`, `.timm_vit`,
...); this module holds what every family shares: the rules, the recording, the patching
of LayerNorm, MLP, classifier and patch embedding, and the explanation entry points.

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
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from pxopt.errors import ConfigError, NonFiniteRelevanceError, UnsupportedLayerError
from pxopt.families import family_of
from pxopt.lrp import attention as ops
from pxopt.lrp import vit_check
from pxopt.lrp.config import RuleConfig, RuleSpec
from pxopt.lrp.explanation import Explanation
from pxopt.lrp.explanation import seed_relevance as _seed
from pxopt.lrp.rules import LayerRule, LinearOp, conv2d_op, layer_backward
from pxopt.lrp.vit_structure import ViTBlock, ViTStructure, block_group
from pxopt.scores import ComponentScores, ScoreAccumulator, default_ranking
from pxopt.vocab import TRANSFORMER_KINDS

if TYPE_CHECKING:
    from pxopt.families.transformer import TransformerFamily

LinearRule = Callable[[Tensor], Tensor]
Recorder = Callable[[Tensor], None]



# --------------------------------------------------------------------------- structure

__all__ = ["Recording", "ViTBlock", "ViTRules", "ViTStructure", "attention_core",
           "component_relevance_vit", "conv_rule", "depth_group", "explain_vit",
           "explainable_vit", "is_vit", "linear_rule", "patch_linear", "qkv_fn", "set_forward",
           "vit_family", "vit_structure"]

depth_group = block_group  # the older name


def vit_family(model: nn.Module) -> TransformerFamily:
    """The model's family when it is a transformer family; UnsupportedLayerError otherwise."""
    from pxopt.families.transformer import TransformerFamily

    try:
        family = family_of(model)
    except UnsupportedLayerError:
        family = None
    if not isinstance(family, TransformerFamily):
        raise UnsupportedLayerError(
            f"{type(model).__name__} is not a vision transformer of a supported family "
            "(torchvision or timm VisionTransformer)")
    return family


def is_vit(model: nn.Module) -> bool:
    """True when the model's family is a transformer family (explained by this engine)."""
    from pxopt.families.transformer import TransformerFamily

    try:
        return isinstance(family_of(model), TransformerFamily)
    except UnsupportedLayerError:
        return False


def vit_structure(model: nn.Module, boundaries: tuple[float, float] = (0.25, 0.75)) -> ViTStructure:
    """Find blocks, attention, MLPs, patch embedding and head (the family's checked
    structure); raise on unsupported parts."""
    return vit_family(model).checked_structure(model, boundaries)


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


def set_forward(module: nn.Module, fn: Callable[..., Any], saved: list) -> None:
    saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
    module.forward = fn  # type: ignore[method-assign]


def attention_core(q: Tensor, k: Tensor, v: Tensor, scale: float, rules: ViTRules,
                    record: Recorder | None) -> Tensor:
    """softmax(q kᵀ · scale) v over (batch, heads, tokens, dim), rules on every op
    (`attention.biased_attention` without a bias: one implementation for ViT and Swin)."""
    return ops.biased_attention(q, k, v, scale, None, rules.softmax, eps=rules.matmul_eps,
                                fused=rules.fused, record=record)


def qkv_fn(spec: RuleSpec, name: str, weight: Tensor, bias: Tensor | None, heads: int,
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


def patch_linear(module: nn.Linear, name: str, spec: RuleSpec, saved: list,
                  rec: Recorder | None = None) -> None:
    """Linear layer with its group's rule; with `rec`, its output relevance is recorded
    per token."""
    rule = linear_rule(spec, name, module.weight, module.bias)
    if rec is None:
        set_forward(module, rule, saved)
    else:
        set_forward(module, lambda x: ops.record_relevance(rule(x), rec, dims=()), saved)


def _patch_act(module: nn.Module, rec: Recorder | None, saved: list) -> None:
    if not vit_check.is_pass_activation(module):
        raise UnsupportedLayerError(f"activation {type(module).__name__} is not supported")
    fn = module.forward
    set_forward(module, lambda x: ops.pass_activation(fn, x, rec), saved)


@contextmanager
def explainable_vit(model: nn.Module, rules: ViTRules, recording: Recording | None = None, *,
                    kinds: set[str] | None = None, mlp_outputs: bool = False,
                    boundaries: tuple[float, float] = (0.25, 0.75),
                    family: TransformerFamily | None = None) -> Iterator[ViTStructure]:
    """Patch `model` in place so its backward computes LRP; undo every patch on exit.

    The family (default: the model's) gives the checked structure, the attention patches
    and the residual forwards; LayerNorm, MLP, classifier and patch-embedding rules are
    the same for every family."""
    fam = family if family is not None else vit_family(model)
    struct = fam.checked_structure(model, boundaries)
    want = kinds if kinds is not None else set(TRANSFORMER_KINDS)
    saved: list = []
    try:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                if len(m.normalized_shape) != 1:
                    raise UnsupportedLayerError("LayerNorm over more than the last dim is not supported")
                set_forward(m, lambda x, m=m: ops.layer_norm(x, m.weight, m.bias, m.eps), saved)
        for blk in struct.blocks:
            rec_h = recording.token_recorder(recording.heads, blk.attn_name, heads=True) \
                if recording is not None and "heads" in want else None
            fam.patch_attention(blk, rules, rec_h, saved)
            rec_m = recording.token_recorder(recording.mlp, blk.fc1_name) \
                if recording is not None and "mlp" in want else None
            _patch_act(blk.act, rec_m, saved)
            patch_linear(blk.fc1, blk.fc1_name, rules.rule_for(blk.fc1_name, blk.group), saved)
            rec_o = recording.token_recorder(recording.mlp_out, blk.fc2_name) \
                if recording is not None and mlp_outputs else None
            patch_linear(blk.fc2, blk.fc2_name, rules.rule_for(blk.fc2_name, blk.group), saved, rec_o)
        for name in struct.head_names:
            patch_linear(model.get_submodule(name), name, rules.rule_for(name, "fc"), saved)
        for act in struct.extra_acts:
            _patch_act(act, None, saved)
        for name, lin, group in struct.extra_linears:
            patch_linear(lin, name, rules.rule_for(name, group), saved)
        rec_in = recording.recorder(recording.input, "input") if recording is not None else None
        pe_name = struct.patch_embed_name
        pe_rule = conv_rule(rules.rule_for(pe_name, "input"), pe_name, struct.patch_embed, rec_in)
        if recording is not None and "conv" in want:
            rec_c = recording.recorder(recording.conv, pe_name)
            set_forward(struct.patch_embed,
                         lambda x: ops.record_relevance(pe_rule(x), rec_c, dims=(2, 3)), saved)
        else:
            set_forward(struct.patch_embed, pe_rule, saved)
        if rules.residual_eps:
            for blk in struct.blocks:  # residual sums with the epsilon z-rule
                set_forward(blk.module, fam.residual_forward(blk, rules.residual_eps), saved)
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
             tokens: bool = False, family: TransformerFamily | None = None) -> Explanation:
    rec = Recording(tokens={} if tokens else None)
    return explanation_pass(model, inputs, targets, start, kinds, rec, explainable_vit(
        model, vr, rec, kinds=kinds, mlp_outputs=mlp_outputs, boundaries=boundaries, family=family))


def explanation_pass(model: nn.Module, inputs: Tensor, targets: Any, start: str, kinds: set[str],
                     rec: Recording, explainable: AbstractContextManager[Any]) -> Explanation:
    """One forward and one LRP backward under a transformer's `explainable` context (ViT or
    Swin: it yields a structure with `patch_embed_name`, `blocks` and `head_names`), its
    components collected in forward order. One pass for every transformer family."""
    x = inputs.detach()
    if x.is_inference():
        x = x.clone()
    x.requires_grad_(True)
    with explainable as struct:
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
    return finish_explanation(relevance, components, out, rec)


def finish_explanation(relevance: Tensor, components: dict[str, Tensor], out: Tensor,
                       rec: Recording) -> Explanation:
    """The `Explanation` of a transformer's LRP pass, refused (NonFiniteRelevanceError) when any
    relevance is NaN or infinite: one finiteness check over everything recorded."""
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
    return set(kinds if kinds is not None else TRANSFORMER_KINDS)


def explain_vit(model: nn.Module, inputs: Tensor, targets: Any = None, rules: Any = None, *,
                start: str = "target", kinds: Any = None, mlp_outputs: bool = False,
                matmul_eps: float = 0.0, residual_eps: float = 0.0, fused: bool = True,
                boundaries: tuple[float, float] = (0.25, 0.75),
                tokens: bool = False, family: TransformerFamily | None = None) -> Explanation:
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
    differently from the fused kernels). family: the model's (found when not given).
    """
    vr = ViTRules.from_config(rules, matmul_eps=matmul_eps, residual_eps=residual_eps,
                              fused=fused)
    vr.config.check_overrides({n for n, _ in model.named_modules() if n})
    with torch.inference_mode(False), torch.enable_grad(), _frozen_eval(model):
        return _explain(model, inputs, targets, vr, start, _kinds(kinds), mlp_outputs, boundaries,
                        tokens, family)


def component_relevance_vit(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                            rules: Any = None, *, kinds: Any = None, start: str = "target",
                            mlp_outputs: bool = False, matmul_eps: float = 0.0,
                            residual_eps: float = 0.0,
                            family: TransformerFamily | None = None) -> ComponentScores:
    """Mean over all samples of |R|, R and sum_t |R_t| per component (`component_relevance`
    for ViTs); ranks by sum_t |R_t| ("token-abs", the reference's) unless told otherwise."""
    vr = ViTRules.from_config(rules, matmul_eps=matmul_eps, residual_eps=residual_eps)
    vr.config.check_overrides({n for n, _ in model.named_modules() if n})
    sums = ScoreAccumulator()
    with torch.inference_mode(False), torch.enable_grad(), _frozen_eval(model):
        for images, labels in batches:
            exp = _explain(model, images, labels, vr, start, _kinds(kinds), mlp_outputs,
                           (0.25, 0.75), family=family)
            sums.add(exp.components, images.shape[0], exp.token_abs)
    return sums.result("lrp", {"rules": vr.config.to_dict(), "digest": vr.config.digest(),
                               "start": start, "matmul_eps": vr.matmul_eps,
                               "residual_eps": vr.residual_eps},
                       default_ranking=default_ranking("vit"))
