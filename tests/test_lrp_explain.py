"""explain / component_relevance: model left intact, conservation, errors, options."""

from __future__ import annotations

import gc

import pytest
import torch
import torchvision
from torch import nn

from pxopt.errors import ConfigError, NonFiniteRelevanceError, UnsupportedLayerError
from pxopt.lrp import component_relevance, explain
from pxopt.lrp.rules import LayerRule

from lrp_zennit_helpers import COMPOSITES, randomise_bn, zennit_relevance  # isort: skip

LRP0 = {"groups": {g: {"rule": "epsilon", "epsilon": 1e-9}
                   for g in ("input", "low", "mid", "high", "fc")}}


def small_cnn(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(64, 32, bias=bias), nn.ReLU(), nn.Linear(32, 5, bias=bias),
    )


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "dicts": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
    }


def _assert_same(before: dict, model: nn.Module) -> None:
    after = _snapshot(model)
    assert after["ids"] == before["ids"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
        assert v.dtype == after["state"][k].dtype
    for key in ("requires_grad", "training", "dicts", "hooks"):
        assert after[key] == before[key], key


def test_model_bit_identical_and_no_leaks() -> None:
    model = randomise_bn(torchvision.models.resnet18(num_classes=7))
    model.train()  # even a model in training mode comes back untouched (BN stats included)
    model.layer2.requires_grad_(False)
    before = _snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    for _ in range(3):
        exp = explain(model, x, [0, 5], COMPOSITES["mixed"])
        assert torch.equal(exp.output, ref)  # the logits are the model's own, bit for bit
    _assert_same(before, model)
    del exp
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, LayerRule)]  # nothing retained
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_model_restored_after_an_error() -> None:
    model = small_cnn()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match="targets"):
        explain(model, torch.randn(2, 3, 16, 16), [1, 2, 3], None)
    _assert_same(before, model)


def test_conservation_layer_by_layer_bias_free() -> None:
    """LRP-0 on a bias-free chain: every layer's component relevance sums to 1 per sample."""
    model = nn.Sequential(  # no average pools: their Norm stabiliser (1e-6) costs ~1e-4
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, bias=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(576, 32, bias=False), nn.ReLU(), nn.Linear(32, 5, bias=False),
    ).double().eval()
    for m in model.modules():  # bias-free BatchNorm: random scale, zero mean and shift
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    exp = explain(model, x, [0, 1, 4], LRP0)
    assert set(exp.components) == {"0", "4", "7", "10", "12"}
    for name, r in exp.components.items():
        assert torch.allclose(r.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-6), name
    assert torch.allclose(exp.input.sum((1, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-6)
    # with biases, relevance is absorbed: the same check must fail (the test can fail)
    biased = randomise_bn(small_cnn()).double().eval()
    r0 = explain(biased, x, [0, 1, 4], LRP0).components["0"].sum(1)
    assert not torch.allclose(r0, torch.ones(3, dtype=torch.float64), atol=1e-3)


def test_conservation_resnet_bias_free() -> None:
    model = torchvision.models.resnet18(num_classes=4).double().eval()
    model.fc.bias = None
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    exp = explain(model, x, [1, 2], LRP0)
    # residual sums use zennit's Norm stabiliser 1e-6: conserving up to that
    assert torch.allclose(exp.input.sum((1, 2, 3)), torch.ones(2, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(exp.components["conv1"].sum(1), torch.ones(2, dtype=torch.float64), atol=1e-3)


def test_small_custom_cnn_matches_zennit() -> None:
    """Includes BatchNorm channels with negative scale (merged scale s < 0)."""
    model = randomise_bn(small_cnn()).double().eval()
    model[1].weight.data[::2] *= -1
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for name, rules in COMPOSITES.items():
        rel, comps = zennit_relevance(model, x, [2, 3], rules)
        exp = explain(model, x, [2, 3], rules)
        assert ((exp.input - rel).abs().max() / rel.abs().max()) < 1e-4, name
        for k, v in comps.items():
            assert ((exp.components[k] - v).abs().max() / v.abs().max()) < 1e-4, (name, k)


def test_works_under_no_grad_and_inference_mode() -> None:
    model = small_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = explain(model, x, [1, 2], None).input
    with torch.no_grad():
        assert torch.equal(explain(model, x, [1, 2], None).input, ref)
    with torch.inference_mode():
        xi = x.clone()
        assert torch.equal(explain(model, xi, [1, 2], None).input, ref)


def test_start_options_and_kinds() -> None:
    model = small_cnn().double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    logits = model(x)
    pred = logits.argmax(1)
    a = explain(model, x, pred, None)
    b = explain(model, x, None, None, start="predicted")
    assert torch.equal(a.input, b.input)
    c = explain(model, x, pred, None, start="logit")
    scale = logits.gather(1, pred[:, None]).squeeze(1)
    assert torch.allclose(c.input, a.input * scale.view(-1, 1, 1, 1))
    only = explain(model, x, pred, None, kinds=["conv"])
    assert set(only.components) == {"0", "4", "7"}
    assert only.components["4"].shape == (3, 16)
    with pytest.raises(ConfigError, match="start"):
        explain(model, x, pred, None, start="softmax")


def test_component_relevance_accumulates_on_device() -> None:
    model = small_cnn().double().eval()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4])
    rules = COMPOSITES["mixed"]
    scores = component_relevance(model, [(x[:2], y[:2]), (x[2:], y[2:])], rules)
    full = explain(model, x, y, rules)
    assert scores.criterion == "lrp" and scores.n_samples == 5
    assert scores.meta["digest"]
    for name, r in full.components.items():
        assert torch.allclose(scores.abs[name], r.abs().mean(0), atol=1e-12)
        assert torch.allclose(scores.signed[name], r.mean(0), atol=1e-12)
        assert scores.abs[name].device == x.device
    with pytest.raises(ConfigError):
        component_relevance(model, [], rules)


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(UnsupportedLayerError, match="'1'.*LayerNorm"):
        explain(model, torch.randn(1, 3, 8, 8), [0], None)


class _HiddenAdd(nn.Module):
    """A residual block pxopt does not know: its addition must not fall back to the gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv(x) + x).flatten(1))


def test_hidden_operation_is_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="'add' after layer 'conv'"):
        explain(_HiddenAdd(), torch.randn(1, 3, 8, 8), [0], None)


class _BnFirst(nn.Module):
    """conv and bn registered adjacently but applied in the other order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.bn(x)).flatten(1))


def test_batchnorm_not_after_its_conv_is_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="'bn'"):
        explain(_BnFirst(), torch.randn(1, 3, 8, 8), [0], None)


class _DenseFeatures(nn.Module):
    """DenseNet's feature stack under another root: not the DenseNet family's model."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.densenet121(weights=None).features
        self.fc = nn.Linear(1024, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def test_pre_activation_batchnorm_outside_its_family_is_refused_naming_both_modules() -> None:
    """DenseNet normalises each layer's input (BatchNorm before the conv): only the DenseNet
    family (pxopt/families/densenet.py) declares those BatchNorms; elsewhere the BatchNorm
    registered after a conv belongs to the next layer, with other channels (issue 13.7)."""
    from pxopt.lrp import check_explainable

    model = _DenseFeatures().eval()
    x = torch.randn(1, 3, 32, 32)
    expected = (r"'features\.denseblock1\.denselayer2\.norm1' \(BatchNorm2d, 96 features\) is registered "
                r"right after 'features\.denseblock1\.denselayer1\.conv2' \(Conv2d, 32 outputs\)")
    with pytest.raises(UnsupportedLayerError, match=expected):
        explain(model, x, [0], None)
    with pytest.raises(UnsupportedLayerError, match=expected):
        check_explainable(model, x)
    assert not any("forward" in m.__dict__ for m in model.modules())


class _BnAfterRelu(nn.Module):
    """Same channel count, registered right after the conv, applied after the ReLU."""

    def __init__(self, traceable: bool = True, use_bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3 * 6 * 6, 2)
        self.traceable, self.use_bn = traceable, use_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        if not self.traceable and bool(y.sum() > -1e30):  # data-dependent: torch.fx fails
            return self.fc((self.bn(y) if self.use_bn else y).flatten(1))
        return self.fc(self.bn(y).flatten(1))


def test_batchnorm_pairing_follows_the_graph_not_registration_order() -> None:
    x = torch.randn(1, 3, 8, 8)
    # traced graph: refused before any forward, naming where the conv's output goes
    with pytest.raises(UnsupportedLayerError, match="'bn' .*right after 'conv' but the forward sends "
                                                    "that layer's output to relu"):
        explain(_BnAfterRelu(), x, [0], None)
    # untraceable forward: the run-time check sees the BatchNorm get another tensor ...
    with pytest.raises(UnsupportedLayerError, match=r"'bn' \(BatchNorm\) does not directly follow 'conv'"):
        explain(_BnAfterRelu(traceable=False), x, [0], None)
    # ... or never run at all
    model = _BnAfterRelu(traceable=False, use_bn=False)
    with pytest.raises(UnsupportedLayerError, match=r"'bn' \(BatchNorm\) did not run on the output of 'conv'"):
        explain(model, x, [0], None)
    assert not any("forward" in m.__dict__ or "_pxopt_expected" in m.__dict__ for m in model.modules())


def test_non_finite_relevance_raises() -> None:
    model = small_cnn(bias=False).eval()
    with pytest.raises(NonFiniteRelevanceError):
        explain(model, torch.zeros(1, 3, 16, 16), [0], {"groups": {"fc": {"rule": "epsilon", "epsilon": 0.0}}})


def test_unknown_override_and_pass_on_conv() -> None:
    model = small_cnn()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="overrides.nope"):
        explain(model, x, [0], {"overrides": {"nope": "zplus"}})
    with pytest.raises(ConfigError, match="'4'"):
        explain(model, x, [0], {"overrides": {"4": "pass"}})
    exp = explain(model, x, [0], {"overrides": {"4": "zplus"}})
    assert exp.components["4"].shape == (1, 16)


@pytest.mark.parametrize("edit", ["in_place", "new_parameter", "load_state_dict"])
def test_merged_batchnorm_cache_follows_parameter_changes(edit: str) -> None:
    """The merged BatchNorm is reused across calls; any change of its tensors must show."""
    torch.manual_seed(0)
    model = small_cnn().eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    gamma = {"groups": {g: {"rule": "gamma", "gamma": 0.25} for g in ("input", "low", "mid", "high", "fc")}}
    explain(model, x, y, gamma)  # fills the cache
    bn = model[1]
    if edit == "in_place":
        with torch.no_grad():
            bn.running_var.mul_(3.0)
            bn.weight.add_(0.5)
    elif edit == "new_parameter":
        bn.weight = nn.Parameter(bn.weight.detach() + 0.5)
    else:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["1.running_mean"] += 1.0
        model.load_state_dict(state)
    fresh = small_cnn().eval()
    fresh.load_state_dict(model.state_dict())
    got, want = explain(model, x, y, gamma), explain(fresh, x, y, gamma)
    assert torch.equal(got.input, want.input)
    assert all(torch.equal(got.components[k], want.components[k]) for k in want.components)
