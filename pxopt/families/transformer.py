"""Defaults for vision-transformer families: AttnLRP engine, heads and MLP neurons.

The transformer engine (`pxopt.lrp.vit`) patches module instances for one explanation and
lets the plain gradient carry everything else (gradient x input convention). What it must
know about a family is asked here:

- `check(model)`: refuse, naming the module, every part the engine would get wrong
  silently (unknown classes, weight-standardised convs, gated MLPs, other norms);
- `structure(model, boundaries)`: the blocks (attention, MLP fc1 / act / fc2, heads,
  depth group), the patch embedding and the classifier (`pxopt.lrp.vit_structure`);
- `patch_attention(block, rules, record, saved)`: install the attention's LRP forward
  (torchvision `nn.MultiheadAttention`, timm `Attention`; a windowed attention with a
  relative position bias installs its own, built from `pxopt.lrp.vit.attention_core`);
- `residual_forward(block, eps)`: the block's forward with `residual_add` on its sums
  (only when the residual rule is asked for);
- `read_heads`, `head_targets`, `slice_heads`: the attention heads as components.

The layer map, the explanation entry points and the component defaults follow from these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from pxopt.families.base import Family, HeadSlice, Target

if TYPE_CHECKING:
    from pxopt.layermap import Layer, LayerMap
    from pxopt.lrp.explanation import Explanation
    from pxopt.lrp.vit_structure import ViTBlock, ViTStructure
    from pxopt.scores import ComponentScores


class TransformerFamily(Family):
    """A vision-transformer family (kind "vit"): blocks are the stages, split by quarters."""

    kind: ClassVar[str] = "vit"
    #: `LayerMap.stage_rule` under the stage grouping (the groups are the blocks' own groups,
    #: `ViTBlock.group`: quarters of the block index by default, a Swin family its stages)
    stage_rule: ClassVar[str] = "blocks"

    # ------------------------------------------------------------------ what subclasses give
    def check(self, model: nn.Module) -> None:
        """Raise UnsupportedLayerError naming the first part the engine would get wrong.
        Called before `structure`; the engine then checks that every Linear / Conv2d /
        activation is one the structure gives a rule (`pxopt.lrp.vit_check.check_coverage`)."""
        raise NotImplementedError

    def structure(self, model: nn.Module, boundaries: tuple[float, float]) -> ViTStructure:
        """Blocks, attention, MLPs, patch embedding and classifier of `model`, in forward
        order; each block's group from its index (`pxopt.lrp.vit_structure.block_group`) or
        the family's stages; Linear layers outside blocks and classifier (patch merging) go
        in `extra_linears` with their group, element-wise activations in `extra_acts`."""
        raise NotImplementedError

    def patch_attention(self, block: ViTBlock, rules: Any, record: Callable[[Tensor], None] | None,
                        saved: list) -> None:
        """Replace `block.attn`'s forward (with `pxopt.lrp.vit.set_forward(module, fn, saved)`)
        by one computing q, k, v through rule-carrying projections and the attention through
        `pxopt.lrp.vit.attention_core` (which calls `record` with the per-head relevance).
        Also patch the attention's output projection unless the forward applies its rule."""
        raise NotImplementedError

    def residual_forward(self, block: ViTBlock, eps: float) -> Callable[..., Tensor]:
        """`block.module`'s forward with its residual sums as `pxopt.lrp.attention.residual_add`
        (the epsilon z-rule), for `residual_eps` > 0."""
        raise NotImplementedError

    # ------------------------------------------------------------------ derived defaults
    def checked_structure(self, model: nn.Module,
                          boundaries: tuple[float, float] = (0.25, 0.75)) -> ViTStructure:
        """`check`, `structure`, then the coverage check: what the engine uses."""
        from pxopt.lrp import vit_check

        self.check(model)
        struct = self.structure(model, boundaries)
        vit_check.check_coverage(model, struct)
        return struct

    def layer_map(self, model: nn.Module, boundaries: tuple[float, float], *,
                  grouping: str, example_input: Tensor | None) -> LayerMap:
        """Patch embedding `input`; per block its attention ("heads") and MLP fc1 ("mlp") in
        the block's group (blocks by quarters under both groupings); the classifier `fc`."""
        from pxopt.lrp.vit_structure import structure_layer_map

        found = structure_layer_map(model, self.checked_structure(model, boundaries))
        found.grouping, found.stage_rule = grouping, self.stage_rule if grouping == "stage" else ""
        return found

    def classifier_names(self, model: nn.Module) -> list[str]:
        return list(self.checked_structure(model).head_names)

    def explain(self, model: nn.Module, inputs: Tensor, targets: Any, rules: Any, *,
                start: str, kinds: Iterable[str] | None,
                layer_map: LayerMap | None) -> Explanation:
        """AttnLRP / CP-LRP through `pxopt.lrp.vit.explain_vit` (the layer map is not needed)."""
        from pxopt.lrp.vit import explain_vit

        return explain_vit(model, inputs, targets, rules, start=start, kinds=kinds, family=self)

    def component_relevance(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                            rules: Any, *, kinds: Iterable[str] | None,
                            layer_map: LayerMap | None, start: str) -> ComponentScores:
        from pxopt.lrp.vit import component_relevance_vit

        return component_relevance_vit(model, batches, rules, kinds=kinds, start=start,
                                       family=self)

    def read_heads(self, layer: Layer, fn: Callable[[Tensor], Tensor | None]) -> Callable[[], None]:
        raise NotImplementedError

    def head_targets(self, layer: Layer) -> tuple[list[Target], int, int]:
        raise NotImplementedError

    def slice_heads(self, layer: Layer, kept: Tensor) -> HeadSlice | None:
        return None
