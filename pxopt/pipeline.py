"""One model on one task: rule configuration (or criterion) in, pruning curve out.

`Pipeline` composes the packages in the order of ARCHITECTURE.md (model, task, layer
map, relevance, ranking, curve) behind the single call the search needs,
`evaluate(rules, ranking, on_rate) -> Curve`. Relevances are cached by the rule
configuration's digest, so a repeated configuration (or the same rules with the other
ranking) costs no attribution.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pxopt.device import configure_threads, resolve_device
from pxopt.errors import NonFiniteRelevanceError
from pxopt.scores import ComponentScores
from pxopt.vocab import OnRate

if TYPE_CHECKING:
    from pxopt.search.spec import StudySpec



@dataclass
class Pipeline:
    """A loaded model, its task and layer map, and the settings of its pruning curves."""

    model: nn.Module
    task: Any  # pxopt.data.Task
    layer_map: Any  # pxopt.layers.LayerMap
    kinds: tuple[str, ...]
    rates: list[float]
    device: torch.device
    batch_size: int = 128
    family: str = "cnn"
    model_spec: str = ""
    cache_size: int = 32
    cap: float | None = None  # prune at most this fraction of any layer (None: no cap)
    components: str | None = None  # the spec's components, "auto" resolved by the layer map
    last_timings: dict[str, Any] = field(default_factory=dict)
    _cache: OrderedDict[str, ComponentScores] = field(default_factory=OrderedDict, repr=False)
    _val_batches: list | None = field(default=None, repr=False)
    _ref_batches: list | None = field(default=None, repr=False)
    _heldout_batches: list | None = field(default=None, repr=False)

    def _cap(self) -> Any:
        from pxopt.prune import Cap

        return None if self.cap is None else Cap(max_fraction=float(self.cap))

    def reference_batches(self) -> list:
        """The task's reference batches, moved to the device once for all trials."""
        if self._ref_batches is None:
            self._ref_batches = list(self.task.reference_batches(self.batch_size, self.device))
        return self._ref_batches

    def validation_batches(self) -> list:
        """The task's validation batches, moved to the device once for all trials."""
        if self._val_batches is None:
            self._val_batches = list(self.task.validation_batches(self.batch_size, self.device))
        return self._val_batches

    def heldout_batches(self) -> list:
        """The task's held-out batches (`Task.heldout`), on the device, loaded on first use."""
        if self._heldout_batches is None:
            self._heldout_batches = list(self.task.heldout_batches(self.batch_size, self.device))
        return self._heldout_batches

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: StudySpec, *, device: str | None = None, allow_download: bool = False) -> Pipeline:
        """Load the spec's model and task (builtin models train on first use); offline
        unless `allow_download` (missing weights and Fashion-MNIST are then downloaded).

        `spec.components = "auto"` becomes the model's own (`pxopt.search.components`);
        a choice that leaves fewer than two layers to prune is a `ConfigError`.
        """
        from pxopt.data import make_task
        from pxopt.layers import discover_layers
        from pxopt.models import load_model
        from pxopt.search.components import resolve_components
        from pxopt.search.spec import COMPONENTS

        configure_threads(spec.threads)
        dev = resolve_device(device or spec.device)
        loaded = load_model(spec.model, device=str(dev), allow_download=allow_download)
        layer_map = discover_layers(loaded.model, grouping=spec.grouping,
                                    example_input=torch.zeros(1, *loaded.input_size, device=dev))
        components = resolve_components(spec.components, layer_map, loaded.spec)  # before the data loads
        task = make_task(spec.data, classes=spec.classes, n_ref=spec.n_ref, n_val=spec.n_val, seed=spec.task_seed,
                         transform=loaded.transform, num_model_classes=loaded.num_classes,
                         allow_download=allow_download, n_heldout=spec.n_heldout)
        return cls(
            model=loaded.model,
            task=task,
            layer_map=layer_map,
            kinds=COMPONENTS[components],
            rates=list(spec.rates),
            device=dev,
            batch_size=spec.batch_size,
            family=loaded.family,
            model_spec=loaded.spec,
            cap=spec.cap,
            components=components,
        )

    def with_other_images(self, seed: int) -> Pipeline:
        """The same model and task with another reference set and, where the dataset has enough
        unused images, another validation set (drawn with `seed`, none of the task's images;
        `pxopt.data.other_reference`): where a trial's area is checked before it is named best
        (`pxopt.search.naming`). Shares the model and the held-out images and their batches."""
        from pxopt.data import other_reference

        task = other_reference(self.task, seed, validation=True)
        shared = None if task.info.get("validation_redrawn") else self.validation_batches()
        return dataclasses.replace(self, task=task, last_timings={}, _cache=OrderedDict(), _ref_batches=None,
                                   _val_batches=shared, _heldout_batches=self._heldout_batches)

    # -- scores ---------------------------------------------------------------------------
    def scores(self, rules: Mapping[str, Any] | Any) -> ComponentScores:
        """Mean component relevance on the reference set under `rules` (cached by digest)."""
        from pxopt.lrp import RuleConfig, component_relevance

        config = RuleConfig.coerce(rules)
        key = config.digest()
        start = time.perf_counter()
        if key in self._cache:
            self._cache.move_to_end(key)
            self.last_timings = {"attribution_s": 0.0, "cached": True}
            return self._cache[key]
        scores = component_relevance(
            self.model,
            self.reference_batches(),
            config,
            kinds=self.kinds,
            layer_map=self.layer_map,
        )
        if not scores.is_finite():
            raise NonFiniteRelevanceError(
                "relevances are NaN or infinite under these rules (epsilon too small?)"
            )
        self._cache[key] = scores
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        self.last_timings = {"attribution_s": time.perf_counter() - start, "cached": False}
        return scores

    def check_explainable(self) -> None:
        """Raise `UnsupportedLayerError` if LRP cannot explain the model (one reference image)."""
        from pxopt.lrp import check_explainable

        images, _ = self.reference_batches()[0]
        check_explainable(self.model, images, self.layer_map)

    def criterion_scores(self, name: str, **kwargs: Any) -> ComponentScores:
        """Scores of a baseline criterion (`pxopt.criteria`) on the same reference set."""
        from pxopt.criteria import compute_scores

        return compute_scores(
            name,
            self.model,
            self.reference_batches(),
            self.layer_map,
            **kwargs,
        )

    # -- curves ---------------------------------------------------------------------------
    def curve(
        self,
        scores: ComponentScores,
        ranking: str | None = None,
        on_rate: OnRate | None = None,
        *,
        rates: list[float] | None = None,
        heldout: bool = False,
    ) -> Any:
        """Accuracy-vs-rate curve of the task when pruning by `scores` aggregated as `ranking`
        (`pxopt.scores.RANKINGS`; None: the scores' default, the reference's aggregation),
        on the validation set or, with `heldout`, on the held-out set no search sees."""
        from pxopt.evaluate import accuracy_curve

        start = time.perf_counter()
        try:
            return accuracy_curve(
                self.model,
                self.task,
                self.layer_map,
                scores,
                kinds=self.kinds,
                ranking=ranking,
                rates=list(rates or self.rates),
                device=self.device,
                on_rate=on_rate,
                cap=self._cap(),
                batch_size=self.batch_size,
                batches=self.heldout_batches() if heldout else self.validation_batches(),
            )
        finally:
            self.last_timings["curve_s"] = time.perf_counter() - start

    def evaluate(self, rules: Mapping[str, Any] | Any, ranking: str | None = None,
                 on_rate: OnRate | None = None) -> Any:
        """Rules -> relevance -> curve: the only call the search objective makes.

        The cache holds every aggregation (`ComponentScores`), so the same rules under
        another ranking reuse the relevance: the key is the rules' digest alone."""
        scores = self.scores(rules)
        timings = dict(self.last_timings)
        curve = self.curve(scores, ranking, on_rate)
        timings["curve_s"] = self.last_timings.get("curve_s", 0.0)
        self.last_timings = timings
        return curve

    def timings(self) -> dict[str, Any]:
        """Phase timings of the last `evaluate` (attribution, curve, cache hit)."""
        return dict(self.last_timings)

    def prune_set(self, scores: ComponentScores, ranking: str | None, rate: float) -> dict[str, torch.Tensor]:
        """Components pruned at `rate` (layer -> bool mask), as the curve prunes them."""
        from pxopt.prune import global_order

        order = global_order(scores.select(ranking), self.layer_map, self.kinds, cap=self._cap())
        return order.pruned_at(rate)

    def accuracy(self, model: nn.Module | None = None) -> float:
        """Task accuracy of `model` (default: the pipeline's) on the validation set."""
        from pxopt.data import restricted_correct

        model = model or self.model
        correct = total = 0
        with torch.inference_mode():
            for images, labels in self.validation_batches():
                correct += int(restricted_correct(model(images), labels, self.task.classes))
                total += int(labels.numel())
        return correct / max(total, 1)

    @contextmanager
    def pruned(self, scores: ComponentScores, ranking: str | None, rate: float) -> Iterator[dict[str, torch.Tensor]]:
        """Mask the model in place at `rate` (undone on exit); yields the pruned components."""
        from pxopt.prune import Masker

        pruned = self.prune_set(scores, ranking, rate)
        with Masker(self.model, self.layer_map, self.kinds) as masker:
            masker.set_pruned(pruned)
            yield pruned

    # -- facts used by reports ----------------------------------------------------------
    def count_macs(self) -> tuple[float, dict[str, float]]:
        """MACs of one image's forward pass: total, and per component of each prunable layer."""
        prunable = {layer.module: layer for layer in self.layer_map.prunable(self.kinds)}
        total = [0.0]
        per_component: dict[str, float] = {}

        def record(module: nn.Module, _inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(module, nn.Conv2d):
                macs = out[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
            elif isinstance(module, nn.Linear):
                macs = out[0].numel() * module.in_features
            else:
                return
            total[0] += float(macs)
            if module in prunable:
                layer = prunable[module]
                per_component[layer.name] = float(macs) / max(int(layer.n_components), 1)

        hooks = [m.register_forward_hook(record) for m in self.model.modules()
                 if isinstance(m, nn.Conv2d | nn.Linear)]
        try:
            images, _ = next(iter(self.task.reference_batches(1, self.device)))
            with torch.inference_mode():
                self.model(images)
        finally:
            for h in hooks:
                h.remove()
        return total[0], per_component

    def study_attrs(self) -> dict[str, Any]:
        """Facts stored with the study: weights fingerprint (checked on resume), task, MACs, sizes."""
        from pxopt.models.checkpoint import weights_fingerprint
        from pxopt.search.storage import ATTR_WEIGHTS

        total, per_component = self.count_macs()
        return {
            ATTR_WEIGHTS: weights_fingerprint(self.model),
            "pxopt.task_description": self.task.describe(),
            "pxopt.total_macs": total,
            "pxopt.layer_macs": per_component,
            "pxopt.layer_sizes": {
                layer.name: int(layer.n_components) for layer in self.layer_map.prunable(self.kinds)
            },
            # which layers each rule group holds, and how they were grouped
            "pxopt.grouping": self.layer_map.describe_grouping(),
            "pxopt.layer_groups": self.layer_map.groups(),
        }
