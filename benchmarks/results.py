"""Reproduce the paper's comparison (optimised LRP vs the usual criteria) on the offline models.

For each built-in Fashion-MNIST model (ResNet, VGG, ViT; for the ViT both MLP neurons and
attention heads) and each task (all 10 classes; 3 classes):

1. search the LRP rule configuration (`pxopt.search.run_search`; the paper protocol: 100 trials,
   stopped early only after `--patience` 50 trials without improvement) on a *search*
   validation split, with the reference set of seed 0;
2. evaluate the best configuration and every baseline criterion (`pxopt.criteria`) on
   `--seeds` reference sets (seeds 1..S, none of them the search's) and on *held-out*
   validation images, disjoint from the search split (same test-set draw, split per class);
3. report mean and standard error over the seeds of the area (mean accuracy over the
   rate grid, `Curve.area`, `pxopt.evaluate.AREA_DEFINITION`) and of Top-PR, per criterion,
   and optimised - lrp-epsilon paired over the seeds (mean, 95 % t-interval, t-test, Wilcoxon).

`--models` takes the short names resnet, vgg, vit or any built-in model name (`fmnist-resnet50`
once it exists); the components follow the model's family (cnn: conv; vit: mlp and heads).

    python benchmarks/results.py                       # paper protocol (hours on 2 CPU cores)
    python benchmarks/results.py --quick --models resnet --seeds 2
    python benchmarks/results.py --render-only         # table + figure from the saved JSON

Results are written after every seed (`benchmarks/results/paper_comparison.{json,md}`), so
an interrupted run leaves what it finished (marked `"complete": false`); the searches live
in SQLite files under `--work-dir` and resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer

from pxopt.cli.search_cmd import parse_rates
from pxopt.criteria import CRITERIA as LIBRARY_CRITERIA
from pxopt.criteria import LAYER_MEAN_NORMALISED
from pxopt.data import TensorSet, make_task
from pxopt.data.heldout import split_per_class as split_per_class
from pxopt.device import configure_threads, resolve_device
from pxopt.errors import ConfigError
from pxopt.evaluate import check_rates, curve_area

DATASET = "fashion-mnist"
OUT_DIR = Path(__file__).resolve().parent / "results"
STEM = "paper_comparison"
RESULTS_FORMAT = "pxopt.results/1"

# Built-in models by short name; any other name of `pxopt.models.builtin.BUILTINS` (e.g. the
# paper-scale `fmnist-resnet50`) is accepted as it is. The components evaluated follow the
# loaded model's family, so a new built-in needs no entry here.
MODEL_ALIASES: dict[str, str] = {"resnet": "fmnist-resnet", "vgg": "fmnist-vgg", "vit": "fmnist-vit"}
COMPONENTS_BY_FAMILY: dict[str, tuple[str, ...]] = {"cnn": ("conv",), "vit": ("mlp", "heads")}
# The paired comparison of the table: optimised LRP against this baseline, over reference seeds.
PAIRED_AGAINST = "lrp-epsilon"


def builtin_names() -> tuple[str, ...]:
    """Names of the built-in models known to this pxopt (the registry is the one list)."""
    from pxopt.models.builtin import BUILTINS

    return tuple(BUILTINS)


def model_spec(key: str) -> str:
    """`builtin:<name>` for a short key (resnet, vgg, vit) or any built-in name."""
    name = key.removeprefix("builtin:")
    return f"builtin:{MODEL_ALIASES.get(name, name)}"


# Order of the table and legend: optimised LRP, then the library's criteria (pxopt.criteria
# .CRITERIA, the one list of names) from LRP down to random, each normalised form beside its raw one.
CRITERIA: tuple[str, ...] = ("optimised", *reversed(LIBRARY_CRITERIA))
# Baseline criteria are ranked by their own default aggregation (`ComponentScores.select()`,
# as `pxopt baselines` does): |score| (the smallest go first, as in the paper), and for the
# LRP criteria on ViTs the reference's sum over tokens of |R| ("token-abs").
BASELINE_RANKING = None


@dataclass
class Settings:
    """Budget of one run; `quick()` is the reduced form used by the slow test."""

    models: tuple[str, ...] = ("resnet", "vgg", "vit")
    tasks: tuple[int, ...] = (10, 3)
    trials: int = 100  # the paper protocol: >= 100 trials ...
    patience: int = 50  # ... stopping early only after this many without improvement (0: never)
    seeds: int = 5
    n_ref: int = 10  # reference images per class (LRP and every criterion)
    val_search: int = 200  # validation images per task the search sees (split evenly over classes)
    val_eval: int = 300  # held-out validation images per task for the reported numbers
    rates: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(20)])
    batch_size: int = 250
    ig_steps: int = 16
    threads: int = 1
    device: str = "auto"
    criteria: tuple[str, ...] = CRITERIA
    components: tuple[str, ...] = ()  # a subset of the family's kinds (empty: all of them)
    out_dir: Path = OUT_DIR
    work_dir: Path = Path(os.environ.get("PXOPT_RESULTS_WORK", Path.home() / ".cache" / "pxopt" / "results"))

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        """A few minutes: fewer trials, two seeds, fewer images, a coarser rate grid."""
        base = dict(trials=4, patience=0, seeds=2, n_ref=4, val_search=30, val_eval=45,
                    rates=[round(0.1 * i, 1) for i in range(10)], ig_steps=4)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base).validated()

    def validated(self) -> Settings:
        known = builtin_names()
        unknown = sorted(m for m in self.models if model_spec(m).removeprefix("builtin:") not in known)
        if unknown:
            raise ConfigError(f"unknown model {unknown[0]!r}; choose from {', '.join([*MODEL_ALIASES, *known])}")
        if int(self.patience) < 0:
            raise ConfigError(f"--patience must be >= 0 (0: no early stop), got {self.patience}")
        bad = sorted(set(self.criteria) - set(CRITERIA))
        if bad:
            raise ConfigError(f"unknown criterion {bad[0]!r}; choose from {', '.join(CRITERIA)}")
        for name in ("trials", "seeds", "n_ref", "val_search", "val_eval", "batch_size", "threads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if any(k < 2 or k > 10 for k in self.tasks):
            raise ConfigError(f"tasks are class counts between 2 and 10, got {list(self.tasks)}")
        known_kinds = sorted({k for kinds in COMPONENTS_BY_FAMILY.values() for k in kinds})
        odd = sorted(set(self.components) - set(known_kinds))
        if odd:
            raise ConfigError(f"unknown component kind {odd[0]!r}; choose from {', '.join(known_kinds)}")
        self.rates = check_rates(self.rates)
        if len(self.rates) < 2:
            raise ConfigError(f"rates need at least 2 points to span an area, got {self.rates}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"], d["work_dir"] = str(self.out_dir), str(self.work_dir)
        return d


# -- data: one test-set draw split into a search part and a held-out part ----------------------
# (the split is the library's, `make_task(n_heldout=...)`, the same one `pxopt search` keeps;
# `split_per_class` is re-exported for the other benchmarks)


@dataclass
class Setting:
    """One model, one component kind, one task: the search task and the held-out set."""

    model_key: str
    kind: str
    n_classes: int
    loaded: Any  # pxopt.models.LoadedModel
    layer_map: Any
    classes: list[int]
    search_task: Any  # pxopt.data.Task (reference seed 0, search validation split)
    held_out: TensorSet

    @property
    def key(self) -> str:
        return f"{self.model_key}-{self.kind}-{self.n_classes}cls"


def build_setting(model_key: str, kind: str, n_classes: int, loaded: Any, s: Settings) -> Setting:
    """Draw the task once (seed 0) with its held-out split (`make_task(n_heldout=...)`)."""
    from pxopt.layers import discover_layers

    n_search, n_eval = per_class(s.val_search, n_classes), per_class(s.val_eval, n_classes)
    first = make_task(DATASET, classes=n_classes, n_ref=s.n_ref, n_val=n_search, n_heldout=n_eval * n_classes,
                      seed=0, transform=loaded.transform, num_model_classes=loaded.num_classes)
    if first.heldout is None or first.info["heldout_per_class"] < n_eval:
        raise ConfigError(f"{DATASET} has fewer than {n_search} + {n_eval} validation images per class")
    info = dict(first.info, validation_split=f"search: first {n_search}/class of the seed-0 draw")
    search_task = dataclasses.replace(first, info=info, heldout=None)
    return Setting(model_key, kind, n_classes, loaded, discover_layers(loaded.model), list(first.classes),
                   search_task, first.heldout)


def eval_task(setting: Setting, seed: int, s: Settings) -> Any:
    """Reference set of `seed` (train split) with the held-out validation images."""
    t = make_task(DATASET, classes=setting.classes, n_ref=s.n_ref, n_val=1, seed=seed,
                  transform=setting.loaded.transform, num_model_classes=setting.loaded.num_classes)
    n_search = per_class(s.val_search, setting.n_classes)
    info = dict(t.info, validation_split=f"held out: images {n_search + 1}.. per class of the "
                                         "seed-0 draw, never seen by the search")
    return dataclasses.replace(t, validation=setting.held_out, n_val=per_class(s.val_eval, setting.n_classes),
                               info=info)


def unused_validation(setting: Setting, s: Settings, n_per_class: int, n_sets: int, *,
                      from_end: bool = False) -> list[Any]:
    """`n_sets` disjoint sets of `n_per_class` images per class among the test images neither the
    search nor the held-out evaluation uses (the seed-0 order after both), taken from the front
    of that tail or from its end, so two checks can take disjoint images. One draw for all sets."""
    from pxopt.data import TensorSet
    from pxopt.data.heldout import split_indices_per_class

    used = per_class(s.val_search, setting.n_classes) + per_class(s.val_eval, setting.n_classes)
    every = make_task(DATASET, classes=setting.classes, n_ref=s.n_ref, n_val=None, seed=0,
                      transform=setting.loaded.transform, num_model_classes=setting.loaded.num_classes)
    _, rest = split_indices_per_class(every.validation.labels, used)
    labels = every.validation.labels[rest]
    per_class_rest = {c: rest[labels == c].flip(0) if from_end else rest[labels == c] for c in setting.classes}
    if any(len(mine) < n_sets * n_per_class for mine in per_class_rest.values()):
        raise ConfigError(f"{DATASET} has too few unused validation images for {n_sets} sets of {n_per_class} per class")
    sets = []
    for i in range(n_sets):
        pos = torch.cat([mine[i * n_per_class:(i + 1) * n_per_class] for mine in per_class_rest.values()])
        sets.append(TensorSet(every.validation.images[pos].contiguous(), every.validation.labels[pos]))
    return sets


def per_class(total: int, n_classes: int) -> int:
    """Images per class for a per-task total (at least one)."""
    return max(1, total // n_classes)


def pipeline_for(setting: Setting, task: Any, s: Settings) -> Any:
    from pxopt.pipeline import Pipeline

    return Pipeline(model=setting.loaded.model, task=task, layer_map=setting.layer_map,
                    kinds=(setting.kind,), rates=list(s.rates), device=resolve_device(s.device),
                    batch_size=s.batch_size, family=setting.loaded.family, model_spec=setting.loaded.spec)


# -- search ---------------------------------------------------------------------------------
def search(setting: Setting, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Run (or resume) the fixed-budget search on the search split; return the best trial."""
    import optuna

    from pxopt.search import StudySpec, run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s.work_dir.mkdir(parents=True, exist_ok=True)
    name = f"results-{setting.key}"
    spec = StudySpec(
        name=name, model=setting.loaded.spec, data=DATASET, classes=setting.classes, n_ref=s.n_ref,
        n_val=per_class(s.val_search, setting.n_classes), task_seed=0, batch_size=s.batch_size, components=setting.kind,
        rates=list(s.rates), trials=s.trials, seed=0, baselines=True,
        sampler={"name": "tpe", "n_startup_trials": max(2, min(6, s.trials // 3))},
        pruner={"name": "median", "n_startup_trials": 4, "n_warmup_steps": max(1, len(s.rates) // 5)},
    ).validated()
    # Studies of another budget or image count are different studies: keep them apart
    # ("-meanacc": the area as the mean accuracy; studies of the older trapezoid objective
    # cannot be resumed).
    # ("-stage": the stage grouping; studies of the former count split are kept apart too).
    url = f"sqlite:///{(s.work_dir / f'{name}-r{len(s.rates)}-ref{s.n_ref}-meanacc-{spec.grouping}.db').resolve()}"
    pipe = pipeline_for(setting, setting.search_task, s)
    start = time.perf_counter()

    def progress(study: Any, trial: Any) -> None:
        area = trial.user_attrs.get("area")
        best = _best_value(study)
        log(f"  [{setting.key}] trial {trial.number:>3} {trial.state.name.lower():<8} "
            f"area {'-' if area is None else f'{area:.4f}'}  best {best}  "
            f"({time.perf_counter() - start:.0f} s)")

    patience = StopAfterNoImprovement(s.patience) if s.patience else None
    callbacks = [progress] if patience is None else [progress, patience]
    result = run_search(spec, pipe.evaluate, family=setting.loaded.family, storage_url=url,
                        timings=pipe.timings, callbacks=callbacks,
                        study_attrs=pipe.study_attrs())  # as `pxopt search`: the weights' fingerprint refuses a retrained model
    best = result.best_trial
    if best is None:
        raise RuntimeError(f"{setting.key}: the search finished no trial")
    states = [t.state.name for t in result.study.trials]
    complete = sorted(t.value for t in result.study.trials if t.state.name == "COMPLETE" and t.value is not None)
    baselines = {t.user_attrs["baseline"]: t.value for t in result.study.trials
                 if t.user_attrs.get("baseline") and t.state.name == "COMPLETE"}
    return {
        "rules": best.user_attrs["rules"],
        "ranking": best.user_attrs["ranking"],
        "trial": best.number,
        "baseline": best.user_attrs.get("baseline"),
        "search_area": _area(best.user_attrs["curve"]),
        "search_top_pr": best.user_attrs["top_pr"],
        "n_trials": len(states),
        "n_complete": states.count("COMPLETE"),
        "n_pruned": states.count("PRUNED"),
        "n_failed": states.count("FAIL"),
        # how flat the space is: the search-split areas of every trial that ran its whole curve,
        # and of the enqueued baselines (all-epsilon is LRP-epsilon on the search split)
        "complete_areas": {"min": complete[0], "median": float(np.median(complete)), "max": complete[-1]},
        "baseline_areas": baselines,
        "patience": s.patience,
        "stopped_early": bool(patience and patience.stopped),
        "seconds": round(time.perf_counter() - start, 1),
        "storage": url,
        "validation_images": len(setting.search_task.validation),
    }


class StopAfterNoImprovement:
    """Optuna callback: `study.stop()` once `patience` finished trials in a row (complete or
    pruned) have not improved the best value. Failed trials do not count either way."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ConfigError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.stopped = False

    def trials_since_best(self, study: Any) -> int:
        from pxopt.search.workers import FINISHED

        try:
            best = study.best_trial.number
        except ValueError:  # no complete trial yet
            return 0
        finished = study.get_trials(deepcopy=False, states=FINISHED)
        return sum(1 for t in finished if t.number > best)

    def __call__(self, study: Any, trial: Any) -> None:
        if self.trials_since_best(study) >= self.patience:
            self.stopped = True
            study.stop()


def _best_value(study: Any) -> str:
    try:
        return f"{study.best_value:.4f}"
    except ValueError:
        return "-"


def _area(curve: dict[str, Any]) -> float:
    """The area of a stored curve, from its points (older studies stored the trapezoid)."""
    return curve_area(curve["rates"], curve["accuracies"])


def _run_area(run: dict[str, Any]) -> float:
    """A per-seed run's area (files of older runs call it `area_normalised`)."""
    return float(run["area"] if "area" in run else run["area_normalised"])


# -- evaluation -----------------------------------------------------------------------------
def evaluate_seed(setting: Setting, best: dict[str, Any], seed: int, s: Settings) -> dict[str, Any]:
    """Curves of the optimised rules and of every baseline for one reference set."""
    pipe = pipeline_for(setting, eval_task(setting, seed, s), s)
    out: dict[str, Any] = {}
    for name in s.criteria:
        start = time.perf_counter()
        if name == "optimised":
            scores, ranking = pipe.scores(best["rules"]), best["ranking"]
        else:
            scores = pipe.criterion_scores(name, kinds=(setting.kind,), seed=seed, steps=s.ig_steps)
            ranking = BASELINE_RANKING
        curve = pipe.curve(scores, ranking)
        out[name] = {
            "ranking": scores.default_ranking if ranking is None else ranking,
            "area": float(curve.area),
            "top_pr": float(curve.top_pr),
            "accuracies": [float(a) for a in curve.accuracies],
            "seconds": round(time.perf_counter() - start, 2),
        }
    return out


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); SE is NaN for a single value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(x.mean()), se


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a - b paired over the same reference seeds: mean, 95 % t-interval, paired t-test and
    Wilcoxon signed-rank p (two-sided). NaN where undefined (one seed; all differences 0)."""
    from scipy import stats

    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(x)
    out: dict[str, Any] = {"n_seeds": n, "mean_diff": float(x.mean()) if n else math.nan,
                           "ci95": [math.nan, math.nan], "t_p": math.nan, "wilcoxon_p": math.nan,
                           "n_positive": int((x > 0).sum()), "n_negative": int((x < 0).sum())}
    if n < 2:
        return out
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    out["ci95"] = [out["mean_diff"] - half, out["mean_diff"] + half]
    if sd > 0:
        out["t_p"] = float(stats.ttest_rel(a, b).pvalue)
    if np.any(x != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon(x).pvalue)
    return out


def paired_summary(per_seed: dict[str, dict[str, Any]], first: str = "optimised",
                   second: str = PAIRED_AGAINST) -> dict[str, Any] | None:
    """`first - second` for area and Top-PR over the seeds where both ran (None: not both)."""
    seeds = [k for k, runs in per_seed.items() if first in runs and second in runs]
    if not seeds:
        return None
    return {"first": first, "second": second, "seeds": seeds,
            **{metric: paired_comparison([_metric(per_seed[k][first], metric) for k in seeds],
                                         [_metric(per_seed[k][second], metric) for k in seeds])
               for metric in ("area", "top_pr")}}


def _metric(run: dict[str, Any], metric: str) -> float:
    return _run_area(run) if metric == "area" else float(run[metric])


def summarise(per_seed: dict[str, dict[str, Any]], criteria: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per criterion: mean/SE of area and Top-PR, and the mean/SE curve, over the seeds done."""
    summary: dict[str, dict[str, Any]] = {}
    for name in criteria:
        runs = [seed_runs[name] for seed_runs in per_seed.values() if name in seed_runs]
        if not runs:
            continue
        area, area_se = mean_se([_run_area(r) for r in runs])
        top, top_se = mean_se([r["top_pr"] for r in runs])
        acc = np.asarray([r["accuracies"] for r in runs], dtype=np.float64)
        curve_se = acc.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.full(acc.shape[1], np.nan)
        summary[name] = {
            "area_mean": area, "area_se": area_se, "top_pr_mean": top, "top_pr_se": top_se,
            "n_seeds": len(runs), "curve_mean": acc.mean(axis=0).tolist(), "curve_se": curve_se.tolist(),
        }
    return summary


def grouping_record(layer_map: Any) -> dict[str, Any]:
    """The layer map's grouping ("stage" / "count", with the stage rule) and its groups."""
    return {"grouping": layer_map.describe_grouping(), "layer_groups": layer_map.groups()}


def trained_model_record(meta: dict[str, Any]) -> dict[str, Any]:
    """Which training of a built-in the run measured: two trainings of one recipe (another
    host, bf16 or its float32 fallback) are different models and can give different verdicts."""
    if "test_accuracy" not in meta or "recipe" not in meta:
        return {}
    from pxopt.models.builtin.train import recorded_step_dtype

    return {"test_accuracy": meta["test_accuracy"], "epochs": meta["recipe"].get("epochs"),
            "step_dtype": recorded_step_dtype(meta),
            "trained_at": meta.get("trained_at"), "cpu": meta.get("cpu")}


def run_setting(setting: Setting, s: Settings, record: dict[str, Any], save: Callable[[], None],
                log: Callable[[str], None]) -> None:
    """Search, then evaluate on every seed, saving after each step."""
    start = time.perf_counter()
    record.update({
        "model": setting.model_key, "model_spec": setting.loaded.spec, "components": setting.kind,
        "n_classes": setting.n_classes, "classes": setting.classes,
        "class_names": list(setting.search_task.class_names),
        "layers": {la.name: int(la.n_components) for la in setting.layer_map.prunable((setting.kind,))},
        # how the rule groups were formed, and the layers of each (as `pxopt export` records)
        **grouping_record(setting.layer_map),
        "held_out_validation_images": len(setting.held_out),
        "model_trained": trained_model_record(setting.loaded.meta),
        "per_seed": {}, "summary": {}, "complete": False,
    })
    log(f"[{setting.key}] search: {s.trials} trials on {len(setting.search_task.validation)} search "
        f"images, {len(setting.held_out)} held-out images for evaluation")
    record["search"] = search(setting, s, log)
    save()
    for seed in range(1, s.seeds + 1):
        t0 = time.perf_counter()
        record["per_seed"][str(seed)] = evaluate_seed(setting, record["search"], seed, s)
        record["summary"] = summarise(record["per_seed"], s.criteria)
        record["paired"] = paired_summary(record["per_seed"])
        areas = ", ".join(f"{k} {v['area']:.3f}" for k, v in record["per_seed"][str(seed)].items())
        log(f"[{setting.key}] seed {seed}/{s.seeds} ({time.perf_counter() - t0:.0f} s): {areas}")
        save()
    record["complete"] = True
    record["seconds"] = round(time.perf_counter() - start, 1)
    save()


# -- output ---------------------------------------------------------------------------------
def _fmt(mean: float, se: float, pct: bool = False) -> str:
    if not math.isfinite(mean):
        return "-"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    m = f"{mean * scale:.0f}{unit}" if pct else f"{mean:.3f}"
    if not math.isfinite(se):
        return m
    return f"{m} ± {se * scale:.0f}{unit}" if pct else f"{m} ± {se:.3f}"


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (setting, criterion), in CRITERIA order (the JSON `table`)."""
    rows = []
    for key, rec in results["settings"].items():
        for name in CRITERIA:
            sm = rec.get("summary", {}).get(name)
            if sm is None:
                continue
            rows.append({"setting": key, "model": rec["model"], "components": rec["components"],
                         "n_classes": rec["n_classes"], "criterion": name,
                         **{k: sm[k] for k in ("area_mean", "area_se", "top_pr_mean", "top_pr_se", "n_seeds")}})
    return rows


def markdown(results: dict[str, Any]) -> str:
    """The table as Markdown: one block per task, criteria as rows, settings as columns."""
    s = results["settings_used"]
    lines = [
        "# Optimised LRP vs baseline criteria on the built-in Fashion-MNIST models",
        "",
        *([f"**{results['scale']}**", ""] if results.get("scale") else []),
        ("**PARTIAL RESULTS** (the run did not finish; missing cells were not computed)."
         if not results.get("complete") else f"Complete run ({s['trials']} trials per search, {s['seeds']} seeds)."),
        "",
        f"Area = mean top-1 accuracy over pruning rates {s['rates'][0]}..{s['rates'][-1]} "
        f"({len(s['rates'])} rates, trapezoid rule / span); Top-PR = highest rate keeping >= 95 % of "
        f"the unpruned accuracy. Mean ± standard error over {s['seeds']} reference sets (seeds "
        f"1..{s['seeds']}, {s['n_ref']} images/class); one-shot pruning, no fine-tuning. "
        f"The row 'optimised − {PAIRED_AGAINST}' is the difference paired over the same reference "
        "sets: mean, 95 % t-interval, two-sided paired t-test and Wilcoxon signed-rank p, number of sets.",
        f"The search (at most {s['trials']} trials"
        + (f", stopped early only after {s['patience']} trials without improvement" if s.get("patience") else "")
        + f", reference seed 0) tuned on {s['val_search']} validation "
        f"images per task; **all numbers below come from {s['val_eval']} other validation images per task "
        "(split evenly over its classes) that the search never saw** (Fashion-MNIST test split).",
        "",
    ]
    recs = results["settings"]
    for n_classes in s["tasks"]:
        keys = [k for k, r in recs.items() if r.get("n_classes") == n_classes and r.get("summary")]
        if not keys:
            continue
        lines += [f"## {n_classes} classes" + (f" ({', '.join(recs[keys[0]]['class_names'])})" if n_classes < 10 else ""),
                  ""]
        for metric, label, pct in (("area", "Area", False), ("top_pr", "Top-PR", True)):
            header = "| " + label + " | " + " | ".join(_setting_label(recs[k]) for k in keys) + " |"
            lines += [header, "|---" * (len(keys) + 1) + "|"]
            for name in CRITERIA:
                cells = []
                for k in keys:
                    sm = recs[k]["summary"].get(name)
                    cells.append("-" if sm is None else _fmt(sm[f"{metric}_mean"], sm[f"{metric}_se"], pct))
                if any(c != "-" for c in cells):
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
            paired = [_fmt_paired((recs[k].get("paired") or {}).get(metric), pct) for k in keys]
            if any(c != "-" for c in paired):
                lines.append(f"| optimised − {PAIRED_AGAINST}: mean [95 % CI], p (t / Wilcoxon) | "
                             + " | ".join(paired) + " |")
            lines.append("")
        accs = []
        for k in keys:
            runs = recs[k]["summary"].get("random") or next(iter(recs[k]["summary"].values()))
            accs.append(f"{_setting_label(recs[k])} {runs['curve_mean'][0] * 100:.1f} %")
        lines += ["Unpruned accuracy on the held-out images: " + ", ".join(accs) + ".", ""]
        search_lines = []
        for k in keys:
            se = recs[k].get("search")
            if se:
                src = f"baseline `{se['baseline']}`" if se.get("baseline") else f"trial {se['trial']}"
                area = se.get("search_area", se.get("search_area_normalised"))
                grouping = (recs[k].get("grouping") or {}).get("grouping", "count (not recorded)")
                search_lines.append(f"{_setting_label(recs[k])}: best = {src}, area {area:.3f}"
                                    f" on the search split ({se['n_complete']} complete / {se['n_pruned']} pruned / "
                                    f"{se['n_failed']} failed trials, {se['seconds']:.0f} s"
                                    f"{', stopped early' if se.get('stopped_early') else ''}; "
                                    f"groups by {grouping}, ranking {se.get('ranking', '?')})")
        if search_lines:
            lines += ["Search: " + "; ".join(search_lines) + ".", ""]
    lines += [f"Command: `{results['command']}`", "",
              f"Wall time: {results['wall_seconds'] / 60:.1f} min on {results['machine']}.", ""]
    if results.get("timing_note"):
        lines += [results["timing_note"], ""]
    return "\n".join(lines)


def _fmt_paired(p: dict[str, Any] | None, pct: bool = False) -> str:
    """`+0.105 [+0.080, +0.130], p 0.001 / 0.062 (n 5)`; '-' when not computed."""
    if not p or not math.isfinite(p["mean_diff"]):
        return "-"
    scale = 100.0 if pct else 1.0

    def num(v: float) -> str:
        return "nan" if not math.isfinite(v) else (f"{v * scale:+.0f}" if pct else f"{v:+.3f}")

    def pv(v: float) -> str:
        return "-" if not math.isfinite(v) else f"{v:.2g}"

    lo, hi = p["ci95"]
    unit = " pp" if pct else ""
    return f"{num(p['mean_diff'])}{unit} [{num(lo)}, {num(hi)}], p {pv(p['t_p'])} / {pv(p['wilcoxon_p'])} (n {p['n_seeds']})"


COMPONENT_LABELS: dict[str, str] = {"conv": "channels", "mlp": "MLP neurons", "heads": "heads"}


def _setting_label(rec: dict[str, Any]) -> str:
    comp = COMPONENT_LABELS[rec["components"]]
    return f"{_MODEL_LABELS.get(rec['model'], rec['model'])} {comp}"


_MODEL_LABELS = {"resnet": "ResNet", "vgg": "VGG", "vit": "ViT", "fmnist-resnet": "ResNet", "fmnist-vgg": "VGG",
                 "fmnist-vit": "ViT"}


_COLOURS = {"optimised": "#d62728", "lrp-epsilon": "#1f77b4", "yeom-zplus": "#2ca02c", "ig": "#9467bd",
            "taylor": "#8c564b", "gradient": "#e377c2", "activation": "#bcbd22", "weight": "#17becf",
            "random": "#7f7f7f", "weight-l2-norm": "#0b6e79"}
# A layer-mean-normalised form: its raw criterion's colour, dashed.
_DASHED = set(LAYER_MEAN_NORMALISED)
for _name, (_raw, _) in LAYER_MEAN_NORMALISED.items():
    _COLOURS.setdefault(_name, _COLOURS[_raw])


def figure(results: dict[str, Any]) -> Any:
    """Accuracy vs pruning rate, mean ± SE bands; columns = model/components, rows = tasks."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    recs = results["settings"]
    tasks = list(results["settings_used"]["tasks"])
    cols: list[tuple[str, str]] = []
    for rec in recs.values():
        if (rec["model"], rec["components"]) not in cols:
            cols.append((rec["model"], rec["components"]))
    titles = []
    for n in tasks:
        for m, c in cols:
            rec = recs.get(f"{m}-{c}-{n}cls")
            titles.append(f"{_setting_label(rec) if rec else m}, {n} classes")
    fig = make_subplots(rows=len(tasks), cols=max(len(cols), 1), subplot_titles=titles,
                        shared_yaxes=True, horizontal_spacing=0.04, vertical_spacing=0.12)
    rates = results["settings_used"]["rates"]
    shown: set[str] = set()
    for r, n in enumerate(tasks, start=1):
        for c, (m, comp) in enumerate(cols, start=1):
            rec = recs.get(f"{m}-{comp}-{n}cls")
            for name in CRITERIA:
                sm = (rec or {}).get("summary", {}).get(name)
                if sm is None:
                    continue
                mean = np.asarray(sm["curve_mean"])
                se = np.nan_to_num(np.asarray(sm["curve_se"], dtype=np.float64))
                colour = _COLOURS[name]
                band = f"rgba({int(colour[1:3], 16)},{int(colour[3:5], 16)},{int(colour[5:7], 16)},0.18)"
                fig.add_trace(go.Scatter(x=rates + rates[::-1], y=np.r_[mean + se, (mean - se)[::-1]],
                                         fill="toself", fillcolor=band, line={"width": 0}, hoverinfo="skip",
                                         showlegend=False, legendgroup=name), row=r, col=c)
                fig.add_trace(go.Scatter(x=rates, y=mean, mode="lines", name=name, legendgroup=name,
                                         line={"color": colour, "width": 3 if name == "optimised" else 1.5,
                                               "dash": "dash" if name in _DASHED else "solid"},
                                         showlegend=name not in shown,
                                         hovertemplate=f"{name}<br>rate %{{x}}<br>acc %{{y:.3f}}<extra></extra>"),
                              row=r, col=c)
                shown.add(name)
    fig.update_xaxes(title_text="pruning rate", range=[0, rates[-1]])
    fig.update_yaxes(range=[0, 1.02])
    for r in range(1, len(tasks) + 1):
        fig.update_yaxes(title_text="top-1 accuracy (held-out)", row=r, col=1)
    status = "" if results.get("complete") else " (PARTIAL)"
    fig.update_layout(
        title=f"One-shot pruning on Fashion-MNIST: optimised LRP vs criteria "
              f"(mean ± SE over {results['settings_used']['seeds']} reference sets){status}",
        width=max(420 * len(cols), 700), height=380 * len(tasks) + 120, template="plotly_white",
        legend={"orientation": "h", "y": -0.12},
    )
    return fig


def render_png(fig: Any, path: Path) -> str | None:
    """PNG through kaleido (with Debian's chromium); returns the reason when it cannot."""
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    try:
        fig.write_image(str(path), scale=1)
        return None
    except Exception as exc:  # kaleido/chromium missing or failing: the HTML is still there
        return f"{type(exc).__name__}: {exc}"


def write_outputs(results: dict[str, Any], out_dir: Path, *, png: bool = False) -> None:
    """JSON (everything), Markdown table, HTML figure, and the PNG when asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["table"] = table_rows(results)
    results["paired"] = {k: r["paired"] for k, r in results["settings"].items() if r.get("paired")}
    tmp = out_dir / f"{STEM}.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, allow_nan=True))
    tmp.replace(out_dir / f"{STEM}.json")
    (out_dir / f"{STEM}.md").write_text(markdown(results))
    if any(r.get("summary") for r in results["settings"].values()):
        fig = figure(results)
        fig.write_html(out_dir / f"{STEM}.html", include_plotlyjs="cdn")
        if png:
            reason = render_png(fig, out_dir / f"{STEM}.png")
            if reason:
                print(f"PNG not rendered: {reason}", file=sys.stderr)


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(s: Settings, *, command: str, log: Callable[[str], None] = print,
        load: Callable[[str], Any] | None = None, png: bool = True, scale: str | None = None) -> dict[str, Any]:
    """The whole comparison; returns the results dict (also written to `s.out_dir`)."""
    configure_threads(s.threads)
    if load is None:
        from pxopt.models import load_model

        def load(spec: str) -> Any:
            return load_model(spec, device=s.device)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "complete": False, "command": command, "machine": _machine(), "scale": scale,
        "git_commit": _git_commit(), "settings_used": s.to_dict(), "settings": {}, "errors": {},
        "wall_seconds": 0.0,
        "note": ("search on the 'search' validation split (reference seed 0); every reported number "
                 "on held-out validation images the search did not use, reference seeds 1..S"),
    }

    def save(png_now: bool = False) -> None:
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_outputs(results, s.out_dir, png=png_now)

    for model_key in s.models:
        spec = model_spec(model_key)
        log(f"loading {spec} ...")
        loaded = load(spec)
        kinds = [k for k in COMPONENTS_BY_FAMILY[loaded.family] if not s.components or k in s.components]
        if not kinds:
            raise ConfigError(f"{spec} has none of the components {list(s.components)} "
                              f"(it has {', '.join(COMPONENTS_BY_FAMILY[loaded.family])})")
        for n_classes in s.tasks:
            for kind in kinds:
                setting = build_setting(model_key, kind, n_classes, loaded, s)
                record: dict[str, Any] = {}
                results["settings"][setting.key] = record
                try:
                    run_setting(setting, s, record, save, log)
                except Exception as exc:  # one broken setting must not lose the others
                    results["errors"][setting.key] = f"{type(exc).__name__}: {exc}"
                    log(f"[{setting.key}] FAILED: {type(exc).__name__}: {exc}")
                    save()
    results["complete"] = not results["errors"]
    save(png_now=png)
    log(f"done in {results['wall_seconds'] / 60:.1f} min -> {s.out_dir / STEM}.{{json,md,html,png}}")
    return results


def _csv(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'): the comma-separated options."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    trials: int = typer.Option(None, help="Search budget per setting (default 100; quick 4)."),
    patience: int = typer.Option(None, help="Stop a search after this many trials without improvement "
                                            "(default 50; 0: never; quick 0)."),
    seeds: int = typer.Option(None, help="Reference sets evaluated (default 5; quick 2)."),
    models: str = typer.Option("resnet,vgg,vit", help="Comma-separated: resnet, vgg, vit or any built-in "
                                                      "model name (pxopt models)."),
    tasks: str = typer.Option("10,3", help="Comma-separated class counts."),
    quick: bool = typer.Option(False, "--quick", help="Reduced budget (a few minutes)."),
    n_ref: int = typer.Option(None, help="Reference images per class."),
    val_search: int = typer.Option(None, help="Search validation images per task (default 200)."),
    val_eval: int = typer.Option(None, help="Held-out validation images per task (default 300)."),
    rate_step: float = typer.Option(None, help="Pruning-rate grid step (default 0.05: 0..0.95)."),
    rates: str = typer.Option(None, help="Explicit comma-separated rate grid, e.g. to reach 0.99 where "
                                         "curves separate late (overrides --rate-step)."),
    components: str = typer.Option(None, help="Comma-separated component kinds to evaluate (conv, heads, "
                                              "mlp; default: all of each model's family)."),
    ig_steps: int = typer.Option(None, help="Integrated-gradients steps (default 16)."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]."),
    out_dir: Path = typer.Option(OUT_DIR, help="Where the table and figure go."),
    work_dir: Path = typer.Option(None, help="Where the search studies (SQLite) go."),
    render_only: bool = typer.Option(False, "--render-only", help="Re-write table/figure from the JSON."),
    png: bool = typer.Option(True, help="Render the PNG figure (kaleido + chromium)."),
    scale: str = typer.Option(None, help="Label at the top of the table (e.g. 'REDUCED SCALE ...')."),
) -> None:
    """Search, then evaluate optimised LRP and every baseline on held-out images."""
    if render_only:
        path = out_dir / f"{STEM}.json"
        write_outputs(json.loads(path.read_text()), out_dir, png=png)
        print(f"re-rendered from {path}")
        return
    try:
        if rates is not None:
            grid = parse_rates(rates)
        else:
            grid = None if rate_step is None else [round(rate_step * i, 4) for i in range(int(round(1 / rate_step)))]
        overrides = dict(trials=trials, patience=patience, seeds=seeds, n_ref=n_ref, val_search=val_search,
                         val_eval=val_eval, rates=grid, ig_steps=ig_steps,
                         components=None if components is None else _csv(components),
                         models=_csv(models), tasks=tuple(int(t) for t in _csv(tasks)),
                         threads=threads, device=device, out_dir=out_dir, work_dir=work_dir)
        if quick:
            s = Settings.quick(**overrides)
        else:
            s = dataclasses.replace(Settings(), **{k: v for k, v in overrides.items() if v is not None}).validated()
        command = "python benchmarks/results.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        run(s, command=command.strip(), png=png, scale=scale)
    except ConfigError as exc:  # a one-line reason, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
