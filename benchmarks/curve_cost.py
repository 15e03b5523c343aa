"""Cost of one accuracy-vs-pruning-rate curve relative to one plain validation pass.

    python benchmarks/curve_cost.py [--models resnet,vgg,vit] [--n-val 100] [--threads 1]

For each built-in Fashion-MNIST model: one plain pass over the validation set (no masks,
median of several), then 20-rate curves (0, 0.05, ..., 0.95) pruned by LRP-epsilon scores,
in four settings: masks only; masks + channel slicing; + reuse of the unpruned blocks before
the first pruned one and one-batch evaluation of severed networks (the default); + the chance
stop (an option). Ratio = curve seconds / plain-pass seconds. Writes benchmarks/results/curve_cost.md
and .json.

Models come from `pxopt.models.load_model("builtin:fmnist-...")` (`--source builtin`), or
the built-in architectures (`pxopt.models.builtin.archs`) trained here for `--train-steps`
steps (`--source quick`); the result says which.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pxopt.criteria import compute_scores  # noqa: E402
from pxopt.data import make_task  # noqa: E402
from pxopt.device import resolve_device  # noqa: E402
from pxopt.evaluate import DEFAULT_RATES, _accuracy, accuracy_curve  # noqa: E402
from pxopt.layers import discover_layers  # noqa: E402

# column -> (evaluation mode, prefix cache + severed-network shortcut, chance stop);
# "slice+prefix" is accuracy_curve's default.
SETTINGS = {
    "mask": ("mask", False, False),
    "slice": ("slice", False, False),
    "slice+prefix": ("auto", True, False),
    "slice+prefix+stop": ("auto", True, True),
}
KINDS = {"resnet": ("conv",), "vgg": ("conv",), "vit": ("mlp",), "vit-heads": ("heads",)}


def get_model(name: str, train_steps: int, source: str) -> tuple[torch.nn.Module, object, str]:
    base = "vit" if name.startswith("vit") else name
    if source == "builtin":
        from pxopt.models import load_model

        lm = load_model(f"builtin:fmnist-{base}", device="cpu")  # moved to --device in bench_one
        return lm.model, lm.transform, f"builtin:fmnist-{base} (pxopt.models.load_model)"
    from pxopt.data import open_dataset
    from pxopt.models.builtin import archs
    from pxopt.models.builtin.transform import FmnistTransform

    model = {"resnet": archs.FmnistResNet, "vgg": archs.fmnist_vgg, "vit": archs.fmnist_vit}[base]()
    tf = FmnistTransform()
    split = open_dataset("fashion-mnist").splits["train"]
    x, y = tf.apply_batch(split.images[:20000]), split.labels[:20000]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(train_steps):
        idx = torch.randint(0, len(x), (128,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tf, f"pxopt.models.builtin.archs {base}, trained here for {train_steps} steps of 128"


def _clocked(fn, clock) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = clock()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - t0, out


def timed(fn, repeats: int, clock=time.process_time) -> tuple[float, object]:
    """Median time of `fn`. Default clock: this process's CPU time, robust to other jobs on a
    shared machine with one torch thread (wall time on a busy 2-core box varies 2x)."""
    times, out = [], None
    for _ in range(repeats):
        t, out = _clocked(fn, clock)
        times.append(t)
    return statistics.median(times), out


def paired_ratio(fn, plain, repeats: int, clock=time.process_time) -> tuple[float, float, object]:
    """Median over repeats of time(fn) / time(plain pass), the plain pass timed right before
    and right after each call of `fn`.

    The host's speed drifts by a third within minutes even in CPU time, so a plain pass
    measured once at the start would skew every later ratio; bracketing each curve cancels it.
    """
    ratios, times, out = [], [], None
    for _ in range(repeats):
        before, _ = _clocked(plain, clock)
        t, out = _clocked(fn, clock)
        after, _ = _clocked(plain, clock)
        ratios.append(t / ((before + after) / 2))
        times.append(t)
    return statistics.median(ratios), statistics.median(times), out


def bench_one(name: str, args: argparse.Namespace) -> dict:
    """Plain pass and the four curve settings for one model, measured back to back."""
    model, tf, source = get_model(name, args.train_steps, args.source)
    task = make_task("fashion-mnist", classes=None, n_ref=10, n_val=args.n_val, seed=0, transform=tf,
                     num_model_classes=10)
    dev = resolve_device(args.device)
    model = model.to(dev)
    lm = discover_layers(model)
    kinds = KINDS[name]
    scores = compute_scores("lrp-epsilon", model, task.reference_batches(50, dev), lm, kinds=kinds)
    data = [(x, y) for x, y in task.validation_batches(args.batch_size, dev)]
    classes = torch.tensor(task.classes, device=dev)
    _accuracy(model, data, classes)  # warm-up
    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    plain, acc = timed(lambda: _accuracy(model, data, classes), 5, clock)
    row = {"model": name, "source": source, "kinds": list(kinds), "n_val": sum(len(y) for _, y in data),
           "plain_pass_s": plain, "unpruned_accuracy": acc, "clock": clock.__name__}
    for key, (mode, prefix, stop) in SETTINGS.items():
        ratio, t, curve = paired_ratio(lambda mode=mode, prefix=prefix, stop=stop: accuracy_curve(
            model, task, lm, scores, kinds=kinds, rates=DEFAULT_RATES, batches=data, mode=mode,
            stop_at_chance=stop, prefix_cache_bytes=None if prefix else 0,
            detect_severed=prefix),
            lambda: _accuracy(model, data, classes), args.repeats, clock)
        row[key] = {"seconds": t, "ratio": ratio, "area": curve.area,
                    "stopped_early_at": curve.stopped_early_at, "passes": curve.meta["passes"],
                    "resumed_passes": curve.meta["resumed_passes"],
                    "severed_passes": curve.meta["severed_passes"],
                    "sliced_layers": len(curve.meta["sliced_layers"]),
                    "accuracies": [round(a, 4) for a in curve.accuracies]}
    row["same_curve"] = row["slice"]["accuracies"] == row["slice+prefix"]["accuracies"]  # reuse is exact
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet,vgg,vit,vit-heads")
    ap.add_argument("--n-val", type=int, default=100, help="validation images per class")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--source", choices=("builtin", "quick"), default="builtin",
                    help="builtin: pxopt.models.load_model (trains on first use, minutes); quick: the"
                         " built-in architectures trained here for --train-steps steps")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2, help="curve repeats (median)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "curve_cost"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        row = bench_one(name, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} thread(s),"
                   f" torch {torch.__version__}, device {args.device}, load average"
                   f" {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end (shared machine)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Curve cost: 20-rate curve time / one plain validation pass", "",
        "Times are this process's CPU time on the CPU (one torch thread; robust to the other jobs"
        " on the shared machine), wall time on CUDA. Ratios per cell: median over the repeats of"
        " curve / plain pass, the plain pass timed right before and after each curve (the host's"
        " speed drifts).", "",
        f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
        "- scores: LRP-epsilon on 10 reference images per class; rates 0, 0.05, ..., 0.95;"
        " all measured in one run; target <= 8, naive (one full pass per rate) ~20.", "",
        "| model | kinds | val images | unpruned acc | plain pass s | mask | slice |"
        " slice + prefix + severed (default) | the same + chance stop | passes resumed / severed |"
        " default curve = slice curve |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[k]['ratio']:.1f}" + (f" (stop at {r[k]['stopped_early_at']})" if r[k]["stopped_early_at"]
                                          else "") for k in SETTINGS]
        lines.append(f"| {r['model']} | {','.join(r['kinds'])} | {r['n_val']} | {r['unpruned_accuracy']:.3f} |"
                     f" {r['plain_pass_s']:.3f} | " + " | ".join(cells) +
                     f" | {r['slice+prefix']['resumed_passes']} / {r['slice+prefix']['severed_passes']}"
                     f" of {r['slice+prefix']['passes'] - 1} |"
                     f" {'yes' if r['same_curve'] else 'NO'} |")
    lines += ["", "Model sources:", *[f"- {r['model']}: {r['source']}" for r in rows], ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
