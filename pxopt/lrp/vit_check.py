"""The ViT path's guard against silent wrong results (what `check_graph` is for CNNs).

The ViT engine (`pxopt.lrp.vit`) patches a fixed set of module instances and lets the
plain gradient handle everything else, which is the exact z-rule only for linear,
parameter-free operations (reshapes, token concatenation, residual sums, pooling,
LayerScale). A module whose forward it does not know would silently get the plain
gradient: timm `StdConv2d` (the rule would use the raw weight, the forward a standardised
one), `RmsNorm` (only LayerNorm is patched), `GluMlp` / `SwiGLU` (the gate product),
hybrid CNN backbones, distillation heads, attention pooling. So before anything is
patched, the family's `check` (`pxopt.families.transformer.TransformerFamily`) runs:

1. `check_root`: the model's class is exactly the family's root class (subclasses such
   as timm `VisionTransformerDistilled` change the forward); the family also checks its
   head configuration ends in one Linear classifier on one pooled token.
2. `check_modules`: every submodule's class is exactly one of the family's allow-list
   (exact types: a subclass may change the forward).

and after its structure is read:

3. `check_coverage`: every Linear, Conv2d and activation module is one the engine
   gives a rule, so none runs as a plain gradient by accident.

Each raises `UnsupportedLayerError` naming the module and its class. The family-specific
allow-lists live in the family modules (`pxopt.families.torchvision_vit`, `.timm_vit`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from pxopt.errors import UnsupportedLayerError

if TYPE_CHECKING:
    from pxopt.lrp.vit_structure import ViTStructure

#: element-wise activations that get the Pass rule (by type, or by timm's class names)
PASS_ACTIVATIONS: tuple[type, ...] = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity)
PASS_ACTIVATION_NAMES = frozenset({"GELU", "GELUTanh", "QuickGELU", "Swish", "SiLU"})

def is_pass_activation(module: nn.Module) -> bool:
    """True for element-wise activations the ViT engine gives the Pass rule."""
    return isinstance(module, PASS_ACTIVATIONS) or type(module).__name__ in PASS_ACTIVATION_NAMES


def class_name(module: nn.Module) -> str:
    """Fully qualified class name, so a subclass is never mistaken for its base."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def refuse(name: str, module: nn.Module, why: str) -> UnsupportedLayerError:
    where = f"layer {name!r}" if name else "the model"
    return UnsupportedLayerError(
        f"{where} ({class_name(module)}) {why}; the ViT LRP engine refuses it rather than give "
        "it the plain gradient")


# --------------------------------------------------------------------------- checks


def layer_norms() -> set[type]:
    """LayerNorm classes the engine patches (torch's, and timm's subclass with the same
    forward, its fast-norm option)."""
    found: set[type] = {nn.LayerNorm}
    try:
        from timm.layers import LayerNorm
        found.add(LayerNorm)
    except ImportError:  # pragma: no cover
        pass
    return found


def check_root(model: nn.Module, root: type, base_children: tuple[str, ...]) -> None:
    """The model is exactly `root` (a subclass may have its own forward); its own extra
    children (beyond `base_children`) are named in the refusal."""
    if type(model) is not root:
        extra = sorted({n for n, _ in model.named_children()} - set(base_children))
        more = f" (its own parts: {', '.join(extra)})" if extra else ""
        raise refuse("", model, f"is a subclass of {root.__module__}.{root.__qualname__} "
                     f"with its own forward{more}")


def check_modules(model: nn.Module, allowed: set[type]) -> None:
    """Every submodule's class is exactly one of `allowed` (the family's allow-list) or a
    Pass activation (see the module docstring)."""
    for name, module in model.named_modules():
        if not name or type(module) in allowed or is_pass_activation(module):
            continue
        if isinstance(module, nn.Conv2d | nn.Linear):
            why = (f"is a subclass of {'Conv2d' if isinstance(module, nn.Conv2d) else 'Linear'} "
                   "with its own forward (e.g. weight standardisation)")
        else:
            why = "is not a part the ViT engine has a rule for"
        raise refuse(name, module, why)


def check_coverage(model: nn.Module, struct: ViTStructure) -> None:
    """Every Linear, Conv2d and activation is one the engine patches or runs inside a patch.

    Attention's own projections (timm qkv / proj, torchvision out_proj) run inside the
    patched attention; every other weight layer must be the patch embedding, a block's MLP
    linear or a classifier linear, and every activation a block's MLP activation or one
    of the classifier's.
    """
    ruled: set[int] = {id(struct.patch_embed)}
    ruled |= {id(model.get_submodule(n)) for n in struct.head_names}
    ruled |= {id(a) for a in struct.extra_acts}
    ruled |= {id(m) for _, m, _ in struct.extra_linears}
    for blk in struct.blocks:
        ruled |= {id(blk.fc1), id(blk.fc2), id(blk.act)}
        ruled |= {id(m) for m in blk.attn.modules()}
    for name, module in model.named_modules():
        if id(module) in ruled or type(module) is nn.Identity:
            continue
        if isinstance(module, nn.Conv2d | nn.Linear) or is_pass_activation(module):
            raise refuse(name, module, "sits where the ViT engine gives no rule (not the patch "
                          "embedding, an attention or MLP layer, or the classifier)")
