"""What the transformer engine needs to know of a vision transformer: its blocks, attention,
MLPs, patch embedding and classifier (a leaf module: families build it, the engine reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pxopt.layermap import Layer, LayerMap


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

    family: str  # the family's name, e.g. "torchvision-vit" | "timm-vit"
    patch_embed_name: str
    patch_embed: nn.Conv2d
    blocks: list[ViTBlock]
    head_names: list[str]  # classifier Linear layers (group "fc")
    extra_acts: list[nn.Module] = field(default_factory=list)  # e.g. pre-logits Tanh
    #: other Linear layers outside blocks and classifier, each with the group whose rule it
    #: gets: (name, module, group), e.g. Swin's patch-merging reductions
    extra_linears: list[tuple[str, nn.Module, str]] = field(default_factory=list)


def block_group(index: int, depth: int, boundaries: tuple[float, float] = (0.25, 0.75)) -> str:
    """Depth group of block `index` of `depth`: 12 blocks give 0-2 low, 3-8 mid, 9-11 high."""
    frac = index / depth
    if frac < boundaries[0] - 1e-9:
        return "low"
    if frac >= boundaries[1] - 1e-9:
        return "high"
    return "mid"


def structure_layer_map(model: nn.Module, struct: ViTStructure) -> LayerMap:
    """Layer map of a ViT: patch embedding `input`, per block the attention ("heads") and
    MLP fc1 ("mlp") in the block's depth group, the classifier `fc`."""
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
