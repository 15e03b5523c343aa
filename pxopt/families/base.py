"""The family adapter protocol: everything pxopt knows about one kind of model, in one class.

A *family* (torchvision ResNet, timm ViT, ...) answers every question the generic code has
about a model's architecture, so that code never tests a model's class itself:

- which models it is for (`matches`; `pxopt.families.family_of` picks the one family
  of a model, by `priority`);
- its structure: the layer map with components and stage groups (`layer_map`,
  `stage_groups`, `classifier_names`);
- its LRP: which engine explains it (`explain`, `component_relevance`), and the
  canonisation the CNN engine applies while it does (`block_forwards`: exact block class
  -> a forward whose additions / products carry rules; `leaf_treatments`: leaf module
  classes -> a treatment; both are contributed to the engine's tables by every registered
  family, since they are keyed on exact classes that may be reused in other models);
- its components for the criteria, masking, slicing and physical removal: where a
  component's activation is read (`site`), which tensor slices must be zero for a
  component to be silent (`mask_targets`, `head_targets`), how kept heads are sliced
  (`slice_heads`), which layers Torch-Pruning may shrink (`removable`) and what its
  dependency graph must be told (`physical_options`).

Every method has a default that does what pxopt does for a plain CNN (Conv2d / Linear
channels, BatchNorm merged, stages by resolution), so a new CNN family overrides only
what differs; `pxopt.families.transformer.TransformerFamily` holds the defaults for
vision transformers (AttnLRP engine, heads and MLP neurons). Nothing here imports the
generic code at module level (it imports us): defaults import it when called.

Adding a family: one module `pxopt/families/<name>.py` defining a subclass and calling
`register_family(MyFamily())`; every module of this package is imported when the
registry is first used (see docs/INTERFACES.md, "Adding a model family").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from pxopt.criteria.sites import Site
    from pxopt.layermap import Layer, LayerMap
    from pxopt.lrp.explanation import Explanation
    from pxopt.scores import ComponentScores

#: a replacement forward for a block, bound to the block instance: (block, x) -> output
BlockForward = Callable[..., Tensor]
#: a layer's stage split: (stage rule name, layer name -> "low" | "mid" | "high")
StageSplit = tuple[str, dict[str, str]]
IndexMap = Callable[[Tensor], Tensor]


@dataclass
class Target:
    """One tensor slice that must be zero for a component to be silent (masking).

    `index_map` turns component indices into indices along `dim` of `tensor` (e.g. head
    numbers into the head's rows of the value projection).
    """

    tensor: Tensor
    dim: int
    index_map: IndexMap


@dataclass
class SliceEdit:
    """Keep only `index` along `dim` of a parameter or buffer (`store`: "_parameters" |
    "_buffers") of `module`, for the duration of a sliced evaluation."""

    module: nn.Module
    store: str
    attr: str
    dim: int
    index: Tensor


@dataclass
class HeadSlice:
    """How an attention module runs with only its kept heads: tensor slices plus plain
    attributes to set (e.g. `num_heads`), all undone by the `Slicer`."""

    edits: list[SliceEdit] = field(default_factory=list)
    attrs: list[tuple[nn.Module, str, Any]] = field(default_factory=list)


def first_attention(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first attention module of `model` (`nn.MultiheadAttention` or a class whose name
    contains "Attention"), or None: a model with one is no plain CNN."""
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__:
            return name, module
    return None


@dataclass
class SlicePlan:
    """A family's own slicing of some prunable layers (channels that travel through its
    structure, e.g. DenseNet's concatenations): `edits(pruned)` gives every slicing step for
    the current masks (masks already applied: the sliced model must equal the masked one)."""

    names: list[str]
    edits: Callable[[Mapping[str, Tensor]], list[SliceEdit]]


class Family:
    """One model family. Subclass, set the class attributes, override what differs.

    name: short unique id ("torchvision-resnet"); shown by `pxopt models`.
    kind: "cnn" or "vit": the search space's default rankings and aggregations
        (`pxopt.search.space`, `pxopt.scores.default_ranking`), `LoadedModel.family`.
    priority: families are asked in decreasing priority; the first whose `matches` is
        true is the model's family (specific families > 0, the generic CNN fall-back < 0).
    summary: one line for `pxopt models` (what it covers, its components).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "cnn"
    priority: ClassVar[int] = 0
    summary: ClassVar[str] = ""

    # ------------------------------------------------------------------ identity
    def matches(self, model: nn.Module) -> bool:
        """True when this family knows `model`: its root class (exact or a subclass that
        keeps the forward) and nothing else. Must not raise and must be cheap (no forward);
        import optional libraries (timm) inside, returning False when they are missing."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ------------------------------------------------------------------ structure
    def layer_map(self, model: nn.Module, boundaries: tuple[float, float], *,
                  grouping: str, example_input: Tensor | None) -> LayerMap:
        """The layer map: every layer with components (conv channels, linear / MLP neurons,
        attention heads), kind and group, in forward order; the first layer `input`, the
        classifier `fc`. `grouping` is "stage" (`stage_groups`) or "count" (position split
        by `boundaries`); set `grouping` and `stage_rule` on the result.

        Default: Conv2d / Linear layers (`pxopt.layermap.discover_cnn`), stages from
        `stage_groups`. Raise UnsupportedLayerError (naming the module) for parts the
        family cannot give components for."""
        from pxopt.layermap import discover_cnn

        return discover_cnn(model, boundaries, example_input, grouping=grouping,
                            stages=lambda names: self.stage_groups(model, names, example_input))

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None) -> StageSplit | None:
        """Stage split of the hidden layers `names` (first layer included) into low / mid /
        high, with the rule's name; None: fall back to the count split.

        Default: the network's resolution stages from a forward of `example_input`
        (`pxopt.layermap.resolution_stages`). Override with the family's own stages
        (ResNet: stem + layer1 / .. / layerN; Swin: its stages; DenseNet: dense blocks)."""
        from pxopt.layermap import resolution_stages

        split = resolution_stages(model, names, example_input)
        return None if split is None else ("resolution", split)

    def classifier_names(self, model: nn.Module) -> list[str]:
        """Names of the classifier Linear layers (group "fc"; the last one is the "head",
        never pruned, whose output relevance is the seed). Default: the Linear layers after
        the last conv in registration order (`discover_cnn` uses the forward order)."""
        from pxopt.layermap import cnn_classifier_names

        return cnn_classifier_names(model)

    # ------------------------------------------------------------------ LRP
    def explain(self, model: nn.Module, inputs: Tensor, targets: Any, rules: Any, *,
                start: str, kinds: Iterable[str] | None,
                layer_map: LayerMap | None) -> Explanation:
        """LRP of one batch (`pxopt.lrp.explain` calls this). Default: the CNN engine
        (module rules, BatchNorm merged, `check_graph` refusing unknown operations)."""
        from pxopt.lrp.cnn import explain_cnn

        return explain_cnn(model, inputs, targets, rules, start=start, kinds=kinds,
                           layer_map=layer_map)

    def component_relevance(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                            rules: Any, *, kinds: Iterable[str] | None,
                            layer_map: LayerMap | None, start: str) -> ComponentScores:
        """Mean component relevances over a reference set (`pxopt.lrp.component_relevance`).
        Default: the CNN engine."""
        from pxopt.lrp.cnn import component_relevance_cnn

        return component_relevance_cnn(model, batches, rules, kinds=kinds, layer_map=layer_map,
                                       start=start)

    def block_forwards(self) -> Mapping[type, BlockForward]:
        """Canonisation for the CNN engine: exact block class -> a forward equal to the
        block's own except that its additions go through `pxopt.lrp.rules.lrp_sum` (and
        gating products, concatenations through their rules). Installed on every instance
        of that exact class (subclasses may change the forward) in any model, for one
        explanation. Default: none."""
        return {}

    def input_norms(self, model: nn.Module) -> Sequence[str]:
        """Names of BatchNorms that normalise a layer's *input* (pre-activation BN-ReLU-Conv,
        DenseNet): the CNN engine never merges them into the layer registered before them and
        gives them the epsilon rule of their affine map (`pxopt.lrp.rules.lrp_affine`).
        Default: none (a BatchNorm registered after a conv that is not its BatchNorm is
        refused)."""
        return ()

    def leaf_treatments(self) -> Sequence[tuple[tuple[type, ...], str]]:
        """Leaf module classes -> treatment (`pxopt.lrp.canonizers`: LINEAR, PASS, NORM,
        GRADIENT) that the generic table lacks, e.g. a family's own activation class.
        Contributed to the engine's table. Default: none."""
        return ()

    # ------------------------------------------------------------------ components
    def site(self, layer: Layer) -> Site:
        """Where the criteria read (and may replace) `layer`'s component tensor
        (`pxopt.criteria.sites.Site`). Default: conv / linear / mlp outputs; heads through
        `read_heads`."""
        from pxopt.criteria.sites import Site

        heads = getattr(layer.module, "num_heads", 0) if layer.kind == "heads" else 0
        return Site(layer.name, layer.kind, int(layer.n_components), layer.module, int(heads),
                    family=self)

    def read_heads(self, layer: Layer, fn: Callable[[Tensor], Tensor | None]) -> Callable[[], None]:
        """Install a reader of the concatenated head outputs before the output projection
        ((batch, tokens, heads * head_dim), a replacement may be returned); returns undo.
        Default: refuse (CNN families have no heads)."""
        from pxopt.errors import UnsupportedLayerError

        raise UnsupportedLayerError(f"{layer.name}: family {self.name} has no attention heads")

    def mask_targets(self, model: nn.Module, layer: Layer) -> list[Target]:
        """Tensor slices to zero so that `layer`'s components output exactly zero.
        Default: conv / linear weight rows and bias, and the following BatchNorm's affine
        parameters; heads: `head_targets`."""
        if layer.kind == "heads":
            return self.head_targets(layer)[0]
        from pxopt.prune.targets import channel_targets

        return channel_targets(model, layer)

    def head_targets(self, layer: Layer) -> tuple[list[Target], int, int]:
        """(value-projection rows per head, num_heads, head_dim): zeroing a head's rows makes
        its output (A @ V) exactly zero whatever the attention weights. Default: refuse."""
        from pxopt.errors import UnsupportedLayerError

        raise UnsupportedLayerError(f"{layer.name}: family {self.name} has no attention heads")

    def head_projection(self, layer: Layer) -> tuple[Tensor, int]:
        """(packed q/k/v input-projection weight, (3 * heads * head_dim, dim) with q, k, v
        sections in that order, num_heads): what the weight criterion scores a head by.
        Default: refuse."""
        from pxopt.errors import UnsupportedLayerError

        raise UnsupportedLayerError(
            f"weight criterion: cannot find the q/k/v rows of heads in {layer.name}")

    def slice_heads(self, layer: Layer, kept: Tensor) -> HeadSlice | None:
        """How `layer`'s attention runs with only the heads `kept` (sorted indices); None
        when it cannot (the heads stay masked, the evaluation is not faster). Default: None."""
        return None

    def slice_plan(self, model: nn.Module, names: set[str]) -> SlicePlan | None:
        """Slicing of prunable layers (`names`) that the generic Slicer cannot do (channels
        that travel through concatenations); those layers leave the generic pairs / scatter.
        Default: None."""
        return None

    def removable(self, layer: Layer) -> bool:
        """Whether Torch-Pruning may physically remove `layer`'s components (otherwise they
        stay masked in the pruned copy). Default: every kind but attention heads."""
        return layer.kind != "heads"

    def remove_components(self, module: nn.Module, name: str, mask: Tensor) -> list[int]:
        """Remove, for good, pruned components (`mask`: True = pruned) of a layer that
        Torch-Pruning may not shrink (`removable` False, e.g. heads) from `module` of the
        pruned copy; return the removed original indices (kept in the pruning record and
        replayed by `load_pruned` after Torch-Pruning's history). Keep one when all are
        pruned. Default: none (they stay masked)."""
        return []

    def physical_options(self, model: nn.Module) -> dict[str, Any]:
        """Extra keyword arguments for Torch-Pruning's `DependencyGraph.build_dependency`
        (e.g. `unwrapped_parameters` for a layer scale, `customized_pruners`). Default: none."""
        return {}


class ResNetStagesFamily(Family):
    """A family whose stages are a ResNet's `layer1 .. layerN` children (torchvision's and
    timm's ResNets): stem + layer1 low, the last layer high (`pxopt.layermap.resnet_stages`),
    resolution stages where a model lacks them."""

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None) -> StageSplit | None:
        from pxopt.layermap import resnet_stages

        split = resnet_stages(model, names)
        return ("resnet", split) if split is not None else super().stage_groups(model, names, example_input)
