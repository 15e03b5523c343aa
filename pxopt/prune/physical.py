"""Physical removal of pruned components with Torch-Pruning's dependency graph.

`physical_prune` takes the prune set of one rate (e.g. `PruneOrder.pruned_at(0.5)`) and
returns a smaller copy of the model, its params / MACs / latency before and after, and
the Torch-Pruning history needed to rebuild the architecture (`save` / `load_pruned`).
`export_program` writes the pruned model as a `torch.export` program (`.pt2`), which
loads with `torch.export.load(path).module()` and needs neither pxopt nor the history.

Coupled channels: where several prunable layers write the same channels (residual adds in
a ResNet stage, ...), Torch-Pruning can only remove a channel from all of them at once.
- coupled="mask" (default): remove the channels pruned in every coupled layer (exact:
  those channels are zero everywhere), leave the rest of each layer's pruned channels
  masked (zeroed) in the copy. Outputs equal the masked model's up to float rounding.
- coupled="group-sum": rank the coupled channels by the summed scores of the group's
  layers and remove as many as the group's layers prune on average (the structure gets
  smaller, but the selection differs from the masked model's).
Attention heads are left masked (zeroed value rows), not removed: removing heads changes
`num_heads` in ways Torch-Pruning's replayable history does not record (`Family.removable`
says which layers Torch-Pruning may shrink; `Family.physical_options` what its dependency
graph must be told).
Where a layer would lose every channel, one (zeroed) channel is kept.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from pxopt.errors import CheckpointError, ConfigError, UnsupportedLayerError
from pxopt.families import family_of
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
    # medians "cpu_before_ms", "cpu_after_ms" (and "cuda_*" with a GPU), plus "cpu" /
    # "cuda": {"before": Latency.to_dict(), "after": ...} with the spread (pxopt.latency)
    latency: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return dict(
            coupled=self.coupled, groups=self.groups,
            removed={k: len(v) for k, v in self.removed.items()},
            masked={k: len(v) for k, v in self.masked.items()},
            params_before=self.params_before, params_after=self.params_after,
            macs_before=self.macs_before, macs_after=self.macs_after, latency=dict(self.latency),
        )

    def pruning_record(self) -> dict[str, Any]:
        """What `load_pruned` needs besides the weights: the Torch-Pruning history."""
        return {"format": FORMAT, "history": self.history, "removed": self.removed, "masked": self.masked}

    def save(self, path: str | Path) -> Path:
        """Write `<path>/model.pt` (state dict) and `<path>/pruning.json` (history + summary)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), out / "model.pt")
        meta = {**self.pruning_record(), "summary": self.summary()}
        (out / "pruning.json").write_text(json.dumps(meta, indent=1))
        return out

    def save_state(self, path: str | Path, record: Mapping[str, Any] | None = None) -> Path:
        """One file for fine-tuning: {"state_dict", "pruning" (history), "pxopt" (record)},
        CPU tensors and plain containers only (loads with `weights_only=True`);
        `load_pruned(original_model, path, example_inputs)` rebuilds the module from it."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save({"state_dict": state, "pruning": self.pruning_record(), "pxopt": dict(record or {})}, out)
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


def compare_models(before: nn.Module, after: nn.Module, example_inputs: torch.Tensor, *,
                   threads: int | None = None, repeats: int = 15) -> dict[str, Any]:
    """CPU (and, with a GPU, CUDA) latency of two models, timed interleaved (pxopt.latency).

    Returns the medians as "cpu_before_ms", "cpu_after_ms" (...) and the full statistics
    (quartiles, min, max, runs, threads) under "cpu" / "cuda"."""
    from pxopt.latency import compare_latency

    out: dict[str, Any] = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        pair = {"before": before, "after": after}
        moved = {k: m if _device_of(m).type == dev else copy.deepcopy(m).to(dev) for k, m in pair.items()}
        stats = compare_latency(moved, example_inputs.to(dev), threads=threads, repeats=repeats)
        out[f"{dev}_before_ms"] = stats["before"].median_ms
        out[f"{dev}_after_ms"] = stats["after"].median_ms
        out[dev] = {k: v.to_dict() for k, v in stats.items()}
    return out


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning traces the autograd graph, so parameters must require grad while it does.
    The model's family may add options (`Family.physical_options`: unwrapped parameters,
    customised pruners); a model no family knows gets none."""
    try:
        options = family_of(model).physical_options(model)
    except UnsupportedLayerError:
        options = {}
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad(), torch.inference_mode(False), warnings.catch_warnings():
        # ViT cls_token / pos_embed: only the embedding width would touch them, never pruned here.
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, **options)


def _coupling(dg: tp.DependencyGraph, layers: list[Any], by_module: dict[nn.Module, str],
              tied: Mapping[nn.Module, str] | None = None) -> tuple[list[list[str]], set[str]]:
    """Clusters of prunable layers sharing output channels; and clusters with foreign writers
    (modules in `tied` are followers of the layer, never foreign writers)."""
    tied = tied or {}
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
            if not _is_out_fn(handler) or mod is la.module or mod in tied:
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
    threads: int | None = None,
    repeats: int = 15,
) -> PhysicalResult:
    """Remove the components in `pruned` (layer -> bool mask) from a copy of `model`.

    With `measure_latency`, the original and the copy are timed interleaved on
    `example_inputs` (`threads` CPU threads, default env PXOPT_THREADS else 1; `repeats`
    samples each; see `compare_models`)."""
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
    family = family_of(model)
    kept_masked = {la.name for la in layers if not family.removable(la.layer)}  # e.g. heads
    # modules tied to a component (a depthwise conv after a MobileNet expansion): followers
    tied = {mods[n]: n for n in getattr(layer_map, "tied", ()) if n in mods}
    clusters, tainted = _coupling(dg, [la for la in layers if la.name not in kept_masked], by_module,
                                  tied)
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
        if la.name in kept_masked:
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
        res.latency = compare_models(model, work, example_inputs, threads=threads, repeats=repeats)
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

    @property
    def family(self) -> Any:
        return getattr(self.layer, "family", None)


def by_name(layers: list[_Rebound], name: str) -> _Rebound:
    return next(la for la in layers if la.name == name)


class ExportFailed(RuntimeError):
    """`torch.export` could not capture the model (the message is one line)."""


def export_program(model: nn.Module, example_inputs: torch.Tensor, path: str | Path) -> dict[str, Any]:
    """Save `model` as a `torch.export` program on the CPU (any batch size where it traces).

    The file loads without pxopt: `torch.export.load(path).module()`. The program is
    checked against `model` on `example_inputs` before it is written; returns
    {"file", "dynamic_batch", "max_abs_diff"}. Raises ExportFailed with one line."""
    out = Path(path)
    cpu_model = copy.deepcopy(model).cpu().eval()
    x = example_inputs[:2].detach().cpu().clone()  # a clone: the program stores its example's whole storage
    if x.shape[0] < 2:  # a batch of one would pin the batch size to 1
        x = torch.cat([x, x])
    ep, dynamic, first_error = None, True, ""
    for dyn in ({0: torch.export.Dim.DYNAMIC},), None:
        try:
            ep = torch.export.export(cpu_model, (x,), dynamic_shapes=dyn)
            dynamic = dyn is not None
            break
        except Exception as exc:  # torch.export raises many types (UserError, Unsupported, ...)
            first_error = first_error or (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if ep is None:
        raise ExportFailed(f"torch.export cannot capture this model: {first_error}")
    with torch.no_grad():
        got, want = ep.module()(x), cpu_model(x)
    diff = float((got - want).abs().max()) if got.shape == want.shape else math.inf
    if not diff <= 1e-4 * max(1.0, float(want.abs().max())):
        raise ExportFailed(f"the exported program's outputs differ from the model's (max |diff| {diff:.3g})")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(out))
    return {"file": str(out), "dynamic_batch": dynamic, "max_abs_diff": diff}


def load_pruned(model: nn.Module, path: str | Path, example_inputs: torch.Tensor) -> nn.Module:
    """Rebuild a saved pruned model: replay the pruning history on `model` (the original
    architecture, any weights; modified in place) and load the saved state dict.

    `path`: the `.pt` file of `pxopt prune --physical` (state dict and history in one file,
    `PhysicalResult.save_state`) or a folder written by `PhysicalResult.save`."""
    src = Path(path)
    if src.is_dir():
        meta_file, weights = src / "pruning.json", src / "model.pt"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {meta_file}: {exc}") from exc
        state = None
    else:
        meta_file = weights = src
        try:
            saved = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as exc:  # OSError, UnpicklingError, RuntimeError ...
            raise CheckpointError(f"cannot read {src}: {(str(exc).strip().splitlines() or [''])[0][:200]}") from exc
        if not (isinstance(saved, dict) and isinstance(saved.get("pruning"), dict) and "state_dict" in saved):
            raise CheckpointError(f"{src}: not a file written by `pxopt prune --physical` (no pruning history)")
        meta, state = saved["pruning"], saved["state_dict"]
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: not a {FORMAT} file")
    trainable = any(p.requires_grad for p in model.parameters())
    dg = _build_graph(model, example_inputs)
    dg.load_pruning_history(meta["history"])
    for p in model.parameters():
        p.requires_grad_(trainable)
    try:
        if state is None:
            state = torch.load(weights, map_location=_device_of(model), weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {weights} into the replayed architecture: {exc}") from exc
    return model.eval()
