"""Count the tensor operations of one LRP call against one forward + input-gradient backward.

On a GPU at the batch sizes a search uses (a few reference images per class), LRP on a
ResNet-50 is bound by kernel launches and Python dispatch, not by arithmetic: an H200
runs the forward + backward of ResNet-50 at batch 8 in ~19 ms, ~37 us per operation.
The number of aten operations is then the cost model, and unlike a timing it is exact
and the same on every machine, so this benchmark can run (and be compared) on a CPU.

    python benchmarks/lrp_op_count.py                  # writes benchmarks/results/lrp_op_count.md
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from pxopt.layers import discover_layers
from pxopt.lrp import explain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lrp_cnn import COMPOSITES  # noqa: E402 - the composites the timing benchmark uses

RESULTS = Path(__file__).resolve().parent / "results"


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched inside the `with` block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(fn: Any) -> collections.Counter[str]:
    fn()  # first call outside: caches (merged BatchNorm) are filled as in a search
    with OpCounter() as counter:
        fn()
    return counter.counts


def count_model(name: str, size: int) -> list[tuple[str, str, int, float, str]]:
    """(model, method, ops, ops / forward+backward ops, most frequent ops) per composite."""
    model = getattr(torchvision.models, name)().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, size, size)
    y = torch.zeros(2, dtype=torch.long)
    layer_map = discover_layers(model)

    def fwd_bwd() -> None:
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out.gather(1, y[:, None]).sum(), xi)

    base = sum(count(fwd_bwd).values())
    rows = [(name, "forward+backward", base, 1.0, "")]
    for comp, rules in COMPOSITES.items():
        ops = count(lambda rules=rules: explain(model, x, y, rules, layer_map=layer_map))
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
        rows.append((name, f"pxopt {comp}", sum(ops.values()), sum(ops.values()) / base, top))
        print(rows[-1][:4], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    ap.add_argument("--size", type=int, default=64, help="input size (op counts do not depend on it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "lrp_op_count.md")
    args = ap.parse_args()
    rows = [row for name in args.models for row in count_model(name, args.size)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    lines = [
        "# LRP cost in tensor operations (the launch-bound cost model on a GPU)", "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; commit {commit}; torch {torch.__version__}",
        "- command: `python benchmarks/lrp_op_count.py`",
        "- aten operations dispatched by one call (the second: caches warm), batch 2; pxopt records "
        "every conv/linear channel's relevance", "",
        "| model | method | aten ops | x fwd+bwd | most frequent |", "|---|---|---|---|---|",
        *(f"| {m} | {meth} | {n} | {r:.2f} | {top} |" for m, meth, n, r, top in rows), "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
