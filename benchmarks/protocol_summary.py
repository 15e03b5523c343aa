"""One table and one figure over every protocol run: does the search beat LRP-epsilon, and where?

`benchmarks/results.py` writes one `paper_comparison.json` per run (a model, some tasks and
components). This gathers the runs under `benchmarks/results/protocol_*/` into
`protocol_summary.{md,json,html}`: per setting the held-out area of the optimised rules and
of LRP-epsilon, their paired difference over the reference seeds (95 % interval, t-test
p), the strongest other criterion, Top-PR, the search split's area of the rules named best
and where they came from (a searched trial or an enqueued baseline), and the budget.
The figure is a forest plot of the paired differences.

    python benchmarks/protocol_summary.py              # all protocol_* runs
    python benchmarks/protocol_summary.py --min-trials 100   # the paper's budget only
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results as R  # noqa: E402  (benchmarks/results.py: its component labels and model aliases)

RESULTS = R.OUT_DIR
STEM = "protocol_summary"
NOT_CRITERIA = {"optimised", "lrp-epsilon", "random"}


def collect(results_dir: Path, min_trials: int = 0) -> list[dict[str, Any]]:
    """One row per setting of every complete-enough protocol run, in a stable order."""
    rows = []
    for path in sorted(results_dir.glob("protocol_*/paper_comparison.json")):
        run = json.loads(path.read_text())
        used = run["settings_used"]
        if int(used["trials"]) < min_trials:
            continue
        for key, rec in run["settings"].items():
            if not rec.get("summary") or "optimised" not in rec["summary"]:
                continue  # a setting that failed or has no evaluated seed yet
            rows.append(_row(path, run, key, rec))
    # the paper-scale models first, then by model, components, task and budget
    return sorted(rows, key=lambda r: (r["model"] in R.MODEL_ALIASES, r["model"], r["components"], -r["n_classes"],
                                       -r["trial_budget"], r["source"]))


def _row(path: Path, run: dict[str, Any], key: str, rec: dict[str, Any]) -> dict[str, Any]:
    summary, search, used = rec["summary"], rec["search"], run["settings_used"]
    others = {k: v for k, v in summary.items() if k not in NOT_CRITERIA}
    strongest = max(others, key=lambda k: others[k]["area_mean"]) if others else None
    paired = rec.get("paired") or {}
    area = paired.get("area") or {}
    top_pr = paired.get("top_pr") or {}
    return {
        "setting": key, "model": rec["model"], "components": rec["components"], "n_classes": rec["n_classes"],
        "source": str(path.relative_to(path.parents[1])), "scale": run.get("scale"),
        "trained": trained_label(rec.get("model_trained"), run.get("scale")),
        "complete": bool(rec.get("complete")), "seeds_planned": used["seeds"],
        "seeds": summary["optimised"]["n_seeds"], "trials": search["n_trials"], "trial_budget": used["trials"],
        "patience": used.get("patience"),
        "n_complete": search["n_complete"], "n_pruned": search["n_pruned"], "stopped_early": search["stopped_early"],
        "rates": [used["rates"][0], used["rates"][-1], len(used["rates"])],
        "n_ref": used["n_ref"], "val_search": used["val_search"], "val_eval": used["val_eval"],
        "complete_areas": search.get("complete_areas"),
        "all_epsilon_search_area": (search.get("baseline_areas") or {}).get("all-epsilon"),
        "best_trial": search["trial"], "best_baseline": search.get("baseline"), "search_area": search["search_area"],
        "optimised": summary["optimised"]["area_mean"], "optimised_se": summary["optimised"]["area_se"],
        "epsilon": summary["lrp-epsilon"]["area_mean"], "epsilon_se": summary["lrp-epsilon"]["area_se"],
        "random": summary.get("random", {}).get("area_mean"),
        "strongest_other": strongest, "strongest_other_area": others[strongest]["area_mean"] if strongest else None,
        "diff": area.get("mean_diff"), "diff_ci95": area.get("ci95"), "diff_t_p": area.get("t_p"),
        "n_positive": area.get("n_positive"),
        "top_pr_optimised": summary["optimised"]["top_pr_mean"], "top_pr_epsilon": summary["lrp-epsilon"]["top_pr_mean"],
        "top_pr_diff_ci95": top_pr.get("ci95"),
        **_rescored(path.parent, key, rec),
    }


def _rescored(run_dir: Path, key: str, rec: dict[str, Any]) -> dict[str, Any]:
    """The run's `reeval_best.py` result for this setting (the trial named after re-scoring the
    best few), if one was made from this very run: its held-out areas of the search's pick
    must be the run's. The re-scoring on other reference *and* validation images
    (`reeval_best_fresh.json`, as `pxopt search` names it now) comes first, then the one on
    other reference sets alone (`reeval_best.json`)."""
    seeds = sorted(rec.get("per_seed") or {}, key=int)
    ours = [rec["per_seed"][k]["optimised"]["area"] for k in seeds]
    for name, images in (("reeval_best_fresh.json", "reference and validation"), ("reeval_best.json", "reference")):
        path = run_dir / name
        if not path.is_file():
            continue
        found = json.loads(path.read_text())["settings"].get(key)
        if not found or found["search_best_trial"] != rec["search"]["trial"] or found["held_out"]["optimised"] != ours:
            continue  # (a re-scoring of an earlier run in this folder)
        named = next(c for c in found["candidates"] if c["trial"] == found["named_trial"])
        diff = found["re-evaluated − lrp-epsilon"]
        return {"rescored_trial": found["named_trial"], "rescored_baseline": named.get("baseline"),
                "rescored_diff": diff["mean_diff"], "rescored_ci95": diff["ci95"], "rescored_t_p": diff["t_p"],
                "rescored_images": images}
    return {}


def _finite(x: float | None) -> bool:
    return x is not None and x == x  # NaN (one seed) is not a number to print


def _fmt_p(p: float | None) -> str:
    if not _finite(p):
        return "-"
    return f"{p:.1g}" if p < 0.01 else f"{p:.2f}"


def _pm(se: float | None) -> str:
    return f"± {se:.3f}" if _finite(se) else ""


def _diff_cell(r: dict[str, Any]) -> str:
    """The paired difference with its interval and p; the bare difference where one seed gives none."""
    if verdict(r) != "-":
        lo, hi = r["diff_ci95"]
        return f"{r['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], p {_fmt_p(r['diff_t_p'])}"
    return "-" if r["diff"] is None else f"{r['diff']:+.3f}"


def _rescored_cell(r: dict[str, Any]) -> str:
    """'+0.002 [-0.000, +0.004] (trial 89)', or '-' where no re-scoring was made of the run."""
    if r.get("rescored_diff") is None:
        return "-"
    who = f"`{r['rescored_baseline']}`" if r["rescored_baseline"] else f"trial {r['rescored_trial']}"
    if r.get("rescored_images") == "reference":
        who += ", ref. only"
    lo, hi = r["rescored_ci95"]
    if not (_finite(lo) and _finite(hi)) or lo == hi:  # the same areas on every seed (LRP-epsilon itself)
        return f"{r['rescored_diff']:+.3f} ({who})"
    return f"{r['rescored_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({who})"


def verdict(row: dict[str, Any]) -> str:
    """Win / loss only where the paired 95 % interval excludes zero; else a tie."""
    ci = row["diff_ci95"]
    if ci is None or not all(_finite(v) for v in ci):
        return "-"
    if ci[0] > 0:
        return "**wins**"
    if ci[1] < 0:
        return "**loses**"
    return "tie"


def trained_label(trained: dict[str, Any] | None, scale: str | None) -> str:
    """Which training of the model a run measured: recorded since results.py keeps it, else the
    model's description in a paper-protocol run's scale label ('..., fmnist-vit12 (…), ...')."""
    if trained:
        return f"{trained['epochs']} ep, {trained['step_dtype']} steps, {trained['test_accuracy']:.2%}"
    match = re.match(r"PAPER PROTOCOL \(issue #14\), \S+ \(([^()]*)\)", scale or "")
    return match.group(1) if match else ""


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | budget | optimised | LRP-ε | optimised − LRP-ε [95 % CI], t-test p | verdict | strongest other "
            "| Top-PR opt / ε | rules named best (search-split area) | named after re-scoring − LRP-ε "
            "| search trials (complete / pruned) | seeds | source |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        named = f"baseline `{r['best_baseline']}`" if r["best_baseline"] else f"trial {r['best_trial']}"
        named += f" ({r['search_area']:.3f}"
        if r["complete_areas"] and r["all_epsilon_search_area"] is not None:  # recorded since this script exists
            named += (f"; complete trials {r['complete_areas']['min']:.3f}-{r['complete_areas']['max']:.3f}, "
                      f"all-ε {r['all_epsilon_search_area']:.3f}")
        named += ")"
        stop = _stop_note(r)
        lo, hi, n_rates = r["rates"]
        budget = (f"{r['trial_budget']} trials, {r['n_ref']} ref/class, {r['val_search']} + {r['val_eval']} images, "
                  f"rates {lo:g}..{hi:g} ({n_rates})")
        setting = f"{r['model']} {R.COMPONENT_LABELS[r['components']]}, {r['n_classes']} classes"
        if r.get("trained"):
            setting += f" [{r['trained']}]"
        if r["seeds"] < r["seeds_planned"] or not r["complete"]:
            setting += f" (incomplete: {r['seeds']} of {r['seeds_planned']} seeds)"
        other = "-" if r["strongest_other"] is None else f"{r['strongest_other']} {r['strongest_other_area']:.3f}"
        lines.append(
            f"| {setting} | {budget} "
            f"| {r['optimised']:.3f} {_pm(r['optimised_se'])} | {r['epsilon']:.3f} {_pm(r['epsilon_se'])} "
            f"| {_diff_cell(r)} | {verdict(r)} "
            f"| {other} "
            f"| {r['top_pr_optimised']:.0%} / {r['top_pr_epsilon']:.0%} "
            f"| {named} "
            f"| {_rescored_cell(r)} "
            f"| {r['trials']} ({r['n_complete']} / {r['n_pruned']}{stop}) "
            f"| {r['seeds']} | [{r['source']}]({r['source'].replace('.json', '.md')}) |"
        )
    return "\n".join(lines)


def _stop_note(r: dict[str, Any]) -> str:
    """Early stop as it happened: before 1046d6f the search recorded the patience stop but ran on."""
    if not r["stopped_early"]:
        return ""
    if r["trials"] < r["trial_budget"]:
        return ", stopped early"
    return ", patience not honoured*"


def forest(rows: list[dict[str, Any]]):
    """Paired difference optimised − LRP-epsilon with its 95 % interval, one line per setting."""
    import plotly.graph_objects as go

    shown = [r for r in rows if verdict(r) != "-"]
    labels = [f"{r['model']} {R.COMPONENT_LABELS[r['components']]}, {r['n_classes']} cl. (n={r['seeds']})" for r in shown]
    fig = go.Figure(go.Scatter(
        x=[r["diff"] for r in shown], y=labels, mode="markers",
        error_x={"type": "data", "symmetric": False,
                 "array": [r["diff_ci95"][1] - r["diff"] for r in shown],
                 "arrayminus": [r["diff"] - r["diff_ci95"][0] for r in shown]},
        marker={"size": 10, "color": ["#2a9d8f" if verdict(r) == "**wins**" else "#e76f51" if verdict(r) == "**loses**"
                                      else "#8d99ae" for r in shown]},
        hovertemplate="%{y}<br>difference %{x:+.4f}<extra></extra>",
    ))
    again = [r for r in shown if r.get("rescored_diff") is not None]
    if again:  # the trial named after re-scoring the best few (benchmarks/reeval_best.py), where measured
        fig.add_trace(go.Scatter(
            x=[r["rescored_diff"] for r in again],
            y=[labels[shown.index(r)] for r in again], mode="markers", name="named after re-scoring",
            marker={"size": 11, "symbol": "diamond-open", "color": "black"},
            hovertemplate="%{y}<br>named after re-scoring: %{x:+.4f}<extra></extra>"))
        fig.data[0].name = "named by the search"
    fig.add_vline(x=0, line_dash="dash", line_color="black")
    fig.update_layout(title="Held-out area: optimised LRP − LRP-epsilon (paired over reference seeds, 95 % CI)",
                      xaxis_title="difference in area under the accuracy-vs-pruning-rate curve",
                      height=160 + 45 * len(shown), width=900, margin={"l": 320})
    fig.update_yaxes(autorange="reversed")
    return fig


def write(rows: list[dict[str, Any]], out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{STEM}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    md = [
        "# The paper's protocol: optimised LRP against LRP-epsilon, every run",
        "",
        "Held-out area (mean top-1 accuracy over the run's rate grid) over the reference seeds, mean ± SE. "
        "'verdict': a win or loss only where the paired 95 % interval excludes 0. 'strongest other': the best "
        "of the remaining criteria (random excluded). 'named after re-scoring': the held-out difference of "
        "the trial named after re-scoring the 5 best and all-epsilon on 2 other draws of reference and "
        "validation images, as `pxopt search` names it (`benchmarks/reeval_best.py --fresh-validation`, where "
        "it was run on the run's study; else on other reference sets alone, marked 'ref. only'). Each run's own "
        "file has every criterion, its scale and its command.",
        "",
        table(rows),
        "",
        "\\* The search reached its patience (trials without a new best) but ran on to its budget: "
        "before commit 1046d6f a `study.stop()` from a callback was lost between pxopt's one-trial "
        "`optimize` calls. The rules named best are still the best of all trials run.",
        "",
        f"Command: `{command}`",
        "",
    ]
    (out_dir / f"{STEM}.md").write_text("\n".join(md))
    if rows:
        forest(rows).write_html(out_dir / f"{STEM}.html", include_plotlyjs="cdn")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    results_dir: Path = typer.Option(RESULTS, help="Where the protocol_* run folders are."),
    out_dir: Path = typer.Option(RESULTS, help="Where the summary goes."),
    min_trials: int = typer.Option(0, help="Only runs whose search budget was at least this many trials."),
) -> None:
    """Gather every protocol run into one table and a forest plot."""
    rows = collect(results_dir, min_trials)
    if not rows:
        print(f"error: no protocol run under {results_dir} (protocol_*/paper_comparison.json)", file=sys.stderr)
        raise typer.Exit(1)
    write(rows, out_dir, "python benchmarks/protocol_summary.py" + (f" --min-trials {min_trials}" if min_trials else ""))
    print(f"{len(rows)} settings -> {out_dir / STEM}.{{md,json,html}}")


if __name__ == "__main__":
    app()
