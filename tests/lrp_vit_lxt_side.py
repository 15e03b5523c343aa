"""lxt side of the parity test (run in a subprocess: lxt patches torch classes for good).

Usage: python lrp_vit_lxt_side.py IN.pt OUT.pt {cp,attnlrp}
IN.pt holds the torchvision ViT architecture name, its state dict, inputs and targets.
Writes the input relevance (x * grad) and the relevance on the residual stream after
every encoder block (h * grad), lxt's gradient×input convention, starting from the
target logit (the relevance that enters is the logit value).

cp: lxt's own torchvision map (`vit_torch.cp_LRP`: GELU identity, LayerNorm with
detached std, q and k detached at the MultiheadAttention inputs).
attnlrp: the same map with AttnLRP's attention instead, built from lxt's own
`divide_gradient` (its HF wrapper divides q, k by 4 and v by 2): applied at the inputs of
the fused MultiheadAttention, which is equivalent because the in-projections are linear.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
import torchvision
from lxt.efficient import monkey_patch
from lxt.efficient.models.vit_torch import cp_LRP
from lxt.efficient.patches import patch_method
from lxt.efficient.rules import divide_gradient
from torchvision.models import vision_transformer


def attnlrp_mha_forward(self, query, key, value, *args, **kwargs):
    return self.original_forward(divide_gradient(query, 4), divide_gradient(key, 4),
                                 divide_gradient(value, 2), *args, **kwargs)


def main(src: str, dst: str, variant: str) -> None:
    torch.set_num_threads(1)
    data = torch.load(src, weights_only=True)
    patch_map = dict(cp_LRP)
    if variant == "attnlrp":
        patch_map[vision_transformer.nn.MultiheadAttention] = partial(
            patch_method, attnlrp_mha_forward, keep_original=True)
    monkey_patch(vision_transformer, patch_map)
    model = getattr(torchvision.models, data["arch"])(**data["kwargs"]).eval()
    model.load_state_dict(data["state"])
    for p in model.parameters():
        p.requires_grad_(False)
    stream: list[torch.Tensor] = []
    def keep(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        stream.append(out)

    for blk in model.encoder.layers:
        blk.register_forward_hook(keep)
    x = data["inputs"].clone().requires_grad_(True)
    y = model(x)
    onehot = torch.zeros_like(y).scatter_(1, data["targets"][:, None], 1.0)
    y.backward(onehot)
    torch.save({"input": (x * x.grad).detach(),
                "stream": [(h * h.grad).detach() for h in stream],
                "output": y.detach()}, dst)


if __name__ == "__main__":
    main(*sys.argv[1:4])
