"""`pxopt explain`: heatmaps of your own images under an exported rule set (and all-epsilon)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pxopt.cli._options import ALLOW_DOWNLOAD_HELP
from pxopt.errors import ConfigError

EPSILON = {"rule": "epsilon", "epsilon": 1e-6}


def _read_config(path: Path) -> tuple[dict, str | None, str]:
    """(rules, model spec or None, column title) of a pxopt.export/1 or pxopt.rules/1 file."""
    from pxopt.export import read_export

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from exc
    if isinstance(raw, dict) and raw.get("format") == "pxopt.rules/1":
        from pxopt.lrp import RuleConfig

        return RuleConfig.from_dict(raw).to_dict(), None, path.name
    exp = read_export(path)
    where = f"trial {exp['trial']}" + (f", {exp['baseline']}" if exp.get("baseline") else "")
    return exp["rules"], exp["model"], f"{path.name} ({where})"


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain_cmd(
        config: Path = typer.Option(..., "--config", "-c",
                                    help="Rules to explain with: a pxopt.export/1 file (pxopt export) or a "
                                         "pxopt.rules/1 file (then --model is required)."),
        images: Path = typer.Option(..., "--images", "-i",
                                    help="A folder of images (png, jpg, ...; not recursive) or one image file."),
        out: Path = typer.Option(Path("heatmaps.png"), "--out", "-o", help="The PNG to write."),
        model: str | None = typer.Option(None, "--model", help="Model spec (default: the export's model)."),
        label: int | None = typer.Option(None, "--label",
                                         help="Class index (model output) to explain in every image "
                                              "(default: each image's predicted class)."),
        epsilon: bool = typer.Option(True, "--epsilon/--no-epsilon",
                                     help="Draw all-epsilon beside the config's rules."),
        max_images: int = typer.Option(16, "--max-images", help="Use at most this many images (sorted by name)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
        allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    ) -> None:
        """Heatmaps (input relevance) of your images under an exported rule set, beside all-epsilon.

        Red is positive relevance, blue negative, white zero; each heatmap is scaled to its own
        largest |relevance|. The images go through the model's own preprocessing.
        """
        import torch

        from pxopt.lrp import RuleConfig
        from pxopt.models import load_model
        from pxopt.report.heatmaps import compute_heatmaps, image_files, load_images, write_png

        if max_images < 1:
            raise ConfigError(f"--max-images must be >= 1, got {max_images}")
        rules, export_model, title = _read_config(config)
        spec = model or export_model
        if not spec:
            raise ConfigError(f"{config} holds rules only: give the model with --model")
        files = image_files(images, max_images)
        loaded = load_model(spec, device=device, allow_download=allow_download)
        x = load_images(files, loaded.transform)
        if label is not None and not 0 <= label < loaded.num_classes:
            raise ConfigError(f"--label must be a class index in [0, {loaded.num_classes}), got {label}")
        dev = next(loaded.model.parameters()).device
        with torch.inference_mode():
            probs = loaded.model(x.to(dev)).softmax(1).cpu()
        names = loaded.class_names or []

        def name(i: int) -> str:
            return f"{i} {names[i]}" if i < len(names) else str(i)

        captions = []
        for f, p in zip(files, probs, strict=True):
            pred = int(p.argmax())
            text = f"{f.name}: predicted {name(pred)} ({float(p[pred]):.0%})"
            captions.append(text + (f"; explained {name(label)}" if label is not None else ""))
        cfg = RuleConfig.coerce(rules)
        configs = {title: cfg.to_dict()}
        eps = RuleConfig.uniform(EPSILON, softmax=cfg.softmax)
        skipped = ""
        if epsilon and eps.digest() != cfg.digest():
            configs["all-epsilon"] = eps.to_dict()
        elif epsilon:
            skipped = " (the config is all-epsilon: one column)"
        targets = None if label is None else torch.full((len(files),), label, dtype=torch.long, device=dev)
        heatmaps = compute_heatmaps(loaded.model, x, configs, targets=targets, captions=captions,
                                    target="predicted class" if label is None else f"class {label}")
        path = write_png(heatmaps, out)
        typer.echo(f"heatmaps of {len(files)} images under {', '.join(configs)}{skipped} -> {path}")
