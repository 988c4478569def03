"""Demo data: scikit-learn's 1,797 real handwritten digits (8x8) with templated captions.

``python -m data_tools.demo --output DIR`` writes ``DIR/images/*.png`` and two JSONL manifests,
``train.jsonl`` and ``val.jsonl``, over disjoint images (a seeded, class-stratified split).

``--variant rich`` (benchmarks/reproduce.py clip-lite) renders each digit instead on a 16x16 RGB
canvas, in one of ``COLOURS`` at one of the four ``POSITIONS`` (quadrants; both drawn with the
seed), and its caption says all three ("a red seven at the top left", several templates); the
``label`` column stays the digit, and the train/val split is the default variant's. The default
variant's output does not change.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a handwritten {word}",
    "the digit {num}",
    "a photo of the number {word}",
    "handwritten {num}",
    "a scan of a {word}",
    "the number {num} written by hand",
]
# --variant rich: colour name -> RGB of a full-intensity pixel; position name -> (row, column) of
# the 8x8 digit's top-left corner on the 16x16 canvas
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "cyan": (0, 255, 255), "magenta": (255, 0, 255)}
POSITIONS = {"top left": (0, 0), "top right": (0, 8), "bottom left": (8, 0), "bottom right": (8, 8)}
RICH_TEMPLATES = [
    "a {colour} {word} at the {position}",
    "the digit {num} in {colour}, {position}",
    "a handwritten {word} drawn in {colour} in the {position} corner",
    "{position}: a {colour} {num}",
    "a {colour} number {word}, {position}",
]


def render_rich(pixels: np.ndarray, colour: str, position: str) -> Image.Image:
    """The 8x8 digit (values 0..16) in ``colour`` at ``position`` of a black 16x16 RGB canvas."""
    canvas = np.zeros((16, 16, 3), dtype=np.float64)
    r, c = POSITIONS[position]
    canvas[r:r + 8, c:c + 8] = (pixels / 16.0)[:, :, None] * np.array(COLOURS[colour], dtype=np.float64)
    return Image.fromarray(np.round(canvas).astype(np.uint8), mode="RGB")


def write_demo(output: str | Path, val_fraction: float = 0.2, seed: int = 0, variant: str = "digits") -> dict[str, int]:
    from sklearn.datasets import load_digits  # ships its data inside the package: no download

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction: must be between 0 and 1, got {val_fraction}")
    if variant not in ("digits", "rich"):
        raise ValueError(f"--variant: digits or rich, got {variant!r}")
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(digits.target.tolist()):
        by_class.setdefault(label, []).append(i)
    val_ids = set()
    for label, ids in by_class.items():
        ids = ids[:]
        rng.shuffle(ids)
        val_ids.update(ids[: round(len(ids) * val_fraction)])
    counts = {"train": 0, "val": 0}
    rich_rng = random.Random(f"rich-{seed}")  # its own stream: the split and the default captions stay as they are
    with open(output / "train.jsonl", "w") as train_f, open(output / "val.jsonl", "w") as val_f:
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target.tolist())):
            key = f"digit{i:05d}"
            rel = f"images/{key}.png"
            # Pixel values are 0..16; scale to 0..255, white digit on black as in the source.
            img = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
            caption = rng.choice(CAPTION_TEMPLATES).format(word=WORDS[label], num=label)
            if variant == "rich":
                colour, position = rich_rng.choice(list(COLOURS)), rich_rng.choice(list(POSITIONS))
                img = render_rich(pixels, colour, position)
                caption = rich_rng.choice(RICH_TEMPLATES).format(word=WORDS[label], num=label, colour=colour,
                                                                 position=position)
            img.save(output / rel)
            split = "val" if i in val_ids else "train"
            row = {"key": key, "image": rel, "caption": caption, "label": label}
            (val_f if split == "val" else train_f).write(json.dumps(row) + "\n")
            counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.demo", description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["digits", "rich"], default="digits",
                        help="rich: each digit coloured and placed on a 16x16 RGB canvas, captions saying so")
    args = parser.parse_args(argv)
    counts = write_demo(args.output, args.val_fraction, args.seed, args.variant)
    print(f"wrote {counts['train']} train and {counts['val']} val digit images with captions to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
