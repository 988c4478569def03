"""Inputs: JSONL, CSV/TSV and Parquet manifests, and folders of files, read into plain rows.

A row is one would-be sample: ``fields`` maps a column (or, for a folder, a file extension) to its
raw value. Rows that cannot even be parsed (a line that is not JSON, a CSV row with too many cells)
come out as failure records instead; a manifest that cannot be read at all raises ``BuildError``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from data_tools.errors import BuildError
from pretrain.member_names import KEY_FORBIDDEN, split_name

FORMATS = ("jsonl", "csv", "tsv", "parquet", "folder")
SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
    ".parquet": "parquet", ".pq": "parquet",
}


@dataclass(frozen=True)
class FileRef:
    """A file that is a sample member by construction (folder inputs)."""

    path: str


@dataclass
class Row:
    row: int  # 0-based position among the input's rows
    loc: dict  # where it came from, for reports: {"line": n}, {"row": n} or {"path": "a/b"}
    fields: dict = field(default_factory=dict)
    key: str | None = None  # set for folder rows (derived from the path)
    split: str | None = None


@dataclass
class Failure:
    """A rejected input, as written to failures.jsonl."""

    row: int
    loc: dict
    kind: str
    reason: str
    key: str | None = None
    field: str | None = None

    def record(self) -> dict:
        out = {"row": self.row, **self.loc}
        if self.key is not None:
            out["key"] = self.key
        if self.field is not None:
            out["field"] = self.field
        out["kind"] = self.kind
        out["reason"] = self.reason
        return out

    def where(self) -> str:
        loc = ", ".join(f"{k} {v}" for k, v in self.loc.items())
        parts = [loc or f"row {self.row}"]
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts)


Item = Union[Row, Failure]


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise BuildError(f"--format: expected one of auto, {', '.join(FORMATS)}, got {fmt!r}")
        if (fmt == "folder") != path.is_dir():
            what = "a folder" if fmt == "folder" else "a file"
            raise BuildError(f"--input: --format {fmt} needs {what}, got {path}")
        return fmt
    if path.is_dir():
        return "folder"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BuildError(
            f"--input: cannot tell the manifest type of {path.name!r} from its suffix "
            f"(known: {', '.join(sorted(SUFFIX_FORMATS))}, or a folder); pass --format"
        )
    return fmt


def input_fingerprint(path: Path, fmt: str, exclude: Path | None) -> str:
    """Content hash of a manifest, or of a folder's listing (paths, sizes, mtimes)."""
    h = hashlib.sha256()
    if fmt == "folder":
        for rel, full in _walk(path, exclude):
            st = os.stat(full)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_input(path: Path, fmt: str, *, class_folders: str = "auto", exclude: Path | None = None,
               info: dict | None = None) -> tuple[list[str], Iterator[Item]]:
    """(the input's fields in first-seen order, an iterator of rows and failures).

    For JSONL the field list is complete only once the iterator is exhausted.
    ``info`` receives extra facts about the input (the class names of a class-folder tree).
    """
    if not path.exists():
        raise BuildError(f"--input: no such file or folder: {path}")
    if fmt == "jsonl":
        fields: list[str] = []
        return fields, _read_jsonl(path, fields)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, "\t" if fmt == "tsv" else ",")
    if fmt == "parquet":
        return _read_parquet(path)
    return _read_folder(path, class_folders, exclude, info if info is not None else {})


def _read_jsonl(path: Path, fields: list[str]) -> Iterator[Item]:
    seen = set()
    row = 0
    try:
        f = open(path, "rb")
    except OSError as err:
        raise BuildError(f"--input: cannot read {path}: {err.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            loc = {"line": lineno}
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                fail = Failure(row, loc, "bad_row", f"line is not valid UTF-8 ({err.reason} at byte {err.start})")
            else:
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    fail = Failure(row, loc, "bad_row", f"not valid JSON: {err}")
                else:
                    if isinstance(value, dict):
                        fail = None
                        for name in value:
                            if name not in seen:
                                seen.add(name)
                                fields.append(name)
                    else:
                        fail = Failure(row, loc, "bad_row", f"each line must be a JSON object, got {type(value).__name__}")
            if fail is not None:
                if row == 0:
                    raise BuildError(f"--input: {path}:{lineno}: {fail.reason}; is this a JSONL manifest (one JSON object per line)?")
                yield fail
            else:
                yield Row(row, loc, value)
            row += 1


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], Iterator[Item]]:
    try:
        f = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as err:
        raise BuildError(f"--input: cannot read {path}: {err.strerror}") from None
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as err:
        f.close()
        raise BuildError(f"--input: {path}:1: cannot parse the CSV header: {err}") from None
    if not header:
        f.close()
        raise BuildError(f"--input: {path} is empty: a CSV manifest needs a header line naming its columns")
    header = [h.strip() for h in header]
    bad = [h for h in header if not h]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if bad or dupes:
        f.close()
        what = "an empty column name" if bad else f"duplicate column names {dupes}"
        raise BuildError(f"--input: {path}:1: the CSV header has {what}")

    def rows() -> Iterator[Item]:
        row, start = 0, reader.line_num + 1
        with f:
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    raise BuildError(f"--input: {path}:{reader.line_num}: cannot parse CSV: {err}") from None
                loc = {"line": start}
                start = reader.line_num + 1
                if not cells:
                    continue  # blank line
                if len(cells) > len(header):
                    yield Failure(row, loc, "bad_row", f"{len(cells)} cells but the header names {len(header)} columns")
                else:
                    # An empty cell is a missing value (CSV has no null).
                    yield Row(row, loc, {h: (c if c != "" else None) for h, c in zip(header, cells)})
                row += 1

    return header, rows()


def _read_parquet(path: Path) -> tuple[list[str], Iterator[Item]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise BuildError("--input: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise BuildError(f"--input: cannot read {path} as Parquet: {err}") from None
    names = list(pf.schema_arrow.names)

    def rows() -> Iterator[Item]:
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=4096):
                for values in batch.to_pylist():
                    yield Row(row, {"row": row}, values)
                    row += 1
        except Exception as err:
            raise BuildError(f"--input: {path}: cannot read Parquet row group near row {row}: {err}") from None

    return names, rows()


def _walk(root: Path, exclude: Path | None) -> Iterator[tuple[str, str]]:
    """(relative path with '/', full path) of every non-hidden file, sorted, skipping ``exclude``."""
    exclude_s = os.path.realpath(exclude) if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith(".") or (exclude_s and os.path.realpath(full) == exclude_s):
                continue
            keep.append(d)
        dirnames[:] = keep
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            yield rel, os.path.join(dirpath, name)


def sanitize_key(key: str) -> str:
    """Each run of characters a key never holds (``pretrain.member_names.KEY_FORBIDDEN``) -> ``_``."""
    return re.sub(f"(?:{KEY_FORBIDDEN.pattern})+", "_", key)


def _read_folder(root: Path, class_folders: str, exclude: Path | None, info: dict):
    entries = [e for e in sorted(os.listdir(root)) if not e.startswith(".")]
    if exclude is not None:
        entries = [e for e in entries if os.path.realpath(root / e) != os.path.realpath(exclude)]
    all_dirs = bool(entries) and all((root / e).is_dir() for e in entries)
    if class_folders == "yes" and not all_dirs:
        raise BuildError(f"--class-folders yes: {root} must hold only class folders (found files at its top level)")
    use_classes = all_dirs and class_folders in ("auto", "yes")
    classes = entries if use_classes else []
    info["classes"] = classes
    class_index = {c: i for i, c in enumerate(classes)}

    samples: dict[str, dict] = {}
    order: list[str] = []
    stray: list[tuple[str, str]] = []
    for rel, full in _walk(root, exclude):
        parsed = split_name(rel)  # files sharing a stem are one sample, as members sharing a key
        if parsed is None:
            stray.append((rel, "file has no extension (or no stem) to name its member"))
            continue
        sample_path, ext = parsed
        if sample_path not in samples:
            samples[sample_path] = {}
            order.append(sample_path)
        members = samples[sample_path]
        ext = ext.lower()
        if ext in members:
            members.setdefault("\0clash", []).append(rel)
        members[ext] = FileRef(full)

    fields: list[str] = []
    seen = set()
    for members in samples.values():
        for ext in members:
            if ext != "\0clash" and ext not in seen:
                seen.add(ext)
                fields.append(ext)
    if use_classes and "cls" not in seen:
        fields.append("cls")

    def rows() -> Iterator[Item]:
        items: list[tuple[str, object]] = [(p, None) for p in order] + [(p, reason) for p, reason in stray]
        items.sort(key=lambda t: t[0])
        for row, (sample_path, stray_reason) in enumerate(items):
            loc = {"path": sample_path}
            if stray_reason is not None:
                yield Failure(row, loc, "bad_file", stray_reason)
                continue
            members = dict(samples[sample_path])
            key = sanitize_key(sample_path)
            clash = members.pop("\0clash", None)
            if clash:
                yield Failure(row, loc, "member_clash", f"files {clash} give the same member name", key=key)
                continue
            if use_classes:
                cls_name = sample_path.split("/", 1)[0]
                if "cls" in members:
                    yield Failure(row, loc, "member_clash", "a .cls file and its class folder both give a label", key=key)
                    continue
                members["cls"] = class_index[cls_name]
            yield Row(row, loc, members, key=key)

    return fields, rows()
