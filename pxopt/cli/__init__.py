"""The `pxopt` command: thin, parses arguments, calls the library, prints.

Each group of commands lives in its own module with a `register(app)` function;
add the module's name to `_COMMAND_MODULES` to plug it in.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from pxopt.errors import PxoptError


def _show_flags_as_flags() -> None:
    """typer's rich help prints a type after every option, `<bool>` after flags too (its
    plain help does not, and a flag takes no value): print nothing there for flags."""
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_pxopt_flags", False):
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._pxopt_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_show_flags_as_flags()
# torch warns "No CUDA runtime is found, using CUDA_HOME=..." whenever something imports
# torch.utils.cpp_extension on a machine with a CUDA toolkit but no GPU. pxopt builds no
# extensions, so on the command line that warning is noise.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

app = typer.Typer(
    name="pxopt",
    help="Optimise LRP rules as a pruning criterion for CNNs and vision transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

_COMMAND_MODULES: list[str] = [
    "pxopt.cli.models_cmd",
    "pxopt.cli.search_cmd",
    "pxopt.cli.export_cmd",
    "pxopt.cli.report_cmd",
    "pxopt.cli.explain_cmd",
]

_debug = False


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    global _debug
    _debug = debug


for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one red line and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = app(args=args, standalone_mode=False)
    except PxoptError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        usage_error = getattr(exc, "exit_code", None)
        if usage_error is not None and hasattr(exc, "format_message"):
            err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}", highlight=False)
            raise SystemExit(2) from None
        raise
    # Without standalone mode, typer *returns* the code of `typer.Exit(n)` and of Ctrl-C (130)
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        raise SystemExit(code)
