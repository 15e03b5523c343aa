"""`pxopt report`, `pxopt dashboard` and `pxopt baselines`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pxopt.cli._options import ALLOW_DOWNLOAD_HELP
from pxopt.criteria import CRITERIA, check_criteria  # torch-free: the names only
from pxopt.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        study: str | None = typer.Option(None, "--study", help="Study name (default: the default study's)."),
        storage: str | None = typer.Option(None, "--storage", help="SQLite path or SQLAlchemy URL."),
        out: Path | None = typer.Option(None, "--out", "-o", help="HTML file (default: studies/<study>-report.html)."),
        rate: float | None = typer.Option(None, "--rate", help="Rate of the per-layer figure (default: Top-PR)."),
        baselines: Path | None = typer.Option(None, "--baselines", help="JSON table from `pxopt baselines`."),
        out_dir: Path = typer.Option(Path("studies"), "--out-dir", help="Where studies live."),
        heatmaps: int = typer.Option(4, "--heatmaps", help="Reference images in the heatmap figure (0: none; "
                                                          "loads the study's model and data)."),
        device: str | None = typer.Option(None, "--device", help="Device of the heatmaps: auto, cpu, cuda ..."),
        allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    ) -> None:
        """Write one self-contained HTML report of a study (with its held-out figure)."""
        from pxopt.cli._study import load_study
        from pxopt.report import write_report
        from pxopt.report.heatmaps import try_study_heatmaps
        from pxopt.search.heldout import study_pipeline, summary_lines, try_heldout_summary
        from pxopt.search.naming import name_study_best

        st, _ = load_study(study, storage, out_dir)
        extra = None
        if baselines is not None:
            extra = _read_baselines(baselines)
        loaded: dict[str, object] = {}

        def load() -> object:  # at most once: naming, the held-out evaluation and the heatmaps share it
            if "pipeline" not in loaded:
                loaded["pipeline"] = study_pipeline(st, device, allow_download=allow_download)
            return loaded["pipeline"]

        try:
            named = name_study_best(st, load=load, log=lambda line: typer.echo(line, err=True))
            held = try_heldout_summary(st, named, load=load)
        except ValueError:  # no completed trial
            held = {"note": "no completed trial yet"}
        for line in summary_lines(held):
            typer.echo(line)
        maps, note = try_study_heatmaps(st, loaded.get("pipeline"), n_images=heatmaps, device=device,
                                        allow_download=allow_download)
        if note and heatmaps > 0:
            typer.echo(f"heatmaps {note}", err=True)
        path = write_report(st, out or out_dir / f"{st.study_name}-report.html", rate=rate, extra_curves=extra,
                            heatmaps=maps, heatmaps_note=note, heldout=held)
        typer.echo(f"report: {path}")

    @app.command("dashboard")
    def dashboard(
        study: str | None = typer.Option(None, "--study", help="Study name (default: the default study's)."),
        storage: str | None = typer.Option(None, "--storage", help="SQLite path or SQLAlchemy URL."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on (0.0.0.0: every interface)."),
        port: int = typer.Option(8080, "--port", help="Port to serve on."),
        attach_only: bool = typer.Option(False, "--attach-only", help="Attach figures and notes, don't serve."),
        out_dir: Path = typer.Option(Path("studies"), "--out-dir", help="Where studies live."),
    ) -> None:
        """Start optuna-dashboard on the study with pxopt's figures and notes attached."""
        from pxopt.cli._study import load_study
        from pxopt.report.dashboard import attach_figures, serve

        st, url = load_study(study, storage, out_dir)
        ids = attach_figures(st)
        typer.echo(f"attached {len(ids)} figures and a note to study {st.study_name!r}")
        if attach_only:
            return
        typer.echo(f"optuna-dashboard on http://{host}:{port} (Ctrl-C stops)")
        serve(st._storage, host=host, port=port)

    @app.command("baselines")
    def baselines_cmd(
        spec_path: Path | None = typer.Option(None, "--spec", help="Study spec TOML (default: studies/default.toml)."),
        model: str | None = typer.Option(None, "--model", help="Model spec, e.g. resnet50 or builtin:fmnist-resnet."),
        data: str | None = typer.Option(None, "--data", help="Dataset: fashion-mnist, mnist-5k or an image folder."),
        classes: int | None = typer.Option(None, "--classes", help="Number of classes (chosen by seed)."),
        n_ref: int | None = typer.Option(None, "--n-ref", help="Reference images per class."),
        n_val: int | None = typer.Option(None, "--n-val", help="Validation images per class."),
        components: str | None = typer.Option(
            None, "--components", help="conv, mlp, heads or auto (default: the model's: conv for CNNs, mlp for ViTs)."),
        rates: str | None = typer.Option(None, "--rates", help="'0,0.1,0.2' or 'start:stop:step'."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
        criteria: str = typer.Option(",".join(CRITERIA), "--criteria", help="Comma-separated criteria."),
        out_dir: Path = typer.Option(Path("studies"), "--out-dir", help="Output folder."),
        allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    ) -> None:
        """Curves of every baseline criterion on one model and task: a figure and a JSON table."""
        import plotly.graph_objects as go

        from pxopt.cli.search_cmd import load_spec, parse_rates, require_data
        from pxopt.evaluate import AREA_DEFINITION
        from pxopt.pipeline import Pipeline
        from pxopt.search.objective import curve_record

        names = check_criteria(criteria.split(","), what="--criteria")
        spec = load_spec(spec_path, model=model, data=data, classes=classes, n_ref=n_ref, n_val=n_val,
                         components=components, rates=parse_rates(rates), device=device, n_heldout=0)
        require_data(spec, data_given=data is not None, spec_path=spec_path)
        pipeline = Pipeline.from_spec(spec, allow_download=allow_download)
        from pxopt.report.figures import curve_styles

        table: dict[str, dict] = {}
        fig = go.Figure()
        for name, line in zip(names, curve_styles(len(names)), strict=True):
            # each criterion's own aggregation (LRP on ViTs: the reference's "token-abs")
            curve = curve_record(pipeline.curve(pipeline.criterion_scores(name)))
            table[name] = curve
            typer.echo(f"{name:15s} area {curve['area']:.4f}  Top-PR {curve['top_pr']:.2f}")
            fig.add_trace(go.Scatter(x=curve["rates"], y=curve["accuracies"], mode="lines+markers",
                                     name=f"{name}: area {curve['area']:.4f}", line=line))
        fig.update_layout(title=f"Baselines: {spec.model} on {spec.data}", xaxis_title="pruning rate",
                          yaxis_title="top-1 accuracy on the task", yaxis_range=[0, 1.02])
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{spec.name}-baselines"
        (out_dir / f"{stem}.json").write_text(
            json.dumps({"format": "pxopt.baselines/1", "area_definition": AREA_DEFINITION,
                        "model": spec.model, "task": pipeline.task.describe(),
                        "components": pipeline.components, "criteria": table}, indent=2) + "\n", encoding="utf-8")
        fig.write_html(out_dir / f"{stem}.html", include_plotlyjs=True)
        typer.echo(f"table: {out_dir / (stem + '.json')}\nfigure: {out_dir / (stem + '.html')}")


def _read_baselines(path: Path) -> dict[str, dict]:
    """Curves of a `pxopt baselines` JSON table, validated enough to plot."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        curves = data["criteria"]
        for name, curve in curves.items():
            if len(curve["rates"]) != len(curve["accuracies"]):
                raise ValueError(f"criterion {name}: rates and accuracies differ in length")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--baselines {str(path)!r} is not a pxopt baselines table: {exc}") from exc
    return {f"criterion {k}": v for k, v in curves.items()}
