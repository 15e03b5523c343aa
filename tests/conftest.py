"""Shared test settings: one CPU thread (stable on small shared machines), fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """`pxopt` commands run in `tmp_path` with every model replaced by the fake pipeline of
    `search_fakes` (CLI tests without a model)."""
    from search_fakes import FakePipeline

    import pxopt.pipeline

    monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", FakePipeline.from_spec)
    monkeypatch.chdir(tmp_path)
    return tmp_path
