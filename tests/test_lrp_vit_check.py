"""Issue #15.2: every ViT part the ViT LRP engine does not handle is refused, naming the module
and its class; the supported ViTs still pass and conserve relevance exactly (bias-free, float64).

Without the check each refused case ran and returned wrong relevances silently (StdConv2d:
input relevance / logit 0.0077, RmsNorm -0.072, GluMlp 4.12, hybrid: the backbone output's
shape, distilled DeiT: `head_dist` without the fc rule).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import GluMlp, RmsNorm, StdConv2d, SwiGLU
from timm.layers.attention import Attention
from timm.models.vision_transformer import (
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
)
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from torchvision.models.vision_transformer import ConvStemConfig
from torchvision.models.vision_transformer import VisionTransformer as TvViT

from pxopt.errors import UnsupportedLayerError
from pxopt.layers import discover_layers
from pxopt.lrp import explain
from pxopt.models.builtin.archs import fmnist_vit

X28 = torch.randn(2, 1, 28, 28)


def tiny(**kw: object) -> TimmViT:
    args: dict = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=4,
                      num_classes=10)
    args.update(kw)
    return TimmViT(**args).eval()


def tiny_tv(**kw: object) -> TvViT:
    model = TvViT(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                  mlp_dim=64, num_classes=10, **kw)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    return model.eval()


def _std_conv_embed() -> TimmViT:
    model = tiny()
    model.patch_embed.proj = StdConv2d(1, 32, 7, stride=7, padding=0)
    return model


def _gated_attention() -> TimmViT:
    model = tiny()
    model.blocks[1].attn = Attention(32, num_heads=4, qkv_bias=True, gated=True)
    return model


def _extra_linear_in_mlp() -> TimmViT:
    model = tiny()
    model.blocks[0].mlp.norm = nn.Linear(128, 128)  # a Linear where no rule is installed
    return model


def _tv_conv_stem() -> TvViT:
    return tiny_tv(conv_stem_configs=[ConvStemConfig(out_channels=16, kernel_size=3, stride=8)])


def _timm_zoo(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, img_size=32, depth=2).eval()


# name -> (builder, input, regex naming the module, regex naming its class)
REFUSED: dict[str, tuple[Callable[[], nn.Module], torch.Tensor, str, str]] = {
    "std-conv-patch-embed": (_std_conv_embed, X28, r"'patch_embed\.proj'", r"StdConv2d"),
    "rms-norm": (lambda: tiny(norm_layer=RmsNorm), X28, r"'blocks\.0\.norm1'", r"RmsNorm"),
    "rms-norm-embed": (lambda: tiny(embed_norm_layer=RmsNorm), X28, r"'patch_embed\.norm'",
                       r"RmsNorm"),
    "glu-mlp": (lambda: tiny(mlp_layer=GluMlp, act_layer=nn.SiLU), X28, r"'blocks\.0\.mlp'",
                r"GluMlp"),
    "swiglu": (lambda: tiny(mlp_layer=SwiGLU, act_layer=nn.SiLU), X28, r"'blocks\.0\.mlp'",
               r"SwiGLU"),
    "res-post-block": (lambda: tiny(block_fn=ResPostBlock), X28, r"'blocks\.0'", r"ResPostBlock"),
    "parallel-scaling-block": (lambda: tiny(block_fn=ParallelScalingBlock), X28, r"'blocks\.0'",
                               r"ParallelScalingBlock"),
    "parallel-things-block": (lambda: tiny(block_fn=ParallelThingsBlock), X28, r"'blocks\.0'",
                              r"ParallelThingsBlock"),
    "gated-attention": (_gated_attention, X28, r"\bblocks\.1\.attn\b", r"gate"),
    "attention-pool-map": (lambda: tiny(global_pool="map"), X28, r"'attn_pool'",
                           r"AttentionPoolLatent"),
    "attention-pool-prr": (lambda: tiny(global_pool="prr"), X28, r"'attn_pool'",
                           r"AttentionPoolPrr"),
    "no-pooling": (lambda: tiny(global_pool=""), X28, r"global_pool=''", r"VisionTransformer"),
    "no-classifier": (lambda: tiny(num_classes=0), X28, r"'head'", r"Identity"),
    "extra-linear": (_extra_linear_in_mlp, X28, r"'blocks\.0\.mlp\.norm'", r"Linear"),
    "hybrid-backbone": (_timm_zoo("vit_tiny_r_s16_p8_224"), torch.randn(1, 3, 32, 32),
                        r"'patch_embed'", r"HybridEmbed"),
    "distillation-head": (_timm_zoo("deit_tiny_distilled_patch16_224"),
                          torch.randn(1, 3, 32, 32), r"head_dist", r"VisionTransformerDistilled"),
    "torchvision-conv-stem": (_tv_conv_stem, torch.randn(1, 3, 32, 32), r"'conv_proj\.",
                              r"Conv2dNormActivation"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unhandled_vit_part_is_refused_by_name(case: str) -> None:
    build, x, where, cls = REFUSED[case]
    model = build()
    with torch.no_grad():
        model(x)  # the model itself runs: only the LRP engine refuses it
    for attempt in (lambda: discover_layers(model), lambda: explain(model, x, [1] * len(x))):
        with pytest.raises(UnsupportedLayerError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message
        assert re.search(where, message), message
        assert re.search(cls, message), message
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing left patched


def test_std_conv_is_refused_on_the_cnn_path_too() -> None:
    """A Conv2d subclass with its own forward no longer gets the plain Conv2d rule."""
    net = nn.Sequential(StdConv2d(3, 8, 3, padding=0, bias=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 5, bias=False)).eval()
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(StdConv2d\)"):
        explain(net, torch.randn(2, 3, 8, 8), [1, 2])
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 5, bias=False)).eval().double()
    rel = explain(plain, torch.randn(2, 3, 8, 8, dtype=torch.float64), [1, 2],
                  {"groups": {g: {"rule": "epsilon", "epsilon": 1e-12}
                              for g in ("input", "low", "mid", "high", "fc")}}).input
    assert torch.allclose(rel.sum(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64), atol=1e-6)


# --------------------------------------------------------------------------- supported ViTs


def _bias_free(model: nn.Module) -> nn.Module:
    """Zero every bias and every additive constant (position embedding, class/register tokens):
    what remains is a homogeneous map, so an exactly conservative LRP gives the logit back."""
    for name, p in model.named_parameters():
        if name.endswith("bias") or any(k in name for k in ("pos_embed", "pos_embedding",
                                                             "cls_token", "class_token",
                                                             "reg_token")):
            nn.init.zeros_(p)
    return model.double().eval()


SUPPORTED: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "timm-tiny": (lambda: tiny(reg_tokens=2), (1, 28, 28)),
    "timm-avg-layerscale-qknorm": (lambda: tiny(global_pool="avg", class_token=False,
                                                init_values=0.1, qk_norm=True), (1, 28, 28)),
    "timm-zoo-vit-tiny": (_timm_zoo("vit_tiny_patch16_224"), (3, 32, 32)),
    "torchvision-tiny": (tiny_tv, (3, 32, 32)),
    "builtin-fmnist-vit": (lambda: fmnist_vit(embed_dim=32, depth=2), (1, 28, 28)),
}


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_supported_vits_pass_the_check_and_conserve(case: str) -> None:
    build, shape = SUPPORTED[case]
    model = _bias_free(build())
    discover_layers(model)  # no refusal
    x = torch.randn(3, *shape, dtype=torch.float64)
    rules = {"groups": {g: {"rule": "epsilon", "epsilon": 0.0}
                        for g in ("input", "low", "mid", "high", "fc")}, "softmax": "cp"}
    exp = explain(model, x, [1, 2, 3], rules, start="logit")
    logits = exp.output[torch.arange(3), torch.tensor([1, 2, 3])]
    assert logits.abs().min() > 1e-3
    assert torch.allclose(exp.input.sum(dim=(1, 2, 3)), logits, rtol=0, atol=1e-6), \
        (exp.input.sum(dim=(1, 2, 3)), logits)


def test_cli_refuses_a_distilled_vit_checkpoint_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`pxopt search --model file:...@timm:<refused arch>`: one error line, exit code 2."""
    from pxopt.cli import main

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "distilled.pth")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    try:
        main(["search", "--model", f"file:{tmp_path}/distilled.pth@timm:deit_tiny_distilled_patch16_224",
              # an ImageNet model needs --data; the model is refused before the folder is read
              "--data", str(tmp_path / "imagenet"),
              "--classes", "3", "--n-ref", "1", "--n-val", "2", "--trials", "1",
              "--storage", f"sqlite:///{tmp_path}/s.db", "--no-report", "--out-dir", str(tmp_path)])
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else int(exc.code)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "head_dist" in lines[0] and "VisionTransformerDistilled" in lines[0], lines[0]


@pytest.mark.parametrize("name,where", [
    ("vit_relpos_base_patch16_224", r"VisionTransformerRelPos: no supported model family.*'blocks\.0\.attn'"),
    ("vit_base_patch16_rope_reg1_gap_256", r"Eva: no supported model family.*'blocks\.0\.attn'")])
def test_other_transformer_classes_are_refused_by_family(name: str, where: str) -> None:
    """timm transformers that are not a `VisionTransformer` (RelPos, Eva) match no family:
    `family_of` refuses them naming the class and its first attention module (they no longer
    take the CNN path, whose engine refused their first leaf without a rule)."""
    model = timm.create_model(name, pretrained=False, img_size=32, depth=2).eval()
    with pytest.raises(UnsupportedLayerError, match=where):
        explain(model, torch.randn(1, 3, 32, 32), [1])
