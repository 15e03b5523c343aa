"""timm models: weights from the Hugging Face cache (or torch hub cache), offline unless allowed
(`allow_download`: fetched into those caches, with HF_HUB_OFFLINE lifted for the download).

The cache folder is resolved from HF_HUB_CACHE / HF_HOME at call time (huggingface_hub
reads them once at import), and the located file is handed to timm through
`pretrained_cfg_overlay=dict(file=...)`, so timm never touches the network.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import timm

from pxopt.errors import CheckpointError, ModelSpecError
from pxopt.models.loaded import Built

HF_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def pretrained_cfg(name: str, tag: str | None):
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(f"unknown timm model {name!r}{hint}")
    full = f"{name}.{tag}" if tag else name
    try:
        cfg = timm.models.get_pretrained_cfg(full)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = ", ".join(timm.list_pretrained(f"{name}.*")) or "none"
        raise ModelSpecError(f"timm model {name!r} has no pretrained tag {tag!r} (available: {tags})")
    return cfg


@contextmanager
def hub_online() -> Iterator[None]:
    """Lift HF_HUB_OFFLINE (read once by huggingface_hub at import) for an allowed download."""
    from huggingface_hub import constants

    def reset() -> None:  # sessions built while offline refuse every request
        from huggingface_hub import utils

        if hasattr(utils, "reset_sessions"):
            utils.reset_sessions()

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    if before:
        reset()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if before:
            reset()


def fetch_command(full: str) -> str:
    return f"python -c \"import timm; timm.create_model('{full}', pretrained=True)\""


def locate_weights(cfg, full: str, *, allow_download: bool) -> Path:
    """Path of the cached weights file; download it only when allowed."""
    cache = hf_cache_dir()
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        repo = cfg.hf_hub_id
        files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else HF_FILES
        for filename in files:
            found = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
            if isinstance(found, str):
                return Path(found)
        if allow_download:
            with hub_online():
                for filename in files:
                    try:
                        return Path(hf_hub_download(repo, filename, cache_dir=str(cache)))
                    except Exception as exc:  # EntryNotFound, network errors, ...
                        last = exc
            raise ModelSpecError(f"downloading {repo} failed: {str(last).splitlines()[0]}")
        folder = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision>"
        raise ModelSpecError(
            f"weights file {files[0]} for timm:{full} not found in {folder} (with refs/main "
            f"naming the revision); on a machine with internet run {fetch_command(full)} and "
            f"copy {cache / ('models--' + repo.replace('/', '--'))} here (or set HF_HOME), "
            f"or pass --allow-download"
        )
    if cfg.url:
        import torch

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if path.is_file():
            return path
        if allow_download:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(cfg.url, str(path))
            return path
        raise ModelSpecError(
            f"weights file {path.name} for timm:{full} not found in {path.parent}; on a "
            f"machine with internet run {fetch_command(full)} and copy it there, or pass --allow-download"
        )
    raise ModelSpecError(f"timm:{full} has no downloadable weights")


def _transform(model):
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    return create_transform(**config), config


def build(
    name: str, tag: str | None, *, pretrained: bool, allow_download: bool, num_classes: int | None = None
) -> Built:
    cfg = pretrained_cfg(name, tag)
    full = f"{name}.{cfg.tag}" if cfg.tag else name
    kwargs = {"num_classes": num_classes} if num_classes else {}
    meta: dict = {"library": "timm", "timm_version": timm.__version__, "pretrained_tag": cfg.tag}
    if pretrained:
        path = locate_weights(cfg, full, allow_download=allow_download)
        try:
            model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise CheckpointError(f"weights file {path} does not fit timm:{full}: {first}") from exc
        meta["weights_file"] = str(path)
    else:
        model = timm.create_model(full, pretrained=False, **kwargs)
    transform, config = _transform(model)
    meta["data_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    n_out = num_classes or getattr(model, "num_classes", 0)
    class_names = None
    if n_out == 1000 and not num_classes:
        from pxopt.data.synsets import imagenet_descriptions

        class_names = [d.split(", ")[0] for d in imagenet_descriptions()]
    spec = f"timm:{full}" if (pretrained or tag) else f"timm:{name}"
    size = tuple(int(v) for v in config["input_size"])
    return Built(model, spec, transform, size, class_names, meta)  # type: ignore[arg-type]
