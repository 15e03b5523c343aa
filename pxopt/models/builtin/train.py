"""Training the built-in reference models: deterministic by seed, with a progress bar.

The whole training set is one normalised tensor in memory (60,000 x 28 x 28 floats,
190 MB), so an epoch is a loop over index slices with no DataLoader overhead.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pxopt.data.accuracy import restricted_correct
from pxopt.device import resolve_device


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model (hashed into its cache key)."""

    epochs: int
    batch_size: int = 128
    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.0
    flip: bool = False  # random horizontal flips (cheap, on tensors)
    warmup: float = 0.15  # fraction of the one-cycle schedule spent warming up
    channels_last: bool = False  # NHWC activations: oneDNN's faster CPU convolutions for CNNs
    seed: int = 0
    # Mixed precision for the training steps only ("bf16": torch.autocast to bfloat16, which
    # CPUs with AVX512-BF16/AMX and every recent GPU run natively; elsewhere the steps run in
    # float32, see `step_dtype`). Evaluation, the saved weights and everything pxopt does
    # with the model afterwards stay float32.
    autocast: str | None = None

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"unknown autocast {self.autocast!r} (use 'bf16' or leave it unset)")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["autocast"] is None:  # recipes from before the field keep their cache keys
            del d["autocast"]
        return d

    def step_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype a training step computes in on `device`.

        bf16 autocast only where the hardware has it: emulated, it cost 1.36x (ResNet-50),
        2.40x (VGG-16) and 3.37x (ViT-12) the float32 step on a Xeon without AVX512-BF16
        (benchmarks/results/builtin_cost_no_bf16.md), so there float32 is both faster and exact."""
        if self.autocast == "bf16" and bf16_is_native(device):
            return torch.bfloat16
        return torch.float32

    def step_precision(self, device: torch.device, dtype: torch.dtype | None = None) -> torch.autocast:
        """The context a training step runs in (`dtype` from `step_dtype`, probed once per
        training); shared with the step-cost estimate so both time the same arithmetic."""
        dtype = self.step_dtype(device) if dtype is None else dtype
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def _optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if r.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=r.lr)
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {r.optimizer!r}")


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy over all outputs (the 10-class test set)."""
    model.eval()
    classes = torch.arange(model(images[:1]).shape[1], device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += restricted_correct(logits, labels[start : start + batch_size], classes)
    return float(correct) / len(labels)


def recorded_step_dtype(meta: dict) -> str:
    """What a recorded training's steps computed in (its metadata or a benchmark row holding
    it); trainings from before `step_dtype` was recorded ran a bf16 recipe natively, since the
    float32 fallback came with the field."""
    return meta.get("step_dtype") or ("bfloat16" if meta["recipe"].get("autocast") == "bf16" else "float32")


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: CPUs without AVX512-BF16 or AMX emulate it, and
    the paper-scale recipes' 45-minute budget assumes the native kind."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def train_model(
    model: nn.Module,
    recipe: Recipe,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    description: str = "training",
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict:
    """Train in place with a one-cycle schedule; return accuracy and timing."""
    dev = resolve_device(device)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model.to(dev, memory_format=memory_format).train()
    x_train, y_train = train[0].to(dev, memory_format=memory_format), train[1].to(dev)
    x_test, y_test = test[0].to(dev, memory_format=memory_format), test[1].to(dev)
    steps_per_epoch = math.ceil(len(y_train) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    opt = _optimizer(model, recipe)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=total, pct_start=recipe.warmup
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    step_dtype = recipe.step_dtype(dev)
    if recipe.autocast == "bf16" and step_dtype != torch.bfloat16:
        warnings.warn(
            f"this {dev.type.upper()} has no native bfloat16: training in float32 instead of the "
            "recipe's bf16 autocast (emulated bf16 is slower); the model's accuracy may differ "
            "slightly from the one recorded for the recipe",
            RuntimeWarning,
            stacklevel=2,
        )
    history: list[float] = []
    start_time = time.perf_counter()
    start_cpu = time.process_time()
    bar = _progress(progress)
    with bar:
        task = bar.add_task(description, total=total, loss=float("nan"))
        for epoch in range(recipe.epochs):
            model.train()
            order = torch.randperm(len(y_train), generator=gen).to(dev)
            for step in range(steps_per_epoch):
                idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
                xb, yb = x_train[idx].contiguous(memory_format=memory_format), y_train[idx]
                if recipe.flip:
                    flip = torch.rand(len(idx), generator=gen).to(dev) < 0.5
                    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                with recipe.step_precision(dev, step_dtype):
                    loss = loss_fn(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step % 25 == 0:
                    bar.update(task, advance=1, loss=float(loss.detach()))
                else:
                    bar.update(task, advance=1)
            acc = evaluate(model, x_test, y_test)
            history.append(acc)
            if on_epoch is not None:
                on_epoch(epoch, acc)
        bar.update(task, completed=total)
    seconds = time.perf_counter() - start_time
    cpu_seconds = time.process_time() - start_cpu
    model.to(memory_format=torch.contiguous_format).eval()
    return {
        "test_accuracy": history[-1],
        "accuracy_per_epoch": history,
        "train_seconds": round(seconds, 1),
        # CPU time of this process: with one thread, what the wall time would be on an idle
        # machine (the shared machine inflates train_seconds)
        "train_cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        # what the steps really computed in (a bf16 recipe falls back to float32 where
        # bf16 is emulated), so two trainings of one recipe can be told apart
        "step_dtype": str(step_dtype).removeprefix("torch."),
    }


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%  loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
