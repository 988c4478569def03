"""The tests' shared builders: small real datasets and shards, data configs and loaders, tiny
training runs and the process launchers. Tests import from here only (never from each other).

Committed fixtures live in tests/assets/ (made by tests/assets/make_assets.py): caption shards
(``ASSET_SHARDS``: train 48 / val 12 samples, 4 classes) and a run with a checkpoint written by an
earlier version of the code.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from pretrain.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
ASSET_SHARDS = ASSETS / "shards"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
PYTHON = sys.executable

__all__ = [
    "ASSETS", "ASSET_SHARDS", "MAP", "PYTHON", "QUICKSTART", "ROOT", "TINY_MODEL", "all_files", "build",
    "ReadmeBlock", "caption_rows", "data_config", "deadline", "flat", "free_port", "jpg_bytes", "loader", "losses",
    "heldout_images", "image_decoder",
    "make_caption_dataset", "make_vector_shards", "ok", "png_bytes", "readme_block", "readme_blocks", "run_cmd", "run_cmds", "single", "single_cmd", "small_disk", "take", "text_shards",
    "tiny_overrides", "torchrun", "torchrun_cmd", "vector_overrides", "wav_bytes", "write", "write_index", "write_jsonl",
    "write_shard", "libraries_agree",
]

# ------------------------------------------------------------------------------------- processes


def run_cmd(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_cmds(cmds: list[list[str]], timeout: int = 600, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Independent commands run at once (each ``run_cmd``): single-process runs spend most of their
    time in one-threaded start-up, so two cores take two of them for little more than one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
        return list(pool.map(lambda cmd: run_cmd(cmd, timeout=timeout, env=env), cmds))


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails the test instead of hanging."""

    def fire(signum, frame):
        raise TimeoutError(f"no progress within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------ shards by hand


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset tar: members ``<key>.<ext>`` in sample order, deterministic headers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


def write_index(folder: Path, counts: dict[str, int]) -> Path:
    """An index.json in the shard CLI's format (names relative to ``folder``)."""
    shards = [{"name": n, "samples": c, "bytes": 0, "sha256": ""} for n, c in counts.items()]
    doc = {"format": "multimodal-pretrain-shards/1", "total_samples": sum(counts.values()), "shards": shards}
    (folder / "index.json").write_text(json.dumps(doc, indent=1))
    return folder / "index.json"


def png_bytes(seed: int, size=(8, 8), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def heldout_images(folder: Path) -> tuple[list[Path], list[int]]:
    """The committed shards' held-out images (val: 12, 8x8, 4 classes) as PNG files in ``folder``,
    then two non-square ones (label -1) written here: raw files for the field's own loaders."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for shard in sorted((ASSET_SHARDS / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".png")):
            paths.append(write(folder / name, members[name]))
            labels.append(int(members[name[:-3] + "cls"]))
    # resized and cropped or squashed, not only scaled (no crop margin of 3 mod 4: see hf_clip.image_processor)
    for i, size in enumerate([(20, 16), (16, 22)]):
        paths.append(write(folder / f"wide{i}.png", png_bytes(100 + i, size=size)))
        labels.append(-1)
    return paths, labels


def image_decoder(**options):
    """The image decoder (evaluation) with ``options`` (``data.modalities.image.options``), built alone."""
    from pretrain.data import DataConfig
    from pretrain.data.decoders import DECODERS, DecoderContext

    key = "data.modalities.image"
    typed = DECODERS.options("image", options, f"{key}.decoder", f"{key}.options")
    return DECODERS.get("image", f"{key}.decoder")(typed, DecoderContext("image", False, DataConfig()))


def text_shards(folder: Path, sizes: list[int], prefix: str = "s", label: bool = True) -> list[str]:
    """Text-only shards (fast to decode): sample key ``{prefix}{shard}_{i}``, caption = key."""
    urls, counts = [], {}
    for s, n in enumerate(sizes):
        samples = []
        for i in range(n):
            key = f"{prefix}{s:02d}_{i:03d}"
            members = {"txt": key.encode()}
            if label:
                members["cls"] = str(i % 3).encode()
            samples.append((key, members))
        name = f"{prefix}-{s:06d}.tar"
        urls.append(str(write_shard(folder / name, samples)))
        counts[name] = n
    write_index(folder, counts)
    return urls


# ------------------------------------------------------------------ inputs of the shard-building CLI

MAP = {"image": "png", "caption": "txt", "label": "cls"}


def jpg_bytes(seed: int, size=(16, 12)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def wav_bytes(rate=8000, seconds=0.25, freq=440.0, fmt="WAV") -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def caption_rows(folder: Path, n: int) -> list[dict]:
    """n rows {key, image (a PNG file), caption, label}; the files are written under folder/img."""
    rows = []
    for i in range(n):
        rel = f"img/{i:04d}.png"
        write(folder / rel, png_bytes(i, size=(8, 6)))
        rows.append({"key": f"s{i:04d}", "image": rel, "caption": f"caption number {i}", "label": i % 3})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------ shards by the shard CLI


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


# --------------------------------------------------------------------------- data configs, loaders


def data_config(train: dict | None = None, val: dict | None = None, **data):
    """A checked DataConfig (text modality only unless ``modalities`` is given)."""
    from pretrain.config import config_from_dict

    tree = {"train": train or {"urls": "unused.tar"}, "modalities": {"text": {"decoder": "text"}},
            "context_length": 24, **data}
    if val is not None:
        tree["val"] = val
    return config_from_dict({"data": tree, "eval": {"enabled": False}}).data


def loader(d, rank=0, world=1, batch=3, seed=0, train=True, epochs=None, split=None):
    """A loader over ``d`` (a DataConfig) with its decoders built for training or evaluation."""
    from pretrain.data import build_modalities, make_loader

    split = split or (d.train if train else d.val)
    return make_loader(split, build_modalities(d, train), d, batch, rank, world, seed, train, epochs=epochs)


def take(it, n: int) -> list[list[str]]:
    return [next(it).keys for _ in range(n)]


def flat(batches) -> list[str]:
    return [k for b in batches for k in b]


# ------------------------------------------------------------------------------- training runs

# the quickstart's image and text towers shrunk to test size
TINY_MODEL = [
    "data.image_size=16",
    "data.context_length=24",
    "model.towers.image.options.name=test_resnet",
    "model.embed_dim=16",
    "model.towers.text.options.width=32",
    "model.towers.text.options.layers=1",
    "model.towers.text.options.heads=2",
]


def tiny_overrides(shards: Path, out: Path, steps: int, micro_batch: int = 6) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train.urls={shards}/train/shard-{{000000..000007}}.tar",
        f"data.val.urls={shards}/val/shard-{{000000..000001}}.tar",
        "data.train.shuffle_buffer=4",
        *TINY_MODEL,
        f"train.steps={steps}",
        f"train.micro_batch_size={micro_batch}",
        "train.warmup_steps=1",
        "train.log_every=1",
        "eval.classnames=[a, b, c, d]",
        "eval.templates=['class number {}']",
    ]


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


def torchrun_cmd(args: list[str], nproc: int = 2, module: str = "pretrain.train", config: Path = QUICKSTART) -> list[str]:
    """The ``torchrun`` command line of the trainer (or ``module``: tests.faults runs it with faults
    injected) on one host, a free rendezvous port each time."""
    return [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", module, "--config", str(config), *args]


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 600,
             module: str = "pretrain.train", config: Path = QUICKSTART):
    """Runs ``torchrun_cmd`` to its end."""
    return run_cmd(torchrun_cmd(args, nproc, module, config), timeout=timeout, env=env)


def single_cmd(args: list[str], module: str = "pretrain.train") -> list[str]:
    """The command line of the trainer (or ``module``) in one process."""
    return [PYTHON, "-m", module, "--config", str(QUICKSTART), *args]


def single(args: list[str], env: dict | None = None, timeout: int = 600, module: str = "pretrain.train"):
    return run_cmd(single_cmd(args, module), timeout=timeout, env=env)


@contextlib.contextmanager
def small_disk(folder, size_bytes: int):
    """A tmpfs of ``size_bytes`` mounted at ``folder`` (needs root, as on the CI machine)."""
    folder.mkdir(parents=True)
    size = max(4096, size_bytes // 4096 * 4096)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a tmpfs for the full-disk case (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def losses(out: Path) -> dict[int, float]:
    """step -> logged loss (later lines win, as after a resume)."""
    result = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            result[row["step"]] = row["loss"]
    return result


# ------------------------------------------------------------------------------ the README's blocks


class ReadmeBlock:
    """One fenced block of a README: its language tag, first line, text and line number."""

    def __init__(self, path: Path, line: int, lang: str, text: str):
        self.path, self.line, self.lang, self.text = path, line, lang, text
        self.first = text.strip().splitlines()[0] if text.strip() else ""

    def __repr__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ```{self.lang} {self.first[:60]!r}"

    def commands(self) -> list[list[str]]:
        """The shell commands of a bash block: continuation lines joined, comments dropped, one
        argv per command (a leading ``$ `` prompt is dropped too; output lines are not commands)."""
        import shlex

        joined = self.text.replace("\\\n", " ")
        out = []
        for line in joined.splitlines():
            line = line.strip()
            if self.lang != "bash" and not line.startswith("$ "):
                continue
            line = line.removeprefix("$ ")
            if line and not line.startswith("#"):
                out.append(shlex.split(line, comments=True))
        return out


def readme_blocks(path: Path | None = None) -> list[ReadmeBlock]:
    """Every fenced block of ``path`` (default: the README), in order."""
    path = path or ROOT / "README.md"
    blocks, current, start, lang = [], None, 0, ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current, start, lang = [], number, line[3:].strip()
            else:
                blocks.append(ReadmeBlock(path, start, lang, "\n".join(current) + "\n"))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def readme_block(fragment: str, path: Path | None = None) -> ReadmeBlock:
    """The one block of the README whose first line contains ``fragment``."""
    found = [b for b in readme_blocks(path) if fragment in b.first]
    assert len(found) == 1, f"README blocks starting with {fragment!r}: {found}"
    return found[0]


# ------------------------------------------------------------------------ the field's libraries on an export


def libraries_agree(ckpt: Path, open_clip_dir: Path, hf_dir: Path, paths: list[Path], labels: list[int],
                    classnames: list[str], templates: list[str], elsewhere: Path) -> dict[str, float]:
    """The checkpoint ``ckpt`` exported with ``--format open_clip`` to ``open_clip_dir`` and with
    ``--format hf`` to ``hf_dir``: run from the folder ``elsewhere``, each library's own loader,
    tokenizer and preprocessing of the raw image files ``paths`` (``labels``: -1 for one that is not
    held out) give our embeddings (cos >= 0.9999) of every image and prompt (``classnames`` x
    ``templates``) and our zero-shot prediction (the prompts' mean per class) on every held-out
    image: open_clip's ``local-dir:`` loader with its ``build_zero_shot_classifier``; transformers'
    ``AutoModel`` with ``AutoProcessor``, and the ``zero-shot-image-classification`` pipeline per
    template. Returns each one's zero-shot top-1 on the held-out images."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoProcessor, pipeline

    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.export import Embedder, consolidated_state_dict, model_from_state

    cfg = load_config(Path(ckpt).parents[1] / "config.yaml")
    mods = build_modalities(cfg.data, train=False)
    emb = Embedder(model_from_state(cfg, consolidated_state_dict(ckpt), mods), cfg, mods)
    prompts = [t.format(c) for c in classnames for t in templates]
    images, texts = emb.embed_images(paths), emb.embed_texts(prompts)
    held = torch.tensor([label >= 0 for label in labels])
    truth = torch.tensor(labels)[held]

    def classes(prompt_features):  # (classes, d): the mean over templates, renormalised (as ours)
        per_class = F.normalize(prompt_features, dim=-1).reshape(len(classnames), len(templates), -1)
        return F.normalize(per_class.mean(1), dim=-1)

    ours = (images @ classes(texts).T).argmax(1)[held]
    found = {}

    def agree(name, lib_images, lib_texts, lib_classes):
        assert float(F.cosine_similarity(lib_images, images).min()) >= 0.9999, name
        assert float(F.cosine_similarity(lib_texts, texts).min()) >= 0.9999, name
        predicted = (F.normalize(lib_images, dim=-1) @ lib_classes.T).argmax(1)[held]
        assert torch.equal(predicted, ours), (name, predicted, ours)
        found[name] = float((predicted == truth).float().mean())

    pictures = [Image.open(p) for p in paths]
    with contextlib.chdir(elsewhere), torch.no_grad():
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
        model.eval()  # open_clip leaves it in training mode
        tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, device="cpu")
        agree("open_clip", model.encode_image(torch.stack([preprocess(p) for p in pictures]), normalize=True),
              model.encode_text(tokenizer(prompts), normalize=True), classifier.T)

        model, processor = AutoModel.from_pretrained(hf_dir).eval(), AutoProcessor.from_pretrained(hf_dir)
        lib = model(**processor(text=prompts, images=pictures, padding=True, truncation=True, return_tensors="pt"))
        agree("transformers", lib.image_embeds, lib.text_embeds, classes(lib.text_embeds))

        classify = pipeline("zero-shot-image-classification", model=str(hf_dir))
        kept = [str(p) for p, h in zip(paths, held.tolist()) if h]
        for i, template in enumerate(templates):
            ranked = classify(kept, candidate_labels=classnames, hypothesis_template=template, batch_size=64)
            mine = (images @ texts[i::len(templates)].T).argmax(1)[held]  # prompts are class-major
            assert [r[0]["label"] for r in ranked] == [classnames[j] for j in mine.tolist()], template
    return found
