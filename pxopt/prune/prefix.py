"""Reuse the unpruned model's activations up to the first pruned block of a curve.

With a global ranking, the least relevant components usually sit in a few (often late) layers,
so at low and middle rates the first blocks of the network are still unpruned and compute
exactly what they computed at rate 0. The model is traced once at block granularity
(containers such as `nn.Sequential` are expanded, every other submodule is one opaque call, so
masks, slicing and forward hooks inside blocks keep working) and split into segments at
"cuts": points where a single tensor carries everything the rest of the network needs. The
unpruned pass stores the tensors at the cuts (within a memory budget); a pruned rate starts
from the latest stored cut before its first pruned block.

Exactness is checked, not assumed: the chained segments must reproduce `model(x)` bit for bit
on the first validation items, otherwise the cache is switched off and every rate runs the
full model.
"""

from __future__ import annotations

import bisect
import inspect
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def default_budget(device: torch.device) -> int:
    """A quarter of the memory free on `device` now: large enough to hold ImageNet-size cuts on
    a big GPU, small enough to leave the pruned passes their room (1 GiB if unknown)."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free) // 4
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, ValueError, OSError, RuntimeError):
        return 1 << 30


class _BlockTracer(torch.fx.Tracer):
    """Traces the root and containers; every other submodule is a single call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, _CONTAINERS)


def defaults_after_input(model: nn.Module) -> dict[str, Any]:
    """Optional forward arguments (timm: `attn_mask=None`, ...) fixed at their defaults: the
    curve always calls `model(x)`."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def _drop_specialised_inputs(graph: torch.fx.Graph) -> bool:
    """Remove the placeholders of defaulted arguments and the checks fx adds for them; False
    if anything but such checks reads them (a true second input)."""
    extra = [n for n in graph.nodes if n.op == "placeholder"][1:]
    dead: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    stack = list(extra)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        dead.append(n)
        stack.extend(n.users)
    if any(u.op == "output" or any(a not in seen and a.op != "get_attr" for a in u.all_input_nodes)
           for u in dead if u.op != "placeholder"):
        return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(dead, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    return True


def _storages(tensors: Sequence[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _cut_indices(nodes: list[torch.fx.Node]) -> list[int]:
    """Indices of nodes after which exactly that node's value is still needed.

    `get_attr` values (parameters read at the root) are never live: a segment re-reads them.
    """
    last_use: dict[torch.fx.Node, int] = {}
    index = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        for user in n.users:
            last_use[n] = max(last_use.get(n, -1), index[user])
    cuts = []
    live: set[torch.fx.Node] = set()
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        if n.op != "get_attr" and last_use.get(n, -1) > i:
            live.add(n)
        live = {v for v in live if last_use[v] > i}
        feeds_output_only = all(u.op == "output" for u in n.users)
        if n.op in ("call_module", "call_function", "call_method") and live == {n} and not feeds_output_only:
            cuts.append(i)
    return cuts


def _segment(root: torch.fx.GraphModule, nodes: list[torch.fx.Node], start: int | None,
             stop: int | None) -> torch.fx.GraphModule:
    """Graph of nodes (start, stop]: input = value of node `start` (or the model input),
    output = value of node `stop` (or the model output)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    if start is None:
        begin = 0
    else:
        env[nodes[start]] = graph.placeholder("activation")
        begin = start + 1
    end = len(nodes) - 1 if stop is None else stop
    for n in nodes[:begin]:  # parameters read at the root are re-read, not carried
        if n.op == "get_attr":
            env[n] = graph.node_copy(n, lambda m: env[m])
    for n in nodes[begin:end + 1]:
        env[n] = graph.node_copy(n, lambda m: env[m])
    if stop is not None:
        graph.output(env[nodes[stop]])
    return torch.fx.GraphModule(root, graph)


class PrefixCache:
    """Segments of a model at its cuts, the unpruned activations there, and the resumed runs.

    Use: `record(i, x)` gives the unpruned output of batch i and stores its cut tensors; then
    `run(i, x, start)` gives the output of the (masked / sliced) model, resuming at cut `start`
    (from `plan`) when one is stored. `enabled` is False where the model cannot be traced at
    block level or the split does not reproduce it exactly.
    """

    def __init__(self, model: nn.Module, budget_bytes: int):
        self.model = model
        self.budget_bytes = budget_bytes
        self.enabled = False
        self.reason = ""
        self._stored: dict[int, list[torch.Tensor]] = {}  # cut position -> per-batch tensors
        self._keep: list[int] = []  # positions (indices into self._cuts) to store
        try:
            graph = _BlockTracer().trace(model, concrete_args=defaults_after_input(model))
            self._gm = torch.fx.GraphModule(model, graph)
        except Exception as exc:  # noqa: BLE001 - any tracing failure only disables the cache
            self.reason = f"not traceable at block level ({type(exc).__name__})"
            return
        if not _drop_specialised_inputs(self._gm.graph):
            self.reason = "the model takes more than one input"
            return
        self._gm.recompile()
        self._nodes = list(self._gm.graph.nodes)
        self._cuts = _cut_indices(self._nodes)
        if not self._cuts:
            self.reason = "no single-tensor cut between blocks"
            return
        # Segment j computes cut j from cut j-1 (j = 0: from the input); the last one the output.
        bounds = [None, *self._cuts, None]
        self._segments = [_segment(self._gm, self._nodes, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        self._node_storages = [self._storages_of(n) for n in self._nodes]
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()
               if m is model or isinstance(m, _CONTAINERS)):
            self.reason = "forward hooks on the model or a container"  # the segments skip them
            return
        self.enabled = True

    def _storages_of(self, node: torch.fx.Node) -> set[int]:
        if node.op == "call_module":
            mod = self._gm.get_submodule(str(node.target))
            return _storages([*mod.parameters(), *mod.buffers()])
        if node.op == "get_attr":
            obj = operator.attrgetter(str(node.target))(self._gm)
            return _storages([obj]) if isinstance(obj, torch.Tensor) else set()
        return set()

    # -- planning ----------------------------------------------------------------------

    def first_touched(self, tensors: Sequence[torch.Tensor]) -> int:
        """Index of the first traced node that reads any of `tensors` (0 if none is found,
        which makes every resume impossible: the safe answer)."""
        wanted = _storages(tensors)
        for i, s in enumerate(self._node_storages):
            if s & wanted:
                return i
        return 0

    def latest_cut_before(self, node_index: int) -> int | None:
        """Position (into the cut list) of the latest cut strictly before `node_index`."""
        pos = bisect.bisect_left(self._cuts, node_index) - 1
        return pos if pos >= 0 else None

    def plan(self, starts: Sequence[int | None], batch_bytes: Callable[[int], float]) -> None:
        """Choose the cuts to store: the deepest first (they save the most compute) while the
        stored tensors fit the budget. `batch_bytes(pos)` = bytes of cut `pos` for all batches."""
        wanted = sorted({s for s in starts if s is not None}, reverse=True)
        total = 0
        self._keep = []
        for pos in wanted:
            size = batch_bytes(pos)
            if total + size <= self.budget_bytes:
                self._keep.append(pos)
                total += size

    def resume_point(self, start: int | None) -> int | None:
        """The stored cut to resume from for a rate whose latest usable cut is `start`."""
        if start is None:
            return None
        usable = [p for p in self._keep if p <= start]
        return max(usable) if usable else None

    # -- running -----------------------------------------------------------------------

    def verify(self, x: torch.Tensor, n: int = 4) -> list[float] | None:
        """Run the chained segments on the first `n` items of `x`: they must equal `model`'s
        output exactly, otherwise the cache switches off (None). Returns the bytes per item of
        each cut tensor (inf for a cut that is not one tensor)."""
        x = x[:n]
        sizes: list[float] = []
        try:
            h = x
            for seg in self._segments:
                h = seg(h)
                if len(sizes) < len(self._segments) - 1:
                    one = isinstance(h, torch.Tensor)
                    sizes.append(h.numel() * h.element_size() / x.shape[0] if one else float("inf"))
            ok = isinstance(h, torch.Tensor) and torch.equal(h, self.model(x))
        except Exception as exc:  # noqa: BLE001 - a failed split only disables the cache
            self.reason = f"segments fail to run ({type(exc).__name__}: {exc})"
            self.enabled = False
            return None
        if not ok:
            self.reason = "segments do not reproduce the model's output exactly"
            self.enabled = False
            return None
        return sizes

    def record(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        """Unpruned output of batch `batch`, storing the kept cuts' tensors on the way."""
        h = x
        for j, seg in enumerate(self._segments):
            h = seg(h)
            if j in self._keep:
                self._stored.setdefault(j, []).append(h)
        return h

    def run(self, batch: int, x: torch.Tensor, start: int | None) -> torch.Tensor:
        """Output for batch `batch`, from stored cut `start` when given, else from `x`."""
        if start is None or start not in self._stored:
            return self.model(x)
        h = self._stored[start][batch]
        for seg in self._segments[start + 1:]:
            h = seg(h)
        return h

    def clear(self) -> None:
        self._stored.clear()

