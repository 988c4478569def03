"""The shard index formats, defined once: written by ``python -m data_tools build``, read by
``data_tools verify`` / ``stats`` and by the training pipeline (``pretrain.data.sources``).

``index.json`` lies in the build's output folder and is written last (the completion record):

| field            | value                                                                            |
| ---------------- | -------------------------------------------------------------------------------- |
| format           | ``FORMAT``                                                                       |
| total_samples    | samples in all shards                                                            |
| total_bytes      | bytes of all shards                                                              |
| rows             | input rows read (written and rejected)                                           |
| shards           | in order: ``name`` (path relative to the index's folder), ``split``,             |
|                  | ``samples``, ``bytes``, ``sha256``, ``members`` and ``modalities`` (-> samples)  |
| splits           | split -> ``shards``, ``samples``, ``bytes``, ``pattern`` (brace pattern or null) |
| members          | member -> samples that have it                                                   |
| required_members | the members every sample has                                                     |
| failures         | ``total`` and ``by_kind`` (kind -> rows) of the rejected rows                    |
| oversize_shards  | shards over the byte limit (each holds one larger sample)                        |
| classes          | class folder names, a ``.cls`` label's value is the position (only when any)     |
| options          | the build options that shape the output                                          |

``sizes.json`` (OpenCLIP's format) lies beside each split's shards: shard file name -> samples.
A split's shards (``--split``) lie in ``SPLIT/`` under the index's folder: whoever reads a folder of
shards looks for ``index.json`` beside them, then one folder up (``find_index``).

This module imports nothing of the project and nothing heavy (``data_tools`` stays torch-free).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

FORMAT = "multimodal-pretrain-shards/1"
INDEX = "index.json"
SIZES = "sizes.json"


class ShardIndexError(ValueError):
    """Not an index.json / sizes.json document; the message says what is wrong."""


def index_document(shards: list[dict], patterns: dict, rows: int, failures_by_kind: dict, oversize: int,
                   classes: list, options: dict) -> dict:
    """The index.json document. ``shards``: the shard entries in order; ``patterns``: split -> its
    shards' brace pattern (None when it has no shard), in split order."""
    total = sum(s["samples"] for s in shards)
    members: dict[str, int] = {}
    for s in shards:
        for m, c in s["members"].items():
            members[m] = members.get(m, 0) + c
    splits = {}
    for split, pattern in patterns.items():
        mine = [s for s in shards if s["split"] == split]
        splits[split] = {"shards": len(mine), "samples": sum(s["samples"] for s in mine),
                         "bytes": sum(s["bytes"] for s in mine), "pattern": pattern}
    doc = {
        "format": FORMAT,
        "total_samples": total,
        "total_bytes": sum(s["bytes"] for s in shards),
        "rows": rows,
        "shards": shards,
        "splits": splits,
        "members": dict(sorted(members.items())),
        "required_members": sorted(m for m, c in members.items() if c == total),
        "failures": {"total": sum(failures_by_kind.values()), "by_kind": dict(sorted(failures_by_kind.items()))},
        "oversize_shards": oversize,
    }
    if classes:
        doc["classes"] = classes
    doc["options"] = options
    return doc


def sizes_document(shards: list[dict]) -> dict[str, int]:
    """The sizes.json document of the shards of one folder: file name -> samples."""
    return {s["name"].rsplit("/", 1)[-1]: s["samples"] for s in shards}


def dumps(doc: dict) -> str:
    """The text of an index.json or sizes.json."""
    return json.dumps(doc, indent=1) + "\n"


def _is(value, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _check_shards(shards: list, fields: dict[str, type]) -> None:
    for i, entry in enumerate(shards):
        if not (isinstance(entry, dict) and all(_is(entry.get(f), t) for f, t in fields.items())):
            needs = [f"{'a string' if t is str else 'an integer'} {f!r}" for f, t in fields.items()]
            raise ShardIndexError(f"shards[{i}] needs {', '.join(needs[:-1])} and {needs[-1]}")


def shard_counts(doc: object) -> dict[str, int]:
    """name -> samples, from an index.json (names relative to its folder) or a sizes.json document."""
    if isinstance(doc, dict) and isinstance(doc.get("shards"), list):
        shards = doc["shards"]
        # the common case checked in a few passes over the entries (the general check takes a generator
        # per entry: 0.45 s of a 100k-shard index); anything else, and every error message, from _check_shards
        if all(type(e) is dict for e in shards):
            names = [e.get("name") for e in shards]
            samples = [e.get("samples") for e in shards]
            if all(type(x) is str for x in names) and all(type(x) is int for x in samples):
                return dict(zip(names, samples))
        _check_shards(shards, {"name": str, "samples": int})
        return {entry["name"]: entry["samples"] for entry in shards}
    if isinstance(doc, dict) and all(_is(v, int) for v in doc.values()):
        return {str(k): v for k, v in doc.items()}  # OpenCLIP sizes.json
    raise ShardIndexError("neither an index.json (with 'shards') nor a sizes.json (name -> count)")


def find_index(folder: Path) -> Optional[tuple[Path, str]]:
    """(the index.json of a shard folder, the folder's place relative to it): beside the shards
    (``"."``), else one folder up (the folder's name: a split of a ``--split`` build); None when
    neither exists. Whether the index lists shards in the folder is the caller's to check."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        return folder / INDEX, "."
    real = folder.resolve()
    if real.parent != real and (real.parent / INDEX).is_file():
        return real.parent / INDEX, real.name
    return None


def in_folder(shards: list[dict], rel: str) -> list[dict]:
    """The index's shard entries that lie in ``rel`` (relative to the index's folder; "." for all)."""
    if rel == ".":
        return list(shards)
    return [s for s in shards if Path(s["name"]).parent == Path(rel)]


def load_index(path: Path) -> dict:
    """A build's index.json, checked: the format, and each shard's name, samples, bytes and sha256."""
    try:
        doc = json.loads(Path(path).read_text())
    except ValueError as err:
        raise ShardIndexError(f"not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ShardIndexError(f"format {found!r}, expected {FORMAT!r}")
    if not isinstance(doc.get("shards"), list):
        raise ShardIndexError("no 'shards' list")
    _check_shards(doc["shards"], {"name": str, "samples": int, "bytes": int, "sha256": str})
    return doc
