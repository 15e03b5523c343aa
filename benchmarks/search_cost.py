"""Where a search trial's time goes: attribution (LRP) vs curve, and how many trials the
pruner stopped, on the offline default study.

    python benchmarks/search_cost.py                       # runs the default study afresh
    python benchmarks/search_cost.py --storage studies/default.db --study default  # summarise

Writes benchmarks/results/search_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from pxopt.search.meta import library_versions
from pxopt.search.workers import FINISHED

RESULTS = Path(__file__).resolve().parent / "results"


def run_default(spec_path: Path, trials: int | None, storage: Path) -> tuple[optuna.Study, float, float]:
    """Run the spec's study into a fresh storage; returns (study, load seconds, search seconds)."""
    from pxopt.pipeline import Pipeline
    from pxopt.search import SearchSpace, StudySpec, run_search

    spec = StudySpec.from_toml(spec_path).with_overrides(storage=str(storage), trials=trials)
    spec.timeout = None  # measure the whole budget
    t0 = time.perf_counter()
    pipeline = Pipeline.from_spec(spec)
    load_s = time.perf_counter() - t0
    space = SearchSpace.build(spec.space, family=pipeline.family)
    t1 = time.perf_counter()
    result = run_search(spec, pipeline.evaluate, space=space, storage_url=spec.storage_url(),
                        timings=pipeline.timings, study_attrs=pipeline.study_attrs())
    return result.study, load_s, time.perf_counter() - t1


def summarise(study: optuna.Study) -> dict:
    """Per-trial phase times (complete and pruned trials) and the pruner's share."""
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    rows = []
    for t in finished:
        tm = t.user_attrs.get("timings", {})
        rows.append({
            "trial": t.number, "state": t.state.name, "attribution_s": tm.get("attribution_s"),
            "curve_s": tm.get("curve_s"), "total_s": tm.get("total_s"), "cached": tm.get("cached"),
            "rates_evaluated": len(t.intermediate_values),
        })

    def stats(key: str, state: str | None = None) -> dict:
        vals = [r[key] for r in rows if r[key] is not None and (state is None or r["state"] == state)]
        if not vals:
            return {}
        return {"mean": statistics.fmean(vals), "median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    n_pruned = sum(r["state"] == "PRUNED" for r in rows)
    attr = [r["attribution_s"] for r in rows if r["attribution_s"] is not None]
    curve = [r["curve_s"] for r in rows if r["curve_s"] is not None]
    return {
        "study": study.study_name,
        "n_finished": len(rows),
        "n_complete": len(rows) - n_pruned,
        "n_pruned": n_pruned,
        "pruned_share": n_pruned / len(rows) if rows else 0.0,
        "n_failed": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        "cache_hits": sum(bool(r["cached"]) for r in rows),
        "attribution_s": stats("attribution_s"),
        "curve_s_complete": stats("curve_s", "COMPLETE"),
        "curve_s_pruned": stats("curve_s", "PRUNED"),
        "total_s": stats("total_s"),
        "attribution_share": sum(attr) / (sum(attr) + sum(curve)) if attr and curve else None,
        "best_area": study.best_value,
        "trials": rows,
    }


def to_markdown(s: dict, meta: dict) -> str:
    def fmt(d: dict) -> str:
        return f"{d['mean']:.3f} / {d['median']:.3f} / {d['min']:.3f} / {d['max']:.3f}" if d else "-"

    lines = [
        "# Search cost on the default study",
        "",
        f"Machine: {meta['machine']}; torch threads {meta['threads']}; device {meta['device']}.",
        f"Command: `{meta['command']}`; model+task load {meta.get('load_s', float('nan')):.1f} s, "
        f"search {meta.get('search_s', float('nan')):.1f} s.",
        "",
        f"Finished trials: {s['n_finished']} ({s['n_complete']} complete, {s['n_pruned']} stopped by the "
        f"pruner = **{100 * s['pruned_share']:.0f} %**), failed {s['n_failed']}, relevance cache hits {s['cache_hits']}.",
        f"Best area {s['best_area']:.4f}.",
        "",
        "| phase per trial (s) | mean / median / min / max |",
        "|---|---|",
        f"| attribution (LRP on the reference set) | {fmt(s['attribution_s'])} |",
        f"| curve, complete trials (20 rates) | {fmt(s['curve_s_complete'])} |",
        f"| curve, pruned trials (stopped early) | {fmt(s['curve_s_pruned'])} |",
        f"| total | {fmt(s['total_s'])} |",
        "",
        f"Attribution share of trial time: {100 * (s['attribution_share'] or 0):.0f} %.",
        "",
        meta.get("note", ""),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("studies/default.toml"))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--storage", type=Path, default=None, help="summarise this existing study instead")
    parser.add_argument("--study", default="default")
    parser.add_argument("--note", default="", help="context to record (machine load, wall time)")
    args = parser.parse_args()
    meta = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({len(__import__('os').sched_getaffinity(0))} cores)".strip(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "versions": library_versions(),
    }
    if args.storage is not None:
        from pxopt.search.study import open_storage

        study = optuna.load_study(study_name=args.study, storage=open_storage(str(args.storage)))
        meta["command"] = f"python benchmarks/search_cost.py --storage {args.storage} --study {args.study}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            study, meta["load_s"], meta["search_s"] = run_default(args.spec, args.trials, Path(tmp) / "bench.db")
            summary = summarise(study)
        meta["command"] = "python benchmarks/search_cost.py" + (f" --trials {args.trials}" if args.trials else "")
    if args.storage is not None:
        summary = summarise(study)
        meta["threads"] = study.user_attrs.get("pxopt.spec", {}).get("threads") or meta["threads"]
    meta["note"] = args.note
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_cost.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=2) + "\n")
    (RESULTS / "search_cost.md").write_text(to_markdown(summary, meta))
    print(to_markdown(summary, meta))


if __name__ == "__main__":
    main()
