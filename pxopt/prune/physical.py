"""Physical removal of pruned components with Torch-Pruning's dependency graph.

`physical_prune` takes the prune set of one rate (e.g. `PruneOrder.pruned_at(0.5)`) and
returns a smaller copy of the model, its params / MACs / latency before and after, and
the Torch-Pruning history needed to rebuild the architecture (`save` / `load_pruned`).

Coupled channels: where several prunable layers write the same channels (residual adds in
a ResNet stage, ...), Torch-Pruning can only remove a channel from all of them at once.
- coupled="mask" (default): remove the channels pruned in every coupled layer (exact:
  those channels are zero everywhere), leave the rest of each layer's pruned channels
  masked (zeroed) in the copy. Outputs equal the masked model's up to float rounding.
- coupled="group-sum": rank the coupled channels by the summed scores of the group's
  layers and remove as many as the group's layers prune on average (the structure gets
  smaller, but the selection differs from the masked model's).
Attention heads are left masked (zeroed value rows), not removed: removing heads changes
`num_heads` in ways Torch-Pruning's replayable history does not record.
Where a layer would lose every channel, one (zeroed) channel is kept.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from pxopt.errors import CheckpointError, ConfigError
from pxopt.prune._layers import prunable_layers
from pxopt.prune.masking import component_targets

FORMAT = "pxopt.pruned/1"


@dataclass
class PhysicalResult:
    """A physically pruned copy of a model and what it cost / saved."""

    model: nn.Module
    history: list
    removed: dict[str, list[int]]  # original component indices physically removed, per layer
    masked: dict[str, list[int]]  # original indices left masked (zeroed) in the copy
    coupled: str
    groups: list[list[str]]  # clusters of prunable layers whose channels are coupled
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    latency: dict[str, float] = field(default_factory=dict)  # "cpu_before_ms", ...

    def summary(self) -> dict[str, Any]:
        return dict(
            coupled=self.coupled, groups=self.groups,
            removed={k: len(v) for k, v in self.removed.items()},
            masked={k: len(v) for k, v in self.masked.items()},
            params_before=self.params_before, params_after=self.params_after,
            macs_before=self.macs_before, macs_after=self.macs_after, latency=dict(self.latency),
        )

    def save(self, path: str | Path) -> Path:
        """Write `<path>/model.pt` (state dict) and `<path>/pruning.json` (history + summary)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), out / "model.pt")
        meta = {"format": FORMAT, "history": self.history, "summary": self.summary(),
                "removed": self.removed, "masked": self.masked}
        (out / "pruning.json").write_text(json.dumps(meta, indent=1))
        return out


def _prune_fns(module: nn.Module) -> tuple[Any, Any] | None:
    if isinstance(module, nn.Conv2d):
        return tp.prune_conv_out_channels, tp.prune_conv_in_channels
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels, tp.prune_linear_in_channels
    return None


def _is_out_fn(handler: Any) -> bool:
    return handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels,
                       tp.prune_depthwise_conv_out_channels)


def count(model: nn.Module, example_inputs: torch.Tensor) -> tuple[float, int]:
    """(MACs, params) of one forward pass on `example_inputs` (Torch-Pruning's counter)."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return float(macs), int(params)


def latency_ms(model: nn.Module, example_inputs: torch.Tensor, *, min_run_time: float = 0.5) -> float:
    """Median latency of one forward pass in ms (torch.utils.benchmark; syncs CUDA itself)."""
    from torch.utils import benchmark

    with torch.inference_mode():
        model(example_inputs)  # warm-up
        timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": example_inputs},
                                num_threads=torch.get_num_threads())
        return float(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)


def _build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning traces the autograd graph, so parameters must require grad while it does."""
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad(), torch.inference_mode(False), warnings.catch_warnings():
        # ViT cls_token / pos_embed: only the embedding width would touch them, never pruned here.
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)


def _coupling(dg: tp.DependencyGraph, layers: list[Any], by_module: dict[nn.Module, str]
              ) -> tuple[list[list[str]], set[str]]:
    """Clusters of prunable layers sharing output channels; and clusters with foreign writers."""
    parent = {la.name: la.name for la in layers}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    foreign: set[str] = set()
    for la in layers:
        fns = _prune_fns(la.module)
        if fns is None:
            continue
        group = dg.get_pruning_group(la.module, fns[0], idxs=[0])
        for item in group:
            mod, handler = item.dep.target.module, item.dep.handler
            if not _is_out_fn(handler) or mod is la.module:
                continue
            other = by_module.get(mod)
            if other is None:
                foreign.add(la.name)
            else:
                parent[find(other)] = find(la.name)
    clusters: dict[str, list[str]] = {}
    for la in layers:
        clusters.setdefault(find(la.name), []).append(la.name)
    bad = {root for root, names in clusters.items() if any(n in foreign for n in names)}
    return list(clusters.values()), {n for root in bad for n in clusters[root]}


def physical_prune(
    model: nn.Module,
    layer_map: Iterable[Any],
    pruned: Mapping[str, torch.Tensor],
    example_inputs: torch.Tensor,
    *,
    kinds: str | Sequence[str] | None = None,
    coupled: str = "mask",
    scores: Mapping[str, torch.Tensor] | None = None,
    measure_latency: bool = True,
    min_run_time: float = 0.5,
) -> PhysicalResult:
    """Remove the components in `pruned` (layer -> bool mask) from a copy of `model`."""
    if coupled not in ("mask", "group-sum"):
        raise ConfigError(f"coupled must be 'mask' or 'group-sum', got {coupled!r}")
    if coupled == "group-sum" and scores is None:
        raise ConfigError("coupled='group-sum' needs the scores used for ranking")
    orig_layers = prunable_layers(layer_map, kinds)
    names = {la.name for la in orig_layers}
    unknown = set(pruned) - names
    if unknown:
        raise ConfigError(f"cannot prune unknown or non-prunable layers: {sorted(unknown)}")
    macs0, params0 = count(model, example_inputs)
    trainable = any(p.requires_grad for p in model.parameters())
    work = copy.deepcopy(model).eval()
    mods = dict(work.named_modules())
    layers = [_Rebound(la, mods[la.name]) for la in orig_layers]
    by_module = {la.module: la.name for la in layers}
    masks = {la.name: pruned.get(la.name, torch.zeros(la.n_components, dtype=torch.bool)).to("cpu", torch.bool)
             for la in layers}

    dg = _build_graph(work, example_inputs)
    clusters, tainted = _coupling(dg, [la for la in layers if la.kind != "heads"], by_module)
    removed: dict[str, list[int]] = {}
    masked: dict[str, list[int]] = {}
    for names_c in clusters:
        sel = [masks[n] for n in names_c]
        if len(names_c) == 1:
            remove = sel[0].clone()
        elif names_c[0] in tainted:
            remove = torch.zeros_like(sel[0])
        elif coupled == "mask":
            remove = torch.stack(sel).all(0)
        else:
            total = torch.stack([scores[n].detach().float().cpu() for n in names_c]).sum(0)  # type: ignore[index]
            k = round(float(torch.stack(sel).sum(1).float().mean()))
            remove = torch.zeros_like(sel[0])
            remove[torch.argsort(total, stable=True)[:k]] = True
        if bool(remove.all()):  # never remove every channel: keep the first one, masked
            remove[0] = False
        idx = remove.nonzero().flatten().tolist()
        if idx:
            first = by_name(layers, names_c[0])
            group = dg.get_pruning_group(first.module, _prune_fns(first.module)[0], idxs=idx)  # type: ignore[index]
            group.prune()
        for n in names_c:
            removed[n] = idx
            left = masks[n] & ~remove
            masked[n] = left.nonzero().flatten().tolist()
    for la in layers:
        if la.kind == "heads":
            removed[la.name] = []
            masked[la.name] = masks[la.name].nonzero().flatten().tolist()
    # Zero what stays masked, at its index in the slimmer layer.
    with torch.no_grad():
        for la in layers:
            left = masked.get(la.name, [])
            if not left:
                continue
            gone = set(removed.get(la.name, []))
            new_index = {}
            j = 0
            for i in range(la.n_components):
                if i not in gone:
                    new_index[i] = j
                    j += 1
            comps = torch.tensor([new_index[i] for i in left], dtype=torch.long)
            slim = _Rebound(la, la.module, n_components=j)
            for tg in component_targets(work, slim):
                tg.tensor.index_fill_(tg.dim, tg.index_map(comps.to(tg.tensor.device)), 0)
    for p in work.parameters():  # back to the original's flag (LoadedModel: frozen)
        p.requires_grad_(trainable)
    macs1, params1 = count(work, example_inputs)
    res = PhysicalResult(
        model=work, history=dg.pruning_history(), removed=removed, masked=masked, coupled=coupled,
        groups=[c for c in clusters if len(c) > 1], params_before=params0, params_after=params1,
        macs_before=macs0, macs_after=macs1,
    )
    if measure_latency:
        cpu_x = example_inputs.to("cpu")
        on_cpu = next(model.parameters()).device.type == "cpu"
        base = model if on_cpu else copy.deepcopy(model).cpu()
        slim_m = work if on_cpu else copy.deepcopy(work).cpu()
        res.latency["cpu_before_ms"] = latency_ms(base, cpu_x, min_run_time=min_run_time)
        res.latency["cpu_after_ms"] = latency_ms(slim_m, cpu_x, min_run_time=min_run_time)
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            gx = example_inputs.to(dev)
            res.latency["cuda_before_ms"] = latency_ms(copy.deepcopy(model).to(dev), gx, min_run_time=min_run_time)
            res.latency["cuda_after_ms"] = latency_ms(copy.deepcopy(work).to(dev), gx, min_run_time=min_run_time)
    return res


@dataclass
class _Rebound:
    """A layer-map entry pointing at the copy's module (optionally with a new size)."""

    layer: Any
    module: nn.Module
    n_components: int = -1

    def __post_init__(self) -> None:
        if self.n_components < 0:
            self.n_components = int(self.layer.n_components)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def kind(self) -> str:
        return self.layer.kind


def by_name(layers: list[_Rebound], name: str) -> _Rebound:
    return next(la for la in layers if la.name == name)


def load_pruned(model: nn.Module, path: str | Path, example_inputs: torch.Tensor) -> nn.Module:
    """Rebuild a saved pruned model: replay the pruning history on `model` (the original
    architecture, any weights; modified in place) and load the saved state dict."""
    src = Path(path)
    try:
        meta = json.loads((src / "pruning.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {src / 'pruning.json'}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{src / 'pruning.json'}: not a {FORMAT} file")
    trainable = any(p.requires_grad for p in model.parameters())
    dg = _build_graph(model, example_inputs)
    dg.load_pruning_history(meta["history"])
    for p in model.parameters():
        p.requires_grad_(trainable)
    try:
        state = torch.load(src / "model.pt", map_location=next(model.parameters()).device, weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {src / 'model.pt'} into the replayed architecture: {exc}") from exc
    return model.eval()
