"""PNG plots of the evaluations, drawn with Pillow (no plotting library needed):

- ``eval/plots/recall_vs_step.png``: the figures each task marks as a curve (R@1, top-1; labelled
  as in the printout) against the training step, from all ``eval/step*.json`` files so far
  (redrawn after each evaluation);
- ``eval/plots/similarity_step{N}.png``: cosine similarities of a few held-out pairs (rows: query
  modality, columns: candidates; samples sorted by class);
- ``eval/index.html``: both images and the latest metrics, to open from the run folder.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

from pretrain.evaluation.tasks import figures

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def curves(records: list[dict]) -> dict[str, str]:
    """The metrics worth a curve, with their labels: the figures the tasks mark as curves (R@1 and
    top-1 of the built-in tasks; ``Evaluator.figures``), per dataset."""
    found = {}
    for r in records:
        for name, rows in figures(r).items():
            for f in rows:
                if f.curve and isinstance(f.value, (int, float)):
                    found[f.key] = f"{name}: {f.label}" if name else f.label
    return dict(sorted(found.items()))


def curve_keys(records: list[dict]) -> list[str]:
    return list(curves(records))


def plot_curves(records: list[dict], path: Path, title: str = "held-out figures vs step") -> None:
    records = sorted(records, key=lambda r: r["step"])
    labels = curves(records)
    keys = list(labels)[: len(PALETTE)]
    width, height = 980, 520
    left, right, top, bottom = 60, 360, 40, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    draw.text((left, 10), title, fill="black", font=font)
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    steps = [r["step"] for r in records] or [0]
    smin, smax = min(steps), max(steps)
    span = (smax - smin) or 1

    def px(step: float, value: float) -> tuple[float, float]:
        return x0 + (step - smin) / span * (x1 - x0) if smax > smin else (x0 + x1) / 2, y1 - value * (y1 - y0)

    for i in range(5):  # y grid 0, .25, .5, .75, 1
        v = i / 4
        _, y = px(smin, v)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((x0 - 40, y - 7), f"{v:.2f}", fill="black", font=small)
    for s in sorted(set(steps)) if len(set(steps)) <= 8 else [smin + span * i / 4 for i in range(5)]:
        x, _ = px(s, 0)
        draw.line([(x, y1), (x, y1 + 4)], fill="black")
        label = f"{int(round(s))}"
        draw.text((x - _text_width(draw, label, small) / 2, y1 + 6), label, fill="black", font=small)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2 - 15, height - 22), "step", fill="black", font=small)
    for i, key in enumerate(keys):
        color = PALETTE[i]
        pts = [px(r["step"], float(r[key])) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = top + 18 * i
        draw.line([(x1 + 15, ly + 7), (x1 + 35, ly + 7)], fill=color, width=3)
        draw.text((x1 + 40, ly), labels[key], fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _diverging(v: float) -> tuple[int, int, int]:
    """-1 blue, 0 white, +1 red."""
    v = max(-1.0, min(1.0, v))
    if v >= 0:
        return 255, int(255 * (1 - v)), int(255 * (1 - v))
    return int(255 * (1 + v)), int(255 * (1 + v)), 255


def plot_similarity(matrix, path: Path, rows: str, cols: str, labels: Optional[list[int]] = None,
                    title: str = "") -> None:
    """A heatmap of an (n, n) cosine-similarity matrix (values in [-1, 1])."""
    values = matrix.tolist()
    n = len(values)
    cell = max(8, min(24, 480 // max(n, 1)))
    left, top = 90, 60
    width, height = left + cell * n + 120, top + cell * n + 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    draw.text((10, 10), title or f"cosine similarity: {rows} (rows) x {cols} (columns)", fill="black", font=font)
    for i in range(n):
        for j in range(n):
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_diverging(values[i][j]))
    if labels is not None and cell >= 10:
        for i, lab in enumerate(labels):
            text = str(lab) if lab >= 0 else "-"
            draw.text((left - 8 - _text_width(draw, text, small), top + i * cell + cell / 2 - 6), text,
                      fill="black", font=small)
            draw.text((left + i * cell + cell / 2 - _text_width(draw, text, small) / 2, top - 16), text,
                      fill="black", font=small)
    draw.text((10, top + cell * n // 2), rows, fill="black", font=small)
    draw.text((left + cell * n // 2 - 20, top + cell * n + 8), cols, fill="black", font=small)
    bar_x = left + cell * n + 30  # colour bar
    for k in range(cell * n):
        v = 1 - 2 * k / max(1, cell * n - 1)
        draw.line([(bar_x, top + k), (bar_x + 14, top + k)], fill=_diverging(v))
    for text, y in (("+1", top), ("0", top + cell * n / 2), ("-1", top + cell * n - 10)):
        draw.text((bar_x + 20, y - 2), text, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def load_records(eval_dir: Path) -> list[dict]:
    records = []
    for p in sorted(eval_dir.glob("step*.json")):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return records


def write_plots(eval_dir: Path, step: int, example: Optional[dict]) -> dict[str, Path]:
    """Redraws the curves from every JSON in ``eval_dir``, draws this step's similarity example and
    rewrites ``index.html``. Returns the paths written."""
    plots = eval_dir / "plots"
    records = load_records(eval_dir)
    written = {}
    curves = plots / "recall_vs_step.png"
    plot_curves(records, curves)
    written["curves"] = curves
    if example is not None:
        sim = plots / f"similarity_step{step:06d}.png"
        plot_similarity(example["matrix"], sim, example["rows"], example["cols"], example.get("labels"),
                        f"step {step}: cosine similarity, {example['rows']} (rows) x {example['cols']} (columns)")
        written["similarity"] = sim
    latest = max(records, key=lambda r: r["step"]) if records else {}
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(latest.items()))
    body = [f"<h1>Evaluation, step {latest.get('step', step)}</h1>", '<img src="plots/recall_vs_step.png">']
    if "similarity" in written:
        body.append(f'<img src="plots/{written["similarity"].name}">')
    body.append(f"<table>{rows}</table>")
    (eval_dir / "index.html").write_text("<!doctype html><html><body>" + "\n".join(body) + "</body></html>\n")
    return written
