"""The ViT path's guard against silent wrong results (what `check_graph` is for CNNs).

The ViT engine (`pxopt.lrp.vit`) patches a fixed set of module instances and lets the
plain gradient handle everything else, which is the exact z-rule only for linear,
parameter-free operations (reshapes, token concatenation, residual sums, pooling,
LayerScale). A module whose forward it does not know would silently get the plain
gradient: timm `StdConv2d` (the rule would use the raw weight, the forward a standardised
one), `RmsNorm` (only LayerNorm is patched), `GluMlp` / `SwiGLU` (the gate product),
hybrid CNN backbones, distillation heads, attention pooling. So before anything is
patched:

1. `check_vit_root`: the model's class is exactly a supported ViT class (subclasses such
   as timm `VisionTransformerDistilled` change the forward) and its head configuration
   ends in one Linear classifier on one pooled token.
2. `check_vit_modules`: every submodule's class is exactly one of an allow-list per
   family (exact types: a subclass may change the forward).
3. `check_vit_coverage`: every Linear, Conv2d and activation module is one the engine
   gives a rule, so none runs as a plain gradient by accident.

Each raises `UnsupportedLayerError` naming the module and its class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from pxopt.errors import UnsupportedLayerError

if TYPE_CHECKING:
    from pxopt.lrp.vit import ViTStructure

#: element-wise activations that get the Pass rule (by type, or by timm's class names)
PASS_ACTIVATIONS: tuple[type, ...] = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity)
PASS_ACTIVATION_NAMES = frozenset({"GELU", "GELUTanh", "QuickGELU", "Swish", "SiLU"})

#: timm VisionTransformer.global_pool values that pool tokens linearly (or winner takes all)
TIMM_POOLS = ("token", "avg", "max", "avgmax")


def is_pass_activation(module: nn.Module) -> bool:
    """True for element-wise activations the ViT engine gives the Pass rule."""
    return isinstance(module, PASS_ACTIVATIONS) or type(module).__name__ in PASS_ACTIVATION_NAMES


def class_name(module: nn.Module) -> str:
    """Fully qualified class name, so a subclass is never mistaken for its base."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _refuse(name: str, module: nn.Module, why: str) -> UnsupportedLayerError:
    where = f"layer {name!r}" if name else "the model"
    return UnsupportedLayerError(
        f"{where} ({class_name(module)}) {why}; the ViT LRP engine refuses it rather than give "
        "it the plain gradient")


# --------------------------------------------------------------------------- allow-lists


def _layer_norms() -> set[type]:
    found: set[type] = {nn.LayerNorm}
    try:
        from timm.layers import LayerNorm  # subclass with the same forward (fast-norm option)
        found.add(LayerNorm)
    except ImportError:  # pragma: no cover
        pass
    return found


def _timm_types() -> tuple[type | None, set[type]]:
    """The timm ViT root class and the submodule classes its engine path handles."""
    try:
        from timm.layers import DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError:  # pragma: no cover
        return None, set()
    allowed = {
        Block, Attention, Mlp, PatchEmbed, LayerScale, DropPath, PatchDropout,
        nn.Sequential, nn.Linear, nn.Conv2d, nn.Dropout, nn.Identity,
    }
    return VisionTransformer, allowed | _layer_norms()


def _tv_types() -> tuple[type | None, set[type]]:
    """The torchvision ViT root class and the submodule classes its engine path handles."""
    try:
        from torchvision.models.vision_transformer import (
            Encoder,
            EncoderBlock,
            MLPBlock,
            VisionTransformer,
        )
    except ImportError:  # pragma: no cover
        return None, set()
    allowed = {
        Encoder, EncoderBlock, MLPBlock, nn.MultiheadAttention,
        nn.modules.linear.NonDynamicallyQuantizableLinear,  # MultiheadAttention.out_proj
        nn.Sequential, nn.Linear, nn.Conv2d, nn.Dropout, nn.Identity, nn.LayerNorm,
    }
    return VisionTransformer, allowed


def _family_types(model: nn.Module) -> tuple[type, set[type]]:
    for root, allowed in (_timm_types(), _tv_types()):
        if root is not None and isinstance(model, root):
            return root, allowed
    raise UnsupportedLayerError(
        f"{class_name(model)} is not a torchvision or timm VisionTransformer")


# --------------------------------------------------------------------------- checks


def check_vit_root(model: nn.Module) -> None:
    """The model is exactly a supported ViT class, with a pooled token and one Linear head."""
    root, _ = _family_types(model)
    if type(model) is not root:
        extra = sorted({n for n, _ in model.named_children()}
                       - set(_base_children(root)))
        more = f" (its own parts: {', '.join(extra)})" if extra else ""
        raise _refuse("", model, f"is a subclass of {root.__module__}.{root.__qualname__} "
                      f"with its own forward{more}")
    if root.__module__.startswith("timm."):
        _check_timm_head(model)


def _base_children(root: type) -> list[str]:
    """Child names a model of exactly `root` has (the subclass's extra parts are the rest)."""
    names = ("patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm", "attn_pool",
             "fc_norm", "head_drop", "head")  # timm
    tv_names = ("conv_proj", "encoder", "heads")
    return list(names if root.__module__.startswith("timm.") else tv_names)


def _check_timm_head(model: nn.Module) -> None:
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        raise _refuse("attn_pool", attn_pool, "is attention pooling (global_pool 'map' / 'prr'), "
                      "which has no LRP rule here")
    pool = getattr(model, "global_pool", "token")
    if pool not in TIMM_POOLS:
        raise _refuse("", model, f"has global_pool={pool!r}: it must pool the tokens to one "
                      f"vector ({', '.join(TIMM_POOLS)}) before the classifier")
    if type(model.head) is not nn.Linear:
        raise _refuse("head", model.head, "is not a Linear classifier (num_classes=0?), so the "
                      "model returns features, not logits")


def check_vit_modules(model: nn.Module) -> None:
    """Every submodule's class is exactly one the ViT engine knows (see the module docstring)."""
    _, allowed = _family_types(model)
    for name, module in model.named_modules():
        if not name or type(module) in allowed or is_pass_activation(module):
            continue
        if isinstance(module, nn.Conv2d | nn.Linear):
            why = (f"is a subclass of {'Conv2d' if isinstance(module, nn.Conv2d) else 'Linear'} "
                   "with its own forward (e.g. weight standardisation)")
        else:
            why = "is not a part the ViT engine has a rule for"
        raise _refuse(name, module, why)


def check_vit_coverage(model: nn.Module, struct: ViTStructure) -> None:
    """Every Linear, Conv2d and activation is one the engine patches or runs inside a patch.

    Attention's own projections (timm qkv / proj, torchvision out_proj) run inside the
    patched attention; every other weight layer must be the patch embedding, a block's MLP
    linear or a classifier linear, and every activation a block's MLP activation or one
    of the classifier's.
    """
    ruled: set[int] = {id(struct.patch_embed)}
    ruled |= {id(model.get_submodule(n)) for n in struct.head_names}
    ruled |= {id(a) for a in struct.extra_acts}
    for blk in struct.blocks:
        ruled |= {id(blk.fc1), id(blk.fc2), id(blk.act)}
        ruled |= {id(m) for m in blk.attn.modules()}
    for name, module in model.named_modules():
        if id(module) in ruled or type(module) is nn.Identity:
            continue
        if isinstance(module, nn.Conv2d | nn.Linear) or is_pass_activation(module):
            raise _refuse(name, module, "sits where the ViT engine gives no rule (not the patch "
                          "embedding, an attention or MLP layer, or the classifier)")


def check_vit(model: nn.Module) -> None:
    """Root and module checks: run before the structure is read."""
    check_vit_root(model)
    check_vit_modules(model)
