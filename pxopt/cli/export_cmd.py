"""`pxopt export` (trial -> JSON) and `pxopt prune` (JSON -> pruned model)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pxopt.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        study: str | None = typer.Option(None, "--study", help="Study name (default: the default study's)."),
        storage: str | None = typer.Option(None, "--storage", help="SQLite path or SQLAlchemy URL."),
        trial: int | None = typer.Option(None, "--trial", help="Trial number (default: the best)."),
        out: Path = typer.Option(Path("best.json"), "--out", help="Output JSON file."),
        out_dir: Path = typer.Option(Path("studies"), "--out-dir", help="Where studies live."),
    ) -> None:
        """Write the best (or a chosen) trial as pxopt.export/1 JSON."""
        from pxopt.cli._study import load_study
        from pxopt.export import export_trial, write_export

        st, _ = load_study(study, storage, out_dir)
        data = export_trial(st, trial)
        path = write_export(data, out)
        typer.echo(f"trial {data['trial']} (area {data['area']:.4f}, Top-PR {data['top_pr']:.2f}) -> {path}")

    @app.command("prune")
    def prune(
        config: Path = typer.Option(..., "--config", help="A pxopt.export/1 JSON file."),
        rate: float = typer.Option(..., "--rate", help="Pruning rate in [0, 1)."),
        out: Path = typer.Option(..., "--out", help="Where to save the pruned model (.pt)."),
        model: str | None = typer.Option(None, "--model", help="Model spec (default: the export's)."),
        data: str | None = typer.Option(None, "--data", help="Dataset (default: the export's)."),
        physical: bool = typer.Option(False, "--physical", help="Remove components physically (Torch-Pruning)."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda ..."),
    ) -> None:
        """Re-apply an exported configuration: curve point, MACs, latency, saved model."""
        import torch

        from pxopt.export import read_export
        from pxopt.pipeline import Pipeline
        from pxopt.search.spec import StudySpec

        exp = read_export(config)
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"--rate must be in [0, 1), got {rate}")
        task = exp["task"]
        spec = StudySpec(
            name="prune", model=model or exp["model"], data=data or task["data"], classes=task["classes"],
            n_ref=task["n_ref"], n_val=task["n_val"], task_seed=task["seed"], batch_size=task["batch_size"],
            components=exp["components"], rates=sorted({0.0, rate}), device=device or "auto",
            grouping=exp["grouping"],  # the rule groups the configuration was found with
        ).validated()
        pipeline = Pipeline.from_spec(spec)
        scores = pipeline.scores(exp["rules"])
        curve = pipeline.curve(scores, exp["ranking"])
        accuracy = curve.accuracies[-1]
        line = f"rate {rate:.2f}: accuracy {accuracy:.4f} (unpruned {curve.accuracies[0]:.4f})"
        stored = dict(zip(exp["curve"]["rates"], exp["curve"]["accuracies"], strict=True))
        match = next((v for r, v in stored.items() if abs(r - rate) < 1e-9), None)
        if match is not None:
            line += f"; stored curve point {match:.4f} ({'identical' if match == accuracy else 'DIFFERS'})"
        typer.echo(line)
        result = {"rate": rate, "accuracy": accuracy, "unpruned_accuracy": curve.accuracies[0],
                  "stored_accuracy": match, "config": str(config), "model": spec.model}
        out.parent.mkdir(parents=True, exist_ok=True)
        from pxopt.prune import physical_prune
        from pxopt.prune.physical import count, latency_ms

        pruned = pipeline.prune_set(scores, exp["ranking"], rate)
        example = pipeline.validation_batches()[0][0][:1]
        if physical:
            res = physical_prune(pipeline.model, pipeline.layer_map, pruned, example, kinds=pipeline.kinds,
                                 scores=scores.select(exp["ranking"]))
            result["physical_accuracy"] = pipeline.accuracy(res.model)
            result.update(res.summary())
            target = res.save(out.with_suffix(""))
            torch.save({"state_dict": res.model.state_dict(), "pxopt": result}, out)
            typer.echo(
                f"physically pruned: accuracy {result['physical_accuracy']:.4f}; params {res.params_before} -> "
                f"{res.params_after}; MACs {res.macs_before:.4g} -> {res.macs_after:.4g}; CPU latency "
                f"{res.latency.get('cpu_before_ms', float('nan')):.2f} -> {res.latency.get('cpu_after_ms', float('nan')):.2f} ms"
                f" (replayable: {target}/)"
            )
        else:
            macs, params = count(pipeline.model, example)
            _, layer_macs = pipeline.count_macs()
            saved = sum(layer_macs.get(k, 0.0) * int(v.sum()) for k, v in pruned.items())
            with pipeline.pruned(scores, exp["ranking"], rate):
                result["latency_ms"] = latency_ms(pipeline.model, example, min_run_time=0.2)
                result["pruned"] = {k: v.nonzero().flatten().tolist() for k, v in pruned.items()}
                result.update(macs=macs, params=params, macs_effective=macs - saved)
                torch.save({"state_dict": pipeline.model.state_dict(), "pxopt": result}, out)
            typer.echo(f"masked model (same shapes, {params} params): MACs {macs:.4g}, ~{macs - saved:.4g} "
                       f"without the masked components; CPU latency {result['latency_ms']:.2f} ms/image "
                       "(use --physical for a smaller, faster model)")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"saved {out} (+ {out.with_suffix('.json')})")

