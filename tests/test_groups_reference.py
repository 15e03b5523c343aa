"""Layer groups by stage, checked against the reference code's groups, written out literally.

The reference (erfanhatefi/Pruning-by-eXplaining-in-PyTorch, pxp/composites.py,
`get_NameMapComposite`) names the layers of each group for resnet18, resnet50, vgg16(_bn)
and vit_b_16. Its low group includes the first layer (conv1, features.0); pxopt keeps the
first layer in its own group `input` (its rule shapes heatmaps) and gives it the low
group's rule in pruning studies, so pxopt's input + low must equal the reference's low.
"""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torchvision
from torch import nn

from pxopt.errors import ConfigError
from pxopt.layers import LayerMap, discover_layers, stage_groups

# ---- the reference's groups (pxp/composites.py), copied name by name ------------------------
RESNET18_REF = {
    "low": ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"],
    "mid": ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1",
            "layer2.1.conv2", "layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0",
            "layer3.1.conv1", "layer3.1.conv2"],
    "high": ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1",
             "layer4.1.conv2"],
    "fc": ["fc"],
}
RESNET50_REF = {
    "low": ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3", "layer1.0.downsample.0",
            "layer1.1.conv1", "layer1.1.conv2", "layer1.1.conv3", "layer1.2.conv1", "layer1.2.conv2",
            "layer1.2.conv3"],
    "mid": ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.conv3", "layer2.0.downsample.0",
            "layer2.1.conv1", "layer2.1.conv2", "layer2.1.conv3", "layer2.2.conv1", "layer2.2.conv2",
            "layer2.2.conv3", "layer2.3.conv1", "layer2.3.conv2", "layer2.3.conv3",
            "layer3.0.conv1", "layer3.0.conv2", "layer3.0.conv3", "layer3.0.downsample.0",
            "layer3.1.conv1", "layer3.1.conv2", "layer3.1.conv3", "layer3.2.conv1", "layer3.2.conv2",
            "layer3.2.conv3", "layer3.3.conv1", "layer3.3.conv2", "layer3.3.conv3", "layer3.4.conv1",
            "layer3.4.conv2", "layer3.4.conv3", "layer3.5.conv1", "layer3.5.conv2", "layer3.5.conv3"],
    "high": ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.conv3", "layer4.0.downsample.0",
             "layer4.1.conv1", "layer4.1.conv2", "layer4.1.conv3", "layer4.2.conv1", "layer4.2.conv2",
             "layer4.2.conv3"],
    "fc": ["fc"],
}
VGG16_BN_REF = {
    "low": ["features.0", "features.3", "features.7", "features.10"],
    "mid": ["features.14", "features.17", "features.20", "features.24", "features.27"],
    "high": ["features.30", "features.34", "features.37", "features.40"],
    "fc": ["classifier.0", "classifier.3", "classifier.6"],
}
VGG16_REF = {
    "low": ["features.0", "features.2", "features.5", "features.7"],
    "mid": ["features.10", "features.12", "features.14", "features.17", "features.19"],
    "high": ["features.21", "features.24", "features.26", "features.28"],
    "fc": ["classifier.0", "classifier.3", "classifier.6"],
}
# vit_b_16: q/k/v/out_proj and mlp.0 / mlp.3 of blocks 0-2 low, 3-8 mid, 9-11 high; heads.head fc
VIT_B_16_REF_BLOCKS = {"low": [0, 1, 2], "mid": [3, 4, 5, 6, 7, 8], "high": [9, 10, 11]}


def _build(arch: str) -> nn.Module:
    """A torchvision model on the meta device: discovery reads only its structure (fast)."""
    with torch.device("meta"):
        return getattr(torchvision.models, arch)(weights=None)


def _as_reference(lm: LayerMap) -> dict[str, list[str]]:
    """pxopt's groups in the reference's terms: the first layer joins low."""
    groups = lm.groups()
    return {"low": groups["input"] + groups["low"], "mid": groups["mid"], "high": groups["high"],
            "fc": groups["fc"]}


@pytest.mark.parametrize(("arch", "reference"), [
    ("resnet18", RESNET18_REF), ("resnet50", RESNET50_REF),
    ("vgg16_bn", VGG16_BN_REF), ("vgg16", VGG16_REF),
])
def test_cnn_groups_equal_the_reference(arch: str, reference: dict[str, list[str]]) -> None:
    lm = discover_layers(_build(arch))
    assert lm.grouping == "stage" and lm.stage_rule == ("resnet" if "resnet" in arch else "vgg")
    assert _as_reference(lm) == reference
    assert lm[0].group == "input" and lm[0].name == reference["low"][0]


def test_vit_b_16_groups_equal_the_reference() -> None:
    from pxopt.lrp.vit import vit_structure

    model = _build("vit_b_16")
    lm = discover_layers(model)
    by_name = lm.by_name()
    expected = {i: g for g, blocks in VIT_B_16_REF_BLOCKS.items() for i in blocks}
    for i, group in expected.items():
        prefix = f"encoder.layers.encoder_layer_{i}"
        assert by_name[f"{prefix}.self_attention"].group == group
        assert by_name[f"{prefix}.mlp.0"].group == group
    assert by_name["heads.head"].group == "fc"
    # the engine gives q, k, v, out_proj, mlp.0 and mlp.3 of a block the rule of `blk.group`
    assert [blk.group for blk in vit_structure(model).blocks] == [expected[i] for i in range(12)]
    assert lm.stage_rule == "blocks"


def test_count_grouping_is_still_available_and_differs_where_the_issue_says() -> None:
    """The count split (pxopt's grouping before stages) stays an option of the study spec."""
    r50 = discover_layers(_build("resnet50"), grouping="count").by_name()
    assert r50["layer2.0.conv1"].group == "low" and r50["layer3.5.conv3"].group == "high"
    vgg = discover_layers(_build("vgg16_bn"), grouping="count")
    assert vgg.by_name()["features.30"].group == "mid"
    assert vgg.grouping == "count" and vgg.stage_rule == ""
    with torch.device("meta"):
        timm_resnet = timm.create_model("resnet18", pretrained=False)
    wide = discover_layers(timm_resnet, (0.5, 0.5), grouping="count")
    assert Counter(layer.group for layer in wide)["mid"] == 0
    with pytest.raises(ConfigError, match="boundaries"):
        discover_layers(timm_resnet, (0.5, 0.5))  # stages have their own split
    with pytest.raises(ConfigError, match="grouping"):
        discover_layers(timm_resnet, grouping="depth")


def test_builtin_models_get_one_stage_per_group() -> None:
    """The built-ins (what the default study prunes): every hidden group holds a stage."""
    from pxopt.models.builtin.archs import FmnistResNet, fmnist_vgg, fmnist_vit

    resnet = discover_layers(FmnistResNet()).groups()
    assert resnet == {
        "input": ["conv1"], "low": ["layer1.0.conv1", "layer1.0.conv2"],
        "mid": ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"],
        "high": ["layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0"], "fc": ["fc"]}
    vgg = discover_layers(fmnist_vgg()).groups()  # stages 16 | 32 | 64 64
    assert vgg == {"input": ["features.0"], "low": ["features.4"], "mid": ["features.8"],
                   "high": ["features.11"], "fc": ["classifier.0", "classifier.3"]}
    vit = discover_layers(fmnist_vit()).groups()  # 4 blocks: 0 / 1-2 / 3
    assert vit["low"] == ["blocks.0.attn", "blocks.0.mlp.fc1"]
    assert vit["high"] == ["blocks.3.attn", "blocks.3.mlp.fc1"]


def test_other_cnns_are_grouped_by_resolution_given_an_input() -> None:
    """A CNN with no ResNet / VGG structure: each output resolution of its convs is a stage."""

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [3, 4, 4, 8, 8, 16, 16]
            self.body = nn.ModuleList(
                nn.Conv2d(a, b, 3, stride=2 if i in (2, 4) else 1, padding=1)
                for i, (a, b) in enumerate(zip(chans, chans[1:], strict=False)))
            self.fc = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for conv in self.body:
                x = torch.relu(conv(x))
            return self.fc(x.mean((2, 3)))

    lm = discover_layers(Plain(), example_input=torch.zeros(1, 3, 8, 8))
    assert lm.stage_rule == "resolution"
    assert lm.groups() == {"input": ["body.0"], "low": ["body.1"], "mid": ["body.2", "body.3"],
                           "high": ["body.4", "body.5"], "fc": ["fc"]}
    # without an input the resolutions are unknown: the count split
    assert discover_layers(Plain()).grouping == "count"


def test_stage_split() -> None:
    assert stage_groups(5) == ["low", "low", "mid", "mid", "high"]  # ResNet stem+4, VGG's 5 pools
    assert stage_groups(12) == ["low"] * 3 + ["mid"] * 6 + ["high"] * 3  # as ViT-B blocks
    assert stage_groups(3) == ["low", "mid", "high"]
    assert stage_groups(2) == ["low", "high"]
    assert stage_groups(1) == []
