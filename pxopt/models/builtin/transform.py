"""Preprocessing of the built-in models: Fashion-MNIST normalised with its own statistics.

The small built-ins take the native 1x28x28 images. The paper-scale ones (torchvision
ResNet-50 and VGG-16-BN, a 12-block timm ViT) take 3x32x32: the 28x28 image centred on a
32x32 background (VGG-16's five max-pools need at least 32 pixels) and the grey channel
replicated three times, so their first layers are the unchanged 3-channel ones.
"""

from __future__ import annotations

import torch
from PIL import Image

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
NATIVE = 28  # Fashion-MNIST's image size


class FmnistTransform:
    """PIL image -> (channels, size, size) float tensor; `apply_batch` does the same for uint8 tensors.

    `apply_batch` lets pxopt.data convert 60,000 stored images in one vectorised step
    instead of one PIL round-trip per image. A `size` above 28 pads the 28x28 image with
    background (black, i.e. pixel value 0 before normalisation) on all sides.
    """

    def __init__(self, mean: float = FMNIST_MEAN, std: float = FMNIST_STD, *,
                 size: int = NATIVE, channels: int = 1) -> None:  # fmt: skip
        if size < NATIVE or (size - NATIVE) % 2:
            raise ValueError(f"size must be 28 or 28 plus an even padding, got {size}")
        self.mean = mean
        self.std = std
        self.size = size
        self.channels = channels

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        img = image.convert("L")
        if img.size != (self.size, self.size) and img.size != (NATIVE, NATIVE):
            img = img.resize((NATIVE, NATIVE), Image.Resampling.BILINEAR)
        w, h = img.size
        raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, h, w)
        return self.apply_batch(raw.unsqueeze(0))[0]

    def apply_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 28, 28) or (N, 1, 28, 28) -> normalised float (N, channels, size, size).

        Images that already have the output size are not padded.
        """
        x = images.float().div_(255.0)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        pad = (self.size - x.shape[-1]) // 2
        if pad > 0:
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=0.0)
        x = x.sub_(self.mean).div_(self.std)
        if self.channels != x.shape[1]:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x

    def __repr__(self) -> str:
        if self.size == NATIVE and self.channels == 1:
            return f"FmnistTransform(grayscale 28x28, mean={self.mean}, std={self.std})"
        return (f"FmnistTransform(grayscale 28x28 padded to {self.size}x{self.size}, "
                f"{self.channels} channels, mean={self.mean}, std={self.std})")  # fmt: skip
