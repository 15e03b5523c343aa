"""lxt side of the Swin parity test (run in a subprocess: lxt patches torch classes for good).

Usage: python lrp_swin_lxt_side.py IN.pt OUT.pt {torchvision,timm}  (writes both variants,
cp and attnlrp). IN.pt holds the SwinTransformer's constructor kwargs, its state dict (float64),
inputs and targets. Writes the input relevance (x * grad, lxt's gradient×input convention,
starting from the target logit), the relevance on the stream after every stage, and the
output.

lxt's own rules: GELU `non_linear_forward` (identity), LayerNorm `layer_norm_forward`
(normaliser detached), attention by lxt's `divide_gradient` on q, k (÷4) and v (÷2) for
AttnLRP, q and k detached for CP (its `cp_multi_head_attention_forward` construction),
applied to the rows of the packed qkv output (torchvision: inside its own
`shifted_window_attention`; timm: a forward hook on `attn.qkv`), so shifts, window
partition, relative bias and mask are the library's code with the plain gradient, as lxt
leaves every unpatched op.
"""

from __future__ import annotations

import sys
import types
from functools import partial

import torch
import torch.nn.functional as F
from lxt.efficient import monkey_patch
from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method
from lxt.efficient.rules import divide_gradient
from torchvision.models import swin_transformer


def _split(out: torch.Tensor, variant: str) -> torch.Tensor:
    """lxt's attention rule on packed q | k | v rows (last dim)."""
    q, k, v = out.chunk(3, dim=-1)
    if variant == "cp":
        return torch.cat([q.detach(), k.detach(), v], dim=-1)
    return torch.cat([divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)], -1)


def _timm_model(data: dict, variant: list[str]) -> torch.nn.Module:
    from timm.models import swin_transformer as tm

    monkey_patch(tm, {
        tm.nn.GELU: partial(patch_method, non_linear_forward, keep_original=True),
        tm.nn.LayerNorm: partial(patch_method, layer_norm_forward),
    })
    model = tm.SwinTransformer(**data["kwargs"]).double().eval()
    model.load_state_dict(data["state"])
    for m in model.modules():
        if isinstance(m, tm.WindowAttention):
            m.qkv.register_forward_hook(lambda mod, args, out: _split(out, variant[0]))
    return model


def main(src: str, dst: str, family: str) -> None:
    torch.set_num_threads(1)
    variant = ["cp"]  # read by the qkv shim at call time
    data = torch.load(src, weights_only=True)
    if family == "timm":
        model = _timm_model(data, variant)
        _run(model, list(model.layers), data, variant, dst)
        return
    monkey_patch(swin_transformer, {
        swin_transformer.nn.GELU: partial(patch_method, non_linear_forward, keep_original=True),
        swin_transformer.nn.LayerNorm: partial(patch_method, layer_norm_forward),
    })
    model = swin_transformer.SwinTransformer(**data["kwargs"]).double().eval()
    model.load_state_dict(data["state"])
    for p in model.parameters():
        p.requires_grad_(False)
    qkv_weights = {id(m.attn.qkv.weight) for m in model.modules()
                   if isinstance(m, swin_transformer.SwinTransformerBlock)}

    def linear(x, weight, bias=None):
        out = F.linear(x, weight, bias)
        if id(weight) not in qkv_weights:
            return out
        return _split(out, variant[0])

    shim = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    shim.linear = linear
    swin_transformer.F = shim  # only shifted_window_attention's F.linear calls see the shim
    _run(model, [st for i, st in enumerate(model.features) if i % 2 == 1], data, variant, dst)


def _run(model: torch.nn.Module, stages: list, data: dict, variant: list[str], dst: str) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    stream: list[torch.Tensor] = []

    def keep(module, inputs, out):
        out.retain_grad()
        stream.append(out)

    for stage in stages:
        stage.register_forward_hook(keep)
    result = {}
    for name in ("cp", "attnlrp"):
        variant[0] = name
        stream.clear()
        x = data["inputs"].clone().requires_grad_(True)
        y = model(x)
        onehot = torch.zeros_like(y).scatter_(1, data["targets"][:, None], 1.0)
        y.backward(onehot)
        result[name] = {"input": (x * x.grad).detach(),
                        "stream": [(h * h.grad).detach() for h in stream], "output": y.detach()}
    torch.save(result, dst)


if __name__ == "__main__":
    main(*sys.argv[1:4])
