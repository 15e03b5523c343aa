"""Parsing model spec strings: one string names a model everywhere (CLI, study files, exports).

    torchvision:resnet50[:IMAGENET1K_V2]     torchvision builder + weights enum member
    timm:vit_base_patch16_224[.tag]          timm model + pretrained tag
    file:path/to/ckpt.{pth,safetensors}@<arch spec>
    builtin:fmnist-resnet
    package:efficientnet_lite0               weights shipped in a pip package (models/packaged.py)
    resnet50                                 bare name = torchvision, default weights
    efficientnet_lite0                       bare name of a packaged model = package:<name>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pxopt.errors import ModelSpecError

KINDS = ("torchvision", "timm", "file", "builtin", "package")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "torchvision" | "timm" | "file" | "builtin" | "package"
    name: str  # builder / timm name / builtin name; for "file" the checkpoint path
    tag: str | None = None  # torchvision weights member, timm pretrained tag
    arch: ModelSpec | None = None  # for "file": the architecture

    def __str__(self) -> str:
        if self.kind == "file":
            return f"file:{self.name}@{self.arch}"
        if self.kind == "timm":
            return f"timm:{self.name}" + (f".{self.tag}" if self.tag else "")
        if self.kind == "torchvision":
            return f"torchvision:{self.name}" + (f":{self.tag}" if self.tag else "")
        return f"{self.kind}:{self.name}"


def parse_spec(spec: str) -> ModelSpec:
    """Parse a spec string; raise ModelSpecError with the accepted forms when it is malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("empty model spec; " + _FORMS)
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        if sep and len(kind) > 1:  # 'foo:bar' with an unknown prefix (single letters: Windows drives)
            raise ModelSpecError(f"unknown model spec kind {kind!r} in {text!r}; " + _FORMS)
        if text in _packaged_names():
            return ModelSpec("package", text)
        return _torchvision(text, text)
    if not rest:
        raise ModelSpecError(f"model spec {text!r} names no model; " + _FORMS)
    if kind == "torchvision":
        return _torchvision(rest, text)
    if kind == "timm":
        name, _, tag = rest.partition(".")
        if not name:
            raise ModelSpecError(f"model spec {text!r} names no timm model")
        return ModelSpec("timm", name, tag or None)
    if kind in ("builtin", "package"):
        return ModelSpec(kind, rest)
    path, at, arch = rest.rpartition("@")
    if not at or not path or not arch:
        raise ModelSpecError(
            f"file spec {text!r} needs an architecture: file:<checkpoint>@<arch spec>, "
            f"e.g. file:ckpt.pth@torchvision:resnet18"
        )
    if Path(path).suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelSpecError(
            f"checkpoint {path!r} must end in one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    return ModelSpec("file", path, None, parse_spec(arch))  # the arch is after the last '@'


def _packaged_names() -> tuple[str, ...]:
    from pxopt.models.packaged import PACKAGED

    return tuple(PACKAGED)


def _torchvision(rest: str, text: str) -> ModelSpec:
    name, _, tag = rest.partition(":")
    if not name or ":" in tag or "@" in rest:
        raise ModelSpecError(f"malformed model spec {text!r}; " + _FORMS)
    return ModelSpec("torchvision", name, tag or None)


_FORMS = (
    "use torchvision:<name>[:<WEIGHTS>], timm:<name>[.<tag>], "
    "file:<ckpt.pth|.safetensors>@<arch spec>, builtin:<name>, package:<name> or a bare "
    "torchvision name"
)
