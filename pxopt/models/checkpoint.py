"""Reading state dicts safely and fitting them into an architecture, with one-line errors."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from pxopt.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _unpickling_error(exc: BaseException, path: Path) -> CheckpointError:
    """One line for a refused weights-only load, instead of torch's paragraph."""
    text = str(exc)
    code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"\bGLOBAL ([\w.]+)", text)
    if code:  # the file names a Python callable: a pickled module / object, not just tensors
        return CheckpointError(
            f"checkpoint {path} holds pickled code ({code.group(1)}), not a plain state dict; pxopt loads "
            f"checkpoints with weights_only=True and will not run it (save model.state_dict() instead)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return CheckpointError(f"cannot read checkpoint {path}: {detail.group(1) if detail else _first_line(exc)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a .safetensors file or a torch file with `weights_only=True` onto the CPU.

    Training checkpoints that wrap the weights ({'state_dict': ...}, {'model': ...}) are
    unwrapped, and DataParallel / torch.compile prefixes are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(exc, path) from exc
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError
        if type(exc).__name__ != "SafetensorError":
            raise
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    return unwrap(obj, path)


def unwrap(obj: object, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict) and _is_state_dict(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not _is_state_dict(obj):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (a dict of tensors, possibly under "
            f"'state_dict' or 'model')"
        )
    out = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` strictly into `model`; mismatches become one CheckpointError line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter and buffer (names, dtypes, shapes and bytes).

    A model spec such as `builtin:fmnist-vit` or `file:ckpt.pth@resnet50` names a model but
    not its weights, which change when a recipe or a checkpoint file changes; studies store
    this hash so a resumed search cannot mix trials of two different networks.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
