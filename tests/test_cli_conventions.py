"""CLI conventions: help for every option, `-o` for every `--out`, flags shown as flags,
`--allow-download` wherever it is advertised, and no CUDA-toolkit warning on CPU machines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from test_bad_input import _export
from typer.testing import CliRunner

import pxopt.pipeline
from pxopt.cli import app, main
from pxopt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    group = typer.main.get_command(app)
    yield "pxopt", group
    for name, cmd in group.commands.items():
        yield f"pxopt {name}", cmd


def _options(cmd):
    with typer.main.get_command(app).make_context("pxopt", [], resilient_parsing=True) as root:
        with cmd.make_context(cmd.name or "pxopt", [], parent=root, resilient_parsing=True) as ctx:
            return [p for p in cmd.get_params(ctx) if p.param_type_name == "option"]


@pytest.mark.parametrize(("name", "cmd"), list(_commands()), ids=[n for n, _ in _commands()])
def test_every_option_has_help_and_every_out_has_o(name, cmd) -> None:
    options = _options(cmd)
    assert any("--help" in p.opts for p in options)
    for p in options:
        assert (p.help or "").strip(), f"{name} {p.opts[0]} has no help text"
        if "--out" in p.opts:
            assert "-o" in p.opts, f"{name} --out has no -o"


@pytest.mark.parametrize(("name", "cmd"), list(_commands()), ids=[n for n, _ in _commands()])
def test_help_shows_flags_as_flags(name, cmd) -> None:
    args = name.split()[1:] + ["--help"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    flags = [p for p in _options(cmd) if getattr(p, "is_flag", False)]
    for p in flags:  # the flag's row names it and gives no value type
        row = next(line for line in result.output.splitlines() if p.opts[0] in line)
        assert not re.search(rf"{re.escape(p.opts[0])}\S*\s+(-\w\s+)?<", row), row


#: Every command that loads a model (and so may meet a missing weights file, whose error
#: ends "or pass --allow-download").
LOADS_A_MODEL = {"search", "prune", "baselines", "train", "explain", "report", "export"}


def test_allow_download_exists_where_advertised() -> None:
    from pxopt.models import describe_supported

    text = describe_supported()
    advertised = re.findall(r"`(?:pxopt )?(\w+)`", text[text.index("--allow-download") - 200:])
    assert LOADS_A_MODEL <= set(advertised)
    have = {name.split()[-1] for name, cmd in _commands()
            if any("--allow-download" in p.opts for p in _options(cmd))}
    assert LOADS_A_MODEL <= have  # a weights error says "pass --allow-download" in any of them
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = {name.split()[-1] for name, _ in _commands()}
    used = [m.group(1) for line in readme.splitlines() if "--allow-download" in line
            and (m := re.match(r"\s*pxopt (\w+) ", line)) and m.group(1) in commands]
    assert used and set(used) <= have  # every README command line with the flag names a command that has it


@pytest.mark.parametrize("flag", [False, True])
@pytest.mark.parametrize("command", ["search", "prune", "baselines"])
def test_allow_download_reaches_the_model_loader(command, flag, tmp_path, monkeypatch, capsys) -> None:
    seen = []

    def fake_from_spec(cls, spec, **kwargs):
        seen.append(kwargs.get("allow_download"))
        raise ConfigError("stop here")

    monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", classmethod(fake_from_spec))
    monkeypatch.chdir(tmp_path)
    args = {
        "search": ["search", "--model", "builtin:fmnist-resnet", "--storage", str(tmp_path / "s.db"),
                   "--out-dir", str(tmp_path)],
        "prune": ["prune", "--config", _export(tmp_path, "ok"), "--rate", "0.5", "-o", str(tmp_path / "p.pt")],
        "baselines": ["baselines", "--model", "builtin:fmnist-resnet", "--out-dir", str(tmp_path)],
    }[command] + (["--allow-download"] if flag else [])
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "stop here" in capsys.readouterr().err
    assert seen == [flag]


@pytest.mark.parametrize("flag", [False, True])
def test_allow_download_reaches_the_loader_of_explain_report_export(flag, fake, monkeypatch, capsys) -> None:
    import pxopt.models

    main(["search", "--model", "builtin:tiny", "--study", "s", "--trials", "2", "--rates", "0:1:0.5",
          "--no-report"])
    seen = []

    def fake_from_spec(cls, spec, **kwargs):
        seen.append(kwargs.get("allow_download"))
        raise ConfigError("stop here")

    def fake_load_model(spec, **kwargs):
        seen.append(kwargs.get("allow_download"))
        raise ConfigError("stop here")

    monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", classmethod(fake_from_spec))
    monkeypatch.setattr(pxopt.models, "load_model", fake_load_model)
    extra = ["--allow-download"] if flag else []
    capsys.readouterr()
    main(["report", "--study", "s", *extra])  # the heatmaps load the study's model
    assert seen == [flag] and "heatmaps not drawn: stop here" in capsys.readouterr().err
    seen.clear()
    main(["export", "--study", "s", "--trial", "1", "-o", "t1.json", *extra])  # held-out not stored yet
    assert seen == [flag] and "not evaluated: stop here" in capsys.readouterr().out
    seen.clear()
    (fake / "img.png").write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        main(["explain", "--config", "t1.json", "--images", str(fake), *extra])
    assert info.value.code == 2 and "stop here" in capsys.readouterr().err
    assert seen == [flag]


def test_train_allow_download_fetches_fashion_mnist(monkeypatch, capsys) -> None:
    import pxopt.data.sources as sources

    seen = []

    def fake(*, allow_download=False):
        seen.append(allow_download)
        raise ConfigError("stop here")

    monkeypatch.setattr(sources, "fashion_mnist", fake)
    with pytest.raises(SystemExit):
        main(["train", "builtin:fmnist-resnet", "--allow-download"])
    assert seen == [True]


def test_no_cuda_toolkit_warning_on_the_command_line() -> None:
    # torch logs "No CUDA runtime is found, using CUDA_HOME=..." when torch.utils.cpp_extension
    # is imported on a machine with a CUDA toolkit but no GPU. pxopt's latency timing no longer
    # imports it (it used torch.utils.benchmark), and the CLI keeps that one logger quiet in case
    # something else does.
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from pxopt.cli import main\n"
        "from pxopt.latency import compare_latency\n"
        "import pxopt.prune.physical\n"
        "m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()\n"
        "compare_latency({'a': m, 'b': m}, torch.zeros(1, 4), repeats=2)\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'timing imported cpp_extension'\n"
        "for args in (['--help'], ['models']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "import torch.utils.cpp_extension\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "builtin:fmnist-resnet" in done.stdout  # `pxopt models` ran
    assert "No CUDA runtime" not in done.stderr and "CUDA_HOME" not in done.stderr, done.stderr
