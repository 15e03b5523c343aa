"""Single-layer LRP rules equal zennit 0.5.1's (conv and linear, with and without bias)."""

from __future__ import annotations

import pytest
import torch
import zennit.rules as zr
from zennit.core import Composite

from pxopt.errors import ConfigError
from pxopt.lrp.rules import lrp_conv2d, lrp_linear, lrp_norm, lrp_pass, lrp_sum

RULES = {
    "epsilon": ({"rule": "epsilon", "epsilon": 1e-3}, lambda: zr.Epsilon(1e-3)),
    "gamma": ({"rule": "gamma", "gamma": 0.3}, lambda: zr.Gamma(0.3)),
    "alphabeta": ({"rule": "alphabeta", "alpha": 2, "beta": 1}, lambda: zr.AlphaBeta(2, 1)),
    "alphabeta31": ({"rule": "alphabeta", "alpha": 3, "beta": 2}, lambda: zr.AlphaBeta(3, 2)),
    "zplus": ("zplus", zr.ZPlus),
    "flat": ("flat", zr.Flat),
    "wsquare": ("wsquare", zr.WSquare),
    "zbox": ({"rule": "zbox", "low": -2, "high": 2.5}, lambda: zr.ZBox(-2.0, 2.5)),
    "norm": ("norm", zr.Norm),
}


def _zennit(mod: torch.nn.Module, hook, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    comp = Composite(module_map=lambda ctx, n, m: hook if m is mod else None)
    with comp.context(mod):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(mod(x), x, r)
    return g


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", list(RULES))
def test_conv_rule_matches_zennit(rule: str, bias: bool) -> None:
    mine, theirs = RULES[rule]
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=bias).double()
    if bias:
        conv.bias.data.normal_()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    y = conv(x)
    r = torch.randn_like(y)
    expected = _zennit(conv, theirs(), x, r)
    xx = x.clone().requires_grad_(True)
    y2 = lrp_conv2d(xx, conv.weight, conv.bias, mine, stride=2, padding=1)
    assert torch.equal(y, y2)  # forward unchanged
    (got,) = torch.autograd.grad(y2, xx, r)
    assert _rel_err(got, expected) < 1e-10


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", list(RULES))
def test_linear_rule_matches_zennit(rule: str, bias: bool) -> None:
    mine, theirs = RULES[rule]
    lin = torch.nn.Linear(7, 4, bias=bias).double()
    if bias:
        lin.bias.data.normal_()
    x = torch.randn(3, 7, dtype=torch.float64)
    y = lin(x)
    r = torch.randn_like(y)
    expected = _zennit(lin, theirs(), x, r)
    xx = x.clone().requires_grad_(True)
    y2 = lrp_linear(xx, lin.weight, lin.bias, mine)
    assert torch.equal(y, y2)
    (got,) = torch.autograd.grad(y2, xx, r)
    assert _rel_err(got, expected) < 1e-10


def test_linear_rule_on_tokens_records_per_neuron() -> None:
    """Leading dims (tokens) work and the recorder sees R at the output."""
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    seen = []
    y = lrp_linear(x, lin.weight, lin.bias, "epsilon", recorder=seen.append)
    r = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, r)
    assert g.shape == x.shape and torch.equal(seen[0], r)
    x2 = x.detach().reshape(10, 6).requires_grad_(True)
    y2 = lrp_linear(x2, lin.weight, lin.bias, "epsilon")
    (g2,) = torch.autograd.grad(y2, x2, r.reshape(10, 4))
    assert torch.allclose(g2.reshape(2, 5, 6), g)  # same as the flattened batch


def test_gamma_zero_equals_epsilon_at_stabiliser() -> None:
    """Gamma with gamma=0 reduces to Epsilon with the same stabiliser (a sanity identity)."""
    conv = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    grads = []
    for rule in ({"rule": "gamma", "gamma": 0.0}, {"rule": "epsilon", "epsilon": 1e-6}):
        xx = x.clone().requires_grad_(True)
        y = lrp_conv2d(xx, conv.weight, conv.bias, rule, padding=1)
        grads.append(torch.autograd.grad(y, xx, torch.ones_like(y))[0])
    # Gamma gives zero relevance where the output is exactly 0; nowhere here.
    assert _rel_err(grads[0], grads[1]) < 1e-12


def test_pass_sum_and_norm_rules() -> None:
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad(lrp_pass(x, torch.relu), x, r)
    assert torch.equal(g, r)  # relevance passes, even where relu is inactive
    a = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    s = lrp_sum(a, b, 0.0)
    ga, gb = torch.autograd.grad(s, (a, b), torch.ones_like(s))
    assert torch.allclose(ga + gb, torch.ones_like(s))  # conserving with no stabiliser
    pool = torch.nn.AdaptiveAvgPool2d(1)
    y = lrp_norm(x, pool, 0.0)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.allclose(gx.sum((2, 3)), torch.ones(2, 3, dtype=torch.float64))


def test_pass_rule_rejected_on_a_weighted_layer() -> None:
    lin = torch.nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="pass"):
        lrp_linear(torch.randn(1, 3), lin.weight, lin.bias, "pass", name="fc")


def _reference(rule: dict, x, w, b, s, r, stride=1, padding=1):
    """The rules term by term on the merged weight W_m = s W (zennit's definitions)."""
    import torch.nn.functional as F

    wm = w * s.view(-1, 1, 1, 1)
    conv = lambda inp, wt, bb=None: F.conv2d(inp, wt, bb, stride, padding)  # noqa: E731
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = wm.clamp(min=0), wm.clamp(max=0)
    bp, bn = b.clamp(min=0), b.clamp(max=0)

    def stab(d):
        return d + 1e-6 * ((d == 0).to(d) + d.sign())

    def grad(outs, ins, grads):
        return torch.autograd.grad(outs, ins, grads)

    xs = [t.clone().requires_grad_(True) for t in (xp, xn, xp, xn)]
    z = conv(x, wm, b)
    if rule["rule"] == "gamma":
        g = rule["gamma"]
        o = [conv(xs[0], wm + g * wp, b + g * bp), conv(xs[1], wm + g * wn),
             conv(xs[2], wm + g * wn, b + g * bn), conv(xs[3], wm + g * wp)]
        g0 = (z > 0) * r / stab(o[0] + o[1])
        g2 = (z < 0) * r / stab(o[2] + o[3])
        gr = grad(o, xs, [g0, g0, g2, g2])
        return sum(i * gg for i, gg in zip(xs, gr, strict=True))
    al, be = (rule["alpha"], rule["beta"]) if rule["rule"] == "alphabeta" else (1.0, 0.0)
    o = [conv(xs[0], wp, bp), conv(xs[1], wn), conv(xs[2], wn, bn), conv(xs[3], wp)]
    g0 = r / stab(o[0] + o[1])
    g2 = r / stab(o[2] + o[3])
    gr = grad(o, xs, [g0, g0, g2, g2])
    return al * (xs[0] * gr[0] + xs[1] * gr[1]) - be * (xs[2] * gr[2] + xs[3] * gr[3])


@pytest.mark.parametrize("rule", [{"rule": "gamma", "gamma": 0.4},
                                  {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0},
                                  {"rule": "zplus"}])
def test_merged_scale_with_negative_channels(rule: dict) -> None:
    """A BatchNorm merged as an output scale s (some s < 0) equals the rule on s * W."""
    from pxopt.lrp.config import RuleSpec
    from pxopt.lrp.rules import LayerRule, conv2d_op, relevance_backward

    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    s = torch.randn(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    op = conv2d_op(1, 1, 1, 1, w.shape)
    z = torch.nn.functional.conv2d(x, w * s.view(-1, 1, 1, 1), b, 1, 1)
    r = torch.randn_like(z)
    layer = LayerRule(RuleSpec.from_dict(rule), op, w, b, out_scale=s, forward_fn=lambda t: t)
    got = relevance_backward(layer, x, z, r)
    want = _reference(rule, x, w, b, s, r)
    assert _rel_err(got, want) < 1e-10
