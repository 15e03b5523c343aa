"""torchvision VisionTransformer (vit_b_16 .. vit_h_14, and smaller configurations).

Components: attention heads (`encoder.layers.<i>.self_attention`, a packed
`nn.MultiheadAttention`) and MLP neurons (`mlp.0`), the patch embedding's channels
(`conv_proj`, group `input`). Stages: the blocks, split by quarters. LRP: AttnLRP / CP-LRP
(`pxopt.lrp.vit`): the attention is rewritten as explicit q·kᵀ, softmax and A·V ops with
rules (Achtibat et al. 2024, AttnLRP; lxt), LayerNorm by its rule, GELU by Pass. Only the
exact classes in `ALLOWED` are explained; anything else is refused by name.
Heads: a head is masked by zeroing its value rows of `in_proj_weight` / `in_proj_bias`;
criteria read the head outputs through an explicit forward of the attention; heads are not
sliced (the packed projection stays whole) nor physically removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from pxopt.errors import UnsupportedLayerError
from pxopt.families import register_family
from pxopt.families.base import Target
from pxopt.families.transformer import TransformerFamily
from pxopt.lrp import attention as ops
from pxopt.lrp import vit_check
from pxopt.lrp.vit import attention_core, linear_rule, qkv_fn, set_forward
from pxopt.lrp.vit_structure import ViTBlock, ViTStructure, block_group
from pxopt.prune.targets import value_rows

BASE_CHILDREN = ("conv_proj", "encoder", "heads")


def _root() -> type | None:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return None
    return VisionTransformer


def allowed_types() -> set[type]:
    """The submodule classes the engine path handles (exact types)."""
    from torchvision.models.vision_transformer import Encoder, EncoderBlock, MLPBlock

    return {
        Encoder, EncoderBlock, MLPBlock, nn.MultiheadAttention,
        nn.modules.linear.NonDynamicallyQuantizableLinear,  # MultiheadAttention.out_proj
        nn.Sequential, nn.Linear, nn.Conv2d, nn.Dropout, nn.Identity, nn.LayerNorm,
    }


class TorchvisionViT(TransformerFamily):
    name: ClassVar[str] = "torchvision-vit"
    priority: ClassVar[int] = 10
    summary: ClassVar[str] = ("torchvision VisionTransformer (attention heads, MLP neurons; "
                              "AttnLRP; blocks by quarters)")

    def matches(self, model: nn.Module) -> bool:
        root = _root()
        return root is not None and isinstance(model, root)

    def check(self, model: nn.Module) -> None:
        vit_check.check_root(model, _root(), BASE_CHILDREN)  # type: ignore[arg-type]
        vit_check.check_modules(model, allowed_types())

    def structure(self, model: nn.Module, boundaries: tuple[float, float]) -> ViTStructure:
        layers = list(model.encoder.layers.named_children())
        blocks = []
        for i, (child, blk) in enumerate(layers):
            name = f"encoder.layers.{child}"
            mha = blk.self_attention
            mlp = blk.mlp
            if not isinstance(mlp[0], nn.Linear) or not isinstance(mlp[3], nn.Linear):
                raise UnsupportedLayerError(f"{name}.mlp: expected Linear, act, Dropout, Linear, Dropout")
            blocks.append(ViTBlock(
                name=name, module=blk, index=i, group=block_group(i, len(layers), boundaries),
                attn_name=f"{name}.self_attention", attn=mha,
                fc1_name=f"{name}.mlp.0", fc1=mlp[0], act=mlp[1], fc2_name=f"{name}.mlp.3",
                fc2=mlp[3], num_heads=mha.num_heads))
        heads = [f"heads.{n}" for n, m in model.heads.named_children() if isinstance(m, nn.Linear)]
        acts = [m for m in model.heads.children() if not isinstance(m, nn.Linear)]
        return ViTStructure(self.name, "conv_proj", model.conv_proj, blocks, heads, acts)

    def patch_attention(self, block: ViTBlock, rules: Any, record: Callable[[Tensor], None] | None,
                        saved: list) -> None:
        mha: nn.MultiheadAttention = block.attn  # type: ignore[assignment]
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedLayerError(f"{block.attn_name}: only packed self-attention is supported")
        heads = mha.num_heads
        head_dim = mha.embed_dim // heads
        qkv = qkv_fn(rules.rule_for(block.attn_name, block.group), block.attn_name,
                     mha.in_proj_weight, mha.in_proj_bias, heads, head_dim, rules.softmax == "cp")
        out_name = f"{block.attn_name}.out_proj"
        out_rule = linear_rule(rules.rule_for(out_name, block.group), out_name,
                               mha.out_proj.weight, mha.out_proj.bias)

        def forward(query: Tensor, key: Tensor, value: Tensor,
                    key_padding_mask: Tensor | None = None, need_weights: bool = True,
                    attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                    is_causal: bool = False) -> tuple[Tensor, None]:
            if not (query is key and key is value) or key_padding_mask is not None \
                    or attn_mask is not None or is_causal:
                raise UnsupportedLayerError(
                    f"{block.attn_name}: only unmasked self-attention is supported")
            x = query if mha.batch_first else query.transpose(0, 1)
            b, n, d = x.shape
            q, k, v = qkv(x)
            out = attention_core(q, k, v, head_dim ** -0.5, rules, record)
            out = out.transpose(1, 2).reshape(b, n, d)
            out = out_rule(out)
            return (out if mha.batch_first else out.transpose(0, 1)), None

        set_forward(mha, forward, saved)

    def residual_forward(self, block: ViTBlock, eps: float) -> Callable[..., Tensor]:
        m = block.module

        def forward(inp: Tensor) -> Tensor:
            x, _ = m.self_attention(*(m.ln_1(inp),) * 3, need_weights=False)
            x = ops.residual_add(m.dropout(x), inp, eps)
            return ops.residual_add(x, m.mlp(m.ln_2(x)), eps)

        return forward

    # ------------------------------------------------------------------ heads as components
    def read_heads(self, layer: Any, fn: Callable[[Tensor], Tensor | None]) -> Callable[[], None]:
        """An explicit forward of the packed attention that hands `fn` the concatenated head
        outputs (batch_first self-attention without masks: what torchvision's ViT runs)."""
        mha = layer.module
        if not isinstance(mha, nn.MultiheadAttention) or not (mha.batch_first and mha._qkv_same_embed_dim):
            raise UnsupportedLayerError(
                f"{layer.name}: only batch_first self-attention with a fused in_proj is supported "
                "for head criteria")
        h, e = mha.num_heads, mha.embed_dim
        hd = e // h
        name = layer.name

        def forward(query: Tensor, key: Tensor, value: Tensor,
                    key_padding_mask: Tensor | None = None, need_weights: bool = True,
                    attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                    is_causal: bool = False) -> tuple[Tensor, None]:
            if key is not query or value is not query or key_padding_mask is not None \
                    or attn_mask is not None:
                raise UnsupportedLayerError(
                    f"{name}: head criteria need plain self-attention without masks")
            b, n, _ = query.shape
            qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
            q, k, v = qkv.reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=is_causal)
            o = o.transpose(1, 2).reshape(b, n, e)
            new = fn(o)
            o = o if new is None else new
            return F.linear(o, mha.out_proj.weight, mha.out_proj.bias), None

        mha.forward = forward  # instance attribute shadows the class method; removed on undo

        def undo() -> None:
            mha.__dict__.pop("forward", None)

        return undo

    def head_projection(self, layer: Any) -> tuple[Tensor, int]:
        mha = layer.module
        if not (isinstance(mha, nn.MultiheadAttention) and mha._qkv_same_embed_dim):
            raise UnsupportedLayerError(
                f"weight criterion: cannot find the q/k/v rows of heads in {layer.name}")
        return mha.in_proj_weight, int(mha.num_heads)

    def head_targets(self, layer: Any) -> tuple[list[Target], int, int]:
        mha = layer.module
        if not isinstance(mha, nn.MultiheadAttention):
            raise UnsupportedLayerError(f"{layer.name}: expected nn.MultiheadAttention")
        e, h = mha.embed_dim, mha.num_heads
        hd = e // h
        if mha._qkv_same_embed_dim:
            tg = value_rows(mha.in_proj_weight, mha.in_proj_bias, 2 * e, hd)
        else:
            tg = value_rows(mha.v_proj_weight, None, 0, hd)
            if mha.in_proj_bias is not None:
                tg += value_rows(mha.in_proj_bias, None, 2 * e, hd)
        return tg, h, hd


register_family(TorchvisionViT())
