from typer.testing import CliRunner

from pxopt.cli import app
from pxopt.device import resolve_device


def test_cli_help_lists_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "models" in result.output


def test_resolve_device_auto_is_usable() -> None:
    assert resolve_device("auto").type in {"cpu", "cuda"}
