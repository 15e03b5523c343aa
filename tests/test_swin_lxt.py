"""Parity of the Swin engine with lxt (AttnLRP / CP-LRP) on tiny torchvision and timm Swins,
float64.

lxt patches torch classes process-wide, so it runs in a subprocess
(`tests/lrp_swin_lxt_side.py`); see there for how lxt's rules are applied. pxopt uses LRP-0
on every Linear / the patch embedding and the plain residual sum, as lxt's efficient mode.
Shifted windows (with their mask), the relative position bias, patch merging and the
LayerNorms are all in the path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer

from pxopt.families.swin import explain_swin

SIDE = Path(__file__).with_name("lrp_swin_lxt_side.py")
KW = {"patch_size": [4, 4], "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 2],
      "window_size": [4, 4], "num_classes": 10}
TIMM_KW = {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depths": (2, 2),
           "num_heads": (2, 2), "window_size": 4, "num_classes": 10}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pxopt(model: nn.Module, x: torch.Tensor, t: torch.Tensor, variant: str) -> dict:
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        kept.append(out)

    stages = list(model.layers) if isinstance(model, TimmSwin) else \
        [s for i, s in enumerate(model.features) if i % 2 == 1]
    handles = [s.register_forward_hook(keep) for s in stages]
    cfg = {"groups": {g: {"rule": "epsilon", "epsilon": 0.0}
                      for g in ("input", "low", "mid", "high", "fc")}, "softmax": variant}
    try:
        exp = explain_swin(model, x, t, cfg, start="logit", fused=False)
    finally:
        for h in handles:
            h.remove()
    return {"input": exp.input, "stream": [(h * h.grad).detach() for h in kept],
            "output": exp.output}


@pytest.mark.slow  # ~30 s each: lxt's import in the subprocess
@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_lxt_parity_tiny_swin(tmp_path: Path, family: str) -> None:
    """Both variants in one subprocess (lxt's import dominates the time). Tolerance 1e-6 in
    float64: the identity rule's stabiliser of y / x differs (pxopt 1e-12, lxt its own)."""
    torch.manual_seed(0)
    kw = KW if family == "torchvision" else TIMM_KW
    model = (SwinTransformer if family == "torchvision" else TimmSwin)(**kw).double().eval()
    nn.init.normal_(model.get_submodule("head" if family == "torchvision" else "head.fc").weight,
                    std=0.1)
    for m in model.modules():  # a visible relative position bias (trunc-normal 0.02 is tiny)
        if hasattr(m, "relative_position_bias_table"):
            nn.init.normal_(m.relative_position_bias_table, std=1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 4])
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"kwargs": kw, "state": model.state_dict(), "inputs": x, "targets": t}, src)
    proc = subprocess.run([sys.executable, str(SIDE), str(src), str(dst), family],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = torch.load(dst, weights_only=True)
    for variant in ("cp", "attnlrp"):
        _check(model, x, t, variant, both[variant])
    # the variants really differ (the comparison is not vacuous)
    assert rel_err(both["cp"]["input"], both["attnlrp"]["input"]) > 1e-3


def _check(model: nn.Module, x: torch.Tensor, t: torch.Tensor, variant: str, ref: dict) -> None:
    got = _pxopt(model, x, t, variant)
    torch.testing.assert_close(got["output"], ref["output"], rtol=1e-10, atol=1e-10)
    assert ref["input"].abs().sum() > 0
    assert rel_err(got["input"], ref["input"]) <= 1e-6, variant
    assert len(got["stream"]) == len(ref["stream"]) == 2
    for mine, theirs in zip(got["stream"], ref["stream"], strict=True):
        assert rel_err(mine, theirs) <= 1e-6, variant
