"""Does the search objective predict the held-out area, and what should it average over? (issue #14, point 5)

Three measurements on one model / task / component kind:

(a) noise: `--rule-sets` random rule sets from the search space, each evaluated on `--draws`
    independent draws of reference *and* validation images (task seeds 100, 101, ...):
    per-rule-set standard deviation of the area, the median absolute change of a rule set's
    area between two draws, and the Spearman rank correlation of the rule sets between draws;
(b) predictiveness: a TPE study (no pruner) on the search split; every trial is also
    evaluated on held-out images (another reference set, validation images the search never
    saw): Spearman between the objective and the held-out area over the trials;
(c) objective variants: the same search budget with other objectives (reference images per
    class, validation images per class, rate-grid step, averaging over two reference sets,
    re-evaluating the best 3 trials on more images before naming one best, the median
    pruner). For each: search-split area and held-out area of the trial named best, and the
    seconds it cost, so the choice is "held-out area per unit of compute".

    python benchmarks/objective_noise.py --model resnet --components conv
    python benchmarks/objective_noise.py --quick      # a minute, smoke scale

Held-out numbers always use the same evaluation (reference seed 1, `--n-ref-eval` per class,
`--val-eval` held-out images, the `--rate-step` grid), whatever the variant searched with.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results as R  # noqa: E402  (benchmarks/results.py: splits, settings, pipelines)

from pxopt.errors import ConfigError, PxoptError  # noqa: E402

STEM = "objective_noise"
FORMAT = "pxopt.objective_noise/1"
NOISE_SEED0 = 100  # task seeds of the noise draws: 100, 101, ... (none is the search's 0 or eval's 1)
SECOND_REF_SEED = 7  # the second reference set of the "2 reference sets" objective




@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to compute the search objective (and to name the best trial)."""

    name: str
    n_ref: int = 5  # reference images per class
    n_val: int = 10  # search validation images per class
    rate_step: float = 0.1
    ref_sets: int = 1  # average the curve over this many reference sets
    reeval_top: int = 0  # re-evaluate the best k trials on `reeval_n_val` images/class first
    reeval_n_val: int = 30
    pruner: str = "none"

    def rates(self) -> list[float]:
        return [round(self.rate_step * i, 4) for i in range(int(round(1 / self.rate_step)))]


def default_variants(base: Variant) -> list[Variant]:
    """The base objective and one change at a time."""
    r = dataclasses.replace
    return [
        base,
        r(base, name=f"n_ref {base.n_ref * 2}", n_ref=base.n_ref * 2),
        r(base, name=f"n_val {base.n_val * 3}", n_val=base.n_val * 3),
        r(base, name=f"rate step {base.rate_step * 2:g}", rate_step=base.rate_step * 2),
        r(base, name="2 reference sets", ref_sets=2),
        r(base, name=f"re-evaluate top 3 on {base.n_val * 3}/class", reeval_top=3, reeval_n_val=base.n_val * 3),
        r(base, name="median pruner", pruner="median"),
    ]


# -- statistics (pure) ----------------------------------------------------------------------
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (NaN for fewer than 3 pairs or a constant side)."""
    from scipy import stats

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def noise_summary(areas: np.ndarray) -> dict[str, Any]:
    """`areas[rule_set, draw]` -> per-rule-set sd, median |change| between draws, Spearman between draws."""
    areas = np.asarray(areas, dtype=np.float64)
    n_sets, n_draws = areas.shape
    pairs = list(itertools.combinations(range(n_draws), 2))
    rho = [spearman(areas[:, i], areas[:, j]) for i, j in pairs]
    changes = [abs(areas[k, i] - areas[k, j]) for k in range(n_sets) for i, j in pairs]
    sd = areas.std(axis=1, ddof=1) if n_draws > 1 else np.full(n_sets, math.nan)
    return {
        "n_rule_sets": n_sets, "n_draws": n_draws,
        "sd_per_rule_set": sd.tolist(), "sd_median": float(np.median(sd)), "sd_max": float(np.max(sd)),
        "abs_change_median": float(np.median(changes)) if changes else math.nan,
        "spearman_between_draws": rho,
        "spearman_mean": float(np.nanmean(rho)) if rho and not all(math.isnan(x) for x in rho) else math.nan,
        "spearman_min": float(np.nanmin(rho)) if rho and not all(math.isnan(x) for x in rho) else math.nan,
        "area_range": [float(areas.min()), float(areas.max())],
    }


def name_best(values: Sequence[float | None], reeval: Callable[[int], float] | None, top: int) -> tuple[int, float]:
    """Index of the trial named best and its (re-evaluated) value: the highest search value, or,
    with `top` > 0, the highest `reeval` among the `top` highest search values."""
    done = [(v, i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not done:
        raise PxoptError("no complete trial")
    done.sort(key=lambda vi: (-vi[0], vi[1]))
    if top <= 0 or reeval is None:
        return done[0][1], done[0][0]
    rescored = [(reeval(i), i) for _v, i in done[:top]]
    rescored.sort(key=lambda vi: (-vi[0], vi[1]))
    return rescored[0][1], rescored[0][0]


# -- evaluation plumbing --------------------------------------------------------------------
class AveragedEvaluate:
    """`evaluate(rules, ranking, on_rate)` over several pipelines (reference sets): mean curve.

    The pipelines run whole; `on_rate` then sees the mean rate by rate (the pruner still
    works, it only saves nothing within the trial)."""

    def __init__(self, pipes: Sequence[Any]) -> None:
        self.pipes = list(pipes)

    def __call__(self, rules: Any, ranking: str | None = None, on_rate: Any = None) -> Any:
        from pxopt.evaluate import curve_area

        if len(self.pipes) == 1:
            return self.pipes[0].evaluate(rules, ranking, on_rate)
        curves = [p.evaluate(rules, ranking) for p in self.pipes]
        rates = list(curves[0].rates)
        acc = np.mean([c.accuracies for c in curves], axis=0).tolist()
        if on_rate is not None:
            for i, (rate, a) in enumerate(zip(rates, acc, strict=True)):
                on_rate(i, rate, a)
        return SimpleNamespace(rates=rates, accuracies=acc, area=curve_area(rates, acc),
                               top_pr=float(np.mean([c.top_pr for c in curves])))


@dataclasses.dataclass
class Bench:
    """The loaded model and the fixed data of all three measurements."""

    setting: Any  # results.Setting: seed-0 draw split into search / held-out
    settings: Any  # results.Settings (threads, device, batch size, eval rates, n_ref for eval)
    held_pipe: Any  # reference seed 1 + held-out images: the one yardstick

    def task(self, *, n_ref: int, n_val: int | None, seed: int, validation: Any = None) -> Any:
        from pxopt.data import make_task

        loaded = self.setting.loaded
        t = make_task(R.DATASET, classes=self.setting.classes, n_ref=n_ref, n_val=n_val or 1, seed=seed,
                      transform=loaded.transform, num_model_classes=loaded.num_classes)
        if validation is not None:
            t = dataclasses.replace(t, validation=validation, n_val=len(validation) // len(self.setting.classes))
        return t

    def pipe(self, task: Any, rates: list[float]) -> Any:
        return R.pipeline_for(self.setting, task, dataclasses.replace(self.settings, rates=rates))

    def search_validation(self, n_val: int) -> Any:
        """The first `n_val` per class of the search split (never the held-out images)."""
        val = self.setting.search_task.validation
        per = len(val) // len(self.setting.classes)
        if n_val > per:
            raise ConfigError(f"variant wants {n_val} search images/class; the split has {per} (raise --val-search)")
        return val if n_val == per else R.split_per_class(val, n_val)[0]

    def held_out_area(self, rules: Any, ranking: str) -> float:
        return float(self.held_pipe.evaluate(rules, ranking).area)


def random_rule_sets(family: str, n: int, seed: int) -> list[tuple[dict, str]]:
    """`n` rule sets drawn uniformly from the search space (Optuna's RandomSampler)."""
    import optuna

    from pxopt.search.space import SearchSpace

    space = SearchSpace.build(None, family=family)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return out


def measure_noise(bench: Bench, *, rule_sets: int, draws: int, n_ref: int, n_val: int, seed: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """(a): areas[rule set, draw] on independent reference + validation draws."""
    sets = random_rule_sets(bench.setting.loaded.family, rule_sets, seed)
    areas = np.full((len(sets), draws), math.nan)
    start = time.perf_counter()
    for d in range(draws):
        pipe = bench.pipe(bench.task(n_ref=n_ref, n_val=n_val, seed=NOISE_SEED0 + d), list(bench.settings.rates))
        for k, (rules, ranking) in enumerate(sets):
            try:
                areas[k, d] = float(pipe.evaluate(rules, ranking).area)
            except PxoptError as exc:
                log(f"  rule set {k} draw {d}: {type(exc).__name__}: {exc}")
        log(f"(a) draw {d + 1}/{draws} done ({time.perf_counter() - start:.0f} s)")
    ok = ~np.isnan(areas).any(axis=1)
    return {"n_ref": n_ref, "n_val": n_val, "task_seeds": [NOISE_SEED0 + d for d in range(draws)],
            "areas": areas.tolist(), "rule_sets": [{"rules": r, "ranking": k} for r, k in sets],
            "n_failed_rule_sets": int((~ok).sum()), **noise_summary(areas[ok]),
            "seconds": round(time.perf_counter() - start, 1)}


def run_variant(bench: Bench, v: Variant, *, trials: int, seed: int, n_startup: int,
                held_out_every_trial: bool) -> dict[str, Any]:
    """(c) one search with objective `v`; (b) when `held_out_every_trial`: every trial held out."""
    import optuna
    from search_efficiency import make_pruner, make_sampler

    from pxopt.search.objective import Objective
    from pxopt.search.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rates = v.rates()
    validation = bench.search_validation(v.n_val)
    ref_seeds = [0, SECOND_REF_SEED][: v.ref_sets]
    pipes = [bench.pipe(bench.task(n_ref=v.n_ref, n_val=None, seed=s, validation=validation), rates) for s in ref_seeds]
    evaluate = AveragedEvaluate(pipes)
    space = SearchSpace.build(None, family=bench.setting.loaded.family)
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed, n_startup),
                                pruner=make_pruner(v.pruner, len(rates)))
    start = time.perf_counter()
    study.optimize(Objective(space, evaluate, rates), n_trials=trials, catch=(PxoptError,))
    values = [t.value if t.state.name == "COMPLETE" else None for t in study.trials]
    reeval_pipe = None

    def reeval(i: int) -> float:
        nonlocal reeval_pipe
        if reeval_pipe is None:
            val = bench.search_validation(v.reeval_n_val)
            reeval_pipe = AveragedEvaluate([bench.pipe(bench.task(n_ref=v.n_ref, n_val=None, seed=s, validation=val),
                                                       rates) for s in ref_seeds])
        t = study.trials[i]
        return float(reeval_pipe(t.user_attrs["rules"], t.user_attrs["ranking"]).area)

    best, best_value = name_best(values, reeval, v.reeval_top)
    seconds = time.perf_counter() - start  # search + re-evaluation: the compute of this objective
    t = study.trials[best]
    out: dict[str, Any] = {
        "variant": v.name, "seed": seed, "best_trial": best, "search_area": values[best],
        "named_value": best_value, "held_out_area": bench.held_out_area(t.user_attrs["rules"], t.user_attrs["ranking"]),
        "seconds": round(seconds, 1), "n_complete": sum(x is not None for x in values),
        "n_pruned": sum(t.state.name == "PRUNED" for t in study.trials),
    }
    if held_out_every_trial:
        done = [(i, x) for i, x in enumerate(values) if x is not None]
        held = [bench.held_out_area(study.trials[i].user_attrs["rules"], study.trials[i].user_attrs["ranking"])
                for i, _x in done]
        objective = [x for _i, x in done]
        top = np.argsort(objective)[::-1][: max(3, len(objective) // 2)]
        out["trials"] = [{"trial": i, "objective": x, "held_out": h} for (i, x), h in zip(done, held, strict=True)]
        out["spearman_objective_held_out"] = spearman(objective, held)
        out["spearman_top_half"] = spearman([objective[k] for k in top], [held[k] for k in top])
    return out


def summarise_variants(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]
        held = [r["held_out_area"] for r in rs]
        rows.append({
            "variant": name, "n_seeds": len(rs),
            "search_area_mean": float(np.mean([r["search_area"] for r in rs])),
            "held_out_mean": float(np.mean(held)),
            "held_out_sd": float(np.std(held, ddof=1)) if len(rs) > 1 else math.nan,
            "gap_mean": float(np.mean([r["search_area"] - r["held_out_area"] for r in rs])),
            "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
        })
    return rows


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [f"# Objective noise and predictiveness: {s['model']} {s['components']}, {s['n_classes']} classes", "",
             f"**{res['scale']}**", "", f"Command: `{res['command']}`", "",
             f"Held-out yardstick: reference seed 1 ({s['n_ref_eval']}/class), {res['held_out_images']} held-out "
             f"validation images, rates {s['rates'][0]}..{s['rates'][-1]} ({len(s['rates'])}).", ""]
    n = res.get("noise")
    if n:
        rho = ", ".join(f"{x:.2f}" for x in n["spearman_between_draws"])
        lines += ["## (a) Noise of the objective", "",
                  f"{n['n_rule_sets']} random rule sets x {n['n_draws']} independent draws of reference "
                  f"({n['n_ref']}/class) and validation ({n['n_val']}/class) images "
                  f"({n['n_failed_rule_sets']} rule sets failed and are left out). Areas span "
                  f"{n['area_range'][0]:.3f}..{n['area_range'][1]:.3f}.", "",
                  "| per-rule-set sd (median / max) | median abs change between draws | Spearman between draws (mean / min) |",
                  "|---|---|---|",
                  f"| {n['sd_median']:.4f} / {n['sd_max']:.4f} | {n['abs_change_median']:.4f} | "
                  f"{n['spearman_mean']:.3f} / {n['spearman_min']:.3f} |", "", f"Pairs: {rho}.", ""]
    pred = [r for r in res.get("variants", []) if "spearman_objective_held_out" in r]
    if pred:
        lines += ["## (b) Does the objective predict the held-out area?", "",
                  "| study seed | trials | Spearman(objective, held-out) | same, best half of the trials |", "|---|---|---|---|"]
        for r in pred:
            lines.append(f"| {r['seed']} | {len(r['trials'])} | {r['spearman_objective_held_out']:.3f} | "
                         f"{r['spearman_top_half']:.3f} |")
        lines.append("")
    rows = res.get("variant_summary")
    if rows:
        lines += ["## (c) Objective variants: held-out area of the trial named best, per compute", "",
                  f"TPE, {s['trials']} trials per search, search seeds {list(range(s['seeds']))}. Base: "
                  f"{s['base']['name']}.", "",
                  "| objective | search-split area | held-out area (mean ± sd) | search − held-out | seconds / search |",
                  "|---|---|---|---|---|"]
        for r in rows:
            sd = "" if not math.isfinite(r["held_out_sd"]) else f" ± {r['held_out_sd']:.4f}"
            lines.append(f"| {r['variant']} | {r['search_area_mean']:.4f} | {r['held_out_mean']:.4f}{sd} | "
                         f"{r['gap_mean']:+.4f} | {r['seconds_mean']:.0f} |")
        lines.append("")
    lines += [f"Wall time {res['wall_seconds'] / 60:.1f} min on {res['machine']}.", ""]
    return "\n".join(lines)


def write_outputs(res: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, allow_nan=True))
    (out_dir / f"{stem}.md").write_text(markdown(res))


def run(*, model: str, components: str, n_classes: int, settings: Any, n_ref_eval: int, rule_sets: int,
        draws: int, variants: list[Variant], trials: int, seeds: int, n_startup: int, parts: str,
        out_dir: Path, stem: str, command: str, scale: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    from pxopt.device import configure_threads
    from pxopt.models import load_model

    configure_threads(settings.threads)
    started = time.perf_counter()
    loaded = load_model(R.model_spec(model), device=settings.device)
    if components not in R.COMPONENTS_BY_FAMILY[loaded.family]:
        raise ConfigError(f"{model} ({loaded.family}) has components {R.COMPONENTS_BY_FAMILY[loaded.family]}")
    setting = R.build_setting(model, components, n_classes, loaded, settings)
    eval_settings = dataclasses.replace(settings, n_ref=n_ref_eval)
    bench = Bench(setting, settings, R.pipeline_for(setting, R.eval_task(setting, 1, eval_settings), settings))
    base = variants[0]
    res: dict[str, Any] = {
        "format": FORMAT, "scale": scale, "command": command, "machine": R._machine(), "git_commit": R._git_commit(),
        "settings": {"model": model, "components": components, "n_classes": n_classes, "trials": trials,
                     "seeds": seeds, "n_startup": n_startup, "n_ref_eval": n_ref_eval, "rates": list(settings.rates),
                     "val_search": settings.val_search, "val_eval": settings.val_eval,
                     "base": dataclasses.asdict(base), "variants": [dataclasses.asdict(v) for v in variants]},
        "held_out_images": len(setting.held_out), "variants": [], "wall_seconds": 0.0,
    }

    def save() -> None:
        res["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_outputs(res, out_dir, stem)

    if "a" in parts:
        res["noise"] = measure_noise(bench, rule_sets=rule_sets, draws=draws, n_ref=base.n_ref, n_val=base.n_val,
                                     seed=0, log=log)
        save()
        log(f"(a) sd median {res['noise']['sd_median']:.4f}, Spearman mean {res['noise']['spearman_mean']:.3f}")
    if "b" in parts or "c" in parts:
        todo = variants if "c" in parts else variants[:1]
        for seed in range(seeds):
            for v in todo:
                r = run_variant(bench, v, trials=trials, seed=seed, n_startup=n_startup,
                                held_out_every_trial="b" in parts and v is base)
                res["variants"].append(r)
                res["variant_summary"] = summarise_variants(res["variants"])
                save()
                extra = (f", Spearman {r['spearman_objective_held_out']:.3f}"
                         if "spearman_objective_held_out" in r else "")
                log(f"(c) {v.name} seed {seed}: search {r['search_area']:.4f} held-out {r['held_out_area']:.4f} "
                    f"({r['seconds']:.0f} s){extra}")
    save()
    return res


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    model: str = typer.Option("resnet", help="resnet, vgg, vit or any built-in model name."),
    components: str = typer.Option("conv", help="conv (CNN); mlp or heads (ViT)."),
    n_classes: int = typer.Option(10, help="Classes of the task."),
    parts: str = typer.Option("abc", help="Which measurements: any of a (noise), b (predictiveness), c (variants)."),
    rule_sets: int = typer.Option(20, help="(a) random rule sets."),
    draws: int = typer.Option(4, help="(a) independent reference + validation draws."),
    trials: int = typer.Option(30, help="(b, c) trials per search."),
    seeds: int = typer.Option(2, help="(b, c) search seeds per variant."),
    n_startup: int = typer.Option(8, help="(b, c) TPE start-up trials."),
    n_ref: int = typer.Option(5, help="Base objective: reference images per class."),
    n_val: int = typer.Option(10, help="Base objective: search validation images per class."),
    rate_step: float = typer.Option(0.1, help="Base objective's rate step; also the held-out grid."),
    n_ref_eval: int = typer.Option(10, help="Held-out yardstick: reference images per class."),
    val_eval: int = typer.Option(300, help="Held-out validation images per task."),
    quick: bool = typer.Option(False, "--quick", help="Smoke scale: 3 rule sets x 2 draws, 2 variants, 3 trials."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]."),
    out_dir: Path = typer.Option(R.OUT_DIR, help="Where JSON and table go."),
    stem: str = typer.Option(None, help="File name stem (default objective_noise_<model>_<components>_<n>cls)."),
    scale: str = typer.Option("full protocol", help="Label written at the top of the results."),
) -> None:
    """Noise of the objective, its rank correlation with the held-out area, and objective variants."""
    if quick:
        rule_sets, draws, trials, seeds, n_startup, n_ref, n_val, val_eval, rate_step = 3, 2, 3, 1, 2, 2, 2, 20, 0.25
        scale = "QUICK smoke run"
    base = Variant(name=f"base (n_ref {n_ref}, n_val {n_val}, step {rate_step:g})", n_ref=n_ref, n_val=n_val,
                   rate_step=rate_step)
    variants = default_variants(base)
    if quick:
        variants = [variants[0], variants[5]]
    max_val = max(max(v.n_val, v.reeval_n_val if v.reeval_top else 0) for v in variants)
    rates = base.rates()
    settings = dataclasses.replace(R.Settings(), n_ref=n_ref, val_search=max_val * n_classes, val_eval=val_eval,
                                   rates=rates, threads=threads, device=device, models=(model,),
                                   tasks=(n_classes,)).validated()
    bad = set(parts) - set("abc")
    if bad or not parts:
        raise ConfigError(f"--parts takes letters of 'abc', got {parts!r}")
    command = "python benchmarks/objective_noise.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run(model=model, components=components, n_classes=n_classes, settings=settings, n_ref_eval=n_ref_eval,
        rule_sets=rule_sets, draws=draws, variants=variants, trials=trials, seeds=seeds, n_startup=n_startup,
        parts=parts, out_dir=out_dir, stem=stem or f"{STEM}_{model}_{components}_{n_classes}cls",
        command=command.strip(), scale=scale)


if __name__ == "__main__":
    app()
