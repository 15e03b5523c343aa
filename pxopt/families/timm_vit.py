"""timm VisionTransformer (vit_*, deit_* without distillation, with register tokens,
LayerScale, qk-norm), pooled by token / avg / max.

Components: attention heads (`blocks.<i>.attn`, timm `Attention` with a packed `qkv`) and
MLP neurons (`mlp.fc1`), the patch embedding's channels (`patch_embed.proj`, group
`input`). Stages: the blocks, split by quarters. LRP: AttnLRP / CP-LRP (`pxopt.lrp.vit`;
Achtibat et al. 2024, lxt). Refused by name (`check`): subclasses with their own forward
(e.g. `VisionTransformerDistilled`'s `head_dist`), attention pooling, a missing classifier,
and every submodule class outside `allowed_types` (StdConv2d, RmsNorm, GluMlp / SwiGLU,
hybrid backbones, gated attention).
Heads: masked by zeroing their value rows of `qkv` (and `v_bias`); criteria read the head
outputs at `attn.proj`'s input; plain attention (no gate, no scale-norm, no separate q
bias) runs sliced with only its kept heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pxopt.errors import UnsupportedLayerError
from pxopt.families import register_family
from pxopt.families.base import HeadSlice, SliceEdit, Target
from pxopt.families.transformer import TransformerFamily
from pxopt.lrp import attention as ops
from pxopt.lrp import vit_check
from pxopt.lrp.vit import attention_core, patch_linear, qkv_fn, set_forward
from pxopt.lrp.vit_structure import ViTBlock, ViTStructure, block_group
from pxopt.prune.targets import head_rows, value_rows

#: timm VisionTransformer.global_pool values that pool tokens linearly (or winner takes all)
TIMM_POOLS = ("token", "avg", "max", "avgmax")
BASE_CHILDREN = ("patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm",
                 "attn_pool", "fc_norm", "head_drop", "head")


def _root() -> type | None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return None
    return VisionTransformer


def allowed_types() -> set[type]:
    """The submodule classes the engine path handles (exact types)."""
    from timm.layers import DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    allowed = {
        Block, Attention, Mlp, PatchEmbed, LayerScale, DropPath, PatchDropout,
        nn.Sequential, nn.Linear, nn.Conv2d, nn.Dropout, nn.Identity,
    }
    return allowed | vit_check.layer_norms()


def _check_head(model: nn.Module) -> None:
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        raise vit_check.refuse("attn_pool", attn_pool, "is attention pooling (global_pool 'map' / "
                               "'prr'), which has no LRP rule here")
    pool = getattr(model, "global_pool", "token")
    if pool not in TIMM_POOLS:
        raise vit_check.refuse("", model, f"has global_pool={pool!r}: it must pool the tokens to "
                               f"one vector ({', '.join(TIMM_POOLS)}) before the classifier")
    if type(model.head) is not nn.Linear:
        raise vit_check.refuse("head", model.head, "is not a Linear classifier (num_classes=0?), "
                               "so the model returns features, not logits")


def plain_attention(mod: nn.Module) -> bool:
    """timm Attention whose heads can be sliced: packed qkv, no gate, no scale-norm, no q bias."""
    return (isinstance(getattr(mod, "qkv", None), nn.Linear)
            and isinstance(getattr(mod, "proj", None), nn.Linear)
            and hasattr(mod, "attn_dim") and getattr(mod, "gate", None) is None
            and isinstance(getattr(mod, "norm", nn.Identity()), nn.Identity)
            and getattr(mod, "q_bias", None) is None)


class TimmViT(TransformerFamily):
    name: ClassVar[str] = "timm-vit"
    priority: ClassVar[int] = 10
    summary: ClassVar[str] = ("timm VisionTransformer (attention heads, MLP neurons; AttnLRP; "
                              "blocks by quarters)")

    def matches(self, model: nn.Module) -> bool:
        root = _root()
        return root is not None and isinstance(model, root)

    def check(self, model: nn.Module) -> None:
        vit_check.check_root(model, _root(), BASE_CHILDREN)  # type: ignore[arg-type]
        _check_head(model)
        vit_check.check_modules(model, allowed_types())

    def structure(self, model: nn.Module, boundaries: tuple[float, float]) -> ViTStructure:
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
                raise UnsupportedLayerError(
                    f"{name}.attn: only timm Attention with qkv (no gate) is supported")
            blocks.append(ViTBlock(
                name=name, module=blk, index=i, group=block_group(i, n, boundaries),
                attn_name=f"{name}.attn", attn=attn, fc1_name=f"{name}.mlp.fc1", fc1=mlp.fc1,
                act=mlp.act, fc2_name=f"{name}.mlp.fc2", fc2=mlp.fc2, num_heads=attn.num_heads))
        heads = ["head"] if isinstance(model.head, nn.Linear) else []
        proj = model.patch_embed.proj
        if not isinstance(proj, nn.Conv2d):
            raise UnsupportedLayerError("patch_embed.proj: expected a Conv2d")
        return ViTStructure(self.name, "patch_embed.proj", proj, blocks, heads, [])

    def patch_attention(self, block: ViTBlock, rules: Any, record: Callable[[Tensor], None] | None,
                        saved: list) -> None:
        attn = block.attn
        name = f"{block.attn_name}.qkv"
        qkv = qkv_fn(rules.rule_for(name, block.group), name, attn.qkv.weight, attn.qkv.bias,
                     attn.num_heads, attn.head_dim, rules.softmax == "cp")

        def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            if attn_mask is not None or is_causal:
                raise UnsupportedLayerError(f"{block.attn_name}: masked attention is not supported")
            b, n, _ = x.shape
            q, k, v = qkv(x)
            q, k = attn.q_norm(q), attn.k_norm(k)
            out = attention_core(q, k, v, attn.scale, rules, record)
            out = out.transpose(1, 2).reshape(b, n, -1)
            out = attn.norm(out)
            out = attn.proj(out)
            return attn.proj_drop(out)

        set_forward(attn, forward, saved)
        proj = f"{block.attn_name}.proj"  # qkv runs inside the patched attention
        patch_linear(attn.proj, proj, rules.rule_for(proj, block.group), saved)

    def residual_forward(self, block: ViTBlock, eps: float) -> Callable[..., Tensor]:
        m = block.module

        def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            y = m.drop_path1(m.ls1(m.attn(m.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
            x = ops.residual_add(x, y, eps)
            return ops.residual_add(x, m.drop_path2(m.ls2(m.mlp(m.norm2(x)))), eps)

        return forward

    # ------------------------------------------------------------------ heads as components
    def read_heads(self, layer: Any, fn: Callable[[Tensor], Tensor | None]) -> Callable[[], None]:
        """A forward pre-hook on `attn.proj`: its input is the concatenated head outputs."""
        proj = getattr(layer.module, "proj", None)
        if not isinstance(proj, nn.Module):
            raise UnsupportedLayerError(
                f"cannot read head outputs of {layer.name} ({type(layer.module).__name__}): "
                "expected timm Attention (attn.proj)")

        def pre(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            new = fn(args[0])
            return None if new is None else (new, *args[1:])

        return proj.register_forward_pre_hook(pre).remove

    def head_projection(self, layer: Any) -> tuple[Tensor, int]:
        qkv, h = getattr(layer.module, "qkv", None), getattr(layer.module, "num_heads", 0)
        if not isinstance(qkv, nn.Linear) or not h:
            raise UnsupportedLayerError(
                f"weight criterion: cannot find the q/k/v rows of heads in {layer.name}")
        return qkv.weight, int(h)

    def head_targets(self, layer: Any) -> tuple[list[Target], int, int]:
        mod = layer.module
        qkv, h = getattr(mod, "qkv", None), getattr(mod, "num_heads", None)
        if not isinstance(qkv, nn.Linear) or not h:
            raise UnsupportedLayerError(
                f"cannot mask heads of {layer.name} ({type(mod).__name__}): expected timm "
                "Attention (qkv)")
        hd = getattr(mod, "head_dim", qkv.out_features // 3 // h)
        tg = value_rows(qkv.weight, qkv.bias, 2 * h * hd, hd)
        v_bias = getattr(mod, "v_bias", None)
        if isinstance(v_bias, torch.Tensor):
            tg.append(Target(v_bias, 0, head_rows(0, hd)))
        return tg, h, hd

    def slice_heads(self, layer: Any, kept: Tensor) -> HeadSlice | None:
        attn = layer.module
        if not plain_attention(attn):
            return None
        h, hd = int(attn.num_heads), int(attn.head_dim)
        cols = (kept[:, None] * hd + torch.arange(hd)).flatten().to(attn.qkv.weight.device)
        rows = torch.cat([cols + s * h * hd for s in range(3)])
        edits = [SliceEdit(attn.qkv, "_parameters", "weight", 0, rows),
                 SliceEdit(attn.qkv, "_parameters", "bias", 0, rows),
                 SliceEdit(attn.proj, "_parameters", "weight", 1, cols)]
        attrs = [(attn, "num_heads", int(kept.numel())), (attn, "attn_dim", int(kept.numel()) * hd)]
        return HeadSlice(edits, attrs)


register_family(TimmViT())
