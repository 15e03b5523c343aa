"""How fast each Optuna sampler finds good LRP rules (issue #14, point 3).

For one model / task / component kind: studies with every sampler in `--samplers` (tpe,
gp = Optuna's GPSampler, random, cmaes = CmaEsSampler) x pruner {median, none} x `--seeds`
search seeds, all on the same search split (reference seed 0). After each trial the study's
current best (on the search split) is the rule set one would pick; whenever it changes it is
evaluated on *held-out* validation images with another reference set (seed 1), so the curve
is "held-out area of the rules picked so far" against trials, not the search's own optimism.

Reports, per sampler and pruner: mean best-so-far held-out area per trial (with a band over
seeds), the final areas, and the trials each run needed to reach 99 % of the best held-out
area found by any run ("trials to 99 %").

    python benchmarks/search_efficiency.py --model resnet --components conv --trials 100 --seeds 3
    python benchmarks/search_efficiency.py --quick      # a few minutes, reduced scale

Coupling to pxopt is kept to the stable pieces: `Pipeline` (through benchmarks/results.py's
split helpers), `SearchSpace`, `Objective`, Optuna itself (no storage: in-memory studies).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results as R  # noqa: E402  (benchmarks/results.py: splits, settings, pipelines)

from pxopt.errors import ConfigError, PxoptError  # noqa: E402

STEM = "search_efficiency"
FORMAT = "pxopt.search_efficiency/1"
SAMPLERS = ("tpe", "gp", "random", "cmaes")
PRUNERS = ("median", "none")
REACH = 0.99  # "trials to reach 99 % of the best held-out area found by any sampler"


# -- pure helpers (tested on synthetic sequences) ---------------------------------------------
def best_so_far(values: Sequence[float | None]) -> list[float]:
    """Running maximum; None (a pruned or failed trial) keeps the previous best (NaN before any)."""
    out, best = [], math.nan
    for v in values:
        if v is not None and math.isfinite(v) and (math.isnan(best) or v > best):
            best = float(v)
        out.append(best)
    return out


def trials_to_reach(curve: Sequence[float], target: float, *, stay: bool = True) -> int | None:
    """1-based number of trials until `curve` reaches `target` (None: never).

    The held-out area of the picked trial is not monotone (a new search-split best can be
    worse held out), so by default the count is until the curve reaches the target *and
    stays there* to the end; `stay=False` gives the first time it touches it."""
    hit = [math.isfinite(v) and v >= target - 1e-12 for v in curve]
    if not stay:
        return next((i + 1 for i, h in enumerate(hit) if h), None)
    n = None
    for i in range(len(hit) - 1, -1, -1):
        if not hit[i]:
            break
        n = i + 1
    return n


def picked_held_out(search_values: Sequence[float | None], held_out: Callable[[int], float]) -> list[float]:
    """Held-out area of the trial that is best on the search split after each trial.

    `held_out(i)` evaluates trial i; it is called once per change of the best (ties keep the
    earlier trial, as Optuna's `best_trial` does)."""
    out: list[float] = []
    best_value, best_area = -math.inf, math.nan
    for i, v in enumerate(search_values):
        if v is not None and math.isfinite(v) and v > best_value:
            best_value, best_area = float(v), float(held_out(i))
        out.append(best_area)
    return out


# -- samplers and pruners -------------------------------------------------------------------
def make_sampler(name: str, seed: int, n_startup: int) -> Any:
    """An Optuna sampler by short name: `pxopt search`'s own for tpe / gp / random; cmaes
    (not offered by pxopt: it falls back to random sampling on this space) built here."""
    import optuna

    from pxopt.search.spec import SAMPLERS as PRODUCT_SAMPLERS
    from pxopt.search.spec import StudySpec
    from pxopt.search.study import make_sampler as product_sampler

    if name in PRODUCT_SAMPLERS:
        return product_sampler(StudySpec(name="efficiency", seed=seed,
                                         sampler={"name": name, "n_startup_trials": n_startup}), 0)
    if name == "cmaes":
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False)
    raise ConfigError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def unavailable_reason(name: str) -> str | None:
    """Why a sampler cannot run here (a missing optional package), or None."""
    needs = {"gp": "scipy", "cmaes": "cmaes"}.get(name)
    if needs is None:
        return None
    try:
        __import__(needs)
    except ImportError:
        return f"needs the `{needs}` package, not installed"
    return None


def make_pruner(name: str, n_rates: int) -> Any:
    """The pruner of benchmarks/results.py's studies, or none."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, n_rates // 5))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}; choose from {', '.join(PRUNERS)}")


# -- one study ------------------------------------------------------------------------------
def run_study(search_pipe: Any, held_pipe: Any, family: str, rates: list[float], *, sampler: str,
              pruner: str, seed: int, trials: int, n_startup: int) -> dict[str, Any]:
    """One in-memory study; per trial: state, search value, seconds; plus the picked held-out curve."""
    import optuna

    from pxopt.search.objective import Objective
    from pxopt.search.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for pipe in (search_pipe, held_pipe):  # no relevance carried over from another study: fair seconds
        getattr(pipe, "_cache", {}).clear()
    space = SearchSpace.build(None, family=family)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(sampler, seed, n_startup),
                                pruner=make_pruner(pruner, len(rates)))
    objective = Objective(space, search_pipe.evaluate, rates)
    held_cache: dict[int, float] = {}
    start = time.perf_counter()
    held_seconds = 0.0

    def held_out(i: int) -> float:
        nonlocal held_seconds
        if i not in held_cache:
            t0 = time.perf_counter()
            t = study.trials[i]
            held_cache[i] = float(held_pipe.evaluate(t.user_attrs["rules"], t.user_attrs["ranking"]).area)
            held_seconds += time.perf_counter() - t0
        return held_cache[i]

    study.optimize(objective, n_trials=trials, catch=(PxoptError,))
    values = [t.value if t.state.name == "COMPLETE" else None for t in study.trials]
    picked = picked_held_out(values, held_out)
    return {
        "sampler": sampler, "pruner": pruner, "seed": seed,
        "states": [t.state.name for t in study.trials],
        "search_values": values,
        "best_search_so_far": best_so_far(values),
        "picked_held_out": picked,
        "final_search": best_so_far(values)[-1] if values else math.nan,
        "final_held_out": picked[-1] if picked else math.nan,
        "trial_seconds": [round(t.duration.total_seconds(), 3) if t.duration else None for t in study.trials],
        "search_seconds": round(time.perf_counter() - start - held_seconds, 1),
        "held_out_seconds": round(held_seconds, 1),
    }


# -- summary --------------------------------------------------------------------------------
BUDGETS = (10, 20, 30, 50, 75, 100)  # trial budgets the summary reports the hand-over at


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per sampler/pruner: mean and band of the picked held-out curve, final areas, trials to 99 %."""
    finals = [r["final_held_out"] for r in runs if math.isfinite(r["final_held_out"])]
    target_area = max(finals) if finals else math.nan
    target = REACH * target_area
    groups: dict[str, dict[str, Any]] = {}
    for r in runs:
        groups.setdefault(f"{r['sampler']}/{r['pruner']}", {"sampler": r["sampler"], "pruner": r["pruner"],
                                                            "runs": []})["runs"].append(r)
    out = {}
    for key, g in groups.items():
        curves = np.asarray([r["picked_held_out"] for r in g["runs"]], dtype=np.float64)
        reach = [trials_to_reach(r["picked_held_out"], target) for r in g["runs"]]
        touched = [trials_to_reach(r["picked_held_out"], target, stay=False) for r in g["runs"]]
        hit = [n for n in reach if n is not None]
        out[key] = {
            "sampler": g["sampler"], "pruner": g["pruner"], "n_seeds": len(g["runs"]),
            "curve_mean": np.nanmean(curves, axis=0).tolist() if curves.size else [],
            "curve_min": np.nanmin(curves, axis=0).tolist() if curves.size else [],
            "curve_max": np.nanmax(curves, axis=0).tolist() if curves.size else [],
            "final_held_out_mean": float(np.mean([r["final_held_out"] for r in g["runs"]])),
            "final_held_out_sd": float(np.std([r["final_held_out"] for r in g["runs"]], ddof=1)) if len(g["runs"]) > 1 else math.nan,
            "final_search_mean": float(np.mean([r["final_search"] for r in g["runs"]])),
            "trials_to_reach": reach,
            "trials_to_first_touch": touched,
            "trials_to_reach_median": float(np.median(hit)) if hit else None,
            "n_reached": len(hit),
            "pruned_fraction": float(np.mean([s == "PRUNED" for r in g["runs"] for s in r["states"]])),
            "seconds_mean": float(np.mean([r["search_seconds"] for r in g["runs"]])),
            # what a smaller trial budget would have handed over, and what it would have cost
            "budgets": {n: {"held_out_mean": float(np.nanmean(curves[:, n - 1])),
                            "seconds_mean": float(np.mean([sum(r["trial_seconds"][:n]) for r in g["runs"]]))}
                        for n in BUDGETS if curves.size and n <= curves.shape[1]},
        }
    return {"best_held_out_any": target_area, "target": target, "groups": out}


def same_as_random(runs: list[dict[str, Any]]) -> list[str]:
    """Samplers whose every run proposed exactly the random sampler's trials (same seed, pruner)."""
    rand = {(r["pruner"], r["seed"]): r["search_values"] for r in runs if r["sampler"] == "random"}
    out = []
    for name in dict.fromkeys(r["sampler"] for r in runs if r["sampler"] != "random"):
        mine = [r for r in runs if r["sampler"] == name]
        if mine and all(rand.get((r["pruner"], r["seed"])) == r["search_values"] for r in mine):
            out.append(name)
    return out


def markdown(res: dict[str, Any]) -> str:
    s, sm = res["settings"], res["summary"]
    lines = [
        f"# Search efficiency: {s['model']} {s['components']}, {s['n_classes']} classes",
        "",
        f"**{res['scale']}**",
        "",
        f"Command: `{res['command']}`",
        "",
        f"{s['trials']} trials per study, search seeds {list(range(s['seeds']))}; search split "
        f"{res['search_images']} validation images + reference seed 0 ({s['n_ref']}/class); held-out: "
        f"{res['held_out_images']} other validation images + reference seed 1. Rates {s['rates'][0]}.."
        f"{s['rates'][-1]} ({len(s['rates'])}). 'held-out' = held-out area of the trial that is best on the "
        "search split so far (what the search would hand over); it can fall when a new search-split best "
        "is worse held out, so 'trials to 99 %' counts until it reaches the target and stays there "
        "(in brackets: when it first touched it). Target = "
        f"{REACH:.0%} of the best held-out area any run found ({sm['best_held_out_any']:.4f}) = {sm['target']:.4f}.",
        "",
        "| sampler | pruner | final held-out (mean ± sd) | final search | trials to 99 % (median; reached/runs) "
        "| per-run trials to 99 % (first touched) | pruned | search s/study |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in sm["groups"].values():
        med = "-" if g["trials_to_reach_median"] is None else f"{g['trials_to_reach_median']:.0f}"
        sd = "" if not math.isfinite(g["final_held_out_sd"]) else f" ± {g['final_held_out_sd']:.4f}"
        lines.append(f"| {g['sampler']} | {g['pruner']} | {g['final_held_out_mean']:.4f}{sd} | "
                     f"{g['final_search_mean']:.4f} | {med} ({g['n_reached']}/{g['n_seeds']}) | "
                     f"{_runs(g['trials_to_reach'])} ({_runs(g['trials_to_first_touch'])}) | "
                     f"{g['pruned_fraction']:.0%} | {g['seconds_mean']:.0f} |")
    budgets = sorted({n for g in sm["groups"].values() for n in g.get("budgets", {})}, key=int)
    if budgets:
        lines += ["", "What a smaller trial budget hands over: held-out area of the trial that is best on the "
                      "search split after n trials (mean over seeds), and the search seconds spent to get there.",
                  "", "| sampler | pruner | " + " | ".join(f"n = {n}" for n in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for g in sm["groups"].values():
            cells = [f"{b['held_out_mean']:.4f} ({b['seconds_mean']:.0f} s)" if (b := g["budgets"].get(n)) else "-"
                     for n in budgets]
            lines.append(f"| {g['sampler']} | {g['pruner']} | " + " | ".join(cells) + " |")
    same = same_as_random(res["runs"])
    if same:
        lines += ["", "Same trials as the random sampler (same seed and pruner), so the sampler fell back to "
                      "independent random sampling on this conditional, mostly categorical space: "
                      + ", ".join(same) + "."]
    if res.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items()) + "."]
    lines += ["", f"Wall time {res['wall_seconds'] / 60:.1f} min on {res['machine']}.", ""]
    return "\n".join(lines)


def _runs(ns: Sequence[int | None]) -> str:
    return ", ".join("-" if n is None else str(n) for n in ns)


def figure(res: dict[str, Any]) -> Any:
    """Best-so-far held-out area against trials: mean over seeds, band = min..max."""
    import plotly.graph_objects as go

    palette = {"tpe": "#d62728", "gp": "#1f77b4", "random": "#7f7f7f", "cmaes": "#2ca02c"}
    fig = go.Figure()
    for g in res["summary"]["groups"].values():
        x = list(range(1, len(g["curve_mean"]) + 1))
        c = palette.get(g["sampler"], "#000000")
        rgba = f"rgba({int(c[1:3], 16)},{int(c[3:5], 16)},{int(c[5:7], 16)},0.12)"
        dash = "solid" if g["pruner"] == "none" else "dash"
        name = f"{g['sampler']} / {g['pruner']} pruner"
        fig.add_trace(go.Scatter(x=x + x[::-1], y=g["curve_max"] + g["curve_min"][::-1], fill="toself",
                                 fillcolor=rgba, line={"width": 0}, hoverinfo="skip", showlegend=False,
                                 legendgroup=name))
        fig.add_trace(go.Scatter(x=x, y=g["curve_mean"], mode="lines", name=name, legendgroup=name,
                                 line={"color": c, "dash": dash}))
    fig.add_hline(y=res["summary"]["target"], line={"dash": "dot", "color": "black"},
                  annotation_text="99 % of best")
    s = res["settings"]
    fig.update_layout(title=f"Held-out area of the best-so-far trial: {s['model']} {s['components']}, "
                            f"{s['n_classes']} classes ({res['scale']})",
                      xaxis_title="trial", yaxis_title="held-out area (mean accuracy over rates)",
                      template="plotly_white", width=900, height=520)
    return fig


def write_outputs(res: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, allow_nan=True))
    (out_dir / f"{stem}.md").write_text(markdown(res))
    if res["runs"]:
        figure(res).write_html(out_dir / f"{stem}.html", include_plotlyjs="cdn")


# -- driver ---------------------------------------------------------------------------------
# Settings that make two runs comparable: a stored run is reused only when all of these match.
RESUME_KEYS = ("model", "components", "n_classes", "trials", "n_startup", "n_ref", "val_search", "val_eval", "rates")


def finished_runs(path: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """The runs (and wall seconds) a previous, interrupted call stored at `path` with the same settings.

    Each study is written as soon as it ends, so a stopped measurement loses at most the study
    that was running; a file from other settings is never mixed in (it is overwritten instead).
    """
    if not path.exists():
        return [], 0.0
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return [], 0.0
    if old.get("format") != FORMAT or any(old.get("settings", {}).get(k) != settings[k] for k in RESUME_KEYS):
        return [], 0.0
    return list(old.get("runs", [])), float(old.get("wall_seconds", 0.0))


def run(*, model: str, components: str, n_classes: int, samplers: Sequence[str], pruners: Sequence[str],
        seeds: int, trials: int, n_startup: int, settings: Any, out_dir: Path, stem: str, command: str,
        scale: str, resume: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    from pxopt.device import configure_threads
    from pxopt.models import load_model

    configure_threads(settings.threads)
    started = time.perf_counter()
    loaded = load_model(R.model_spec(model), device=settings.device)
    if components not in R.COMPONENTS_BY_FAMILY[loaded.family]:
        raise ConfigError(f"{model} ({loaded.family}) has components {R.COMPONENTS_BY_FAMILY[loaded.family]}")
    setting = R.build_setting(model, components, n_classes, loaded, settings)
    search_pipe = R.pipeline_for(setting, setting.search_task, settings)
    held_pipe = R.pipeline_for(setting, R.eval_task(setting, 1, settings), settings)
    res: dict[str, Any] = {
        "format": FORMAT, "scale": scale, "command": command, "machine": R._machine(), "git_commit": R._git_commit(),
        "settings": {"model": model, "components": components, "n_classes": n_classes, "samplers": list(samplers),
                     "pruners": list(pruners), "seeds": seeds, "trials": trials, "n_startup": n_startup,
                     **{k: v for k, v in settings.to_dict().items() if k in ("n_ref", "val_search", "val_eval", "rates")}},
        "search_images": len(setting.search_task.validation), "held_out_images": len(setting.held_out),
        "skipped": {}, "runs": [], "wall_seconds": 0.0,
    }
    stored = out_dir / f"{stem}.json"
    done, earlier_wall = finished_runs(stored, res["settings"]) if resume else ([], 0.0)
    if done:
        log(f"resuming: {len(done)} finished {'study' if len(done) == 1 else 'studies'} from {stored}")
    res["runs"] = done
    done_keys = {(r["sampler"], r["pruner"], r["seed"]) for r in done}

    def wall() -> float:
        return round(earlier_wall + time.perf_counter() - started, 1)

    for sampler in samplers:
        reason = unavailable_reason(sampler)
        if reason:
            res["skipped"][sampler] = reason
            log(f"skip {sampler}: {reason}")
            continue
        for pruner in pruners:
            for seed in range(seeds):
                if (sampler, pruner, seed) in done_keys:
                    continue
                t0 = time.perf_counter()
                r = run_study(search_pipe, held_pipe, loaded.family, list(settings.rates), sampler=sampler,
                              pruner=pruner, seed=seed, trials=trials, n_startup=n_startup)
                res["runs"].append(r)
                res["summary"] = summarise(res["runs"])
                res["wall_seconds"] = wall()
                write_outputs(res, out_dir, stem)
                log(f"{sampler}/{pruner} seed {seed}: search {r['final_search']:.4f} held-out "
                    f"{r['final_held_out']:.4f} ({time.perf_counter() - t0:.0f} s)")
    res["summary"] = summarise(res["runs"])
    res["wall_seconds"] = wall()
    write_outputs(res, out_dir, stem)
    return res


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    model: str = typer.Option("resnet", help="resnet, vgg, vit or any built-in model name."),
    components: str = typer.Option("conv", help="conv (CNN); mlp or heads (ViT)."),
    n_classes: int = typer.Option(10, help="Classes of the task."),
    samplers: str = typer.Option(",".join(SAMPLERS), help="Comma-separated: tpe, gp, random, cmaes."),
    pruners: str = typer.Option(",".join(PRUNERS), help="Comma-separated: median, none."),
    seeds: int = typer.Option(3, help="Search seeds per sampler and pruner."),
    trials: int = typer.Option(100, help="Trials per study."),
    n_startup: int = typer.Option(8, help="Random start-up trials of tpe, gp and cmaes."),
    n_ref: int = typer.Option(10, help="Reference images per class."),
    val_search: int = typer.Option(200, help="Search validation images per task."),
    val_eval: int = typer.Option(300, help="Held-out validation images per task."),
    rate_step: float = typer.Option(0.05, help="Pruning-rate grid step (0 .. 1 - step)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny: 2 samplers x 2 pruners x 1 seed x 4 trials."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]."),
    out_dir: Path = typer.Option(R.OUT_DIR, help="Where JSON, table and figure go."),
    stem: str = typer.Option(None, help="File name stem (default search_efficiency_<model>_<components>_<n>cls)."),
    scale: str = typer.Option("full protocol", help="Label written at the top of the results."),
    render_only: Path = typer.Option(None, help="Re-summarise and re-write table/figure from this JSON."),
    resume: bool = typer.Option(True, help="Keep the finished studies of an interrupted run with the same "
                                           "settings (its JSON in --out-dir) and run only the rest."),
) -> None:
    """Best-so-far held-out area against trials, per sampler and pruner."""
    if render_only is not None:
        res = json.loads(render_only.read_text())
        res["summary"] = summarise(res["runs"])
        write_outputs(res, render_only.parent, render_only.stem)
        return
    if quick:
        samplers, pruners, seeds, trials, n_startup = "tpe,random", "median,none", 1, 4, 2
        n_ref, val_search, val_eval, rate_step, scale = 2, 20, 20, 0.25, "QUICK smoke run"
    rates = [round(rate_step * i, 4) for i in range(int(round(1 / rate_step)))]
    settings = dataclasses.replace(R.Settings(), n_ref=n_ref, val_search=val_search, val_eval=val_eval,
                                   rates=rates, threads=threads, device=device, models=(model,),
                                   tasks=(n_classes,)).validated()
    sampler_list, pruner_list = R._csv(samplers), R._csv(pruners)
    for name in sampler_list:
        if name not in SAMPLERS:
            raise ConfigError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    for name in pruner_list:
        if name not in PRUNERS:
            raise ConfigError(f"unknown pruner {name!r}; choose from {', '.join(PRUNERS)}")
    command = "python benchmarks/search_efficiency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run(model=model, components=components, n_classes=n_classes, samplers=sampler_list, pruners=pruner_list,
        seeds=seeds, trials=trials, n_startup=n_startup, settings=settings, out_dir=out_dir,
        stem=stem or f"{STEM}_{model}_{components}_{n_classes}cls", command=command.strip(), scale=scale,
        resume=resume)


if __name__ == "__main__":
    app()
