"""Synthetic data sets for the paper reproductions, written as a manifest the shard CLI builds.

``python -m data_tools.synthetic xor --dim D --samples N --val-samples M --output DIR`` writes
Symile's binary XOR data (Saporta et al., 2024, section on synthetic data): per sample

    a, b ~ Bernoulli(0.5)^d (independent bits),   c = a XOR b   (element-wise)

so every pair of the three is independent and only the triple carries information: b is
determined by (a, c), but neither a nor c alone says anything about it. ``--p-hat P`` gives the
paper's interpolation: per sample i ~ Bernoulli(P), c = a XOR b if i else c = a (P = 1, the
default, is pure XOR; P = 0 makes c a copy of a).

Missing modalities (``--missing-frac F --missing-modality c``): exactly round(F x N) training
rows, chosen with the seed, leave that field out (build with ``--optional c``; the training
config marks the modality ``required: false``). The held-out rows are always complete, as in the
Symile repository's missingness example (missing data in train/val, complete test set).

Output: ``DIR/manifest.jsonl`` (fields ``key``, ``split``, ``a``, ``b``, ``c``), each vector inline
as a JSON object ``{"bits": [0, 1, ...]}``, so the shard CLI makes ``a.json``, ``b.json``, ``c.json``
members (read with the ``json`` decoder, ``fields: [bits]``, ``size: d``). Then::

    python -m data_tools build --input DIR/manifest.jsonl --output DIR/shards --split-column split \
        --optional c --shard-size 1000

gives ``DIR/shards/train/`` and ``DIR/shards/val/`` (``index.json`` in ``DIR/shards``).
``--members npy`` writes ``DIR/vectors/*.npy`` instead, one float32 (d,) file per distinct bit
vector (at most 2^d files, shared by the rows holding it), giving ``<field>.npy`` members for the
``npy`` decoder (``shape: [d]``); they decode about 5x slower than the JSON members.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MODALITIES = ("a", "b", "c")


def xor_arrays(dim: int, samples: int, seed: int = 0, p_hat: float = 1.0) -> dict[str, np.ndarray]:
    """(samples, dim) uint8 arrays a, b, c with c = a XOR b (or c = a for the rows where the
    Bernoulli(p_hat) switch is 0)."""
    if dim < 1:
        raise ValueError(f"--dim: must be >= 1, got {dim}")
    if samples < 1:
        raise ValueError(f"--samples: must be >= 1, got {samples}")
    if not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"--p-hat: must be in [0, 1], got {p_hat}")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, size=(samples, dim), dtype=np.uint8)
    b = rng.integers(0, 2, size=(samples, dim), dtype=np.uint8)
    switch = rng.random(samples) < p_hat if p_hat < 1.0 else np.ones(samples, dtype=bool)
    c = np.where(switch[:, None], a ^ b, a).astype(np.uint8)
    return {"a": a, "b": b, "c": c}


def missing_rows(samples: int, frac: float, seed: int) -> np.ndarray:
    """A bool (samples,) mask: exactly round(frac x samples) rows True, chosen with the seed."""
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"--missing-frac: must be in [0, 1), got {frac}")
    out = np.zeros(samples, dtype=bool)
    count = int(round(frac * samples))
    if count:
        rng = np.random.default_rng([seed, 0x6D15])  # its own stream: the bits do not depend on frac
        out[rng.permutation(samples)[:count]] = True
    return out


def write_xor(output: str | Path, dim: int, samples: int, val_samples: int = 0, seed: int = 0,
              missing_frac: float = 0.0, missing_modality: str = "c", p_hat: float = 1.0,
              members: str = "json") -> dict:
    """Writes ``output/manifest.jsonl`` (and ``output/vectors/`` for npy members); returns a summary."""
    if missing_modality not in MODALITIES:
        raise ValueError(f"--missing-modality: one of {', '.join(MODALITIES)}, got {missing_modality!r}")
    if members not in ("npy", "json"):
        raise ValueError(f"--members: npy or json, got {members!r}")
    if val_samples < 0:
        raise ValueError(f"--val-samples: must be >= 0, got {val_samples}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    total = samples + val_samples
    data = xor_arrays(dim, total, seed, p_hat)
    absent = np.zeros(total, dtype=bool)
    absent[:samples] = missing_rows(samples, missing_frac, seed)
    vec_dir = output / "vectors"
    written: set[str] = set()

    def value(bits: np.ndarray):
        if members == "json":
            return {"bits": bits.tolist()}
        name = "".join("1" if x else "0" for x in bits.tolist())
        if len(name) > 64:  # long vectors: a digest of the bits keeps file names short
            import hashlib

            name = f"{dim}-{hashlib.sha1(bits.tobytes()).hexdigest()}"
        rel = f"vectors/{name}.npy"
        if name not in written:
            vec_dir.mkdir(exist_ok=True)
            path = output / rel
            if not path.exists():
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, bits.astype(np.float32))
                tmp.replace(path)
            written.add(name)
        return rel

    manifest = output / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for i in range(total):
            split = "train" if i < samples else "val"
            row = {"key": f"xor{i:07d}", "split": split}
            for m in MODALITIES:
                if m == missing_modality and absent[i]:
                    continue
                row[m] = value(data[m][i])
            f.write(json.dumps(row) + "\n")
    tmp.replace(manifest)
    summary = {
        "task": "xor", "dim": dim, "train": samples, "val": val_samples, "seed": seed, "p_hat": p_hat,
        "missing_modality": missing_modality, "missing_frac": missing_frac,
        "missing_train_rows": int(absent.sum()), "members": members, "manifest": str(manifest),
        "distinct_vectors": len(written) if members == "npy" else None,
    }
    (output / "synthetic.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    x = sub.add_parser("xor", help="Symile's binary XOR: a, b ~ Bernoulli(0.5)^d, c = a XOR b")
    x.add_argument("--dim", type=int, default=5, metavar="D", help="bits per vector (default 5: 32 candidates)")
    x.add_argument("--samples", type=int, required=True, metavar="N", help="training rows")
    x.add_argument("--val-samples", type=int, default=0, metavar="M", help="held-out rows (always complete; default 0)")
    x.add_argument("--seed", type=int, default=0, help="seed of the bits and of the missing rows (default 0)")
    x.add_argument("--p-hat", type=float, default=1.0, metavar="P",
                   help="probability that c = a XOR b for a row (else c = a); default 1")
    x.add_argument("--missing-frac", type=float, default=0.0, metavar="F",
                   help="fraction of training rows without --missing-modality (default 0)")
    x.add_argument("--missing-modality", default="c", choices=MODALITIES, help="the modality left out (default c)")
    x.add_argument("--members", default="json", choices=["json", "npy"],
                   help="inline JSON objects (default; decoder json, fields [bits]) or npy files (decoder npy)")
    x.add_argument("--output", required=True, metavar="DIR", help="folder for manifest.jsonl (and vectors/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = write_xor(args.output, args.dim, args.samples, args.val_samples, args.seed, args.missing_frac,
                            args.missing_modality, args.p_hat, args.members)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"xor: d={summary['dim']}, {summary['train']} train rows ({summary['missing_train_rows']} without "
          f"{summary['missing_modality']}), {summary['val']} held-out rows -> {summary['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
