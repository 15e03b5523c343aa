"""Option texts shared by several commands."""

from __future__ import annotations

ALLOW_DOWNLOAD_HELP = (
    "Download missing weights (torchvision, timm) and Fashion-MNIST into their usual caches "
    "(without it, pxopt never uses the network)."
)
