"""Is it the rules or the ranking? Crosses a finished run's best rules and the all-epsilon rules
with each ranking the search could pick, on the search split and held out.

A ViT search chooses the ranking (`token-abs` or `signed`) beside the rules. Where its pick
loses to LRP-epsilon held out, this separates the two: the same four curves (best rules or
all-epsilon, under either ranking) on the search split and on each of the run's held-out
reference sets, paired with the all-epsilon / token-abs baseline. `--fresh N` adds N
validation sets of the held-out size drawn from test images that neither the search nor the
held-out evaluation used (each with its own reference set, seeds 201..): whether a ranking's
lead or loss belongs to one set of validation images.

    python benchmarks/rules_vs_ranking.py benchmarks/results/protocol_vit12_mlp_3cls --fresh 3
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import reeval_best  # noqa: E402  (loading a finished run)
import results  # noqa: E402  (settings, tasks, pipelines, paired statistics)

FRESH_SEED0 = 201  # reference sets of the fresh validation sets: none of the run's seeds


def fresh_tasks(setting: Any, s: Any, n_sets: int) -> dict[str, Any]:
    """`n_sets` validation sets of the held-out size from the test images neither the search nor
    the held-out evaluation used (`results.unused_validation`, from the front), each with
    reference set 201+i."""
    import dataclasses

    if n_sets < 1:
        return {}
    n_eval = results.per_class(s.val_eval, setting.n_classes)
    sets = results.unused_validation(setting, s, n_eval, n_sets)
    return {f"fresh {i + 1}": dataclasses.replace(results.eval_task(setting, FRESH_SEED0 + i, s), validation=v)
            for i, v in enumerate(sets)}


def crossed(srec: dict[str, Any], s: Any, fresh: int = 0, held_out: bool = True, log=print) -> dict[str, Any]:
    """Areas of {best, all-epsilon rules} x {each ranking} on the search split and held out."""
    import optuna

    from pxopt.models import load_model
    from pxopt.search import naming
    from pxopt.vocab import DEFAULT_RANKINGS

    loaded = load_model(srec["model_spec"], device=s.device)
    setting = results.build_setting(srec["model"], srec["components"], srec["n_classes"], loaded, s)
    study = optuna.load_study(study_name=None, storage=srec["search"]["storage"])
    base = next(t for t in study.trials if t.user_attrs.get("baseline") == naming.BASELINE)
    rules = {"best": srec["search"]["rules"], naming.BASELINE: base.user_attrs["rules"]}
    rankings = DEFAULT_RANKINGS[loaded.family]
    seeds = sorted(srec["per_seed"], key=int)
    splits = {"search split": setting.search_task,
              **{f"held out {k}": results.eval_task(setting, int(k), s) for k in (seeds if held_out else [])},
              **fresh_tasks(setting, s, fresh)}
    areas: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    for split, task in splits.items():
        pipe = results.pipeline_for(setting, task, s)
        for name, r in rules.items():
            scores = pipe.scores(r)
            for ranking in rankings:
                areas.setdefault(f"{name} / {ranking}", {})[split] = float(pipe.curve(scores, ranking).area)
        log(f"  {split}: " + ", ".join(f"{k} {v[split]:.4f}" for k, v in areas.items()))
    reference = f"{naming.BASELINE} / {rankings[0]}"  # LRP-epsilon as the baselines rank it

    def paired(prefix: str, at_least: int) -> dict[str, Any]:
        """Each combination against `reference`, paired over the splits whose name starts with `prefix`."""
        on = [k for k in splits if k.startswith(prefix)]
        if len(on) < at_least:
            return {}
        return {key: results.paired_comparison([v[k] for k in on], [areas[reference][k] for k in on])
                for key, v in areas.items() if key != reference}

    return {"search_ranking": srec["search"]["ranking"], "best_rules": rules["best"], "rankings": list(rankings),
            "areas": areas, "reference": reference, f"− {reference} (held out)": paired("held out", 1),
            "fresh (unused validation images)": paired("fresh", 2),
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(out: dict[str, Any]) -> str:
    lines = ["# Rules or ranking? (the search's best rules and all-epsilon under each ranking)", "",
             f"Run: `{out['run']}`. Command: `{out['command']}`.", ""]
    for key, r in out["settings"].items():
        ref = r["reference"]
        paired = r[f"− {ref} (held out)"]
        fresh = r.get("fresh (unused validation images)") or {}
        splits = next(iter(r["areas"].values()))
        n_held = sum(k.startswith("held out") for k in splits)
        n_fresh = sum(k.startswith("fresh") for k in splits)
        head = (f"| rules / ranking | search split | held out (mean of {n_held} reference sets) | "
                f"− {ref}, held out [95 % CI], t-test p |" if n_held else "| rules / ranking | search split | held out | |")
        if fresh:
            head += f" fresh validation images (mean of {n_fresh} sets) | − {ref}, fresh [95 % CI], t-test p |"
        lines += [f"## {key} (the search picked ranking `{r['search_ranking']}`)", "", head,
                  "|---|---|---|---|" + ("---|---|" if fresh else "")]

        def diff(d: dict[str, Any] | None) -> str:
            return f"{d['mean_diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], p {d['t_p']:.3g}" if d else "(reference)"

        for name, v in r["areas"].items():
            held = [a for split, a in v.items() if split.startswith("held out")]
            row = (f"| {name} | {v['search split']:.4f} | {np.mean(held):.4f} | {diff(paired.get(name))} |"
                   if held else f"| {name} | {v['search split']:.4f} | (not run) | |")
            if fresh:
                row += f" {np.mean([a for k, a in v.items() if k.startswith('fresh')]):.4f} | {diff(fresh.get(name))} |"
            lines.append(row)
        lines += ["", f"{r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(
    run_dir: Path = typer.Argument(..., help="A benchmarks/results.py output folder (its JSON names the study)."),
    fresh: int = typer.Option(0, help="Validation sets from test images the run never used."),
    held_out: bool = typer.Option(True, help="Also the run's held-out reference sets (--no-held-out: fresh sets only)."),
    threads: int = typer.Option(1, help="torch CPU threads."),
) -> None:
    from pxopt.device import configure_threads

    configure_threads(threads)
    rec, s = reeval_best.load_run(run_dir)
    out = {"run": str(run_dir), "command": shlex.join(["python", "benchmarks/rules_vs_ranking.py", *sys.argv[1:]]),
           "settings": {key: crossed(srec, s, fresh, held_out) for key, srec in rec["settings"].items()}}
    (run_dir / "rules_vs_ranking.json").write_text(json.dumps(out, indent=1) + "\n")
    (run_dir / "rules_vs_ranking.md").write_text(markdown(out) + "\n")
    typer.echo(f"wrote {run_dir / 'rules_vs_ranking.md'}", err=True)


if __name__ == "__main__":
    typer.run(main)
