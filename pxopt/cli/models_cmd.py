"""`pxopt models` and `pxopt train` (owned by the models/data work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models() -> None:
        """List the supported model families and built-in models."""
        from pxopt.models import describe_supported

        typer.echo(describe_supported())
