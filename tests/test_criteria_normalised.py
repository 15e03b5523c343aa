"""Layer-normalised criteria (`weight-norm`, `weight-l2-norm`, `activation-norm`, `taylor-norm`):
hand-computed values, Torch-Pruning's own importances, the layer they keep from being emptied,
and one list of names for the library, the CLI and the results benchmark."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from pxopt.criteria import CRITERIA, LAYER_MEAN_NORMALISED, check_criteria, compute_scores
from pxopt.errors import ConfigError
from pxopt.prune import global_order
from tests._prune_helpers import simple_layer_map, tiny_vit, trained_tiny_resnet

ROOT = Path(__file__).resolve().parents[1]
NORMALISED = tuple(LAYER_MEAN_NORMALISED)


class Toy(nn.Module):
    """conv1 (1->2, 1x1) -> ReLU -> conv2 (2->3, 1x1) -> mean pool -> fc (3->2), no biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 3, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([2.0, -4.0]).view(2, 1, 1, 1))
            self.conv2.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 3.0], [-2.0, 0.0]]).view(3, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, -1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.conv2(self.relu(self.conv1(x)))), 1))


def _toy_scores(name: str) -> dict[str, dict[str, torch.Tensor]]:
    model = Toy().eval()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    sc = compute_scores(name, model, [(x, torch.tensor([1]))], simple_layer_map(model, "fc"), kinds="conv")
    assert sc.criterion == name and sc.meta["normaliser"] == "layer mean of |score|"
    return {"abs": sc.abs, "signed": sc.signed}


def _close(got: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_weight_norms_by_hand() -> None:
    # conv1 filters: |2|, |-4| -> mean 3; squares 4, 16 -> mean 10.
    # conv2 filters: rows (1, 1), (0, 3), (-2, 0): L1 2, 3, 2 -> mean 7/3; squares 2, 9, 4 -> mean 5.
    l1 = _toy_scores("weight-norm")["abs"]
    _close(l1["conv1"], [2 / 3, 4 / 3])
    _close(l1["conv2"], [6 / 7, 9 / 7, 6 / 7])
    l2 = _toy_scores("weight-l2-norm")["abs"]
    _close(l2["conv1"], [0.4, 1.6])
    _close(l2["conv2"], [0.4, 1.8, 0.8])


def test_activation_norm_by_hand() -> None:
    # x = [1, 2, 3, 4] (mean 2.5). conv1 outputs 2x and -4x: mean |a| 5 and 10 (layer mean
    # 7.5), mean a 5 and -10. After ReLU only 2x is left; conv2 outputs 2x, 0, -4x: mean |a|
    # 5, 0, 10 (layer mean 5), mean a 5, 0, -10. Signed scores share the abs denominator.
    s = _toy_scores("activation-norm")
    _close(s["abs"]["conv1"], [2 / 3, 4 / 3])
    _close(s["signed"]["conv1"], [2 / 3, -4 / 3])
    _close(s["abs"]["conv2"], [1.0, 0.0, 2.0])
    _close(s["signed"]["conv2"], [1.0, 0.0, -2.0])


def test_taylor_norm_by_hand() -> None:
    # Target: logit 1 = 0.5 p0 + p1 - p2 (p = mean-pooled conv2 outputs 5, 0, -10).
    # conv2: a * dlogit/da summed over positions = w_fc[1, c] * mean(a_c): 2.5, 0, 10 -> mean 12.5/3.
    # conv1: dlogit/d relu_k = sum_c w_fc[1, c] w2[c, k] / 4 = 0.625 (k=0), 0.875 (k=1); the
    # ReLU passes channel 0 only (channel 1 is negative): 0.625 * (2+4+6+8) = 12.5, and 0 -> mean 6.25.
    s = _toy_scores("taylor-norm")
    _close(s["abs"]["conv2"], [0.6, 0.0, 2.4])
    _close(s["signed"]["conv2"], [0.6, 0.0, 2.4])
    _close(s["abs"]["conv1"], [2.0, 0.0])


def test_normalised_forms_are_raw_over_layer_mean_on_vit_heads_and_mlp() -> None:
    model = tiny_vit()
    lm = simple_layer_map(model, "head")
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for name, (raw_name, opts) in LAYER_MEAN_NORMALISED.items():
        norm = compute_scores(name, model, [(x, y)], lm, kinds=("heads", "mlp"))
        raw = compute_scores(raw_name, model, [(x, y)], lm, kinds=("heads", "mlp"))
        for layer, v in norm.abs.items():
            assert float(v.mean()) == pytest.approx(1.0, rel=1e-5)
            if opts.get("p", 1) == 1:
                torch.testing.assert_close(v, raw.abs[layer] / raw.abs[layer].mean())
                torch.testing.assert_close(norm.signed[layer], raw.signed[layer] / raw.abs[layer].mean())
    qkv = model.blocks[0].attn.qkv.weight  # embed 32, 4 heads of 8: head 2 = rows 16..23 of q, k, v
    l2 = compute_scores("weight-l2-norm", model, [], lm, kinds="heads").abs["blocks.0.attn"]
    per_head = torch.stack([sum(qkv[s * 32 + 8 * h: s * 32 + 8 * h + 8].pow(2).sum() for s in range(3))
                            for h in range(4)])
    torch.testing.assert_close(l2, per_head / per_head.mean())


def test_zero_layer_stays_zero() -> None:
    model = Toy().eval()
    with torch.no_grad():
        model.conv2.weight.zero_()
    sc = compute_scores("weight-norm", model, [], simple_layer_map(model, "fc"), kinds="conv")
    assert torch.equal(sc.abs["conv2"], torch.zeros(3)) and sc.is_finite()


# -- Torch-Pruning's own importances on a small conv net -------------------------------------
class Chain(nn.Module):
    """conv1 feeds conv2 directly (no BN / ReLU between), so Torch-Pruning's group of conv1's
    output channels is {conv1 out, conv2 in} and conv2's input is exactly conv1's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv2(self.conv1(x)))), 1))


def _tp_group(model: Chain, x: torch.Tensor):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    return dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(6)))


@pytest.mark.parametrize(("name", "p"), [("weight-norm", 1), ("weight-l2-norm", 2)])
def test_weight_norms_match_torch_pruning_magnitude_importance(name: str, p: int) -> None:
    torch.manual_seed(1)
    model = Chain().eval()
    x = torch.randn(2, 3, 8, 8)
    # The layer's own filters (group_reduction="first"), divided by their mean (normalizer="mean").
    imp = tp.importance.MagnitudeImportance(p=p, normalizer="mean", group_reduction="first")
    ref = imp(_tp_group(model, x))
    ours = compute_scores(name, model, [], simple_layer_map(model, "fc"), kinds="conv").abs["conv1"]
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-6)


def test_activation_norm_matches_torch_pruning_activation_importance() -> None:
    torch.manual_seed(2)
    model = Chain().eval()
    x = torch.randn(3, 3, 8, 8)
    imp = tp.importance.ActivationImportance(normalizer="mean")
    group = _tp_group(model, x)
    with imp.compute_importance(model), torch.no_grad():
        model(x)  # Torch-Pruning reads mean |input| of conv2 = mean |output| of conv1
    ref = imp(group)
    ours = compute_scores("activation-norm", model, [(x, torch.zeros(3, dtype=torch.long))],
                          simple_layer_map(model, "fc"), kinds="conv").abs["conv1"]
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-6)


def test_taylor_norm_matches_torch_pruning_taylor_importance() -> None:
    """For a bias-free conv, sum_k w_k dL/dw_k over a filter = sum over positions of a * dL/da
    (the output is linear in the filter), so Torch-Pruning's weight-space Taylor with
    `multivariable=True` (|sum of w * dw| per filter) equals pxopt's activation-space Taylor
    (Molchanov et al. 2017) for one sample; both normalised by the layer mean."""
    torch.manual_seed(3)
    model = Chain().eval()
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([2])
    group = _tp_group(model, x)
    model.zero_grad()
    model(x).gather(1, y.view(-1, 1)).sum().backward()  # pxopt's target: the label's logit
    imp = tp.importance.TaylorImportance(multivariable=True, normalizer="mean", group_reduction="first")
    ref = imp(group)
    model.zero_grad()
    ours = compute_scores("taylor-norm", model, [(x, y)], simple_layer_map(model, "fc"), kinds="conv").abs["conv1"]
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-4, atol=1e-6)


# -- what the normalisation is for ---------------------------------------------------------
def test_normalised_forms_do_not_empty_a_layer_where_raw_forms_do() -> None:
    """On the trained tiny ResNet (56 conv channels: stem 8, block 8 + 8, features 16 + 16),
    raw weight and activation scores of the stem are all below every other layer's, so the
    global ranking removes the whole stem by rate 0.15; the layer-normalised forms spread the
    same budget over the layers."""
    from pxopt.data import make_task
    from pxopt.layers import discover_layers

    model = trained_tiny_resnet()
    lm = discover_layers(model)
    task = make_task("mnist-5k", classes=None, n_ref=5, n_val=30, seed=0)
    kinds = ("conv",)

    def fractions(name: str) -> dict[float, dict[str, float]]:
        sc = compute_scores(name, model, task.reference_batches(32, "cpu"), lm, kinds=kinds)
        order = global_order(sc.abs, lm, kinds)
        return {rate: {k: c / order.n_components[k] for k, c in order.per_layer_counts(rate).items()}
                for rate in (0.15, 0.5)}

    for raw in ("weight", "activation"):
        assert fractions(raw)[0.15]["stem"] == 1.0, raw  # the stem is gone: no signal passes
    for name in NORMALISED:
        f = fractions(name)
        assert max(f[0.15].values()) <= 0.5, (name, f[0.15])
        assert max(f[0.5].values()) < 1.0, (name, f[0.5])  # still no layer emptied at 50 %


# -- one list of names -----------------------------------------------------------------------
def test_check_criteria() -> None:
    assert check_criteria([" weight-norm", "taylor", ""]) == ("weight-norm", "taylor")
    with pytest.raises(ConfigError, match="unknown criterion 'weight-l1'"):
        check_criteria(["weight", "weight-l1"])
    with pytest.raises(ConfigError, match="empty"):
        check_criteria([" "])
    assert set(LAYER_MEAN_NORMALISED) <= set(CRITERIA)
    assert all(raw in CRITERIA for raw, _ in LAYER_MEAN_NORMALISED.values())


def test_cli_accepts_every_library_criterion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`pxopt baselines` runs every name of `pxopt.criteria.CRITERIA` by default and rejects
    the rest with the library's message."""
    from search_fakes import FakePipeline
    from typer.testing import CliRunner

    import pxopt.pipeline
    from pxopt.cli import app

    monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", FakePipeline.from_spec)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["baselines", "--model", "builtin:tiny", "--out-dir", "b", "--rates", "0:1:0.5"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "b" / "builtin-tiny-baselines.json").read_text())
    assert list(table["criteria"]) == list(CRITERIA)
    # the report overlays every curve of the table, each normalised form beside its raw one
    for args in (["search", "--model", "builtin:tiny", "--study", "s", "--trials", "2", "--no-report",
                  "--rates", "0:1:0.5"],
                 ["report", "--study", "s", "--out", "r.html", "--heatmaps", "0",
                  "--baselines", "b/builtin-tiny-baselines.json"]):
        res = CliRunner().invoke(app, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text()
    for name, (raw, _) in LAYER_MEAN_NORMALISED.items():
        assert f"criterion {name}: area" in html and f"criterion {raw}: area" in html, name
    with pytest.raises(ConfigError, match="--criteria: unknown criterion 'weight-l1'"):
        CliRunner().invoke(app, ["baselines", "--model", "builtin:tiny", "--criteria", "weight,weight-l1"],
                           catch_exceptions=False)


def test_cli_reads_the_names_without_torch() -> None:
    code = "import sys, pxopt.cli, pxopt.criteria; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_results_benchmark_uses_the_library_names() -> None:
    spec = importlib.util.spec_from_file_location("pxopt_bench_results_names", ROOT / "benchmarks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.CRITERIA[0] == "optimised"
    assert sorted(module.CRITERIA[1:]) == sorted(CRITERIA)
    assert set(module._COLOURS) >= set(module.CRITERIA)
