"""`pxopt search`: run or resume a study (no arguments: the offline default study)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pxopt.cli._options import ALLOW_DOWNLOAD_HELP
from pxopt.errors import ConfigError

console = Console(stderr=True)
DEFAULT_SPEC = "default.toml"


def find_default_spec() -> Path | None:
    """`studies/default.toml` in the working directory, else next to the package sources."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / "studies" / DEFAULT_SPEC
        if candidate.is_file():
            return candidate
    return None


def parse_rates(text: str | None) -> list[float] | None:
    """'0,0.1,0.2' or 'start:stop:step' (stop excluded) -> list of rates."""
    if text is None:
        return None
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError("step must be > 0")
            n = int(round((stop - start) / step))
            return [round(start + i * step, 10) for i in range(n) if start + i * step < stop - 1e-12]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--rates: expected '0,0.1,...' or 'start:stop:step', got {text!r}") from exc


def load_spec(
    spec_path: Path | None,
    **overrides: object,
):
    """The spec file (else studies/default.toml) with CLI overrides applied.

    Without `--spec`, every setting of the default study that the user did not override
    still applies (threads, timeout, sampler, ...). Settings tied to the default model or
    data are dropped when those change: another model gets its own study name and the
    components its layer map chooses ("auto"); other data gets all its classes.
    """
    from pxopt.search.spec import AUTO_COMPONENTS, StudySpec

    if spec_path is not None:
        return StudySpec.from_toml(spec_path).with_overrides(**overrides)
    default = find_default_spec()
    spec = StudySpec.from_toml(default) if default is not None else StudySpec()
    model, data = overrides.get("model"), overrides.get("data")
    if model is not None and model != spec.model:
        if overrides.get("name") is None:
            overrides["name"] = str(model).replace(":", "-").replace("/", "-").replace("@", "-")
        if overrides.get("components") is None:
            overrides["components"] = AUTO_COMPONENTS
    if data is not None and data != spec.data and overrides.get("classes") is None:
        spec = dataclasses.replace(spec, classes=None)
    return spec.with_overrides(**overrides)


def is_imagenet_model(model: str) -> bool:
    """A torchvision or timm model (or a checkpoint of one): ImageNet classes and preprocessing.

    An unknown model name or weights tag is reported first (`ModelSpecError`).
    """
    from pxopt.models.spec import parse_spec

    parsed = parse_spec(model)
    if parsed.kind == "torchvision":
        from pxopt.models.tv import weights_enum

        weights_enum(parsed.name, parsed.tag)
    elif parsed.kind == "timm":
        from pxopt.models.timm_backend import pretrained_cfg

        pretrained_cfg(parsed.name, parsed.tag)
    elif parsed.kind == "file" and parsed.arch is not None:
        parsed = parsed.arch
    return parsed.kind in ("torchvision", "timm", "package")


def require_data(spec, *, data_given: bool, spec_path: Path | None) -> None:
    """An ImageNet model needs ImageNet data: refuse to pair it with the default Fashion-MNIST."""
    if spec_path is None and not data_given and is_imagenet_model(spec.model):
        raise ConfigError(
            f"{spec.model} is an ImageNet model: pass --data /path/to/imagenet (a folder of WNID class "
            "folders) and --classes N or --class-names a,b,c for a class subset"
        )


@contextmanager
def optuna_logging(verbose: bool) -> Iterator[None]:
    """Optuna's log through the rich console (above the progress bar), INFO only if verbose.

    Optuna's own handler writes to the terminal line the bar is drawn on; by default only
    its warnings (a failed trial and why) are worth a line.
    """
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("optuna")
    previous = optuna.logging.get_verbosity()
    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    if not verbose:
        handler.addFilter(_no_traceback)  # a failed trial's reason is its fail_reason, not a traceback
    optuna.logging.disable_default_handler()
    logger.addHandler(handler)
    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        optuna.logging.set_verbosity(previous)
        optuna.logging.enable_default_handler()


def _no_traceback(record: object) -> bool:
    """Keep the log line, drop the traceback attached to it."""
    record.exc_info = None  # type: ignore[attr-defined]
    record.exc_text = None  # type: ignore[attr-defined]
    return True


def _log(message: str) -> None:
    """Worker messages go through the console, so they print above the progress bar."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _name_best(study: Any, spec: Any, pipeline: Any) -> Any:
    """Re-score the best trials on other draws of the task's images and name one (`pxopt.search.naming`),
    with a progress bar; prints the re-scored table. ValueError: no completed trial."""
    from pxopt.search.naming import BASELINE, name_best, named_trial, naming_error, naming_lines

    study.best_trial  # noqa: B018  (ValueError before any bar is drawn)
    what = f"re-scoring the {spec.rescore_top} best trials and {BASELINE} on {spec.rescore_sets} other image sets"
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task(what, total=None, visible=spec.rescore_top > 0 and spec.rescore_sets > 0)
        try:
            record = name_best(study, top=spec.rescore_top, sets=spec.rescore_sets, pipeline=pipeline,
                               progress=lambda done, total: progress.update(bar, completed=done, total=total))
        except Exception as exc:
            reason = naming_error(exc)
            if reason is None:
                raise
            console.print(f"re-scoring failed ({reason}): the search's best stands", markup=False, highlight=False)
            return named_trial(study)
    for line in naming_lines(record):
        typer.echo(line)
    return named_trial(study)


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search(
        spec_path: Path | None = typer.Option(None, "--spec", help="Study spec TOML (default: studies/default.toml)."),
        model: str | None = typer.Option(None, "--model", help="Model spec, e.g. resnet50 or builtin:fmnist-resnet."),
        data: str | None = typer.Option(None, "--data", help="Dataset: fashion-mnist, mnist-5k or an image folder."),
        classes: int | None = typer.Option(None, "--classes", help="Number of classes (chosen by seed)."),
        class_names: str | None = typer.Option(None, "--class-names", help="Comma-separated class names."),
        n_ref: int | None = typer.Option(None, "--n-ref", help="Reference images per class."),
        n_val: int | None = typer.Option(None, "--n-val", help="Validation images per class."),
        n_heldout: int | None = typer.Option(
            None, "--n-heldout", help="Held-out images per task the search never sees, evaluated at the end "
            "(default 300, fewer if the data has fewer; 0: none). A resumed study keeps its own."),
        trials: int | None = typer.Option(None, "--trials", help="Finished trials the study should hold."),
        rescore_top: int | None = typer.Option(
            None, "--rescore-top", help="Before naming the best: re-score this many best trials and all-epsilon on "
            "other reference and validation images, name the best mean (default 5; 0: name the search's best)."),
        rescore_sets: int | None = typer.Option(
            None, "--rescore-sets", help="Other draws of reference and validation images the best trials are re-scored on (default 2)."),
        timeout: float | None = typer.Option(None, "--timeout", help="Stop starting trials after S seconds."),
        storage: str | None = typer.Option(None, "--storage", help="SQLite path or SQLAlchemy URL."),
        study: str | None = typer.Option(None, "--study", help="Study name (default: the spec's)."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
        seed: int | None = typer.Option(None, "--seed", help="Sampler seed."),
        components: str | None = typer.Option(
            None, "--components", help="conv, mlp, heads or auto (default: the model's: conv for CNNs, mlp for ViTs)."
        ),
        rates: str | None = typer.Option(None, "--rates", help="'0,0.1,0.2' or 'start:stop:step'."),
        out_dir: Path = typer.Option(Path("studies"), "--out-dir", help="Where the report and best config go."),
        report: bool = typer.Option(True, "--report/--no-report", help="Write the HTML report at the end."),
        workers: int = typer.Option(1, "--workers", help="Worker processes on this study (one GPU each)."),
        allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print Optuna's line per trial."),
    ) -> None:
        """Search LRP rule configurations that prune best; the same command resumes."""
        from pxopt.device import resolve_device
        from pxopt.export import export_trial, write_export
        from pxopt.pipeline import Pipeline
        from pxopt.report import write_report
        from pxopt.search import run_search
        from pxopt.search.heldout import resume_spec, summary_lines, try_heldout_summary
        from pxopt.search.pool import resume_command
        from pxopt.search.storage import check_reachable

        if classes is not None and class_names is not None:
            raise ConfigError("give either --classes or --class-names, not both")
        chosen = [c.strip() for c in class_names.split(",") if c.strip()] if class_names else classes
        spec = load_spec(
            spec_path, model=model, data=data, classes=chosen, n_ref=n_ref, n_val=n_val, n_heldout=n_heldout,
            trials=trials, rescore_top=rescore_top, rescore_sets=rescore_sets, timeout=timeout, storage=storage,
            name=study, device=device,
            seed=seed, components=components, rates=parse_rates(rates),
        )
        url = spec.storage_url(out_dir)
        check_reachable(url)  # a database server fails fast; a SQLite file is made only after the model loads
        spec, heldout_note = resume_spec(spec, url)  # a resumed study keeps its held-out images
        if heldout_note:
            console.print(heldout_note, markup=False, highlight=False)
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        require_data(spec, data_given=data is not None, spec_path=spec_path)
        with console.status("loading model and task (a built-in model trains on first use)"):
            pipeline = Pipeline.from_spec(spec, device="cpu" if workers > 1 else None,
                                          allow_download=allow_download)
            pipeline.check_explainable()  # an unsupported model: one error line, no study
        spec = spec.with_overrides(components=pipeline.components)
        console.print(f"study [bold]{spec.name}[/]: model {spec.model}, data {spec.data}, "
                      f"components {spec.components}, {len(spec.rates)} rates")
        study_attrs = pipeline.study_attrs()
        with optuna_logging(verbose), Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False,
        ) as progress:
            # hidden until run_search reports what the study holds: no "0/N" frame on resume
            bar = progress.add_task("finished trials", total=spec.trials, visible=False)
            result = run_search(
                spec, workers=workers, pipeline=pipeline, storage_url=url, study_attrs=study_attrs,
                progress=lambda n: progress.update(bar, completed=n, visible=True), log=_log,
                resume_hint=resume_command(),
            )
        st = result.study
        new = result.trials_after - result.trials_before
        typer.echo(f"study:  {spec.name} in {url} ({len(st.trials)} trials, {new} newly finished)")
        if result.interrupted:
            raise typer.Exit(130)
        if workers > 1 and resolve_device(spec.device).type != "cpu":
            # the workers are done: re-scoring, held-out curves and heatmaps on the GPU, not the CPU copy
            del pipeline
            with console.status("loading the model on the study's device"):
                pipeline = Pipeline.from_spec(spec, allow_download=allow_download)
        try:
            best = _name_best(st, spec, pipeline)
        except ValueError:
            typer.echo("no completed trial: nothing to export")
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        with console.status("evaluating the best trial and all-epsilon on the held-out images"):
            heldout = try_heldout_summary(st, best, pipeline=pipeline)
        best_path = write_export(export_trial(st, best.number, heldout=heldout), out_dir / f"{spec.name}-best.json")
        typer.echo(f"best:   trial {best.number}, area {best.value:.4f}, "
                   f"Top-PR {best.user_attrs['curve']['top_pr']:.2f} -> {best_path}")
        for line in summary_lines(heldout):
            typer.echo(line)
        if report:
            from pxopt.report.heatmaps import try_study_heatmaps

            maps, note = try_study_heatmaps(st, pipeline)
            report_path = write_report(st, out_dir / f"{spec.name}-report.html", heatmaps=maps, heatmaps_note=note,
                                       heldout=heldout)
            typer.echo(f"report: {report_path}")
