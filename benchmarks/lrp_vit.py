"""Cost of AttnLRP / CP-LRP on ViTs relative to a plain forward + input-gradient backward.

    python benchmarks/lrp_vit.py            # batch 1 and 8, 3 rounds
    python benchmarks/lrp_vit.py --quick    # batch 1, 2 rounds

Models: torchvision vit_b_16 and timm vit_base_patch16_224 (random weights). Methods:
forward (no grad), forward + backward (input gradient, frozen parameters), pxopt
AttnLRP and CP-LRP collecting heads and MLP neurons (default epsilon 1e-6 composite;
fused attention kernel), pxopt AttnLRP with the explicit q·kᵀ / softmax / A·V ops, and
lxt 2.1 on the torchvision model (its CP-LRP map, and AttnLRP built from lxt's own
`divide_gradient`; its class patches are swapped in only around its own calls). Methods are
interleaved round by round (medians reported) so that load changes on a shared machine hit
them alike. Results go to benchmarks/results/lrp_vit.{md,json} (`--out` for another stem),
rewritten after every model and batch so that an interrupted run keeps what it measured.

    python benchmarks/lrp_vit.py --device cuda --batches 1 8 32 --rounds 5 --out /tmp/lrp_vit_gpu

On CUDA each batch size gets its own warm-up call per method (cheap there, and the first
call at a new shape pays for kernel selection and allocator growth); the results record the
cuDNN / TF32 flags in force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pxopt.device import configure_threads, resolve_device
from pxopt.lrp.vit import explain_vit
from pxopt.vocab import GROUPS

RESULTS = Path(__file__).resolve().parent / "results"


def make_models(device: torch.device) -> dict[str, nn.Module]:
    import timm
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.vit_b_16()
    nn.init.normal_(tv.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    tm = timm.create_model("vit_base_patch16_224", pretrained=False)
    models = {"torchvision vit_b_16": tv, "timm vit_base_patch16_224": tm}
    for m in models.values():
        m.eval().to(device)
        for p in m.parameters():
            p.requires_grad_(False)
    return models


def backend_flags() -> str:
    """cuDNN / TF32 settings: they change CUDA timings, so the results record them."""
    cudnn = torch.backends.cudnn
    conv = getattr(getattr(cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    return (f"cudnn {cudnn.version()} enabled={cudnn.enabled} benchmark={cudnn.benchmark} "
            f"deterministic={cudnn.deterministic}; conv fp32_precision={conv}, "
            f"matmul fp32_precision={matmul}, float32_matmul_precision="
            f"{torch.get_float32_matmul_precision()}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def forward_backward(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    """Plain gradient of the target logit w.r.t. the input (what lxt's explanation costs)."""
    xg = x.detach().requires_grad_(True)
    out = model(xg)
    seed = torch.zeros_like(out).scatter_(1, t[:, None], 1.0)
    (grad,) = torch.autograd.grad(out, xg, seed)
    (xg * grad).sum().item()


LRP0 = {g: {"rule": "epsilon", "epsilon": 0.0} for g in GROUPS}


def pxopt_lrp(model: nn.Module, x: torch.Tensor, t: torch.Tensor, softmax: str,
              fused: bool = True, groups: dict | None = None) -> None:
    explain_vit(model, x, t, {"softmax": softmax, "groups": groups or {}}, kinds=["heads", "mlp"],
                fused=fused)


def time_rounds(methods: dict[str, Callable[[], None]], rounds: int, device: torch.device,
                warmup: bool = True) -> dict[str, dict[str, list[float]]]:
    """One warm-up call each (if asked), then `rounds` rounds with every method once per round."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values() if warmup else ():
        fn()
    for _ in range(rounds):
        for name, fn in methods.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {"wall": times, "cpu": cpu}


def lxt_methods(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, Callable[[], None]]:
    """lxt's explanations (gradient × input under its patches of torch.nn classes).

    lxt patches nn.GELU, nn.LayerNorm and nn.MultiheadAttention class-wide with no undo;
    the patched forwards are captured here and swapped in only around each lxt call, so
    lxt can be interleaved with the other methods (and timm's nn.GELU stays untouched).
    """
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.vit_torch import cp_LRP
    from lxt.efficient.rules import divide_gradient
    from torchvision.models import vision_transformer

    classes = (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)
    torch_fwd = {c: c.__dict__["forward"] for c in classes}
    mha_forward = torch_fwd[nn.MultiheadAttention]

    def attnlrp_mha_forward(self: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, *args: object, **kwargs: object) -> object:
        return mha_forward(self, divide_gradient(query, 4), divide_gradient(key, 4),
                           divide_gradient(value, 2), *args, **kwargs)

    monkey_patch(vision_transformer, cp_LRP)  # GELU identity, LayerNorm, CP attention
    cp_fwd = {c: c.__dict__["forward"] for c in classes}
    for c in classes:  # back to torch until an lxt call
        c.forward = torch_fwd[c]
    attn_fwd = {**cp_fwd, nn.MultiheadAttention: attnlrp_mha_forward}

    def run(patched: dict) -> None:
        try:
            for c in classes:
                c.forward = patched[c]
            forward_backward(model, x, t)
        finally:
            for c in classes:
                c.forward = torch_fwd[c]

    return {"lxt CP-LRP": partial(run, cp_fwd),
            "lxt AttnLRP (divide_gradient)": partial(run, attn_fwd)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 only, 2 rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on shared machines)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-lxt", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "lrp_vit")
    ap.add_argument("--note", default="", help="free text appended to the results file")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.rounds = [1], 2
    threads = configure_threads(args.threads)
    device = resolve_device(args.device)
    models = make_models(device)
    rows: list[dict] = []
    inputs = {b: (torch.randn(b, 3, 224, 224, device=device),
                  torch.arange(b, device=device) % 1000) for b in args.batches}

    def record(model_name: str, batch: int, times: dict[str, dict[str, list[float]]]) -> None:
        for method, ts in times["wall"].items():
            cpu = times["cpu"][method]
            rows.append({"model": model_name, "batch": batch, "method": method,
                         "median_s": statistics.median(ts), "times_s": ts,
                         "median_cpu_s": statistics.median(cpu), "cpu_s": cpu})
            print(f"{model_name:28s} b={batch:<2d} {method:34s} {statistics.median(ts):8.3f} s"
                  f"  cpu {statistics.median(cpu):8.3f} s", flush=True)

    for b in args.batches:
        for model_name, model in models.items():
            x, t = inputs[b]
            methods = {
                "forward": partial(forward, model, x, t),
                "forward+backward": partial(forward_backward, model, x, t),
                "pxopt AttnLRP": partial(pxopt_lrp, model, x, t, "attnlrp"),
                "pxopt CP-LRP": partial(pxopt_lrp, model, x, t, "cp"),
                "pxopt AttnLRP, LRP-0 (lxt's rules)": partial(pxopt_lrp, model, x, t, "attnlrp",
                                                               True, LRP0),
            }
            if b == min(args.batches):  # the explicit ops only where they are cheap to time
                methods["pxopt AttnLRP (explicit ops)"] = partial(pxopt_lrp, model, x, t, "attnlrp",
                                                                  False)
            if not args.no_lxt and model_name.startswith("torchvision"):
                methods.update(lxt_methods(model, x, t))
            # CPU: warm-up on the smallest batch only (the larger ones then run warm)
            warmup = b == min(args.batches) or device.type == "cuda"
            record(model_name, b, time_rounds(methods, args.rounds, device, warmup=warmup))
            write(rows, args, threads, device)  # after every model and batch: partial results


def write(rows: list[dict], args: argparse.Namespace, threads: int, device: torch.device) -> None:
    # ratios from process CPU time on the CPU (robust to other load on a shared machine with
    # one torch thread), from wall time on CUDA
    key = "median_cpu_s" if device.type == "cpu" else "median_s"
    base = {(r["model"], r["batch"]): r[key] for r in rows if r["method"] == "forward+backward"}
    fwd = {(r["model"], r["batch"]): r[key] for r in rows if r["method"] == "forward"}
    for r in rows:
        r["vs_forward_backward"] = r[key] / base[(r["model"], r["batch"])]
        r["vs_forward"] = r[key] / fwd[(r["model"], r["batch"])]
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {threads} torch thread(s)"
    cmd = "python benchmarks/lrp_vit.py " + " ".join(sys.argv[1:])
    meta = {"command": cmd.strip(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine, "device": str(device), "python": platform.python_version(),
            "torch": torch.__version__, "rounds": args.rounds, "note": args.note}
    if device.type == "cuda":
        meta["backend"] = backend_flags()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# AttnLRP on ViTs: cost relative to forward + input-gradient backward", "",
        f"- command: `{meta['command']}`", f"- date: {meta['date']}",
        f"- machine: {machine} ({platform.platform()}), device {device}",
        f"- torch {torch.__version__}, Python {meta['python']}; median of {args.rounds} "
        "interleaved rounds (one warm-up call per method "
        f"{'at every batch' if device.type == 'cuda' else 'at the smallest batch'})",
        *([f"- CUDA backend: {meta['backend']}"] if "backend" in meta else []),
        "- pxopt: default composite (epsilon 1e-6 everywhere), components: heads + MLP fc1 "
        "neurons; lxt: input relevance only (it has no component collection)", "",
        f"- ratios from {'process CPU time (one torch thread; robust to other load)' if key == 'median_cpu_s' else 'wall time'}",
        "",
        "| model | batch | method | median wall s | median CPU s | × fwd+bwd | × forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['median_s']:.3f} | "
                     f"{r['median_cpu_s']:.3f} | {r['vs_forward_backward']:.2f} | "
                     f"{r['vs_forward']:.2f} |")
    if args.note:
        lines += ["", args.note]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
