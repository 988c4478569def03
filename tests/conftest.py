"""Shared helpers: small real datasets and process launchers for the tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_caption_dataset(folder: Path, n: int, classes: int = 4, seed: int = 0) -> Path:
    """n small PNG images (one colour pattern per class) with captions and labels; returns the manifest."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with open(manifest, "w") as f:
        for i in range(n):
            label = i % classes
            pixels = rng.integers(0, 60, size=(8, 8, 3), dtype=np.uint8)
            pixels[:, :, label % 3] += np.uint8(120 + 40 * (label // 3))
            rel = f"images/s{i:05d}.png"
            Image.fromarray(pixels, mode="RGB").save(folder / rel)
            row = {"key": f"s{i:05d}", "image": rel, "caption": f"class number {label}", "label": label}
            f.write(json.dumps(row) + "\n")
    return manifest


def build(manifest: Path, out: Path, shard_size: int) -> dict:
    from data_tools.build import build_shards

    return build_shards(manifest, out, shard_size=shard_size,
                        mapping={"image": "png", "caption": "txt", "label": "cls"})


def run_cmd(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc


PYTHON = sys.executable
