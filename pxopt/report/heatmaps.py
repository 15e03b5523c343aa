"""Heatmaps: the input relevance of a few images under rule configurations, side by side.

One grid, one row per image: the image (the model's input, rescaled for display), then the
relevance of each input pixel (summed over the colour channels) under each configuration,
e.g. the best rules of a study beside all-epsilon. Colours as zennit's
`imgify(relevance, symmetric=True, cmap="bwr")`: a diverging map centred at zero, red for
positive, white for zero, blue for negative relevance, each heatmap scaled to its own
largest |relevance|. The input group's rule of each configuration shapes its heatmap most
(flat or ZBox at the input spread relevance differently from epsilon).

`heatmap_figure` draws the grid with Plotly (the HTML report), `write_png` with Pillow
alone (`pxopt explain`: no browser, no matplotlib). `study_heatmaps` makes the report's
grid from a study and a loaded `pxopt.pipeline.Pipeline` (reference images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor, nn

from pxopt.errors import ConfigError, DataError
from pxopt.search.naming import named_trial

#: zennit's "bwr" colour map ('00f,80:fff,f00') as a Plotly colour scale.
BWR: list[list[Any]] = [[0.0, "rgb(0,0,255)"], [0.5, "rgb(255,255,255)"], [1.0, "rgb(255,0,0)"]]
#: The column of all-epsilon, the configuration every study starts with.
EPSILON_TITLE = "all-epsilon"
#: PNG layout, in pixels: gap between cells, column-title band, caption band under each row,
#: colour-bar band at the bottom, and the smallest cell side (small images are enlarged).
MARGIN = 6
HEADER = 22
CAPTION = 18
LEGEND = 30
MIN_CELL = 112
TEXT = (0, 0, 0)
BACKGROUND = (255, 255, 255)


@dataclass
class Heatmaps:
    """The grid's content: images, per-configuration relevance maps and row captions."""

    images: np.ndarray  # (N, H, W, 3) uint8: the model inputs, rescaled per image for display
    relevance: dict[str, np.ndarray]  # column title -> (N, H, W) float64 input relevance
    captions: list[str]  # one per image (row)
    target: str = "predicted class"  # which logit was explained, for titles

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if not self.relevance:
            raise ConfigError("heatmaps need at least one rule configuration")
        for title, rel in self.relevance.items():
            if rel.shape != (n, *self.images.shape[1:3]):
                raise ValueError(f"relevance of {title!r} has shape {rel.shape}, images {self.images.shape}")
        if len(self.captions) != n:
            raise ValueError(f"{len(self.captions)} captions for {n} images")

    @property
    def columns(self) -> list[str]:
        return ["image", *self.relevance]


# -- computing --------------------------------------------------------------------------------
def input_relevance(model: nn.Module, inputs: Tensor, rules: Any, targets: Tensor | Sequence[int] | None = None) -> np.ndarray:
    """(N, H, W) relevance of every input pixel, summed over channels (`pxopt.lrp.explain`).

    targets: class indices (model outputs) to explain; None explains the predicted class.
    """
    from pxopt.lrp import explain

    start = "predicted" if targets is None else "target"
    exp = explain(model, inputs, targets, rules, start=start, kinds=())
    return exp.input.sum(1).detach().double().cpu().numpy()


def display_images(inputs: Tensor) -> np.ndarray:
    """(N, C, H, W) model inputs -> (N, H, W, 3) uint8, each image and channel rescaled to 0..255.

    The inputs are normalised for the model; min-max per channel undoes an affine
    normalisation up to contrast, so the picture shows what the model was given.
    """
    x = inputs.detach().float().cpu()
    if x.ndim != 4:
        raise ConfigError(f"images must be (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != 3:
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    y = (x - lo) / (hi - lo).clamp_min(1e-12)
    return (y * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def compute_heatmaps(model: nn.Module, inputs: Tensor, configs: Mapping[str, Any], *,
                     targets: Tensor | Sequence[int] | None = None, captions: Sequence[str] | None = None,
                     target: str | None = None) -> Heatmaps:
    """Input relevance of `inputs` under each configuration of `configs` (title -> rules)."""
    device = next(model.parameters()).device
    x = inputs.to(device)
    relevance = {title: input_relevance(model, x, rules, targets) for title, rules in configs.items()}
    n = int(x.shape[0])
    return Heatmaps(
        images=display_images(x), relevance=relevance,
        captions=list(captions) if captions is not None else [f"image {i}" for i in range(n)],
        target=target or ("predicted class" if targets is None else "given class"),
    )


def limit(relevance: np.ndarray) -> float:
    """The symmetric colour limit of one heatmap: its largest |relevance| (1 if all zero)."""
    m = float(np.abs(relevance).max()) if relevance.size else 0.0
    return m if m > 0 and math.isfinite(m) else 1.0


def bwr_rgb(relevance: np.ndarray, lim: float | None = None) -> np.ndarray:
    """(H, W) relevance -> (H, W, 3) uint8 in zennit's "bwr", symmetric around 0.

    -lim is blue (0, 0, 255), 0 white, +lim red (255, 0, 0), linear in between.
    """
    t = np.clip(relevance / (limit(relevance) if lim is None else lim), -1.0, 1.0)
    pos = np.clip(t, 0.0, 1.0)
    neg = np.clip(-t, 0.0, 1.0)
    r = 255.0 * (1.0 - neg)
    g = 255.0 * (1.0 - pos - neg)
    b = 255.0 * (1.0 - pos)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


# -- the study's grid (HTML report) -------------------------------------------------------------
def _reference_picks(labels: Tensor, n: int) -> list[int]:
    """Up to n indices of the reference set, one class after the other (round robin)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        by_class.setdefault(int(y), []).append(i)
    picks: list[int] = []
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop(0))
    return picks


def study_heatmaps(study: Any, pipeline: Any, n_images: int = 4) -> Heatmaps:
    """Reference images of the study's task under the best trial's rules and all-epsilon.

    `pipeline`: the study's loaded `Pipeline` (model and task). The relevance starts at each
    image's true class, as the search's relevance does; captions name the class and the
    model's prediction among the task's classes.
    """
    from pxopt.lrp import RuleConfig
    from pxopt.search.study import baseline_trials

    if n_images < 1:
        raise ConfigError(f"heatmaps: n_images must be >= 1, got {n_images}")
    try:
        best = named_trial(study)
    except ValueError:
        raise ConfigError("heatmaps: the study has no completed trial yet") from None
    eps_trial = baseline_trials(study).get("all-epsilon")
    eps_rules = eps_trial.user_attrs["rules"] if eps_trial is not None else RuleConfig().to_dict()
    name = best.user_attrs.get("baseline")
    title = f"best rules (trial {best.number}{', ' + name if name else ''})"
    ref = pipeline.task.reference
    picks = _reference_picks(ref.labels, n_images)
    images, labels = ref.images[picks], ref.labels[picks]
    classes = list(pipeline.task.classes)
    names = dict(zip(classes, pipeline.task.class_names, strict=False))
    model = pipeline.model
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(images.to(device))
    predicted = [classes[int(i)] for i in out[:, classes].argmax(1).tolist()]
    captions = [f"class {names.get(int(y), int(y))}; predicted {names.get(p, p)}"
                for y, p in zip(labels.tolist(), predicted, strict=True)]
    return compute_heatmaps(model, images, {title: best.user_attrs["rules"], EPSILON_TITLE: eps_rules},
                            targets=labels.to(device), captions=captions, target="true class")


def study_pipeline(study: Any, device: str | None = None, *, allow_download: bool = False) -> Any:
    """The study's model and reference images, loaded again from its spec (`pxopt.spec`).

    The validation set is cut to one image per class (the reference set is drawn first,
    so it is the study's own): heatmaps need only references.
    """
    import dataclasses

    from pxopt.pipeline import Pipeline
    from pxopt.search.spec import StudySpec

    stored = study.user_attrs.get("pxopt.spec")
    if not isinstance(stored, dict):
        raise ConfigError("the study stores no pxopt spec (it was not made by pxopt search)")
    names = {f.name for f in dataclasses.fields(StudySpec)}
    values = {k: v for k, v in stored.items() if k in names}
    spec = StudySpec(**{**values, "n_val": 1, "n_heldout": 0}).validated()
    return Pipeline.from_spec(spec, device=device, allow_download=allow_download)


def try_study_heatmaps(study: Any, pipeline: Any | None = None, n_images: int = 4,
                       device: str | None = None, *,
                       allow_download: bool = False) -> tuple[Heatmaps | None, str | None]:
    """(heatmaps, None), or (None, why not) when the model, the data or the relevance fail.

    Without `pipeline` the study's model and task are loaded from its stored spec.
    """
    from pxopt.errors import PxoptError

    if n_images < 1:
        return None, "not drawn (--heatmaps 0)"
    try:
        if pipeline is None:
            pipeline = study_pipeline(study, device, allow_download=allow_download)
        return study_heatmaps(study, pipeline, n_images), None
    except (PxoptError, MemoryError, torch.OutOfMemoryError) as exc:
        return None, f"not drawn: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


# -- Plotly -----------------------------------------------------------------------------------
def heatmap_figure(h: Heatmaps, *, title: str | None = None) -> go.Figure:
    """The grid as a Plotly figure: the image, then one heatmap per configuration."""
    from plotly.subplots import make_subplots

    n, cols = h.images.shape[0], len(h.columns)
    height, width = h.images.shape[1:3]
    fig = make_subplots(rows=n, cols=cols, column_titles=h.columns, horizontal_spacing=0.015,
                        vertical_spacing=min(0.04, 0.3 / max(n, 1)))
    for i in range(n):
        fig.add_trace(go.Image(z=h.images[i], hoverinfo="skip", name=h.captions[i]), row=i + 1, col=1)
        for j, (col_title, rel) in enumerate(h.relevance.items()):
            lim = limit(rel[i])
            fig.add_trace(
                go.Heatmap(
                    z=rel[i] / lim, customdata=rel[i], zmin=-1.0, zmax=1.0, zmid=0.0, colorscale=BWR,
                    showscale=(i == 0 and j == 0), name=col_title,
                    colorbar={"title": {"text": "relevance / largest |relevance|", "side": "right"},
                              "len": min(1.0, 300 / (n * 180 + 80)), "y": 1.0, "yanchor": "top"},
                    hovertemplate="relevance %{customdata:.3g} (%{z:.2f} of the largest)<extra></extra>",
                ),
                row=i + 1, col=j + 2,
            )
        fig.update_yaxes(title_text=h.captions[i], title_font={"size": 11}, row=i + 1, col=1)
    for k in range(1, n * cols + 1):
        suffix = "" if k == 1 else str(k)
        fig.layout[f"yaxis{suffix}"].update(autorange="reversed", scaleanchor=f"x{suffix}", constrain="domain",
                                           showticklabels=False, showgrid=False, zeroline=False)
        fig.layout[f"xaxis{suffix}"].update(showticklabels=False, showgrid=False, zeroline=False,
                                           constrain="domain", range=[-0.5, width - 0.5])
    cell = max(150, min(260, 3 * max(height, width)))
    fig.update_layout(
        title=title or (f"Input relevance ({h.target})<br><sup>red positive, blue negative, white 0; "
                        "each heatmap scaled to its own largest |relevance|</sup>"),
        height=n * (cell + 20) + 110, width=cols * (cell + 10) + 260, margin={"l": 160, "b": 20},
    )
    return fig


# -- Pillow (PNG) -----------------------------------------------------------------------------
def png_layout(n_rows: int, n_cols: int, height: int, width: int, min_cell: int = MIN_CELL) -> dict[str, int]:
    """Pixel sizes of the PNG grid: cells enlarged by an integer factor to >= min_cell."""
    scale = max(1, math.ceil(min_cell / max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    return {
        "scale": scale, "cell_h": cell_h, "cell_w": cell_w,
        "width": MARGIN + n_cols * (cell_w + MARGIN),
        "height": HEADER + n_rows * (cell_h + CAPTION + MARGIN) + LEGEND,
    }


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """`text`, shortened with '...' to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_png(h: Heatmaps, *, min_cell: int = MIN_CELL) -> Any:
    """The grid as a Pillow image (RGB), with column titles, captions and a colour bar."""
    from PIL import Image, ImageDraw, ImageFont

    n, height, width = h.images.shape[:3]
    cols = h.columns
    lay = png_layout(n, len(cols), height, width, min_cell)
    canvas = Image.new("RGB", (lay["width"], lay["height"]), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    cw, ch, s = lay["cell_w"], lay["cell_h"], lay["scale"]
    for j, title in enumerate(cols):
        x0 = MARGIN + j * (cw + MARGIN)
        draw.text((x0, 4), _fit(draw, title, font, cw), fill=TEXT, font=font)
    for i in range(n):
        y0 = HEADER + i * (ch + CAPTION + MARGIN)
        tiles = [h.images[i]] + [bwr_rgb(rel[i]) for rel in h.relevance.values()]
        for j, tile in enumerate(tiles):
            img = Image.fromarray(np.ascontiguousarray(tile), "RGB")
            if s > 1:
                img = img.resize((cw, ch), Image.Resampling.NEAREST)  # exact pixels, no blur
            canvas.paste(img, (MARGIN + j * (cw + MARGIN), y0))
        draw.text((MARGIN, y0 + ch + 3), _fit(draw, h.captions[i], font, lay["width"] - 2 * MARGIN),
                  fill=TEXT, font=font)
    # colour bar: -max (blue) .. 0 (white) .. +max (red), each heatmap scaled to its own max
    y0 = lay["height"] - LEGEND + 4
    bar_w = max(60, min(lay["width"] // 2 - MARGIN, 200))
    ramp = bwr_rgb(np.linspace(-1.0, 1.0, bar_w)[None, :].repeat(8, axis=0), 1.0)
    canvas.paste(Image.fromarray(ramp, "RGB"), (MARGIN, y0))
    for text, x in (("-max", MARGIN), ("0", MARGIN + bar_w // 2), ("+max", MARGIN + bar_w)):
        w = draw.textlength(text, font=font)
        x = min(max(x - w / 2, 0), lay["width"] - w)
        draw.text((x, y0 + 10), text, fill=TEXT, font=font)
    x_text = int(MARGIN + bar_w + draw.textlength("+max", font=font) / 2 + 12)
    rest = lay["width"] - x_text - MARGIN
    if rest > 40:
        draw.text((x_text, y0 - 1), _fit(draw, "relevance, scaled to each", font, rest), fill=TEXT, font=font)
        draw.text((x_text, y0 + 10), _fit(draw, "heatmap's largest |value|", font, rest), fill=TEXT, font=font)
    return canvas


def write_png(h: Heatmaps, path: str | Path, *, min_cell: int = MIN_CELL) -> Path:
    """Write the grid as an image file (format from the suffix: .png, .jpg, .webp ...)."""
    out = Path(path)
    image = render_png(h, min_cell=min_cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        image.save(out)
    except (ValueError, KeyError) as exc:  # unknown extension
        raise ConfigError(f"cannot write {str(out)!r}: use a .png file ({exc})") from exc
    return out


# -- a user's images (pxopt explain) ----------------------------------------------------------
def image_files(path: str | Path, max_images: int | None = None) -> list[Path]:
    """The image files of a folder (sorted, not recursive), or the one file given."""
    from pxopt.data.sources import IMAGE_EXTENSIONS

    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
        if not files:
            raise DataError(f"{p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    else:
        raise DataError(f"images: {p} is neither a folder nor a file")
    return files[:max_images] if max_images is not None else files


def load_images(files: Sequence[Path], transform: Any) -> Tensor:
    """Decode and preprocess images with the model's own transform -> (N, C, H, W)."""
    from pxopt.data.folders import decode_image

    tensors = [transform(decode_image(f)) for f in files]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DataError(f"the images have different shapes after the model's preprocessing: {sorted(shapes)}")
    return torch.stack(tensors)
