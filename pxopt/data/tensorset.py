"""Preprocessed images and labels held as tensors, moved to each device only once.

Evaluating twenty pruning rates reads the validation set twenty times; keeping one copy
per device avoids twenty host-to-device transfers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pxopt.device import resolve_device


@dataclass
class TensorSet:
    """Images (N, C, H, W) float and labels (N,) int64 (model-output indices)."""

    images: torch.Tensor
    labels: torch.Tensor
    _on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def on(self, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) on `device`, transferred on first use and cached."""
        dev = resolve_device(device)
        key = str(dev)
        if key not in self._on_device:
            if self.images.device == dev:
                self._on_device[key] = (self.images, self.labels)
            else:
                self._on_device[key] = (
                    self.images.to(dev, non_blocking=True),
                    self.labels.to(dev, non_blocking=True),
                )
        return self._on_device[key]

    def batches(
        self, batch_size: int, device: str | torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive (images, labels) slices (views: no copies) of the on-device tensors."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images, labels = self.on(device)
        for start in range(0, len(self), batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]

    def release(self, device: str | torch.device | None = None) -> None:
        """Drop the cached copy on one device (all devices when None)."""
        if device is None:
            self._on_device.clear()
        else:
            self._on_device.pop(str(resolve_device(device)), None)
