"""benchmarks/builtin_training.py --estimate: it times the dtype training would really use."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from bench_modules import load_benchmark

from pxopt.models.builtin import registry

BT = load_benchmark("builtin_training")


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_recipe_is_timed_in_both_dtypes_the_used_one_first(monkeypatch, native):
    from pxopt.models.builtin import train as train_module

    monkeypatch.setattr(train_module, "bf16_is_native", lambda device: native)
    entry = registry.BUILTINS["fmnist-vgg"]
    bf16 = dataclasses.replace(entry, recipe=dataclasses.replace(entry.recipe, autocast="bf16"))
    monkeypatch.setitem(registry.BUILTINS, "fmnist-vgg", bf16)
    used, other = BT._dtypes_to_time("fmnist-vgg")
    assert used == (torch.bfloat16 if native else torch.float32) and {used, other} == {torch.bfloat16, torch.float32}
    assert BT._dtypes_to_time("fmnist-resnet") == [torch.float32]  # no autocast asked: one row


def test_step_seconds_reports_the_dtype_it_timed():
    row = BT._step_seconds("fmnist-vgg", steps=1, dtype=torch.bfloat16)
    assert row["dtype"] == "bfloat16" and row["step_s"] > 0 and row["epochs"] == registry.BUILTINS["fmnist-vgg"].recipe.epochs
    assert BT._step_seconds("fmnist-vgg", steps=1)["dtype"] == "float32"


def test_a_float32_fallback_is_recorded_beside_the_native_training(monkeypatch):
    """Both trainings of a bf16 recipe keep their row and their log: neither replaces the other."""
    from pxopt.models.builtin import train as train_module

    native = {"name": "fmnist-vit12", "recipe": {"autocast": "bf16"}}  # recorded before the field existed
    fallback = {**native, "step_dtype": "float32"}
    plain = {"name": "fmnist-vit", "recipe": {}, "step_dtype": "float32"}
    assert BT._row_key(native) == "fmnist-vit12" and BT.recorded_step_dtype(native) == "bfloat16"
    assert BT._row_key(fallback) == "fmnist-vit12 (float32 fallback)"
    assert BT._row_key(plain) == "fmnist-vit"
    monkeypatch.setattr(train_module, "bf16_is_native", lambda device: False)
    assert BT._log_name("fmnist-vit12") == "fmnist-vit12-float32.log"
    assert BT._log_name("fmnist-vit") == "fmnist-vit.log"
    monkeypatch.setattr(train_module, "bf16_is_native", lambda device: True)
    assert BT._log_name("fmnist-vit12") == "fmnist-vit12.log"
