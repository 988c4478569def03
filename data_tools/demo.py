"""Demo data: scikit-learn's 1,797 real handwritten digits (8x8) with templated captions.

``python -m data_tools.demo --output DIR`` writes ``DIR/images/*.png`` and two JSONL manifests,
``train.jsonl`` and ``val.jsonl``, over disjoint images (a seeded, class-stratified split).
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


def write_demo(output: str | Path, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    from sklearn.datasets import load_digits  # ships its data inside the package: no download

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction: must be between 0 and 1, got {val_fraction}")
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
    with open(output / "train.jsonl", "w") as train_f, open(output / "val.jsonl", "w") as val_f:
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target.tolist())):
            key = f"digit{i:05d}"
            rel = f"images/{key}.png"
            # Pixel values are 0..16; scale to 0..255, white digit on black as in the source.
            img = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
            img.save(output / rel)
            caption = rng.choice(CAPTION_TEMPLATES).format(word=WORDS[label], num=label)
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
    args = parser.parse_args(argv)
    counts = write_demo(args.output, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val digit images with captions to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
