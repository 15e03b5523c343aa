"""`pxopt export` (trial -> JSON) and `pxopt prune` (JSON -> pruned model)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pxopt.cli._options import ALLOW_DOWNLOAD_HELP
from pxopt.vocab import check_rate


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        study: str | None = typer.Option(None, "--study", help="Study name (default: the default study's)."),
        storage: str | None = typer.Option(None, "--storage", help="SQLite path or SQLAlchemy URL."),
        trial: int | None = typer.Option(None, "--trial", help="Trial number (default: the best)."),
        out: Path = typer.Option(Path("best.json"), "--out", "-o", help="Output JSON file."),
        out_dir: Path = typer.Option(Path("studies"), "--out-dir", help="Where studies live."),
        device: str | None = typer.Option(None, "--device", help="Device of a held-out evaluation or re-scoring not stored yet."),
        allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    ) -> None:
        """Write the best (or a chosen) trial as pxopt.export/1 JSON, with its held-out curve."""
        from pxopt.cli._study import load_study
        from pxopt.export import export_trial, pick_trial, write_export
        from pxopt.search.heldout import study_pipeline, summary_lines, try_heldout_summary
        from pxopt.search.naming import name_study_best

        st, _ = load_study(study, storage, out_dir)
        chosen = pick_trial(st, trial)
        loaded: dict[str, object] = {}

        def load() -> object:  # at most once: naming and the held-out evaluation share it
            if "pipeline" not in loaded:
                loaded["pipeline"] = study_pipeline(st, device, allow_download=allow_download)
            return loaded["pipeline"]

        if trial is None:  # the trial named best (re-scoring trials the study has not re-scored yet)
            chosen = name_study_best(st, load=load, log=lambda line: typer.echo(line, err=True))
        held = try_heldout_summary(st, chosen, load=load)
        data = export_trial(st, chosen.number, heldout=held)
        path = write_export(data, out)
        how = (", named best after re-scoring" if data.get("naming") else
               ", the search's best" if trial is None else "")
        typer.echo(f"trial {data['trial']} (area {data['area']:.4f}, Top-PR {data['top_pr']:.2f}{how}) -> {path}")
        for line in summary_lines(held):
            typer.echo(line)

    @app.command("prune")
    def prune(
        config: Path = typer.Option(..., "--config", help="A pxopt.export/1 JSON file (from `pxopt export`)."),
        rate: float = typer.Option(..., "--rate", help="Pruning rate in [0, 1)."),
        out: Path = typer.Option(..., "--out", "-o", help="The pruned model's state dict (.pt); beside it a summary (.json) "
                                 "and, with --physical, the torch.export program (.pt2)."),
        model: str | None = typer.Option(None, "--model", help="Model spec (default: the export's)."),
        data: str | None = typer.Option(None, "--data", help="Dataset (default: the export's)."),
        physical: bool = typer.Option(False, "--physical", help="Remove the pruned components (smaller, faster "
                                      "model; Torch-Pruning) instead of zeroing them."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads while timing latency "
                                           "(default: env PXOPT_THREADS, else 1)."),
        allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    ) -> None:
        """Re-apply an exported configuration: curve point, MACs, latency, saved model."""
        import torch

        from pxopt.export import read_export
        from pxopt.latency import compare_latency, latency_threads
        from pxopt.pipeline import Pipeline
        from pxopt.search.spec import StudySpec

        exp = read_export(config)
        rate = check_rate(rate, "--rate")
        n_threads = latency_threads(threads)
        task = exp["task"]
        spec = StudySpec(
            name="prune", model=model or exp["model"], data=data or task["data"], classes=task["classes"],
            n_ref=task["n_ref"], n_val=task["n_val"], task_seed=task["seed"], batch_size=task["batch_size"],
            components=exp["components"], rates=sorted({0.0, rate}), device=device or "auto",
            grouping=exp["grouping"],  # the rule groups the configuration was found with
            n_heldout=0,  # (the validation images are the same with or without a held-out split)
        ).validated()
        pipeline = Pipeline.from_spec(spec, allow_download=allow_download)
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
        from pxopt.prune import physical_prune
        from pxopt.prune.physical import ExportFailed, count, export_program

        pruned = pipeline.prune_set(scores, exp["ranking"], rate)
        batch = pipeline.validation_batches()[0][0]
        example = batch[:1]
        result["input_shape"] = ["N", *batch.shape[1:]]
        summary_path = out.with_suffix(".json")
        if physical:
            program_path = out.with_suffix(".pt2") if out.suffix != ".pt2" else out
            state_path = out if out.suffix != ".pt2" else out.with_suffix(".pt")
            res = physical_prune(pipeline.model, pipeline.layer_map, pruned, example, kinds=pipeline.kinds,
                                 scores=scores.select(exp["ranking"]), threads=n_threads)
            result["physical_accuracy"] = pipeline.accuracy(res.model)
            result.update(res.summary())
            try:
                result["program"] = export_program(res.model, batch[:2], program_path)
            except ExportFailed as exc:
                result["program"] = None
                result["program_error"] = str(exc)
            result["files"] = {"program": str(program_path) if result["program"] else None,
                               "state_dict": str(state_path), "summary": str(summary_path)}
            res.save_state(state_path, result)
            typer.echo(f"physically pruned: accuracy {result['physical_accuracy']:.4f}; params {res.params_before} -> "
                       f"{res.params_after}; MACs {res.macs_before:.4g} -> {res.macs_after:.4g}")
            typer.echo(_latency_line(res.latency, "cpu", ("unpruned", "pruned")))
            if "cuda" in res.latency:
                typer.echo(_latency_line(res.latency, "cuda", ("unpruned", "pruned")))
            summary_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            shape = ", ".join(str(v) for v in result["input_shape"])
            if result["program"]:
                typer.echo(f"pruned model: {program_path} (torch.export program; input: preprocessed images, "
                           f"shape ({shape}))\n  load it without pxopt: "
                           f"model = torch.export.load({str(program_path)!r}).module()")
            else:
                typer.echo(f"warning: no {program_path}: {result['program_error']}; rebuild the model from "
                           f"{state_path} with pxopt.prune.physical.load_pruned", err=True)
            typer.echo(f"state dict:   {state_path} (with the pruning history, for fine-tuning: "
                       "pxopt.prune.physical.load_pruned)")
            typer.echo(f"summary:      {summary_path}")
        else:
            macs, params = count(pipeline.model, example)
            _, layer_macs = pipeline.count_macs()
            saved = sum(layer_macs.get(k, 0.0) * int(v.sum()) for k, v in pruned.items())
            with pipeline.pruned(scores, exp["ranking"], rate):
                timing = compare_latency({"masked": pipeline.model}, example, threads=n_threads)["masked"]
                result["latency_ms"] = timing.median_ms
                result["latency"] = timing.to_dict()
                result["pruned"] = {k: v.nonzero().flatten().tolist() for k, v in pruned.items()}
                result.update(macs=macs, params=params, macs_effective=macs - saved)
                out.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"state_dict": pipeline.model.state_dict(), "pxopt": result}, out)
            typer.echo(f"masked model (same shapes, {params} params): MACs {macs:.4g}, ~{macs - saved:.4g} "
                       f"without the masked components; {example.device.type.upper()} latency {timing} per image "
                       f"({_timing_note(timing)}); "
                       "use --physical for a smaller, faster model")
            summary_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            typer.echo(f"saved {out} (state dict, the original architecture's shapes) + {summary_path}")


def _timing_note(t) -> str:
    threads = f"{t.threads} thread{'s' if t.threads > 1 else ''}"
    return f"median [quartiles] of {t.runs} runs, {threads}"


def _latency_line(latency: dict, dev: str, labels: tuple[str, str]) -> str:
    """'CPU latency per image, median [quartiles] of 15 interleaved runs, 1 thread: a -> b (x1.9)'."""
    from pxopt.latency import Latency

    before, after = (Latency(**latency[dev][k]) for k in ("before", "after"))
    speed = before.median_ms / after.median_ms if after.median_ms > 0 else float("nan")
    threads = f", {before.threads} thread{'s' if before.threads > 1 else ''}" if dev == "cpu" else ""
    line = (f"{dev.upper()} latency per image, median [quartiles] of {before.runs} interleaved runs{threads}: "
            f"{labels[0]} {before} -> {labels[1]} {after} (x{speed:.2f})")
    if any(t.q3_ms - t.q1_ms > 0.25 * t.median_ms for t in (before, after)):
        line += "; the spread is wide: a busy machine" + (", try --threads 1" if before.threads > 1 else "")
    return line
