"""Benchmark: pxopt's CNN LRP vs a plain forward / forward+backward and vs zennit 0.5.1.

For each model and batch size, in one run (so the ratios share the machine's state):
forward (no grad), forward + input-gradient backward (parameters frozen), pxopt LRP
collecting every channel's relevance (`explain`, all layers recorded), and zennit's
attribution with the same rules (its canonizers + a NameMapComposite; no channel
collection, which favours zennit). Peak memory: `torch.cuda.max_memory_allocated` on
CUDA; on CPU the peak increase of the process RSS during the call, sampled every 2 ms
from /proc/self/statm (an approximation: the allocator may reuse freed memory).

    python benchmarks/lrp_cnn.py                 # full: resnet50, vgg16, mobilenet_v3_large,
                                                 # efficientnet_b0; batch 8, 32; 224x224
    python benchmarks/lrp_cnn.py --quick         # 1 repeat, batch 8 only
    python benchmarks/lrp_cnn.py --models resnet50 --batches 8 --repeats 3
    python benchmarks/lrp_cnn.py --device cuda --warmup 2 --repeats 5 --out /tmp/lrp_cnn_gpu.md
    python benchmarks/lrp_cnn.py --models convnext_tiny --batches 8 --composites epsilon \
        --out benchmarks/results/lrp_cnn_convnext.md   # no zennit row: zennit has no LayerNorm rule

On CUDA every method runs under the same cuDNN settings (`--cudnn-benchmark` sets
`torch.backends.cudnn.benchmark` once, before any model runs), and the results file
records the cuDNN / TF32 flags in force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from pxopt.device import configure_threads, resolve_device
from pxopt.layers import discover_layers
from pxopt.lrp import explain
from pxopt.lrp.config import RuleConfig

COMPOSITES: dict[str, dict] = {
    "epsilon": RuleConfig.uniform({"rule": "epsilon", "epsilon": 1e-6}).to_dict(),
    "gamma": RuleConfig.uniform({"rule": "gamma", "gamma": 0.25}).to_dict(),
    "alphabeta": RuleConfig.uniform({"rule": "alphabeta", "alpha": 2.0, "beta": 1.0}).to_dict(),
    "mixed": {"groups": {
        "input": {"rule": "zbox", "low": -3.0, "high": 3.0},
        "low": {"rule": "gamma", "gamma": 0.25},
        "mid": {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0},
        "high": {"rule": "epsilon", "epsilon": 1e-6},
        "fc": {"rule": "epsilon", "epsilon": 1e-6}}},
}


# ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_flags() -> str:
    """cuDNN / TF32 settings: they change CUDA timings, so every results file records them."""
    cudnn = torch.backends.cudnn
    conv = getattr(getattr(cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    return (f"cudnn {cudnn.version()} enabled={cudnn.enabled} benchmark={cudnn.benchmark} "
            f"deterministic={cudnn.deterministic}; conv fp32_precision={conv}, "
            f"matmul fp32_precision={matmul}, float32_matmul_precision="
            f"{torch.get_float32_matmul_precision()}")


class _RssPeak:
    """Peak RSS increase (bytes) while the context is open, sampled every 2 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> _RssPeak:
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Seconds and peak memory (MiB) of one call."""
    if device.type == "cuda":
        _sync(device)  # start from an idle stream: only this call's kernels are timed
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _RssPeak() as rss:
        t = time.perf_counter()
        fn()
        dt_ = time.perf_counter() - t
    return dt_, rss.delta / 2**20


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
            baseline: Callable[[], object] | None = None) -> dict:
    """Median time, peak memory and, with a baseline, the median of paired ratios.

    Each timed call of `fn` follows a call of `baseline` and its ratio is taken pairwise,
    which cancels slow drifts in the load of a shared machine.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times, mems, ratios = [], [], []
    for _ in range(repeats):
        if baseline is not None:
            tb, _ = _timed(baseline, device)
        t, mem = _timed(fn, device)
        times.append(t)
        mems.append(mem)
        if baseline is not None:
            ratios.append(t / tb)
    out = {"time": statistics.median(times), "mem": max(mems)}
    if ratios:
        out["vs_fb"] = statistics.median(ratios)
    return out


# ---------------------------------------------------------------------------------------
def make_model(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # realistic, non-trivial BatchNorm
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    model.requires_grad_(False)
    return model.eval().to(device)


def zennit_covers(model: nn.Module) -> bool:
    """zennit has canonisers for ResNet and VGG only (none for ConvNeXt's LayerNorm, no rule for
    squeeze-excitation gates)."""
    return isinstance(model, torchvision.models.ResNet | torchvision.models.VGG)


def zennit_attributor(model: nn.Module, rules: dict, layer_map):  # noqa: ANN201
    import zennit.rules as zr
    from zennit.composites import (
        LayerMapComposite,
        MixedComposite,
        NameMapComposite,
        layer_map_base,
    )
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    cfg = RuleConfig.coerce(rules)

    def to_zennit(spec):  # noqa: ANN001, ANN202
        p = dict(spec.params)
        return {"epsilon": lambda: zr.Epsilon(p.get("epsilon", 1e-6)),
                "gamma": lambda: zr.Gamma(p.get("gamma", 0.25)),
                "alphabeta": lambda: zr.AlphaBeta(p.get("alpha", 2.0), p.get("beta", 1.0)),
                "zplus": zr.ZPlus,
                "zbox": lambda: zr.ZBox(p["low"], p["high"])}[spec.name]()

    name_map = [((layer.name,), to_zennit(cfg.rule_for(layer.name, layer.group)))
                for layer in layer_map]
    canon = [ResNetCanonizer()] if isinstance(model, torchvision.models.ResNet) else [VGGCanonizer()]
    return MixedComposite([NameMapComposite(name_map), LayerMapComposite(layer_map_base())],
                          canonizers=canon)


def run(args: argparse.Namespace,
        on_row: Callable[[list[dict], int | None], None] | None = None) -> tuple[list[dict], int | None]:
    """Measure everything; `on_row(rows, threads)` after each row (partial results survive)."""
    device = resolve_device(args.device)
    threads = configure_threads(args.threads) if device.type == "cpu" else None
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # one setting for every method
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(rows, threads)

    for name in args.models:
        model = make_model(name, device)
        lm = discover_layers(model)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, device=device)
            y = torch.randint(0, 1000, (batch,), device=device)

            def forward(model: nn.Module = model, x: torch.Tensor = x) -> object:
                with torch.no_grad():
                    return model(x)

            def fwd_bwd(model: nn.Module = model, x: torch.Tensor = x,
                        y: torch.Tensor = y) -> object:
                xx = x.clone().requires_grad_(True)
                out = model(xx)
                return torch.autograd.grad(out.gather(1, y[:, None]).sum(), xx)[0]

            base = {"model": name, "batch": batch}
            fwd = measure(forward, device, args.repeats, max(args.warmup, 1))
            fb = measure(fwd_bwd, device, args.repeats, max(args.warmup, 1))
            add({**base, "method": "forward", **fwd})
            add({**base, "method": "forward+backward", **fb})
            print(f"{name} b{batch}: forward {fwd['time']:.3f}s, fwd+bwd {fb['time']:.3f}s",
                  flush=True)
            for comp in args.composites:
                rules = COMPOSITES[comp]

                def pxopt_lrp(rules: dict = rules, model: nn.Module = model,
                              x: torch.Tensor = x, y: torch.Tensor = y, lm: object = lm) -> object:
                    return explain(model, x, y, rules, layer_map=lm)

                px = measure(pxopt_lrp, device, args.repeats, args.warmup, fwd_bwd)
                row = {**base, "method": f"pxopt {comp}", **px}
                msg = f"  {comp}: pxopt {px['time']:.3f}s ({px['vs_fb']:.2f}x fwd+bwd)"
                if not args.no_zennit and zennit_covers(model):
                    composite = zennit_attributor(model, rules, lm)

                    def zennit_lrp(composite: object = composite, model: nn.Module = model,
                                   x: torch.Tensor = x, y: torch.Tensor = y) -> object:
                        with composite.context(model) as hooked:
                            xx = x.clone().requires_grad_(True)
                            out = hooked(xx)
                            seed = torch.zeros_like(out).scatter_(1, y[:, None], 1.0)
                            return torch.autograd.grad(out, xx, seed)[0]

                    zn = measure(zennit_lrp, device, args.repeats, args.warmup, fwd_bwd)
                    add({**base, "method": f"zennit {comp}", **zn})
                    # speed-up from the paired ratios (both relative to fwd+bwd)
                    row["speedup"] = zn["vs_fb"] / px["vs_fb"]
                    msg += f", zennit {zn['time']:.3f}s ({zn['vs_fb']:.2f}x), speed-up {row['speedup']:.2f}x"
                add(row)
                print(msg, flush=True)
    return rows, threads


def write(rows: list[dict], args: argparse.Namespace, threads: int | None, path: Path) -> None:
    device = resolve_device(args.device)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
        memnote = "peak `torch.cuda.max_memory_allocated` above the resident model"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s)"
        memnote = "peak RSS increase during one call (sampled every 2 ms; approximate)"
    lines = [
        "# LRP on CNNs: pxopt vs forward/backward and zennit 0.5.1",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine}; torch {torch.__version__}, torchvision {torchvision.__version__}",
        f"- command: `python benchmarks/lrp_cnn.py {' '.join(args.argv)}`".rstrip(),
        f"- input {args.size}x{args.size}, float32, random weights with randomised BatchNorm; "
        f"median of {args.repeats} timed call(s) after {args.warmup} warm-up call(s)",
        f"- memory: {memnote}",
        *([f"- CUDA backend: {backend_flags()}"] if device.type == "cuda" else []),
        f"- machine load (1/5/15-min load average when this file was written): "
        f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())}",
        "- ratios: time / (forward + input-gradient backward) of the same model and batch, "
        "measured in this run as the median of paired ratios (each timed call right after a "
        "forward+backward call, to cancel load drift on a shared machine); speed-up = zennit "
        "ratio / pxopt ratio",
        "- pxopt LRP records every conv/linear channel's relevance; zennit computes only the "
        "input relevance (favours zennit)",
        "",
        "| model | batch | method | time (s) | x fwd+bwd | speed-up vs zennit | memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['vs_fb']:.2f}" if "vs_fb" in r else ""
        speed = f"{r['speedup']:.2f}" if "speedup" in r else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['time']:.3f} | "
                     f"{ratio} | {speed} | {r['mem']:.0f} |")
    if args.note:
        lines += ["", args.note]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+",
                   default=["resnet50", "vgg16", "mobilenet_v3_large", "efficientnet_b0"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--composites", nargs="+", default=list(COMPOSITES), choices=list(COMPOSITES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="1 repeat, no warm-up (except one forward), batch 8 only")
    p.add_argument("--no-zennit", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="set torch.backends.cudnn.benchmark for all methods (default: off)")
    p.add_argument("--note", default="", help="free text appended to the results file")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lrp_cnn.md")
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.quick:
        args.repeats, args.warmup, args.batches = 1, 0, [8]
    rows, threads = run(args, lambda rows, threads: write(rows, args, threads, args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
