"""lxt 2.1 as shipped on a torchvision ViT (run in a subprocess: lxt patches torch for good).

Usage: python lrp_vit_lxt_shipped_side.py IN.pt OUT.pt
IN.pt: the VisionTransformer kwargs, state dict, dtype, inputs, targets and the two gamma
values. The explanation is made exactly as lxt's own example `examples/vit_torch.py`:

    monkey_patch(vision_transformer)   # lxt's default map for it: vit_torch.cp_LRP
    monkey_patch_zennit()
    LayerMapComposite([(Conv2d, Gamma(conv_gamma)), (Linear, Gamma(lin_gamma))]).register(model)
    y[target].backward()               # relevance = input * input.grad

Nothing of pxopt is imported. Saved (gradient x input, per token, before any aggregation):
- "heads": per block (batch, heads, tokens) = the relevance of the attention output per head
  and query token, before the out-projection: ctx * grad(ctx) summed over the head's
  channels. lxt's MultiheadAttention is one fused call with no module boundary there, so
  ctx (softmax(q k^T / sqrt(d)) v, all heads concatenated) is recomputed from the block's
  input (checked: ctx W_o^T + b_o equals the block's attention output), and grad(ctx) is
  grad(attention output) @ W_o: the out-projection runs inside that fused call, so no rule
  reaches it (its zennit hook never fires: "out_proj_calls" counts its forward calls).
- "mlp": per block (batch, tokens, hidden) = the relevance at the GELU output
  (y * grad y); "fc1_out": the same at the GELU input (the fc1 output).
- "input": input relevance; "output": the logits.
"""

from __future__ import annotations

import sys

import torch
from lxt.efficient import monkey_patch, monkey_patch_zennit
from torch import nn
from torchvision.models import vision_transformer
from zennit.composites import LayerMapComposite
from zennit.rules import Gamma


def context(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of a packed, batch-first self-attention, heads concatenated."""
    b, n, e = x.shape
    h = mha.num_heads
    q, k, v = nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, h, e // h).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-2, -1) / (e // h) ** 0.5, dim=-1)
    return (a @ v).transpose(1, 2).reshape(b, n, e)


def main(src: str, dst: str) -> None:
    torch.set_num_threads(1)
    data = torch.load(src, weights_only=True)
    monkey_patch(vision_transformer)
    monkey_patch_zennit()
    model = vision_transformer.VisionTransformer(**data["kwargs"]).to(data["dtype"]).eval()
    model.load_state_dict(data["state"])
    for p in model.parameters():
        p.requires_grad_(False)
    composite = LayerMapComposite([(nn.Conv2d, Gamma(data["conv_gamma"])),
                                   (nn.Linear, Gamma(data["lin_gamma"]))])
    composite.register(model)

    kept: dict[str, list] = {"attn_in": [], "attn_out": [], "gelu_in": [], "gelu_out": []}
    calls = [0]

    def keep_attn(module: nn.Module, inputs: tuple, out: tuple) -> None:
        out[0].retain_grad()
        kept["attn_in"].append(inputs[0].detach())
        kept["attn_out"].append(out[0])

    def keep_gelu(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        inputs[0].retain_grad()
        out.retain_grad()
        kept["gelu_in"].append(inputs[0])
        kept["gelu_out"].append(out)

    def count(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        calls[0] += 1

    blocks = list(model.encoder.layers)
    for blk in blocks:
        blk.self_attention.register_forward_hook(keep_attn)
        blk.self_attention.out_proj.register_forward_hook(count)
        blk.mlp[1].register_forward_hook(keep_gelu)
    x = data["inputs"].clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.zeros_like(y).scatter_(1, data["targets"][:, None], 1.0))
    composite.remove()

    heads = []
    for blk, xin, out in zip(blocks, kept["attn_in"], kept["attn_out"], strict=True):
        mha = blk.self_attention
        ctx = context(mha, xin)
        err = (nn.functional.linear(ctx, mha.out_proj.weight, mha.out_proj.bias) - out).abs().max()
        assert err <= 1e-6 * out.abs().max(), f"recomputed attention context is off by {err}"
        rel = ctx * (out.grad @ mha.out_proj.weight)
        b, n, e = rel.shape
        heads.append(rel.reshape(b, n, mha.num_heads, -1).sum(-1).transpose(1, 2).detach())
    torch.save({"input": (x * x.grad).detach(), "output": y.detach(), "heads": heads,
                "mlp": [(t * t.grad).detach() for t in kept["gelu_out"]],
                "fc1_out": [(t * t.grad).detach() for t in kept["gelu_in"]],
                "out_proj_calls": calls[0]}, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
