"""Would re-scoring the best few trials on other reference sets have named better rules?

Issue #14 point 5 asks whether the best few trials should be re-evaluated before one is named
best. This answers it on a finished `benchmarks/results.py` run, at no new search cost: it
re-scores the `--top` best complete trials of that run's study and its all-epsilon trial (the
candidates of `pxopt.search.naming`, the step `pxopt search` now takes) on `--confirm` other reference
sets (seeds 101.., never the held-out reference seeds 1..S) with the search's own validation
images (the held-out images stay unseen until the end), names the best by the mean
(`objective_noise.name_best`), and evaluates the rules so named on the run's held-out
reference sets, paired with the LRP-epsilon and optimised areas the run recorded there.

    python benchmarks/reeval_best.py benchmarks/results/protocol_vit12_heads --top 5 --confirm 2
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from pxopt.search import naming

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import objective_noise  # noqa: E402  (benchmarks/objective_noise.py: naming the best trial)
import results  # noqa: E402  (benchmarks/results.py: settings, tasks, pipelines, paired statistics)

CONFIRM_SEED0 = 101  # confirmation reference sets: far from the held-out seeds 1..S


def confirm_task(setting: Any, seed: int, s: Any, validation: Any = None) -> Any:
    """Reference set `seed` with the search's own validation images (never the held-out ones), or
    with `validation` (`--fresh-validation`: as many test images that neither the search nor the
    held-out evaluation uses, from the end of that pool, so `rules_vs_ranking.py`'s fresh sets
    stay disjoint)."""
    t = results.make_task(results.DATASET, classes=setting.classes, n_ref=s.n_ref, n_val=1, seed=seed,
                          transform=setting.loaded.transform, num_model_classes=setting.loaded.num_classes)
    if validation is None:
        return dataclasses.replace(t, validation=setting.search_task.validation, n_val=setting.search_task.n_val)
    return dataclasses.replace(t, validation=validation, n_val=results.per_class(s.val_search, setting.n_classes))


def reeval_setting(key: str, srec: dict[str, Any], s: Any, *, top: int, confirm_seeds: list[int],
                   fresh: bool = False, log=print) -> dict[str, Any]:
    """Re-score one setting's best trials, name one, and evaluate it held out."""
    import optuna

    from pxopt.models import load_model

    loaded = load_model(srec["model_spec"], device=s.device)
    setting = results.build_setting(srec["model"], srec["components"], srec["n_classes"], loaded, s)
    study = optuna.load_study(study_name=None, storage=srec["search"]["storage"])
    candidates = naming.candidates(study, top)  # the trials `pxopt search` re-scores: the best and all-epsilon
    start = time.perf_counter()
    n_search = results.per_class(s.val_search, setting.n_classes)
    validations = (results.unused_validation(setting, s, n_search, len(confirm_seeds), from_end=True) if fresh
                   else [None] * len(confirm_seeds))
    pipes = [results.pipeline_for(setting, confirm_task(setting, seed, s, v), s)
             for seed, v in zip(confirm_seeds, validations, strict=True)]
    rescored: dict[int, float] = {}

    def area(pipe: Any, trial: Any) -> float:
        return float(pipe.curve(pipe.scores(trial.user_attrs["rules"]), trial.user_attrs["ranking"]).area)

    def reeval(i: int) -> float:
        t = candidates[i]
        rescored[t.number] = float(np.mean([area(p, t) for p in pipes]))
        log(f"[{key}] trial {t.number}: search {t.value:.4f}, confirmation {rescored[t.number]:.4f}")
        return rescored[t.number]

    index, _ = objective_noise.name_best([t.value for t in candidates], reeval, len(candidates))
    named = candidates[index]
    seeds = sorted(srec["per_seed"], key=int)
    eps = [srec["per_seed"][k]["lrp-epsilon"]["area"] for k in seeds]
    opt = [srec["per_seed"][k]["optimised"]["area"] for k in seeds]
    if named.number == srec["search"]["trial"]:  # the run evaluated these very rules on these very sets
        reeval_areas = list(opt)
    else:
        reeval_areas = [area(results.pipeline_for(setting, results.eval_task(setting, int(k), s), s), named)
                        for k in seeds]
    log(f"[{key}] named trial {named.number} (search named {srec['search']['trial']}): held out "
        f"{np.mean(reeval_areas):.4f} vs optimised {np.mean(opt):.4f}, LRP-epsilon {np.mean(eps):.4f}")
    return {
        "search_best_trial": srec["search"]["trial"],
        "candidates": [{"trial": t.number, "search_area": t.value, "confirmation_area": rescored[t.number],
                        "baseline": t.user_attrs.get("baseline")} for t in candidates],  # fmt: skip
        "named_trial": named.number,
        "named_rules": named.user_attrs["rules"],
        "held_out": {"re-evaluated": reeval_areas, "optimised": opt, "lrp-epsilon": eps},
        "re-evaluated − lrp-epsilon": results.paired_comparison(reeval_areas, eps),
        "optimised − lrp-epsilon": results.paired_comparison(opt, eps),
        "seconds": round(time.perf_counter() - start, 1),
    }


def load_run(run_dir: Path) -> tuple[dict[str, Any], Any]:
    """A finished `results.py` run's record and the `results.Settings` it ran with."""
    rec = json.loads((run_dir / "paper_comparison.json").read_text())
    used = dict(rec["settings_used"])
    used["out_dir"], used["work_dir"] = Path(used["out_dir"]), Path(used["work_dir"])
    for name in ("models", "tasks", "criteria", "components"):
        used[name] = tuple(used[name])
    return rec, results.Settings(**used)


def run(run_dir: Path, *, top: int, confirm: int, threads: int, fresh: bool = False, log=print) -> dict[str, Any]:
    from pxopt.device import configure_threads

    configure_threads(threads)
    rec, s = load_run(run_dir)
    confirm_seeds = list(range(CONFIRM_SEED0, CONFIRM_SEED0 + confirm))
    return {"run": str(run_dir), "top": top, "baselines": [naming.BASELINE], "confirm_seeds": confirm_seeds,
            "command": shlex.join(["python", "benchmarks/reeval_best.py", *sys.argv[1:]]),
            "validation": "unused test images" if fresh else "the search's",
            "settings": {key: reeval_setting(key, srec, s, top=top, confirm_seeds=confirm_seeds,
                                             fresh=fresh, log=log)
                         for key, srec in rec["settings"].items()}}  # fmt: skip


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Re-scoring the best trials on other reference sets before naming one (issue #14 point 5)",
        "",
        f"Run: `{out['run']}`. Command: `{out['command']}`.",
        "",
        f"The {out['top']} best complete trials of the run's search (and the enqueued "
        f"{', '.join(out.get('baselines', [])) or 'no'} baseline trial) are re-scored on reference sets "
        f"{out['confirm_seeds']} with "
        + ("as many test images that neither the search nor the held-out evaluation uses"
           if out.get("validation") == "unused test images" else "the search's own validation images")
        + "; the best mean is named, then "
        "evaluated on the run's held-out reference sets and images (paired with the areas the run recorded).",
        "",
    ]
    for key, r in out["settings"].items():
        d, o = r["re-evaluated − lrp-epsilon"], r["optimised − lrp-epsilon"]
        lines += [
            f"## {key}",
            "",
            "| trial | search-split area | confirmation area (mean) | |",
            "|---|---|---|---|",
            *[f"| {c['trial']} | {c['search_area']:.4f} | {c['confirmation_area']:.4f} | "
              f"{'named by the search' if c['trial'] == r['search_best_trial'] else ''}"
              f"{' / ' if c['trial'] == r['search_best_trial'] and c['trial'] == r['named_trial'] else ''}"
              f"{'named after re-scoring' if c['trial'] == r['named_trial'] else ''}"
              f"{' (' + c['baseline'] + ')' if c['baseline'] else ''} |" for c in r["candidates"]],
            "",
            "| held out (5 reference sets) | mean area | − LRP-epsilon [95 % CI], t-test p |",
            "|---|---|---|",
            f"| named after re-scoring (trial {r['named_trial']}) | {np.mean(r['held_out']['re-evaluated']):.4f} | "
            f"{d['mean_diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], p {d['t_p']:.3g} |",
            f"| named by the search (trial {r['search_best_trial']}) | {np.mean(r['held_out']['optimised']):.4f} | "
            f"{o['mean_diff']:+.4f} [{o['ci95'][0]:+.4f}, {o['ci95'][1]:+.4f}], p {o['t_p']:.3g} |",
            f"| LRP-epsilon | {np.mean(r['held_out']['lrp-epsilon']):.4f} | |",
            "",
            f"{r['seconds']:.0f} s.",
            "",
        ]
    return "\n".join(lines)


def main(
    run_dir: Path = typer.Argument(..., help="A benchmarks/results.py output folder (its JSON names the study)."),
    top: int = typer.Option(5, help="Best complete trials to re-score."),
    confirm: int = typer.Option(2, help="Other reference sets to re-score them on."),
    fresh: bool = typer.Option(False, "--fresh-validation",
                               help="Re-score on unused test images, not the search's validation images."),
    threads: int = typer.Option(1, help="torch CPU threads."),
) -> None:
    out = run(run_dir, top=top, confirm=confirm, threads=threads, fresh=fresh)
    stem = "reeval_best_fresh" if fresh else "reeval_best"
    (run_dir / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    (run_dir / f"{stem}.md").write_text(markdown(out) + "\n")
    typer.echo(f"wrote {run_dir / f'{stem}.md'}", err=True)


if __name__ == "__main__":
    typer.run(main)
