"""Small real shard sets of vector modalities (``.npy`` members built by the shard CLI's library)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def make_vector_shards(base: Path, n: int = 48, dim: int = 8, seed: int = 0, shard_size: int = 6,
                       names: tuple[str, ...] = ("a", "b")) -> Path:
    """``n`` samples, each modality a float32 (dim,) vector: ``a`` random, every other one a fixed
    random linear map of ``a`` plus noise (so the pairing is learnable). Returns the shard folder."""
    from data_tools.build import build_shards

    rng = np.random.default_rng(seed)
    maps = {m: rng.standard_normal((dim, dim)).astype(np.float32) for m in names[1:]}
    files = base / "files"
    files.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a = rng.standard_normal(dim).astype(np.float32)
        row = {"key": f"s{i:05d}"}
        for m in names:
            v = a if m == names[0] else a @ maps[m] + 0.1 * rng.standard_normal(dim).astype(np.float32)
            path = files / f"{i:05d}_{m}.npy"
            np.save(path, v)
            row[m] = str(path)
        rows.append(row)
    manifest = base / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = base / "shards"
    build_shards(manifest, out, shard_size=shard_size)
    return out


def vector_overrides(shards: Path, out: Path, steps: int, micro_batch: int, dim: int = 8,
                     names: tuple[str, ...] = ("a", "b")) -> list[str]:
    """A run over ``make_vector_shards`` data: one npy modality and one MLP tower per name."""
    count = len(list(shards.glob("shard-*.tar")))
    mods = {m: {"decoder": "npy", "members": [f"{m}.npy"], "options": {"shape": [dim]}} for m in names}
    towers = {m: {"type": "mlp", "options": {"hidden": [16]}} for m in names}
    return [
        f"output_dir={out}",
        f"data.train.urls={shards}/shard-{{000000..{count - 1:06d}}}.tar",
        "data.train.shuffle_buffer=0",
        "data.labels=null",
        f"data.modalities={json.dumps(mods)}",
        f"model.towers={json.dumps(towers)}",
        "model.embed_dim=8",
        f"train.steps={steps}",
        f"train.micro_batch_size={micro_batch}",
        "train.warmup_steps=1",
        "train.log_every=1",
        "eval.enabled=false",
        "eval.classnames=[]",
    ]
