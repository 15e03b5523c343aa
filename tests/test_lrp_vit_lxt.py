"""Parity with lxt 2.1 on torchvision ViTs (random weights).

lxt patches torch classes process-wide with no undo, so it runs in a subprocess
(`tests/lrp_vit_lxt_side.py`) that saves its relevances to a temporary file.

Compared variants, both in lxt's gradient×input convention starting from the target
logit (`start="logit"`), with pxopt using LRP-0 (epsilon 0) on every Linear / the patch
embedding and the plain residual sum, which is what lxt's efficient mode does:
- "cp": lxt's own torchvision map `vit_torch.cp_LRP` vs pxopt `softmax="cp"`.
- "attnlrp": lxt has no AttnLRP map for torchvision; the side script builds one from lxt's
  own `divide_gradient` (q, k / 4 and v / 2, as in its HF attention wrapper) applied at
  the MultiheadAttention inputs, vs pxopt `softmax="attnlrp"` (uniform rule, eps 0).
Checked: input relevance and the relevance on the residual stream after every encoder
block, each within 1e-4 relative (‖a − b‖ / ‖b‖). The per-head and per-MLP-neuron
relevance that pruning ranks is compared with lxt as shipped (its own patch map and
zennit rules, nothing assembled here) in tests/test_lrp_vit_lxt_shipped.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pxopt.lrp.vit import explain_vit

SIDE = Path(__file__).with_name("lrp_vit_lxt_side.py")
GROUPS = ("input", "low", "mid", "high", "fc")


def run_lxt(tmp_path: Path, arch: str, kwargs: dict, model: nn.Module, x: torch.Tensor,
            t: torch.Tensor, variant: str) -> dict:
    src, dst = tmp_path / "in.pt", tmp_path / f"out_{variant}.pt"
    torch.save({"arch": arch, "kwargs": kwargs, "state": model.state_dict(), "inputs": x,
                "targets": t}, src)
    proc = subprocess.run([sys.executable, str(SIDE), str(src), str(dst), variant],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dst, weights_only=True)


def run_pxopt(model: nn.Module, x: torch.Tensor, t: torch.Tensor, variant: str) -> dict:
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        kept.append(out)

    handles = [b.register_forward_hook(keep) for b in model.encoder.layers]
    cfg = {"groups": {g: {"rule": "epsilon", "epsilon": 0.0} for g in GROUPS}, "softmax": variant}
    try:
        expl = explain_vit(model, x, t, cfg, start="logit")
    finally:
        for h in handles:
            h.remove()
    return {"input": expl.input, "stream": [(h * h.grad).detach() for h in kept],
            "output": expl.output}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_parity(tmp_path: Path, arch: str, kwargs: dict, variant: str, x: torch.Tensor) -> None:
    model = getattr(torchvision.models, arch)(**kwargs).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    t = torch.arange(x.shape[0]) + 3
    ref = run_lxt(tmp_path, arch, kwargs, model, x, t, variant)
    got = run_pxopt(model, x, t, variant)
    assert (got["output"] - ref["output"]).abs().max() <= 1e-5
    assert ref["input"].abs().sum() > 0
    assert rel_err(got["input"], ref["input"]) <= 1e-4
    assert len(got["stream"]) == len(ref["stream"]) == len(model.encoder.layers)
    for mine, theirs in zip(got["stream"], ref["stream"], strict=True):
        assert rel_err(mine, theirs) <= 1e-4
    # the variants really differ (the comparison is not vacuous)
    if variant == "attnlrp":
        cp = run_pxopt(model, x, t, "cp")
        assert rel_err(cp["input"], ref["input"]) > 1e-2


TINY = {"image_size": 32, "patch_size": 8, "num_layers": 3, "num_heads": 4, "hidden_dim": 32,
        "mlp_dim": 64, "num_classes": 10}


def test_lxt_parity_tiny_torchvision_cp(tmp_path: Path) -> None:
    check_parity(tmp_path, "VisionTransformer", TINY, "cp", torch.randn(2, 3, 32, 32))


@pytest.mark.slow
def test_lxt_parity_tiny_torchvision_attnlrp(tmp_path: Path) -> None:
    check_parity(tmp_path, "VisionTransformer", TINY, "attnlrp", torch.randn(2, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cp", "attnlrp"])
def test_lxt_parity_vit_b_16(tmp_path: Path, variant: str) -> None:
    check_parity(tmp_path, "vit_b_16", {}, variant, torch.randn(1, 3, 224, 224))
