"""AttnLRP engine for torchvision / timm ViTs: forward equality, rules, conservation, components."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TvViT

from pxopt.errors import ConfigError, UnsupportedLayerError
from pxopt.lrp import attention as ops
from pxopt.lrp.rules import lrp_linear
from pxopt.lrp.vit import (
    ViTRules,
    depth_group,
    explain_vit,
    explainable_vit,
    linear_rule,
    vit_structure,
)

GROUPS = ("input", "low", "mid", "high", "fc")


def tiny_timm(fused: bool = True, reg_tokens: int = 0, **kw: object) -> TimmViT:
    model = TimmViT(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4, num_heads=4,
                    num_classes=10, reg_tokens=reg_tokens, **kw)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model.eval()


def tiny_tv() -> TvViT:
    model = TvViT(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64,
                  mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    return model.eval()


def eps_config(eps: float, softmax: str) -> dict:
    return {"groups": {g: {"rule": "epsilon", "epsilon": eps} for g in GROUPS}, "softmax": softmax}


def assert_restored(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    assert not any("forward" in m.__dict__ for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def check_forward_equal(model: nn.Module, x: torch.Tensor) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        assert ref.abs().max() > 0
        for softmax in ("attnlrp", "cp", "zplus"):
            with explainable_vit(model, ViTRules.from_config({"softmax": softmax})):
                out = model(x)
            assert (out - ref).abs().max() <= 1e-5
    assert_restored(model, state)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


# --------------------------------------------------------------------------- forward equality


@pytest.mark.parametrize("fused,reg", [(True, 0), (False, 0), (True, 4), (False, 2)])
def test_forward_equal_tiny_timm(fused: bool, reg: int) -> None:
    check_forward_equal(tiny_timm(fused, reg), torch.randn(3, 1, 28, 28))


def test_forward_equal_tiny_timm_avgpool_layerscale_qknorm() -> None:
    model = tiny_timm(True, global_pool="avg", class_token=False, init_values=0.1, qk_norm=True,
                      fc_norm=True)
    check_forward_equal(model, torch.randn(2, 1, 28, 28))


def test_forward_equal_tiny_torchvision() -> None:
    check_forward_equal(tiny_tv(), torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224",
                                  "vit_small_patch16_224", "deit_small_patch16_224"])
def test_forward_equal_timm_zoo(name: str) -> None:
    check_forward_equal(timm.create_model(name, pretrained=False), torch.randn(1, 3, 224, 224))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_base_patch16_224", "deit_base_patch16_224"])
def test_forward_equal_timm_zoo_base(name: str) -> None:
    check_forward_equal(timm.create_model(name, pretrained=False), torch.randn(1, 3, 224, 224))


def _tv(name: str) -> nn.Module:
    model = getattr(torchvision.models, name)()
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval()


def test_forward_equal_torchvision_vit_b_32() -> None:
    check_forward_equal(_tv("vit_b_32"), torch.randn(1, 3, 224, 224))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "vit_l_16"])
def test_forward_equal_torchvision_large(name: str) -> None:
    check_forward_equal(_tv(name), torch.randn(1, 3, 224, 224))


def test_explain_restores_model_and_flags() -> None:
    model = tiny_timm()
    model.train()
    model.head.weight.requires_grad_(True)
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    explain_vit(model, torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), None)
    assert_restored(model, state)
    assert model.training and model.blocks[2].mlp.training
    assert model.head.weight.requires_grad and not model.blocks[0].attn.qkv.weight.requires_grad


# --------------------------------------------------------------------------- rules


def test_uniform_matmul_gives_each_operand_half() -> None:
    a = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    z = ops.uniform_matmul(a, b)
    ga, gb = torch.autograd.grad(z, (a, b), g)
    total = (z * g).sum(dim=(-2, -1))
    assert torch.allclose((a * ga).sum(dim=(-2, -1)), total / 2)
    assert torch.allclose((b * gb).sum(dim=(-2, -1)), total / 2)
    # epsilon-stabilised: the same with eps, relevance shrinks only where |z| is small
    z2 = ops.uniform_matmul(a, b, eps=1e-3)
    ga2, _ = torch.autograd.grad(z2, (a, b), g)
    expected = ((g * z / (z + 1e-3 * torch.where(z >= 0, 1.0, -1.0))) @ b.transpose(-2, -1)) / 2
    assert torch.allclose(ga2, expected)
    # batched over heads = one head at a time
    head = ops.uniform_matmul(a[:, 1], b[:, 1])
    ga_head, _ = torch.autograd.grad(head, (a, b), g[:, 1])
    assert torch.allclose(ga_head[:, 1], ga[:, 1])


def test_attnlrp_softmax_rule_and_its_bias_loss() -> None:
    """AttnLRP: R_in = x (R - s ΣR); Σ R_in = Σ R - (Σ_i x_i s_i... ) is not conserved."""
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    r_out = torch.rand(4, 7, dtype=torch.float64)
    s = ops.softmax(x, "attnlrp")
    (grad,) = torch.autograd.grad(s, x, r_out / s.detach())  # start relevance r_out at s
    r_in = x.detach() * grad
    sd = s.detach()
    assert torch.allclose(r_in, x.detach() * (r_out - sd * r_out.sum(-1, keepdim=True)))
    # the loss: Σ R_in = Σ x R - (Σ x s) Σ R, different from Σ R (the softmax bias absorbs it)
    loss = (r_out.sum(-1) - r_in.sum(-1)).abs()
    assert bool((loss > 1e-3).all())


def test_cp_softmax_passes_no_relevance() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    assert not ops.softmax(x, "cp").requires_grad


def test_zplus_softmax_matches_bruteforce() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    r_out = torch.rand(6, 5, dtype=torch.float64)
    s = ops.softmax(x, "zplus")
    (grad,) = torch.autograd.grad(s, x, r_out / s.detach())
    r_in = x.detach() * grad
    xd, sd = x.detach(), s.detach()
    expected = torch.zeros_like(xd)
    for row in range(xd.shape[0]):
        jac = torch.diag(sd[row]) - torch.outer(sd[row], sd[row])  # J[j, i] = ds_j/dx_i
        contrib = (jac * xd[row][None, :]).clamp(min=0)  # [j, i]: (x_i J_ji)+
        expected[row] = (contrib / contrib.sum(1, keepdim=True) * r_out[row][:, None]).sum(0)
    assert torch.allclose(r_in, expected, atol=1e-10)
    assert torch.allclose(r_in.sum(-1), r_out.sum(-1))  # conservative


def test_layer_norm_keeps_normaliser_constant() -> None:
    ln = nn.LayerNorm(8)
    nn.init.normal_(ln.weight)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y = ops.layer_norm(x, ln.weight.double(), None, ln.eps)
    assert torch.allclose(y, nn.functional.layer_norm(x, (8,), ln.weight.double(), None, ln.eps))
    g = torch.randn(3, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, g)
    # identity rule on the normaliser: relevance conserved (bias-free), Σ x·grad = Σ y·g
    assert torch.allclose((x * grad).sum(-1), (y * g).sum(-1))


def test_pass_activation_keeps_relevance() -> None:
    x = torch.randn(2, 3, 10, requires_grad=True)
    got: list[torch.Tensor] = []
    y = ops.pass_activation(nn.functional.gelu, x, got.append)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(x * grad, y * g, atol=1e-6)
    assert got[0].shape == (2, 3, 10) and torch.allclose(got[0], y * g)  # per token


@pytest.mark.parametrize("rule", [{"rule": "epsilon", "epsilon": 0.01}, {"rule": "gamma", "gamma": 0.25},
                                  {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0}, {"rule": "zplus"}])
def test_linear_rules_equal_the_cnn_engine(rule: dict) -> None:
    """Gradient-convention bridge gives the engine's (zennit-equal) relevance."""
    from pxopt.lrp.config import RuleSpec

    lin = nn.Linear(6, 4).double()
    x = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    r_out = torch.randn(5, 3, 4, dtype=torch.float64)
    spec = RuleSpec.from_dict(rule)
    y = linear_rule(spec, "l", lin.weight.detach(), lin.bias.detach())(x)
    (grad,) = torch.autograd.grad(y, x, r_out / y.detach())
    y_ref = lrp_linear(x, lin.weight.detach(), lin.bias.detach(), spec)
    (r_ref,) = torch.autograd.grad(y_ref, x, r_out)
    assert torch.allclose(x.detach() * grad, r_ref, atol=1e-10)


def test_depth_groups() -> None:
    assert [depth_group(i, 12) for i in range(12)] == ["low"] * 3 + ["mid"] * 6 + ["high"] * 3
    assert [depth_group(i, 4) for i in range(4)] == ["low", "mid", "mid", "high"]
    assert [depth_group(i, 24) for i in range(24)].count("low") == 6
    struct = vit_structure(_tv("vit_b_32"))
    assert [b.group for b in struct.blocks] == ["low"] * 3 + ["mid"] * 6 + ["high"] * 3
    assert struct.head_names == ["heads.head"] and struct.patch_embed_name == "conv_proj"


def test_group_rule_applies_to_block_linears() -> None:
    """A ZPlus rule on 'high' changes relevance; an override on one layer changes it again."""
    model, x, t = tiny_timm(), torch.randn(2, 1, 28, 28), torch.tensor([3, 4])
    base = explain_vit(model, x, t, eps_config(1e-6, "cp")).input
    cfg = eps_config(1e-6, "cp")
    cfg["groups"]["high"] = {"rule": "zplus"}
    high = explain_vit(model, x, t, cfg).input
    cfg["overrides"] = {"blocks.0.mlp.fc1": {"rule": "zplus"}}
    over = explain_vit(model, x, t, cfg).input
    assert not torch.allclose(base, high) and not torch.allclose(high, over)


def test_config_errors() -> None:
    model, x = tiny_timm(), torch.randn(1, 1, 28, 28)
    with pytest.raises(ConfigError, match="softmax"):
        explain_vit(model, x, torch.tensor([0]), {"softmax": "nope"})
    with pytest.raises(ConfigError, match="start"):
        explain_vit(model, x, torch.tensor([0]), None, start="middle")
    with pytest.raises(ConfigError, match="matmul_eps"):
        explain_vit(model, x, torch.tensor([0]), None, matmul_eps=-1.0)


def test_unsupported_models_raise() -> None:
    with pytest.raises(UnsupportedLayerError):
        vit_structure(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UnsupportedLayerError, match="attn_pool"):
        vit_structure(TimmViT(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=2,
                              num_heads=4, num_classes=10, global_pool="map"))


# --------------------------------------------------------------------------- conservation


def _zero_biases(model: nn.Module) -> nn.Module:
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
    return model


def stream_ratios(model: nn.Module, blocks: nn.Module, x: torch.Tensor, t: torch.Tensor,
                  cfg: dict, **kw: object) -> tuple[torch.Tensor, object]:
    """Relevance on the residual stream after each block, as ratios block k+1 / block k."""
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        kept.append(out)

    handles = [b.register_forward_hook(keep) for b in blocks]
    try:
        expl = explain_vit(model, x, t, cfg, **kw)
    finally:
        for h in handles:
            h.remove()
    sums = torch.stack([(h * h.grad).sum(dim=(1, 2)) for h in kept])
    return sums[1:] / sums[:-1], expl


@pytest.mark.parametrize("softmax", ["cp", "zplus"])
def test_conservation_timm(softmax: str) -> None:
    model = _zero_biases(tiny_timm(False, 2))
    ratios, _ = stream_ratios(model, model.blocks, torch.randn(3, 1, 28, 28),
                              torch.tensor([1, 2, 3]), eps_config(1e-9, softmax))
    assert ((ratios - 1).abs() < 0.01).all(), ratios


@pytest.mark.parametrize("softmax", ["cp", "zplus"])
def test_conservation_torchvision(softmax: str) -> None:
    model = _zero_biases(tiny_tv())
    ratios, _ = stream_ratios(model, model.encoder.layers, torch.randn(3, 3, 32, 32),
                              torch.tensor([1, 2, 3]), eps_config(1e-9, softmax))
    assert ((ratios - 1).abs() < 0.01).all(), ratios


def test_conservation_with_residual_rule() -> None:
    """The epsilon z-rule on residual sums stays conservative up to its stabiliser."""
    model = _zero_biases(tiny_timm())
    ratios, _ = stream_ratios(model, model.blocks, torch.randn(2, 1, 28, 28), torch.tensor([1, 2]),
                              eps_config(1e-9, "cp"), residual_eps=1e-9)
    assert ((ratios - 1).abs() < 0.01).all(), ratios


def test_attnlrp_loses_relevance_through_softmax_bias() -> None:
    """Documented AttnLRP behaviour: the softmax rule is not conservative (s·x acts as a bias)."""
    model = _zero_biases(tiny_tv())
    ratios, _ = stream_ratios(model, model.encoder.layers, torch.randn(3, 3, 32, 32),
                              torch.tensor([1, 2, 3]), eps_config(1e-9, "attnlrp"))
    assert ((ratios - 1).abs() > 0.01).any(), ratios


def test_batch_invariance() -> None:
    model, x, t = tiny_timm(), torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    full = explain_vit(model, x, t, None)
    one = explain_vit(model, x[2:3], t[2:3], None)
    assert torch.allclose(full.input[2:3], one.input, atol=1e-6)
    assert torch.allclose(full.components["blocks.1.attn"][2:3], one.components["blocks.1.attn"],
                          atol=1e-6)


# --------------------------------------------------------------------------- components


def test_components_timm() -> None:
    model = tiny_timm(reg_tokens=1)
    expl = explain_vit(model, torch.randn(2, 1, 28, 28), torch.tensor([0, 5]), None, mlp_outputs=True)
    names = [f"blocks.{i}.{s}" for i in range(4) for s in ("attn", "mlp.fc1", "mlp.fc2")]
    assert list(expl.components) == names
    assert expl.components["blocks.0.attn"].shape == (2, 4)
    assert expl.components["blocks.3.mlp.fc1"].shape == (2, 256)
    assert expl.components["blocks.3.mlp.fc2"].shape == (2, 64)
    only_heads = explain_vit(model, torch.randn(2, 1, 28, 28), torch.tensor([0, 5]), None,
                             kinds=["heads"])
    assert list(only_heads.components) == [f"blocks.{i}.attn" for i in range(4)]


@pytest.mark.parametrize("softmax", ["cp", "attnlrp"])
def test_components_torchvision_and_head_sum(softmax: str) -> None:
    """Heads: relevance at the attention map = half the relevance of the attention output."""
    model = _zero_biases(tiny_tv())
    attn = model.encoder.layers[1].self_attention
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, out: tuple) -> None:
        out[0].retain_grad()
        kept.append(out[0])

    handle = attn.register_forward_hook(keep)
    try:
        expl = explain_vit(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 2]),
                           eps_config(0.0, softmax), start="logit")
    finally:
        handle.remove()
    name = "encoder.layers.encoder_layer_1.self_attention"
    assert list(expl.components)[:2] == ["encoder.layers.encoder_layer_0.self_attention",
                                         "encoder.layers.encoder_layer_0.mlp.0"]
    assert expl.components[name].shape == (2, 4)
    assert expl.components["encoder.layers.encoder_layer_1.mlp.0"].shape == (2, 128)
    branch = (kept[0] * kept[0].grad).sum(dim=(1, 2))  # zero bias, LRP-0 out_proj: R passes
    assert torch.allclose(2 * expl.components[name].sum(1), branch, rtol=1e-4, atol=1e-7)


def test_predicted_and_target_start() -> None:
    model, x = tiny_timm(), torch.randn(3, 1, 28, 28)
    pred = model(x).argmax(1)
    a = explain_vit(model, x, None, eps_config(1e-9, "cp"), start="predicted")
    b = explain_vit(model, x, pred, eps_config(1e-9, "cp"), start="target")
    assert torch.allclose(a.input, b.input)
    # explicit attention and LayerNorm round differently from the fused kernels
    assert (a.output - model(x).detach()).abs().max() <= 1e-5


# --------------------------------------------------------------------------- integration


def test_discover_layers_and_explain_dispatch_to_vit() -> None:
    from pxopt.layers import discover_layers
    from pxopt.lrp.explain import component_relevance, explain

    model = tiny_timm()
    lm = discover_layers(model)
    assert [(la.name, la.kind, la.group) for la in lm[:3]] == [
        ("patch_embed.proj", "conv", "input"), ("blocks.0.attn", "heads", "low"),
        ("blocks.0.mlp.fc1", "mlp", "low")]
    assert lm[-1].name == "head" and lm[-1].kind == "head" and lm[-1].group == "fc"
    assert [la.n_components for la in lm.prunable(["heads"])] == [4] * 4
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    a = explain(model, x, t, {"softmax": "cp"})
    b = explain_vit(model, x, t, {"softmax": "cp"})
    assert torch.equal(a.input, b.input) and list(a.components) == list(b.components)
    scores = component_relevance(model, [(x, t), (x, t)], {"softmax": "cp"}, kinds=["mlp"])
    assert scores.n_samples == 4 and list(scores.abs) == [f"blocks.{i}.mlp.fc1" for i in range(4)]
    assert torch.allclose(scores.abs["blocks.1.mlp.fc1"], b.components["blocks.1.mlp.fc1"].abs().mean(0))


def test_conv_and_head_kinds_and_inference_mode() -> None:
    model, x, t = tiny_tv(), torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.inference_mode():
        expl = explain_vit(model, x, t, None, kinds=["conv", "head"])
    assert list(expl.components) == ["conv_proj", "heads.head"]
    assert expl.components["conv_proj"].shape == (2, 64)
    assert torch.equal(expl.components["heads.head"].argmax(1), t)


def test_unknown_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="overrides"):
        explain_vit(tiny_timm(), torch.randn(1, 1, 28, 28), torch.tensor([0]),
                    {"overrides": {"blocks.9.attn.qkv": {"rule": "zplus"}}})


@pytest.mark.parametrize("softmax", ["attnlrp", "cp"])
@pytest.mark.parametrize("make", [tiny_timm, tiny_tv])
def test_fused_attention_path_equals_explicit_ops(softmax: str, make: object) -> None:
    """With matmul_eps 0 the fused kernel + gradient scaling is the same rule as the explicit ops."""
    # float64: in float32 the epsilon rule amplifies 1e-7 rounding differences of the two
    # forward paths wherever a Linear output is close to zero
    model = make().double()  # type: ignore[operator]
    x = torch.randn(3, *((1, 28, 28) if isinstance(model, TimmViT) else (3, 32, 32))).double()
    t = torch.tensor([1, 2, 3])
    cfg = eps_config(1e-6, softmax)
    fused = explain_vit(model, x, t, cfg, fused=True)
    explicit = explain_vit(model, x, t, cfg, fused=False)
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert rel(fused.input, explicit.input) < 1e-9
    for name, r in explicit.components.items():
        assert rel(fused.components[name], r) < 1e-9, name
