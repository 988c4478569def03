"""Synthetic data sets: for the paper reproductions, written as a manifest the shard CLI builds, and
web-like image-text shards for the data-pipeline benchmarks, written as shards.

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

``python -m data_tools.synthetic webimages --samples N --output DIR [--shard-size 1000] [--workers W]``
writes shards shaped like img2dataset's output at ``--image_size 512 --resize_mode keep_ratio
--resize_only_if_bigger``: per sample ``KEY.jpg`` (quality 90, 4:2:0), ``KEY.txt`` (a web-like alt
text) and ``KEY.json`` (img2dataset's metadata fields), keys ``SSSSSIIII`` in shards ``SSSSS.tar``,
with ``index.json`` (the shard CLI's format) and ``sizes.json`` (OpenCLIP's) beside them. Sizes: the
short side is 512 for half of the images (those larger on the web, resized down) and uniform in
256-511 for the rest (smaller ones, kept); aspect ratios 1:1 to 2:1 (4:3, 3:2 and 16:9 most often),
a third of them portrait. Content, since no photo collection is available offline: the two
photographs scikit-learn ships (``china.jpg``, ``flower.jpg``; and any in ``--photos DIR``) cropped,
flipped, rescaled and colour-shifted, with film-like grain (1/f noise) added back where upscaling
smoothed them; colour 1/f^a noise textures (a in 1.0-1.45, the spectrum of natural images); and
product shots (a photo crop on a white background). The summary (``DIR/synthetic.json``, and the
printout) gives what realism can be judged by: bytes per pixel (web JPEGs at quality 90: about
0.2-0.5) and decode time per megapixel (PIL, this machine). Deterministic for a seed, whatever
``--workers``.
"""
from __future__ import annotations

import argparse
import io
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


# ------------------------------------------------------------------------------ web-like images

WEB_SIZE, WEB_MIN_SIDE, WEB_QUALITY = 512, 256, 90
# long side / short side, and how often (4:3, 3:2 and 16:9 dominate web photographs)
ASPECTS = ((1.0, 0.22), (1.25, 0.08), (4 / 3, 0.25), (1.5, 0.2), (16 / 9, 0.17), (2.0, 0.08))
KINDS = (("photo", 0.45), ("texture", 0.35), ("product", 0.2))
_WORDS = {
    "adj": "red blue green small large old new vintage modern wooden golden bright dark white black rustic "
           "beautiful cozy ancient tiny colorful elegant handmade autumn winter summer".split(),
    "noun": "house flower garden temple river mountain bridge chair table lamp dress shoes car bicycle dog cat "
            "bird tree forest lake city street beach boat mug kitchen painting poster pattern fabric".split(),
    "place": "in the park|near the river|at sunset|on a white background|in the city|from above|in spring|"
             "at night|on the table|in the garden|by the sea".split("|"),
    "tail": "stock photo|royalty free image|high resolution|for sale|wallpaper|HD|free shipping|"
            "vector illustration|close-up|DIY ideas".split("|"),
}


def _photo_dirs(extra: str | Path | None) -> list[Path]:
    """Where sample photographs are: scikit-learn's two (found without importing it) and ``extra``."""
    import importlib.util

    dirs = []
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images")
    if extra:
        dirs.append(Path(extra))
    return dirs


def load_photos(extra: str | Path | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 array) of every JPEG/PNG in the photo folders, sorted by name."""
    from PIL import Image

    out = []
    for d in _photo_dirs(extra):
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                out.append((f.name, np.asarray(Image.open(f).convert("RGB"))))
    return out


def pink_noise(rng: np.random.Generator, side: int, alpha: float) -> np.ndarray:
    """(side, side, 3) uint8 colour noise with amplitude spectrum 1/f^alpha per channel (natural
    images: alpha about 1-1.5), channels mixed by a random colour matrix."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** alpha
        spec[0, 0] = 0.0
        chans.append(np.fft.irfft2(spec, s=(side, side)))
    x = np.stack(chans, -1) @ (np.eye(3) + 0.5 * rng.standard_normal((3, 3)))
    x = (x - x.mean()) / (x.std() + 1e-9)
    base = rng.uniform(70, 185, 3)
    return np.clip(base + rng.uniform(30, 55) * x, 0, 255).astype(np.uint8)


def texture_bank(seed: int, count: int = 6, side: int = 1024) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 0xBA2C])
    return [pink_noise(rng, side, a) for a in np.linspace(1.0, 1.45, count)]


def _shape(rng: np.random.Generator, size: int, min_side: int) -> tuple[int, int]:
    """(height, width) as img2dataset's keep_ratio + resize_only_if_bigger leaves it."""
    short = size if rng.random() < 0.5 else int(rng.integers(min_side, size))
    ratios, weights = zip(*ASPECTS)
    ratio = ratios[rng.choice(len(ratios), p=np.array(weights) / sum(weights))] * rng.uniform(0.97, 1.03)
    long = max(short, int(round(short * ratio)))
    return (long, short) if rng.random() < 1 / 3 else (short, long)


def _crop_resized(rng, src: np.ndarray, h: int, w: int, area: tuple[float, float], flip: bool = True) -> np.ndarray:
    """A crop of ``src`` with the aspect of (h, w) and a share ``area`` of its area, resized to (h, w)."""
    from PIL import Image

    sh, sw = src.shape[:2]
    frac = rng.uniform(*area)
    ch = min(sh, int(round(np.sqrt(frac * sh * sw * h / w))))
    cw = min(sw, int(round(ch * w / h)))
    ch = min(sh, max(8, int(round(cw * h / w))))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    crop = src[y:y + ch, x:x + cw]
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.15:
        crop = crop[::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.BICUBIC))


def _colour(rng, img: np.ndarray) -> np.ndarray:
    m = np.eye(3) + 0.12 * rng.standard_normal((3, 3))
    x = img.astype(np.float32) @ m.T.astype(np.float32) * rng.uniform(0.85, 1.15) + rng.uniform(-20, 20, 3)
    return x


def web_image(rng: np.random.Generator, photos: list[np.ndarray], bank: list[np.ndarray], size: int = WEB_SIZE,
              min_side: int = WEB_MIN_SIDE) -> tuple[np.ndarray, str]:
    """One web-like RGB image (uint8 (h, w, 3)) and its kind (photo, texture or product)."""
    h, w = _shape(rng, size, min_side)
    names, weights = zip(*KINDS)
    kind = names[rng.choice(len(names), p=weights)] if photos else "texture"
    if kind == "texture":
        img = _colour(rng, _crop_resized(rng, bank[int(rng.integers(len(bank)))], h, w, (0.25, 1.0)))
    elif kind == "photo":
        src = photos[int(rng.integers(len(photos)))]
        img = _colour(rng, _crop_resized(rng, src, h, w, (0.3, 1.0)))
        # grain where upscaling smoothed the photograph: a web photo resized down from a camera is sharp
        upscale = max(h / src.shape[0], w / src.shape[1])
        grain = _crop_resized(rng, bank[0], h, w, (0.05, 0.2)).astype(np.float32) - bank[0].mean((0, 1))
        img = img + grain * min(0.6, 0.2 + 0.25 * upscale)
    else:  # a product shot: a photo crop on a white background
        img = np.full((h, w, 3), 255.0, dtype=np.float32) - rng.uniform(0, 12)
        ih, iw = int(h * rng.uniform(0.4, 0.8)), int(w * rng.uniform(0.4, 0.8))
        y, x = int(rng.integers(0, h - ih + 1)), int(rng.integers(0, w - iw + 1))
        img[y:y + ih, x:x + iw] = _colour(rng, _crop_resized(rng, photos[int(rng.integers(len(photos)))], ih, iw,
                                                             (0.2, 0.7)))
    return np.clip(img, 0, 255).astype(np.uint8), kind


def web_caption(rng: np.random.Generator) -> str:
    pick = lambda k: _WORDS[k][int(rng.integers(len(_WORDS[k])))]  # noqa: E731
    words = [pick("adj") for _ in range(int(rng.integers(0, 3)))] + [pick("noun")]
    if rng.random() < 0.6:
        words.append(pick("place"))
    if rng.random() < 0.4:
        words += ["with", pick("adj"), pick("noun")]
    if rng.random() < 0.35:
        words += ["-", pick("tail")]
    if rng.random() < 0.2:
        words.append(str(int(rng.integers(100, 99999))))
    return " ".join(words).capitalize()


def _web_shard(job: tuple) -> dict:
    """Writes one shard; returns its index entry and figures."""
    from PIL import Image

    from data_tools.tarwriter import ShardFile, encode_sample

    output, shard, count, seed, size, min_side, quality, photos_dir = job
    photos = [a for _, a in load_photos(photos_dir)]
    bank = _web_state(seed)
    rng = np.random.default_rng([seed, shard])
    path = Path(output) / f"{shard:05d}.tar"
    sink = ShardFile(path)
    pixels = jpeg_bytes = 0
    kinds: dict[str, int] = {}
    shorts = []
    try:
        for i in range(count):
            key = f"{shard:05d}{i:04d}"
            arr, kind = web_image(rng, photos, bank, size, min_side)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
            jpg = buf.getvalue()
            caption = web_caption(rng)
            h, w = arr.shape[:2]
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
                    "caption": caption, "width": w, "height": h, "original_width": w if min(h, w) < size else
                    int(w * rng.uniform(1.0, 4.0)), "original_height": h, "exif": "{}"}
            if min(h, w) == size:
                meta["original_height"] = int(round(h * meta["original_width"] / w))
            members = {"jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta).encode()}
            sink.add(encode_sample(key, members), list(members))
            pixels += h * w
            jpeg_bytes += len(jpg)
            kinds[kind] = kinds.get(kind, 0) + 1
            shorts.append(min(h, w))
    except BaseException:
        sink.abandon()
        raise
    entry = sink.close()
    entry.update(name=path.name, split="train")
    return {"entry": entry, "pixels": pixels, "jpeg_bytes": jpeg_bytes, "kinds": kinds, "short_sides": shorts}


_BANKS: dict[int, list[np.ndarray]] = {}


def _web_state(seed: int) -> list[np.ndarray]:
    if seed not in _BANKS:  # made once per process (about a second): the same in every worker
        _BANKS[seed] = texture_bank(seed)
    return _BANKS[seed]


def decode_speed(urls: list[str | Path], limit: int = 300) -> dict:
    """PIL's decode of up to ``limit`` JPEGs of the shards: ms per megapixel, and bytes per pixel."""
    import tarfile

    from PIL import Image

    blobs = []
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    blobs.append(tar.extractfile(m).read())
                    if len(blobs) >= limit:
                        break
        if len(blobs) >= limit:
            break
    import time

    start = time.process_time()
    pixels = nbytes = 0
    for b in blobs:
        img = Image.open(io.BytesIO(b))
        img.load()
        pixels += img.width * img.height
        nbytes += len(b)
    cpu = time.process_time() - start
    return {"images": len(blobs), "decode_ms_per_mpix": 1e3 * cpu / (pixels / 1e6), "bytes_per_pixel": nbytes / pixels}


def write_webimages(output: str | Path, samples: int, shard_size: int = 1000, seed: int = 0, workers: int = 1,
                    size: int = WEB_SIZE, min_side: int = WEB_MIN_SIDE, quality: int = WEB_QUALITY,
                    photos: str | Path | None = None, measure: bool = True) -> dict:
    """Writes the shards, ``index.json``, ``sizes.json`` and ``synthetic.json`` under ``output``;
    returns the summary."""
    from data_tools.tarwriter import END  # noqa: F401 - data_tools' writer: deterministic tars
    from pretrain import shard_index

    if samples < 1:
        raise ValueError(f"--samples: must be >= 1, got {samples}")
    if shard_size < 1:
        raise ValueError(f"--shard-size: must be >= 1, got {shard_size}")
    if not 16 <= min_side <= size:
        raise ValueError(f"--min-side: must be in [16, --image-size], got {min_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality: must be in [1, 100], got {quality}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    counts = [min(shard_size, samples - s) for s in range(0, samples, shard_size)]
    jobs = [(str(output), i, n, seed, size, min_side, quality, str(photos) if photos else None)
            for i, n in enumerate(counts)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_web_shard, jobs, chunksize=1)
    else:
        parts = [_web_shard(j) for j in jobs]
    entries = [p["entry"] for p in parts]
    count = len(entries)
    pattern = f"{{00000..{count - 1:05d}}}.tar" if count > 1 else "00000.tar"
    opts = {"synthetic": "webimages", "seed": seed, "image_size": size, "min_side": min_side, "quality": quality}
    doc = shard_index.index_document(entries, {"train": pattern}, samples, {}, 0, [], opts)
    (output / shard_index.SIZES).write_text(shard_index.dumps(shard_index.sizes_document(entries)))
    (output / shard_index.INDEX).write_text(shard_index.dumps(doc))
    pixels = sum(p["pixels"] for p in parts)
    shorts = np.array([s for p in parts for s in p["short_sides"]])
    kinds: dict[str, int] = {}
    for p in parts:
        for k, v in p["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    summary = {
        "task": "webimages", "samples": samples, "shards": count, "pattern": str(output / pattern), "seed": seed,
        "image_size": size, "min_side": min_side, "quality": quality, "kinds": kinds,
        "photos": [n for n, _ in load_photos(photos)],
        "mean_megapixels": pixels / samples / 1e6,
        "short_side": {"min": int(shorts.min()), "median": float(np.median(shorts)), "max": int(shorts.max()),
                       f"share_at_{size}": float((shorts == size).mean())},
        "bytes_per_pixel": sum(p["jpeg_bytes"] for p in parts) / pixels,
        "mean_jpeg_kib": sum(p["jpeg_bytes"] for p in parts) / samples / 1024,
        "total_bytes": doc["total_bytes"],
    }
    if measure:
        summary["decode"] = decode_speed([output / e["name"] for e in entries])
        summary["decode_ms_per_mpix"] = summary["decode"]["decode_ms_per_mpix"]
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
    w = sub.add_parser("webimages", help="web-like JPEG + caption shards, as img2dataset writes them at 512 px")
    w.add_argument("--samples", type=int, required=True, metavar="N", help="images in all")
    w.add_argument("--output", required=True, metavar="DIR", help="folder for the shards, index.json, sizes.json")
    w.add_argument("--shard-size", type=int, default=1000, metavar="K", help="samples per shard (default 1000)")
    w.add_argument("--workers", type=int, default=1, metavar="W", help="processes writing shards (default 1)")
    w.add_argument("--seed", type=int, default=0, help="seed (default 0); the output does not depend on --workers")
    w.add_argument("--image-size", type=int, default=WEB_SIZE, metavar="S",
                   help="img2dataset's --image_size: the short side of images that were larger (default 512)")
    w.add_argument("--min-side", type=int, default=WEB_MIN_SIDE, metavar="M",
                   help="the smallest short side of the images kept as they were (default 256)")
    w.add_argument("--quality", type=int, default=WEB_QUALITY, help="JPEG quality (default 90)")
    w.add_argument("--photos", metavar="DIR", help="more sample photographs (JPEG/PNG) beside scikit-learn's")
    w.add_argument("--no-measure", action="store_true", help="skip the decode-speed measurement")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.task == "webimages":
        try:
            summary = write_webimages(args.output, args.samples, args.shard_size, args.seed, args.workers,
                                      args.image_size, args.min_side, args.quality, args.photos, not args.no_measure)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        ss = summary["short_side"]
        print(f"webimages: {summary['samples']} images in {summary['shards']} shards -> {summary['pattern']}\n"
              f"  short side {ss['min']}-{ss['max']} (median {ss['median']:.0f}, {100 * ss[f'share_at_{args.image_size}']:.0f}% "
              f"at {args.image_size}), {summary['mean_megapixels']:.3f} MP and {summary['mean_jpeg_kib']:.1f} KiB per image; "
              f"kinds {summary['kinds']}; photos: {', '.join(summary['photos']) or 'none found (textures only)'}\n"
              f"  {summary['bytes_per_pixel']:.3f} bytes/pixel (web JPEGs at q90: about 0.2-0.5)"
              + (f", PIL decode {summary['decode_ms_per_mpix']:.1f} ms/MP on this machine" if "decode" in summary else ""))
        return 0
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
