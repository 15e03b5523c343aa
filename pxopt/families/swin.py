"""Swin transformers: torchvision `SwinTransformer` (swin_t / s / b) and timm `SwinTransformer`.

Everything Swin-specific lives here: what matches, the structure (stages, blocks, window
attention, MLPs, patch merging), the layer map and stage groups, the LRP patches and the
component sites. Generic pieces come from the engine (`pxopt.lrp.attention`,
`pxopt.lrp.vit`'s linear / conv rules and recorders).

Rules (AttnLRP, Achtibat et al. 2024, as lxt implements it; gradient×input convention):
- q·kᵀ and A·V: the uniform rule (each operand half), softmax: the configured rule
  ("attnlrp": its plain gradient, R = x ⊙ (R_out − s ΣR_out); "cp": attention held
  constant; "zplus"), exactly as the ViT path (`pxopt.lrp.attention.biased_attention`).
- relative position bias and the shifted-window mask: constants added to the logits. They
  get no relevance passed on: they absorb their share (bias ⊙ g) like a linear layer's
  bias, which is lxt's treatment of a constant addend. Masked logits (−100) have s ≈ 0.
- LayerNorm (blocks, patch merging, patch embedding, final norm): the normaliser held
  constant (AttnLRP's / lxt's identity rule on it), as the ViT path does.
- GELU: the Pass (identity) rule; MLP neurons are read at its output (= fc1's output).
- Linear layers (qkv, proj, fc1, fc2, patch-merging reduction, head): the rule of their
  group (`RuleConfig`), the patch-embedding conv the `input` group's.
- torch.roll (shift), padding, window partition / reverse, the 2×2 neighbour concatenation
  of patch merging, permutes, average pooling, residual sums: linear and parameter-free,
  so the plain gradient is their exact z-rule (relevance follows the permutations).
Bias-free, with the CP softmax and tiny epsilon, the input relevance equals the logit
(tests/test_swin.py, float64).

Components: per block the attention heads (kind "heads", a head's relevance is that of its
attention weights, as for ViTs; its tokens are the window tokens, in window order) and the
MLP neurons (kind "mlp", at fc1). Masking zeroes a head's value rows (exact: A·V = 0 for
any A, relative bias included) or an fc1 row; slicing removes fc1 / fc2 pairs and heads
(qkv rows, proj columns, relative-bias columns, `num_heads`; torchvision's attention also
gets an explicit forward while sliced, as its own derives the head width from the input
width). MLP neurons are removed with Torch-Pruning; timm heads by pxopt itself
(`remove_heads`: Torch-Pruning's history cannot record `num_heads`, so
`pxopt.prune.physical` keeps its own record and replays it on load); torchvision heads
stay masked in the pruned copy (removing them would need a forward of pxopt's in the
saved model). The
criteria read head outputs per image over all its windows (`read_heads_module`).

Stage groups (grouping "stage", `stage_rule` "swin"): Swin's stages are ResNet's
resolution stages (1/4 ... 1/32), so they are grouped as ResNets are: stage 1 low, the
middle stages mid, the last stage high (swin_t, depths 2-2-6-2: blocks 0-1 / 2-9 / 10-11);
two stages: low, high. Grouping "count": blocks by the count boundaries (quarters).
Patch embedding: `input`; classifier: `fc`.

Refused with UnsupportedLayerError naming the module: Swin V2 (cosine attention, a
continuous position-bias MLP), any subclass or unknown module inside the model, and
activations without the Pass rule.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxopt.errors import UnsupportedLayerError
from pxopt.families import register_family
from pxopt.families.base import Family
from pxopt.layermap import Layer, LayerMap, stage_groups
from pxopt.lrp import attention as ops
from pxopt.lrp import vit_check
from pxopt.lrp.explanation import Explanation
from pxopt.lrp.vit import (
    Recording,
    ViTRules,
    _frozen_eval,
    _kinds,
    _patch_act,
    conv_rule,
    explanation_pass,
    linear_rule,
    patch_linear,
    qkv_fn,
    set_forward,
)
from pxopt.lrp.vit_structure import ViTBlock, block_group
from pxopt.scores import ComponentScores, ScoreAccumulator, default_ranking
from pxopt.vocab import HIDDEN_GROUPS, TRANSFORMER_KINDS

NAME = "swin"
STAGE_RULE = "swin"

#: timm window attention -> its block, filled by `swin_structure`: the criteria's head site
#: reads the batch size at the block (the attention sees the windows of all images stacked)
_BLOCK_OF: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- matching


def _tv() -> Any:
    from torchvision.models import swin_transformer as tv
    return tv


def _timm() -> Any:
    try:
        from timm.models import swin_transformer as tm
    except ImportError:  # pragma: no cover
        return None
    return tm


def _roots() -> tuple[type, ...]:
    """Root classes matched (timm's V2 models included, so they are refused as Swin V2)."""
    out: list[type] = [_tv().SwinTransformer]
    tm = _timm()
    if tm is not None:
        out.append(tm.SwinTransformer)
        from timm.models import swin_transformer_v2, swin_transformer_v2_cr
        out += [swin_transformer_v2.SwinTransformerV2, swin_transformer_v2_cr.SwinTransformerV2Cr]
    return tuple(out)


def matches(model: nn.Module) -> bool:
    """True for torchvision and timm Swin transformers (V2 and subclasses included: they are
    matched so that they are refused clearly, never sent to the CNN engine)."""
    return isinstance(model, _roots())


def _allowed(family: str) -> tuple[type, ...]:
    """Exact module classes a supported Swin may contain (a subclass may change forward)."""
    base: list[type] = [nn.Sequential, nn.Conv2d, nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout,
                        nn.Identity, nn.Flatten]
    if family == "torchvision":
        from torchvision.ops.misc import MLP, Permute
        from torchvision.ops.stochastic_depth import StochasticDepth
        tv = _tv()
        return (*base, tv.SwinTransformer, tv.SwinTransformerBlock, tv.ShiftedWindowAttention,
                tv.PatchMerging, MLP, Permute, StochasticDepth, nn.AdaptiveAvgPool2d)
    from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, SelectAdaptivePool2d
    from timm.layers import LayerNorm as TimmLayerNorm
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
    tm = _timm()
    return (*base, tm.SwinTransformer, tm.SwinTransformerStage, tm.SwinTransformerBlock,
            tm.WindowAttention, tm.PatchMerging, PatchEmbed, Mlp, DropPath, ClassifierHead,
            SelectAdaptivePool2d, FastAdaptiveAvgPool, nn.Softmax, TimmLayerNorm)


def _refuse(name: str, module: nn.Module, why: str) -> UnsupportedLayerError:
    where = f"layer {name!r}" if name else "the model"
    return UnsupportedLayerError(
        f"{where} ({vit_check.class_name(module)}) {why}; the Swin LRP engine refuses it "
        "rather than give it the plain gradient")


def check_swin(model: nn.Module) -> str:
    """The family ("torchvision" | "timm") of a supported Swin; raise on anything else."""
    tv, tm = _tv(), _timm()
    if type(model) is tv.SwinTransformer:
        family = "torchvision"
    elif tm is not None and type(model) is tm.SwinTransformer:
        family = "timm"
    elif "V2" in type(model).__name__:
        raise _refuse("", model, "is Swin V2 (cosine attention and a position-bias MLP are not "
                                 "supported)")
    else:
        raise _refuse("", model, "is not exactly torchvision's or timm's SwinTransformer")
    allowed = _allowed(family)
    for name, m in model.named_modules():
        if type(m) not in allowed:
            hint = " (Swin V2: cosine attention and a position-bias MLP are not supported)" \
                if "V2" in type(m).__name__ else ""
            raise _refuse(name, m, f"is not a supported Swin part{hint}")
        if isinstance(m, nn.GELU) and m.approximate not in ("none", "tanh"):  # pragma: no cover
            raise _refuse(name, m, "has an unknown approximation")
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
            raise _refuse(name, m, "normalises more than the last dim")
    if family == "timm":
        pool = getattr(model.head, "global_pool", None)
        if getattr(pool, "pool_type", "avg") not in ("avg", ""):
            raise _refuse("head.global_pool", pool, f"pools with {pool.pool_type!r} (only 'avg')")
        if not isinstance(model.head.fc, nn.Linear):
            raise _refuse("head.fc", model.head.fc, "is not one Linear classifier")
    elif not isinstance(model.head, nn.Linear):
        raise _refuse("head", model.head, "is not one Linear classifier")
    return family


# --------------------------------------------------------------------------- structure


@dataclass
class SwinBlock(ViTBlock):
    """One Swin block: a transformer block (its window attention and MLP; `index` among all
    blocks) with the stage it belongs to."""

    stage: int = 0


@dataclass
class SwinStructure:
    """The parts of a Swin that LRP and pruning need, in forward order."""

    family: str  # "torchvision" | "timm"
    patch_embed_name: str
    patch_embed: nn.Conv2d
    blocks: list[SwinBlock]
    merges: list[tuple[str, nn.Linear, str]]  # patch-merging reductions (name, layer, group)
    head_name: str
    n_stages: int

    @property
    def head_names(self) -> list[str]:
        """The classifier as `ViTStructure` names it, so both run one explanation pass."""
        return [self.head_name]


def _stage_group(stage: int, n_stages: int) -> str:
    """ResNet's stage rule on Swin's stages: first low, last high, the rest mid."""
    groups = stage_groups(n_stages) if n_stages < 4 else \
        ["low"] + ["mid"] * (n_stages - 2) + ["high"]
    return groups[stage] if groups else "mid"


def swin_structure(model: nn.Module, boundaries: tuple[float, float] = (0.25, 0.75),
                   grouping: str = "stage") -> SwinStructure:
    """Find stages, blocks, attention, MLPs, patch merging and head; raise on unknown parts."""
    family = check_swin(model)
    raw: list[tuple[int, str, nn.Module]] = []  # (stage, block name, block)
    merges: list[tuple[str, nn.Linear, int]] = []
    if family == "torchvision":
        stage = -1
        for i, child in enumerate(model.features):
            if i == 0:
                continue
            if isinstance(child, _tv().PatchMerging):
                merges.append((f"features.{i}.reduction", child.reduction, stage + 1))
                continue
            stage += 1
            raw += [(stage, f"features.{i}.{j}", b) for j, b in enumerate(child)]
        n_stages = stage + 1
        pe_name, pe = "features.0.0", model.features[0][0]
        head_name = "head"
    else:
        for s, st in enumerate(model.layers):
            if isinstance(st.downsample, _timm().PatchMerging):
                merges.append((f"layers.{s}.downsample.reduction", st.downsample.reduction, s))
            raw += [(s, f"layers.{s}.blocks.{j}", b) for j, b in enumerate(st.blocks)]
        n_stages = len(model.layers)
        pe_name, pe = "patch_embed.proj", model.patch_embed.proj
        head_name = "head.fc"
    blocks = []
    for i, (s, name, b) in enumerate(raw):
        group = _stage_group(s, n_stages) if grouping == "stage" else \
            block_group(i, len(raw), boundaries)
        if family == "torchvision":
            fc1_name, fc1, act, fc2_name, fc2 = (f"{name}.mlp.0", b.mlp[0], b.mlp[1],
                                                 f"{name}.mlp.3", b.mlp[3])
        else:
            fc1_name, fc1, act, fc2_name, fc2 = (f"{name}.mlp.fc1", b.mlp.fc1, b.mlp.act,
                                                 f"{name}.mlp.fc2", b.mlp.fc2)
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise _refuse(f"{name}.mlp", b.mlp, "is not Linear, activation, Linear")
        if not vit_check.is_pass_activation(act):
            raise _refuse(f"{name}.mlp", act, "has an activation without a rule")
        if family == "timm":
            _BLOCK_OF[b.attn] = b
        blocks.append(SwinBlock(name, b, i, group, f"{name}.attn", b.attn, fc1_name, fc1, act,
                                fc2_name, fc2, int(b.attn.num_heads), stage=s))
    by_stage = {b.stage: b.group for b in blocks}
    merge_groups = [(n, m, by_stage.get(s, "mid")) for n, m, s in merges]
    return SwinStructure(family, pe_name, pe, blocks, merge_groups, head_name, n_stages)


# --------------------------------------------------------------------------- layer map


def discover_swin(model: nn.Module, boundaries: tuple[float, float] = (0.25, 0.75),
                  grouping: str = "stage") -> LayerMap | None:
    """Layer map of a Swin (None for other models): patch embedding `input`, per block its
    attention ("heads") and MLP fc1 ("mlp") in the block's group, the classifier `fc`."""
    if not matches(model):
        return None
    st = swin_structure(model, boundaries, grouping)
    lm = LayerMap([Layer(st.patch_embed_name, st.patch_embed, "conv", "input",
                         int(st.patch_embed.out_channels), -1)])
    for b in st.blocks:
        lm.append(Layer(b.attn_name, b.attn, "heads", b.group, b.num_heads, b.index))
        lm.append(Layer(b.fc1_name, b.fc1, "mlp", b.group, int(b.fc1.out_features), b.index))
    head = model.get_submodule(st.head_name)
    lm.append(Layer(st.head_name, head, "head", "fc", int(head.out_features), len(st.blocks)))
    lm.stage_rule = STAGE_RULE if grouping == "stage" else ""
    return lm



# --------------------------------------------------------------------------- LRP patches


def _tv_shift_mask(pad_h: int, pad_w: int, ws: list[int], shift: list[int], like: Tensor) -> Tensor:
    """torchvision's shifted-window mask, (num_windows, N, N) with 0 / −100 (its own code)."""
    mask = like.new_zeros((pad_h, pad_w))
    hs = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
    wsl = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in hs:
        for w in wsl:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    nw = (pad_h // ws[0]) * (pad_w // ws[1])
    mask = mask.view(pad_h // ws[0], ws[0], pad_w // ws[1], ws[1]).permute(0, 2, 1, 3)
    mask = mask.reshape(nw, ws[0] * ws[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _window_bias(rel: Tensor, mask: Tensor | None, windows: int, heads: int, n: int) -> Tensor:
    """Relative bias (1, h, N, N) plus the window mask (nW, N, N) as (windows·batch, h, N, N)."""
    if mask is None:
        return rel
    nw = mask.shape[0]
    bias = rel.unsqueeze(1) + mask.view(1, nw, 1, n, n)
    return bias.expand(windows // nw, nw, heads, n, n).reshape(windows, heads, n, n)


@dataclass
class _TvWindows:
    """Geometry of one call of torchvision's shifted-window attention: the input's size, its
    padded size, the window size and the shift in force (both as torchvision adjusts them)."""

    b: int
    h: int
    w: int
    ph: int
    pw: int
    ws: list[int]
    shift: list[int]

    @property
    def count(self) -> int:
        return (self.ph // self.ws[0]) * (self.pw // self.ws[1])

    def bias(self, attn: nn.Module, heads: int, n: int, like: Tensor) -> Tensor:
        """The relative position bias plus the shift mask, as `_window_bias` lays them out."""
        mask = _tv_shift_mask(self.ph, self.pw, self.ws, self.shift, like) if sum(self.shift) > 0 else None
        return _window_bias(attn.get_relative_position_bias().to(like.dtype), mask,
                            self.b * self.count, heads, n)

    def merge(self, out: Tensor) -> Tensor:
        """(batch·windows, N, C) back to (batch, H, W, C): undo the partition, shift and pad."""
        ws, c = self.ws, out.shape[-1]
        out = out.view(self.b, self.ph // ws[0], self.pw // ws[1], ws[0], ws[1], c)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(self.b, self.ph, self.pw, c)
        if sum(self.shift) > 0:
            out = torch.roll(out, shifts=(self.shift[0], self.shift[1]), dims=(1, 2))
        return out[:, :self.h, :self.w, :].contiguous()


def _tv_partition(attn: nn.Module, x: Tensor) -> tuple[Tensor, _TvWindows]:
    """torchvision's pad, shift and window partition of (batch, H, W, C) (the steps of its
    `shifted_window_attention`): the windows as (batch·windows, N, C) and their geometry."""
    ws, shift = list(attn.window_size), list(attn.shift_size)
    b, h_, w_, c = x.shape
    pad_r, pad_b = (ws[1] - w_ % ws[1]) % ws[1], (ws[0] - h_ % ws[0]) % ws[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    if ws[0] >= ph:
        shift[0] = 0
    if ws[1] >= pw:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    g = _TvWindows(b, h_, w_, ph, pw, ws, shift)
    x = x.view(b, ph // ws[0], ws[0], pw // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * g.count, ws[0] * ws[1], c), g


class _HeadRecorder:
    """Turns per-window head relevance (batch·nW, heads, N) into (batch, heads, nW·N)."""

    def __init__(self, rec: Callable[[Tensor], None] | None, batch: list[int]):
        self.rec, self.batch = rec, batch

    def __call__(self, r: Tensor) -> None:
        b = self.batch[0]
        h, n = r.shape[1], r.shape[2]
        self.rec(r.reshape(b, -1, h, n).transpose(1, 2).reshape(b, h, -1))  # type: ignore[misc]

    def get(self) -> Callable[[Tensor], None] | None:
        return self if self.rec is not None else None


def _patch_tv_attention(blk: SwinBlock, rules: ViTRules, rec: Callable[[Tensor], None] | None,
                        saved: list) -> None:
    attn = blk.attn
    heads = attn.num_heads
    dim = attn.qkv.in_features
    hd = dim // heads
    qkv_name, proj_name = f"{blk.attn_name}.qkv", f"{blk.attn_name}.proj"
    qkv = qkv_fn(rules.rule_for(qkv_name, blk.group), qkv_name, attn.qkv.weight, attn.qkv.bias,
                  heads, hd, rules.softmax == "cp")
    proj = linear_rule(rules.rule_for(proj_name, blk.group), proj_name, attn.proj.weight,
                       attn.proj.bias)

    def forward(x: Tensor) -> Tensor:  # torchvision's shifted_window_attention, eval mode
        x, g = _tv_partition(attn, x)
        n, c = x.shape[1], x.shape[2]
        q, k, v = qkv(x)
        bias = g.bias(attn, heads, n, x.detach())
        out = ops.biased_attention(q, k, v, hd ** -0.5, bias, rules.softmax, eps=rules.matmul_eps,
                                   fused=rules.fused, record=rec)
        return g.merge(proj(out.transpose(1, 2).reshape(x.shape[0], n, c)))

    set_forward(attn, forward, saved)


def _patch_timm_attention(blk: SwinBlock, rules: ViTRules, rec: Callable[[Tensor], None] | None,
                          saved: list) -> None:
    attn = blk.attn
    name = f"{blk.attn_name}.qkv"
    hd = attn.qkv.out_features // (3 * attn.num_heads)
    qkv = qkv_fn(rules.rule_for(name, blk.group), name, attn.qkv.weight, attn.qkv.bias,
                  attn.num_heads, hd, rules.softmax == "cp")

    def forward(x: Tensor, mask: Tensor | None = None) -> Tensor:
        windows, n, _ = x.shape
        q, k, v = qkv(x)
        bias = _window_bias(attn._get_rel_pos_bias().to(x.dtype),
                            None if mask is None else mask.to(x.dtype), windows, attn.num_heads, n)
        out = ops.biased_attention(q, k, v, attn.scale, bias, rules.softmax, eps=rules.matmul_eps,
                                   fused=rules.fused, record=rec)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(windows, n, -1)))

    set_forward(attn, forward, saved)


def _flat_tokens(rec: Callable[[Tensor], None]) -> Callable[[Tensor], None]:
    """torchvision's MLP runs on (batch, H, W, n): hand the recorder (batch, H·W, n)."""
    return lambda t: rec(t.reshape(t.shape[0], -1, t.shape[-1]))


@contextmanager
def explainable_swin(model: nn.Module, rules: ViTRules, recording: Recording | None = None, *,
                     kinds: set[str] | None = None) -> Iterator[SwinStructure]:
    """Patch `model` in place so its backward computes LRP; undo every patch on exit.

    A pre-hook on the model keeps the batch size of each forward: head relevance is
    regrouped from windows (all images' windows stacked) to images with it."""
    st = swin_structure(model)
    want = kinds if kinds is not None else set(TRANSFORMER_KINDS)
    batch = [0]
    saved: list = []
    hook = model.register_forward_pre_hook(lambda m, args: batch.__setitem__(0, int(args[0].shape[0])))
    try:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                set_forward(m, lambda x, m=m: ops.layer_norm(x, m.weight, m.bias, m.eps), saved)
        for blk in st.blocks:
            rec_h = _HeadRecorder(recording.token_recorder(recording.heads, blk.attn_name, heads=True)
                                  if recording is not None and "heads" in want else None, batch).get()
            if st.family == "torchvision":
                _patch_tv_attention(blk, rules, rec_h, saved)
            else:
                _patch_timm_attention(blk, rules, rec_h, saved)
                name = f"{blk.attn_name}.proj"
                patch_linear(blk.attn.proj, name, rules.rule_for(name, blk.group), saved)
            rec_m = _flat_tokens(recording.token_recorder(recording.mlp, blk.fc1_name)) \
                if recording is not None and "mlp" in want else None
            _patch_act(blk.act, rec_m, saved)
            patch_linear(blk.fc1, blk.fc1_name, rules.rule_for(blk.fc1_name, blk.group), saved)
            patch_linear(blk.fc2, blk.fc2_name, rules.rule_for(blk.fc2_name, blk.group), saved)
        for name, red, group in st.merges:
            patch_linear(red, name, rules.rule_for(name, group), saved)
        patch_linear(model.get_submodule(st.head_name), st.head_name,
                      rules.rule_for(st.head_name, "fc"), saved)
        rec_in = recording.recorder(recording.input, "input") if recording is not None else None
        pe_rule = conv_rule(rules.rule_for(st.patch_embed_name, "input"), st.patch_embed_name,
                            st.patch_embed, rec_in)
        if recording is not None and "conv" in want:
            rec_c = recording.recorder(recording.conv, st.patch_embed_name)
            set_forward(st.patch_embed,
                         lambda x: ops.record_relevance(pe_rule(x), rec_c, dims=(2, 3)), saved)
        else:
            set_forward(st.patch_embed, pe_rule, saved)
        yield st
    finally:
        hook.remove()
        for module, had, fn in reversed(saved):
            if had:
                module.forward = fn
            else:
                del module.forward


# --------------------------------------------------------------------------- explain


def _explain(model: nn.Module, inputs: Tensor, targets: Any, vr: ViTRules, start: str,
             kinds: set[str], tokens: bool = False) -> Explanation:
    rec = Recording(tokens={} if tokens else None)
    return explanation_pass(model, inputs, targets, start, kinds, rec,
                            explainable_swin(model, vr, rec, kinds=kinds))


def explain_swin(model: nn.Module, inputs: Tensor, targets: Any = None, rules: Any = None, *,
                 start: str = "target", kinds: Any = None, matmul_eps: float = 0.0,
                 fused: bool = True, tokens: bool = False) -> Explanation:
    """LRP of a Swin in one forward and one backward pass (`pxopt.lrp.explain` for Swin).

    Same contract as `pxopt.lrp.vit.explain_vit`: components (default heads and mlp) per
    attention module (batch, heads) and per MLP fc1 (batch, hidden), summed over tokens;
    "conv" adds the patch embedding's channels, "head" the relevance at the logits."""
    vr = ViTRules.from_config(rules, matmul_eps=matmul_eps, fused=fused)
    vr.config.check_overrides({n for n, _ in model.named_modules() if n})
    with torch.inference_mode(False), torch.enable_grad(), _frozen_eval(model):
        return _explain(model, inputs, targets, vr, start, _kinds(kinds), tokens)


def component_relevance_swin(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                             rules: Any = None, *, kinds: Any = None, start: str = "target",
                             matmul_eps: float = 0.0) -> ComponentScores:
    """Mean over all samples of |R|, R and sum_t |R_t| per component (as for ViTs)."""
    vr = ViTRules.from_config(rules, matmul_eps=matmul_eps)
    vr.config.check_overrides({n for n, _ in model.named_modules() if n})
    sums = ScoreAccumulator()
    with torch.inference_mode(False), torch.enable_grad(), _frozen_eval(model):
        for images, labels in batches:
            exp = _explain(model, images, labels, vr, start, _kinds(kinds))
            sums.add(exp.components, images.shape[0], exp.token_abs)
    return sums.result("lrp", {"rules": vr.config.to_dict(), "digest": vr.config.digest(),
                               "start": start, "matmul_eps": vr.matmul_eps},
                       default_ranking=default_ranking("vit"))


# --------------------------------------------------------------------------- criteria sites


def read_heads_module(attn: nn.Module, fn: Callable[[Tensor], Tensor | None],
                      name: str) -> Callable[[], None]:
    """Let `fn` read (and replace) a Swin attention's concatenated head outputs before the
    output projection, as (batch, tokens, heads · head_dim) with the tokens of all windows
    of an image (window order); returns the undo.

    The attention gets an explicit forward (its own code, eval mode). timm's window attention
    sees the windows of all images stacked: the batch size is read by a pre-hook on its block
    (known once `discover_layers` / `swin_structure` has seen the model)."""
    tm = _timm()
    if tm is not None and type(attn) is tm.WindowAttention:
        return _read_timm_heads(attn, fn, name)
    if type(attn) is not _tv().ShiftedWindowAttention:
        raise UnsupportedLayerError(f"{name} ({type(attn).__name__}): not a Swin window attention")

    hd = attn.qkv.in_features // attn.num_heads
    attn.forward = lambda x: _tv_plain_forward(attn, x, hd, fn)  # type: ignore[method-assign]

    def undo() -> None:
        attn.__dict__.pop("forward", None)

    return undo


def _tv_plain_forward(attn: nn.Module, x: Tensor, hd: int,
                      fn: Callable[[Tensor], Tensor | None] | None = None) -> Tensor:
    """torchvision's shifted-window attention in eval mode with the head width `hd` given
    (its own code takes input width / num_heads, wrong once heads are sliced); `fn` may read
    or replace the head outputs, (batch, tokens of all windows, heads · hd)."""
    heads = attn.num_heads
    x, g = _tv_partition(attn, x)
    b, nw, n = g.b, g.count, x.shape[1]
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(
        b * nw, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    bias = g.bias(attn, heads, n, x.detach())
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=hd ** -0.5)
    if fn is not None:
        o = o.transpose(1, 2).reshape(b, nw * n, heads * hd)  # windows of one image together
        new = fn(o)
        o = (o if new is None else new).reshape(b * nw, n, heads * hd)
    else:
        o = o.transpose(1, 2).reshape(b * nw, n, heads * hd)
    return g.merge(F.linear(o, attn.proj.weight, attn.proj.bias))


def _read_timm_heads(attn: nn.Module, fn: Callable[[Tensor], Tensor | None],
                     name: str) -> Callable[[], None]:
    block = _BLOCK_OF.get(attn)
    if block is None:
        raise UnsupportedLayerError(
            f"{name}: a timm Swin window attention whose block is unknown (build the layer map "
            "with discover_layers on the whole model first)")
    batch = [0]

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        batch[0] = int(args[0].shape[0])

    handle = block.register_forward_pre_hook(pre)

    def forward(x: Tensor, mask: Tensor | None = None) -> Tensor:
        windows, n, _ = x.shape
        heads = attn.num_heads
        q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(
            windows, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        bias = _window_bias(attn._get_rel_pos_bias().to(x.dtype),
                            None if mask is None else mask.to(x.dtype), windows, heads, n)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        width = o.shape[1] * o.shape[3]
        o = o.transpose(1, 2).reshape(batch[0], -1, width)  # windows of one image together
        new = fn(o)
        o = (o if new is None else new).reshape(windows, n, width)
        return attn.proj_drop(attn.proj(o))

    attn.forward = forward  # type: ignore[method-assign]

    def undo() -> None:
        handle.remove()
        attn.__dict__.pop("forward", None)

    return undo


def is_window_attention(module: nn.Module) -> bool:
    """A torchvision or timm Swin window attention (the criteria route its heads here)."""
    tm = _timm()
    return type(module) is _tv().ShiftedWindowAttention or \
        (tm is not None and type(module) is tm.WindowAttention)


def remove_heads(attn: nn.Module, kept: Tensor) -> None:
    """Keep only the heads `kept` of a timm `WindowAttention` for good (physical removal):
    the edits of `slice_window_heads` written as new Parameters, `num_heads` set. Torch-
    Pruning's history does not record it: `pxopt.prune.physical` stores the removed heads
    in its record and replays this on load."""
    hs = slice_window_heads(attn, kept) if sliceable_heads(attn) else None
    if hs is None:
        raise UnsupportedLayerError(f"{type(attn).__name__}: its heads cannot be removed")
    with torch.no_grad():
        for e in hs.edits:
            store = getattr(e.module, e.store)
            orig = store.get(e.attr)
            if orig is None:
                continue
            new = orig.detach().index_select(e.dim, e.index.to(orig.device)).clone()
            store[e.attr] = nn.Parameter(new, requires_grad=orig.requires_grad) \
                if e.store == "_parameters" else new
    for mod, attr, val in hs.attrs:
        setattr(mod, attr, val)
    attn.qkv.out_features = attn.qkv.weight.shape[0]
    attn.proj.in_features = attn.proj.weight.shape[1]


def sliceable_heads(attn: nn.Module) -> bool:
    """True for timm `WindowAttention` (its heads can be sliced and removed for good)."""
    tm = _timm()
    return tm is not None and type(attn) is tm.WindowAttention


def slice_window_heads(attn: nn.Module, kept: Tensor) -> Any:
    """`pxopt.families.base.HeadSlice` running a Swin window attention with only the heads
    `kept` (sorted indices): q/k/v rows, proj columns, the relative-bias table's columns and
    `num_heads`; torchvision's also gets an explicit forward for the time of the slice (its
    own derives the head width from the input width). None for any other attention."""
    from pxopt.families.base import HeadSlice, SliceEdit

    if not is_window_attention(attn):
        return None
    h = int(attn.num_heads)
    hd = attn.qkv.out_features // (3 * h)
    dev = attn.qkv.weight.device
    kept = kept.to(dev)
    cols = (kept[:, None] * hd + torch.arange(hd, device=dev)).flatten()
    rows = torch.cat([cols + part * h * hd for part in range(3)])
    edits = [SliceEdit(attn.qkv, "_parameters", "weight", 0, rows),
             SliceEdit(attn.qkv, "_parameters", "bias", 0, rows),
             SliceEdit(attn.proj, "_parameters", "weight", 1, cols),
             SliceEdit(attn, "_parameters", "relative_position_bias_table", 1, kept)]
    attrs: list[tuple[nn.Module, str, Any]] = [(attn, "num_heads", int(kept.numel()))]
    if not sliceable_heads(attn):  # torchvision
        attrs.append((attn, "forward", lambda x: _tv_plain_forward(attn, x, hd)))
    return HeadSlice(edits, attrs)


# --------------------------------------------------------------------------- family adapter


class SwinFamily(Family):
    """torchvision / timm Swin transformers as one family (`pxopt.families.base.Family`).

    kind "vit": the search space treats it as a transformer (softmax rules, token-abs
    ranking); name "swin": its own family with its own engine entry, stage rule and sites.
    """

    name = NAME
    kind = "vit"
    priority = 20
    summary = ("Swin transformers (torchvision swin_t/s/b, timm SwinTransformer): window "
               "attention heads and MLP neurons; stages 1 / middle / last")

    def matches(self, model: nn.Module) -> bool:
        try:
            return matches(model)
        except ImportError:  # pragma: no cover
            return False

    def layer_map(self, model: nn.Module, boundaries: tuple[float, float], *, grouping: str,
                  example_input: Tensor | None) -> LayerMap:
        lm = discover_swin(model, boundaries, grouping)
        assert lm is not None
        lm.grouping = grouping
        return lm

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None) -> tuple[str, dict[str, str]] | None:
        lm = discover_swin(model)
        assert lm is not None
        groups = {la.name: la.group for la in lm if la.group in HIDDEN_GROUPS}
        return STAGE_RULE, {n: groups[n] for n in names if n in groups}

    def classifier_names(self, model: nn.Module) -> list[str]:
        return [swin_structure(model).head_name]

    def explain(self, model: nn.Module, inputs: Tensor, targets: Any, rules: Any, *, start: str,
                kinds: Iterable[str] | None, layer_map: Any = None) -> Explanation:
        return explain_swin(model, inputs, targets, rules, start=start, kinds=kinds)

    def component_relevance(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                            rules: Any, *, kinds: Iterable[str] | None, layer_map: Any = None,
                            start: str = "target") -> ComponentScores:
        return component_relevance_swin(model, batches, rules, kinds=kinds, start=start)

    def read_heads(self, layer: Any, fn: Callable[[Tensor], Tensor | None]) -> Callable[[], None]:
        return read_heads_module(layer.module, fn, layer.name)

    def head_targets(self, layer: Any) -> tuple[list, int, int]:
        """A head's value rows of the packed qkv (exact: A·V = 0 whatever A and the bias)."""
        from pxopt.prune.targets import value_rows

        mod = layer.module
        if not is_window_attention(mod):
            raise UnsupportedLayerError(
                f"{layer.name or type(mod).__name__} ({type(mod).__name__}): not a Swin window attention")
        h = int(mod.num_heads)
        hd = mod.qkv.out_features // (3 * h)
        return value_rows(mod.qkv.weight, mod.qkv.bias, 2 * h * hd, hd), h, hd

    def head_projection(self, layer: Any) -> tuple[Tensor, int]:
        """The packed qkv weight (q, k, v sections in order, as both libraries pack it)."""
        self.head_targets(layer)  # refuses anything but a Swin window attention
        return layer.module.qkv.weight, int(layer.module.num_heads)

    def slice_heads(self, layer: Any, kept: Tensor) -> Any:
        """q/k/v rows, proj columns and the relative-bias table's columns of the kept heads,
        `num_heads` set; torchvision with an explicit forward while sliced."""
        return slice_window_heads(layer.module, kept)

    def removable(self, layer: Any) -> bool:
        """Torch-Pruning shrinks MLP neurons; heads are not its (see `remove_components`)."""
        return layer.kind != "heads"

    def remove_components(self, module: nn.Module, name: str, mask: Tensor) -> list[int]:
        """timm heads: removed by `remove_heads` (one kept, masked, when all are pruned);
        torchvision heads stay masked (its head width follows the input width)."""
        idx = mask.nonzero().flatten().tolist()
        if not idx or not sliceable_heads(module):
            return []
        if len(idx) == mask.numel():
            idx = idx[1:]
        gone = set(idx)
        remove_heads(module, torch.tensor([i for i in range(mask.numel()) if i not in gone]))
        return idx

    def physical_options(self, model: nn.Module) -> dict[str, Any]:
        return {}


FAMILY = register_family(SwinFamily())
