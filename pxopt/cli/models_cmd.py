"""`pxopt models` and `pxopt train builtin:<name>` (owned by the models/data work)."""

from __future__ import annotations

import json

import typer

from pxopt.cli._options import ALLOW_DOWNLOAD_HELP
from pxopt.errors import ModelSpecError


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models() -> None:
        """List the supported model families and built-in models."""
        from pxopt.models import describe_supported

        typer.echo(describe_supported())

    @app.command("train")
    def train(
        spec: str = typer.Argument(..., help="builtin:<name>, e.g. builtin:fmnist-resnet"),
        force: bool = typer.Option(False, "--force", help="Retrain even if a cached model exists."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: env PXOPT_THREADS)."),
        allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    ) -> None:
        """Train a built-in reference model (cached; reused unless --force)."""
        from pxopt.device import configure_threads
        from pxopt.models.builtin import get_builtin, load_builtin, train_builtin
        from pxopt.models.spec import parse_spec

        parsed = parse_spec(spec)
        if parsed.kind != "builtin":
            raise ModelSpecError(f"only built-in models can be trained here, got {spec!r}")
        get_builtin(parsed.name)
        configure_threads(threads)
        if allow_download:
            from pxopt.data.sources import fashion_mnist

            fashion_mnist(allow_download=True)
        if force:
            _, meta = train_builtin(parsed.name, device=device)
        else:
            _, meta = load_builtin(parsed.name, device=device)
        summary = {k: meta.get(k) for k in ("name", "test_accuracy", "train_seconds", "threads", "step_dtype", "weights_file")}
        typer.echo(json.dumps(summary))
