"""Manifest (JSONL) -> webdataset tar shards + index.json.

Each manifest line is a JSON object, one sample. The ``key`` field names the sample (keys are
generated when absent; a key may not contain a dot). Every other field becomes one member:

- a string naming an existing file (relative to the manifest) -> that file's bytes;
- any other string -> UTF-8 text;
- a number, list or object -> JSON text (an integer label is thus ``7``, the ``.cls`` convention).

The member is named ``<field>.<ext>`` (ext: the file's suffix, ``txt`` or ``json``) unless
``--map field=name`` names it (e.g. ``--map caption=txt --map image=png --map label=cls``, the
OpenCLIP/img2dataset convention).

Tars are deterministic (sorted members, mtime 0, no owner) and written to a temporary name, then
renamed; ``index.json`` (written last) is the record of a complete build.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path


class BuildError(ValueError):
    """Bad input to the shard builder; the message names the line and field."""


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def _member_bytes(value, manifest_dir: Path) -> tuple[bytes, str]:
    """The member's content and its default extension."""
    if isinstance(value, str):
        candidate = manifest_dir / value
        if value and candidate.is_file():
            suffix = candidate.suffix.lstrip(".").lower()
            if not suffix:
                raise ValueError(f"file {value!r} has no extension to name its member")
            return candidate.read_bytes(), suffix
        return value.encode("utf-8"), "txt"
    if isinstance(value, (bool, int, float, list, dict)) or value is None:
        return json.dumps(value).encode("utf-8"), "json"
    raise ValueError(f"unsupported value type {type(value).__name__}")


def read_manifest(path: Path, mapping: dict[str, str]):
    """Yields (key, {member: bytes}) for each line, failing loud with line and field."""
    manifest_dir = path.parent
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BuildError(f"{path}:{lineno}: not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise BuildError(f"{path}:{lineno}: each line must be a JSON object")
            key = str(row.pop("key", f"{lineno - 1:09d}"))
            if "." in key or "/" in key or not key:
                raise BuildError(f"{path}:{lineno}: field 'key': {key!r} must be non-empty without '.' or '/'")
            if key in seen:
                raise BuildError(f"{path}:{lineno}: field 'key': duplicate key {key!r}")
            seen.add(key)
            members = {}
            for field_name, value in row.items():
                try:
                    data, ext = _member_bytes(value, manifest_dir)
                except ValueError as err:
                    raise BuildError(f"{path}:{lineno}: field {field_name!r}: {err}") from None
                name = mapping.get(field_name, f"{field_name}.{ext}")
                if name in members:
                    raise BuildError(f"{path}:{lineno}: field {field_name!r}: member {name!r} written twice")
                members[name] = data
            if not members:
                raise BuildError(f"{path}:{lineno}: the sample has no fields besides its key")
            yield key, members


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for name in sorted(members):
                data = members[name]
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_shards(
    manifest: str | Path,
    output: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    mapping: dict[str, str] | None = None,
) -> dict:
    manifest, output = Path(manifest), Path(output)
    if shard_size <= 0:
        raise BuildError(f"--shard-size: must be > 0, got {shard_size}")
    if not manifest.is_file():
        raise BuildError(f"--input: no such file: {manifest}")
    output.mkdir(parents=True, exist_ok=True)
    mapping = dict(mapping or {})
    shards: list[ShardInfo] = []
    pending: list[tuple[str, dict[str, bytes]]] = []

    def flush() -> None:
        name = f"{prefix}-{len(shards):06d}.tar"
        path = output / name
        _write_tar(path, pending)
        shards.append(ShardInfo(name, len(pending), path.stat().st_size, _sha256(path)))
        pending.clear()

    for sample in read_manifest(manifest, mapping):
        pending.append(sample)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not shards:
        raise BuildError(f"--input: {manifest} holds no samples")
    index = {
        "format": "multimodal-pretrain-shards/1",
        "total_samples": sum(s.samples for s in shards),
        "shards": [vars(s) for s in shards],
        "options": {"manifest": str(manifest), "shard_size": shard_size, "prefix": prefix, "map": mapping},
    }
    (output / "sizes.json").write_text(json.dumps({s.name: s.samples for s in shards}, indent=1) + "\n")
    tmp = output / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, output / "index.json")
    return index
