"""Where pxopt keeps what it builds: one cache root, overridable for tests and clusters."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """Cache folder (env `PXOPT_CACHE`, else the platform's user cache dir), created on demand."""
    root = os.environ.get("PXOPT_CACHE") or platformdirs.user_cache_dir("pxopt")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
