"""Preprocessing of the built-in models: grayscale 28x28, normalised with Fashion-MNIST stats."""

from __future__ import annotations

import torch
from PIL import Image

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


class FmnistTransform:
    """PIL image -> (1, 28, 28) float tensor; `apply_batch` does the same for uint8 tensors.

    `apply_batch` lets pxopt.data convert 60,000 stored images in one vectorised step
    instead of one PIL round-trip per image.
    """

    size = 28

    def __init__(self, mean: float = FMNIST_MEAN, std: float = FMNIST_STD) -> None:
        self.mean = mean
        self.std = std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        img = image.convert("L")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, self.size, self.size)
        return self.apply_batch(raw.unsqueeze(0))[0]

    def apply_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 28, 28) or (N, 1, 28, 28) -> normalised float (N, 1, 28, 28)."""
        x = images.float().div_(255.0)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"FmnistTransform(grayscale 28x28, mean={self.mean}, std={self.std})"
