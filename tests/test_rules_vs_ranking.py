"""benchmarks/rules_vs_ranking.py: the fresh validation sets it adds, and its table."""

from __future__ import annotations

from pathlib import Path

import torch
from bench_modules import load_benchmark

RVR = load_benchmark("rules_vs_ranking")
R = RVR.results  # (the copy it imported)


def _keys(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images}


def test_fresh_sets_are_new_images_of_the_held_out_size(tmp_path: Path) -> None:
    """Neither the search's nor the held-out images, none shared between fresh sets, balanced."""
    from pxopt.models import load_model

    s = R.Settings.quick(models=("resnet",), tasks=(3,), seeds=1, out_dir=tmp_path / "out",
                         work_dir=tmp_path / "work", val_search=9, val_eval=12)
    loaded = load_model(R.model_spec("resnet"), device="cpu", progress=False)
    setting = R.build_setting("resnet", "conv", 3, loaded, s)
    fresh = RVR.fresh_tasks(setting, s, 2)
    assert list(fresh) == ["fresh 1", "fresh 2"] and RVR.fresh_tasks(setting, s, 0) == {}
    used = _keys(setting.search_task.validation.images) | _keys(setting.held_out.images)
    seen: set[bytes] = set()
    for task in fresh.values():
        keys = _keys(task.validation.images)
        assert sorted(set(task.validation.labels.tolist())) == setting.classes
        assert all(int((task.validation.labels == c).sum()) == 4 for c in setting.classes)
        assert not keys & used and not keys & seen
        seen |= keys
    assert not torch.equal(fresh["fresh 1"].reference.images, fresh["fresh 2"].reference.images)


def test_markdown_pairs_every_combination_with_all_epsilon() -> None:
    paired = {"mean_diff": -0.0047, "ci95": [-0.0071, -0.0023], "t_p": 0.0058}
    areas = {"best / signed": {"search split": 0.991, "held out 1": 0.989, "fresh 1": 0.986},
             "all-epsilon / token-abs": {"search split": 0.987, "held out 1": 0.994, "fresh 1": 0.987}}
    out = {"run": "r", "command": "c", "settings": {"s": {
        "search_ranking": "signed", "reference": "all-epsilon / token-abs", "areas": areas, "seconds": 3.0,
        "− all-epsilon / token-abs (held out)": {"best / signed": paired},
        "fresh (unused validation images)": {"best / signed": dict(paired, mean_diff=-0.0006)}}}}
    text = RVR.markdown(out)
    assert "| best / signed | 0.9910 | 0.9890 | -0.0047 [-0.0071, -0.0023], p 0.0058 | 0.9860 | -0.0006" in text
    assert "| all-epsilon / token-abs | 0.9870 | 0.9940 | (reference) | 0.9870 | (reference) |" in text
