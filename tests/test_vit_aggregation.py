"""How ViT component scores aggregate over tokens (issue 13, point 3).

The reference code (pxp/attribute.py) scores an MLP neuron by the relevance at fc1's output
and a head by the relevance at its attention weights (softmax output) summed over the keys,
then takes |R| per token (per query for heads) and sums over the tokens and the images:
pxopt's "token-abs". pxopt's "abs" is |sum over tokens of R|, "signed" the sum itself.
Here both are computed by hand from per-token relevance tensors captured with autograd
hooks on a 2-block toy ViT (random weights, float64) and compared with what pxopt returns.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer as TvViT

import pxopt.lrp.attention as ops
from pxopt.errors import ConfigError
from pxopt.layers import discover_layers
from pxopt.lrp import component_relevance
from pxopt.lrp.vit import explain_vit, vit_structure
from pxopt.prune import global_order
from pxopt.scores import ComponentScores, ScoreAccumulator
from pxopt.search.space import SearchSpace

RULES = {"groups": {"input": {"rule": "epsilon", "epsilon": 1e-6},
                    "low": {"rule": "epsilon", "epsilon": 1e-3},
                    "mid": {"rule": "gamma", "gamma": 0.25},
                    "fc": {"rule": "epsilon", "epsilon": 1e-6}},
         "softmax": "attnlrp"}


# Seeds with heads that rank differently under the two aggregations: in random-weight toys
# a head's per-query relevance mostly has one sign (and in the last block only the class
# token carries relevance), so most seeds give the same head order; MLP neurons differ often.
def toy_timm() -> nn.Module:
    torch.manual_seed(4)
    return TimmViT(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=4,
                   mlp_ratio=2.0, num_classes=3).double().eval()


def toy_tv() -> nn.Module:
    torch.manual_seed(7)
    model = TvViT(image_size=8, patch_size=4, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=32,
                  num_classes=3)
    nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision zero-initialises the head
    return model.double().eval()


def _inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])


def _by_hand(model: nn.Module, x: Tensor, t: Tensor, rules: dict,
             monkeypatch: pytest.MonkeyPatch) -> dict[str, Tensor]:
    """Per-token relevance (batch, tokens, n) of every head and MLP neuron, from hooks.

    Heads: A ⊙ ∂/∂A at each softmax output A (explicit attention ops), summed over the keys,
    laid out (batch, queries, heads). MLP: y ⊙ ∂/∂y at fc1's output y.
    """
    struct = vit_structure(model)
    soft: list[Tensor] = []
    soft_grads: dict[int, Tensor] = {}
    plain = ops.softmax

    def keep_softmax(x_: Tensor, rule: str, **kw: object) -> Tensor:
        a = plain(x_, rule, **kw)  # type: ignore[arg-type]
        i = len(soft)
        soft.append(a)
        a.register_hook(lambda g: soft_grads.__setitem__(i, g))
        return a

    monkeypatch.setattr(ops, "softmax", keep_softmax)
    fc1_out: dict[str, Tensor] = {}
    fc1_grads: dict[str, Tensor] = {}

    def keep_fc1(name: str) -> Callable:
        def hook(_m: nn.Module, _inp: tuple, out: Tensor) -> None:
            fc1_out[name] = out
            out.register_hook(lambda g: fc1_grads.__setitem__(name, g))
        return hook

    handles = [blk.fc1.register_forward_hook(keep_fc1(blk.fc1_name)) for blk in struct.blocks]
    try:
        explain_vit(model, x, t, rules, fused=False)
    finally:
        for h in handles:
            h.remove()
        monkeypatch.setattr(ops, "softmax", plain)
    out: dict[str, Tensor] = {}
    for i, blk in enumerate(struct.blocks):  # one softmax per block, in forward order
        r_a = soft[i].detach() * soft_grads[i]  # (batch, heads, queries, keys)
        out[blk.attn_name] = r_a.sum(dim=-1).transpose(1, 2)
        out[blk.fc1_name] = fc1_out[blk.fc1_name].detach() * fc1_grads[blk.fc1_name]
    return out


def _close(a: Tensor, b: Tensor, tol: float = 1e-9) -> bool:
    return float((a - b).norm()) <= tol * max(float(b.norm()), 1e-300)


@pytest.mark.parametrize("make", [toy_timm, toy_tv], ids=["timm", "torchvision"])
def test_token_abs_and_abs_against_hand_computed(make: Callable[[], nn.Module],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = make()
    x, t = _inputs()
    tokens = _by_hand(model, x, t, RULES, monkeypatch)
    names = list(tokens)
    assert tokens[names[0]].shape == (5, 5, 4) and tokens[names[1]].shape == (5, 5, 32)

    # one explanation: signed sum, sum of |R_t| and the tokens themselves
    expl = explain_vit(model, x, t, RULES, tokens=True)  # fused attention: the same rule
    assert list(expl.components) == names == list(expl.token_abs) == list(expl.tokens or {})
    for name, r in tokens.items():
        assert _close(expl.tokens[name], r), name  # type: ignore[index]
        assert _close(expl.components[name], r.sum(1)), name
        assert _close(expl.token_abs[name], r.abs().sum(1)), name

    # the scores a search ranks by: mean over the images of each aggregation
    scores = component_relevance(model, [(x[:2], t[:2]), (x[2:], t[2:])], RULES)
    assert scores.default_ranking == "token-abs" and scores.select() is scores.select("token-abs")
    for name, r in tokens.items():
        assert _close(scores.select("token-abs")[name], r.abs().sum(1).mean(0)), name
        assert _close(scores.select("abs")[name], r.sum(1).abs().mean(0)), name
        assert _close(scores.select("signed")[name], r.sum(1).mean(0)), name

    # the two aggregations rank differently here (else this test could not tell them apart)
    layer_map = discover_layers(model)
    for kind in ("heads", "mlp"):
        order = {rk: global_order(scores.select(rk), layer_map, kind) for rk in ("abs", "token-abs")}
        hand = torch.cat([tokens[la.name].abs().sum(1).mean(0) for la in layer_map.prunable([kind])])
        by_token = order["token-abs"]
        assert torch.equal(torch.sort(hand, stable=True).indices,
                           _flat_index(by_token, layer_map, kind)), kind
        assert not torch.equal(_flat_index(order["abs"], layer_map, kind), _flat_index(by_token, layer_map, kind)), kind


def _flat_index(order, layer_map, kind: str) -> Tensor:
    """Prune order as indices into the concatenation of the layers' components."""
    offsets, n = {}, 0
    for la in layer_map.prunable([kind]):
        offsets[la.name] = n
        n += la.n_components
    starts = torch.tensor([offsets[name] for name in order.names])
    return starts[order.layer_index] + order.component_index


def test_cp_heads_are_half_the_head_output_per_query() -> None:
    """CP-LRP sends no relevance through the attention weights; a head's per-query relevance
    is then half its output's (the uniform rule's share), so the variants share a scale."""
    model = toy_timm()
    x, t = _inputs()
    kept: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def pre(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            kept[name] = args[0]
            args[0].register_hook(lambda g: grads.__setitem__(name, g))
        return hook

    handles = [blk.attn.proj.register_forward_pre_hook(pre(f"blocks.{i}.attn"))
               for i, blk in enumerate(model.blocks)]
    try:
        expl = explain_vit(model, x, t, {**RULES, "softmax": "cp"}, tokens=True)
    finally:
        for h in handles:
            h.remove()
    for name, inp in kept.items():
        per_query = (inp.detach() * grads[name]).reshape(5, 5, 4, 4).sum(-1) * 0.5  # (b, q, heads)
        assert _close(expl.tokens[name], per_query), name  # type: ignore[index]
        assert _close(expl.token_abs[name], per_query.abs().sum(1)), name


def test_accumulator_and_selection() -> None:
    acc = ScoreAccumulator()
    r = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    tok = torch.tensor([[3.0, 2.0], [5.0, 4.0]])
    acc.add({"vit": r, "cnn": r}, 2, {"vit": tok})
    acc.add({"vit": r, "cnn": r}, 2, {"vit": tok})
    sc = acc.result("lrp", default_ranking="token-abs")
    assert torch.equal(sc.select("abs")["vit"], torch.tensor([2.0, 3.0]))
    assert torch.equal(sc.select("signed")["vit"], torch.tensor([-1.0, 1.0]))
    assert torch.equal(sc.select()["vit"], torch.tensor([4.0, 3.0]))
    assert torch.equal(sc.select("token-abs")["cnn"], sc.select("abs")["cnn"])  # no tokens: |R|
    plain = ComponentScores(abs={"a": torch.ones(2)}, signed={"a": torch.zeros(2)}, criterion="weight")
    assert plain.select("token-abs") is plain.abs and plain.select() is plain.abs
    with pytest.raises(ValueError, match="token-abs"):
        plain.select("tokens")


def test_space_offers_the_aggregations_per_family() -> None:
    vit, cnn = SearchSpace.build(None, family="vit"), SearchSpace.build(None, family="cnn")
    assert vit.rankings == ("token-abs", "signed") and cnn.rankings == ("abs", "signed")
    assert {r for _, r in vit.baselines().values()} == {"token-abs"}
    assert {r for _, r in cnn.baselines().values()} == {"abs"}
    every = SearchSpace.build({"ranking": ["abs", "token-abs", "signed"]}, family="vit")
    assert every.rankings == ("abs", "token-abs", "signed")
    rules, ranking = every.to_rules(every.to_params({"groups": {}, "softmax": "cp"}, "abs"))
    assert ranking == "abs"
    with pytest.raises(ConfigError, match="token-abs.*transformers only"):
        SearchSpace.build({"ranking": ["token-abs"]}, family="cnn")


def test_export_carries_the_aggregation() -> None:
    from pxopt.export import validate_export

    data = {
        "format": "pxopt.export/1", "rules": {"format": "pxopt.rules/1", "groups": {}, "softmax": "attnlrp"},
        "ranking": "token-abs", "components": "mlp", "model": "builtin:fmnist-vit",
        "task": {"data": "fashion-mnist", "classes": 3, "n_ref": 1, "n_val": 4, "seed": 0, "batch_size": 8},
        "curve": {"rates": [0.0, 0.5], "accuracies": [0.9, 0.5]}, "area": 0.35, "top_pr": 0.0, "trial": 0,
        "versions": {},
    }
    assert validate_export(data)["ranking"] == "token-abs"
    with pytest.raises(ConfigError, match="ranking must be one of"):
        validate_export({**data, "ranking": "per-token"})


def test_pipeline_caches_every_aggregation_and_curves_follow_the_choice() -> None:
    """The relevance cache is keyed by the rules alone: one pass gives all aggregations, and
    the curve (and its record) use the chosen one; no choice = the ViT default."""
    from pxopt.data import Task, TensorSet
    from pxopt.pipeline import Pipeline

    model = toy_timm().float()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    ref = TensorSet(torch.randn(6, 3, 8, 8, generator=g), torch.arange(6) % 3)
    val = TensorSet(torch.randn(12, 3, 8, 8, generator=g), torch.arange(12) % 3)
    task = Task(dataset="random", classes=[0, 1, 2], class_names=["a", "b", "c"], reference=ref,
                validation=val, seed=0, n_ref=2, n_val=4)
    pipe = Pipeline(model=model, task=task, layer_map=discover_layers(model), kinds=("mlp",),
                    rates=[0.0, 0.25, 0.5], device=torch.device("cpu"), batch_size=8, family="vit")
    pipe.check_explainable()
    first = pipe.evaluate(RULES, "abs")
    assert pipe.timings()["cached"] is False and first.meta["ranking"] == "abs"
    default = pipe.evaluate(RULES)
    assert pipe.timings()["cached"] is True and default.meta["ranking"] == "token-abs"
    scores = pipe.scores(RULES)

    def pruned(ranking: str, rate: float) -> list[list[bool]]:
        return [m.tolist() for m in pipe.prune_set(scores, ranking, rate).values()]

    assert any(pruned("abs", k / 64) != pruned("token-abs", k / 64) for k in range(64))  # 64 neurons


def test_resuming_a_study_with_other_ranking_choices_is_refused(tmp_path) -> None:
    """A ViT study made when its space offered ["abs", "signed"] cannot resume under the new
    default (Optuna fixes a categorical parameter's choices): one clear error, no trial."""
    from search_fakes import FakeEvaluator

    from pxopt.search import StudySpec, run_search

    spec = StudySpec(name="v", storage=str(tmp_path / "v.db"), trials=2, seed=0, baselines=False,
                     space={"ranking": ["abs", "signed"]}).validated()
    old = run_search(spec, FakeEvaluator(spec.rates), family="vit").study
    assert len(old.trials) == 2
    resumed = StudySpec(name="v", storage=str(tmp_path / "v.db"), trials=4, seed=0, baselines=False).validated()
    with pytest.raises(ConfigError, match=r"drew ranking from \['abs', 'signed'\], this search space offers "
                                          r"\['token-abs', 'signed'\].*set \[space\] ranking = \['abs', 'signed'\]"):
        run_search(resumed, FakeEvaluator(spec.rates), family="vit")
    assert len(run_search(spec.with_overrides(trials=3), FakeEvaluator(spec.rates), family="vit").study.trials) == 3
