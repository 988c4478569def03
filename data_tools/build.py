"""Manifest or folder -> webdataset tar shards + ``index.json``, ``sizes.json``, ``failures.jsonl``.

How a build runs:

1. Read the whole input (JSONL, CSV/TSV, Parquet or a folder) into rows; resolve each row's key
   (a key column, else generated from the row's position; never a dot), its split (a column, or a
   seeded hash order cut at exact ratios) and its fields. Rows that fail here (bad key, duplicate
   key, missing value, unparseable line) are rejected and reported.
2. Cut each split's rows, in input order, into groups of ``shard_size`` rows. Groups are the unit
   of work: a worker turns one group into one or more tar parts (a new part starts when the next
   sample would push the file past ``max_shard_bytes``) plus a small JSON record, each written
   under a temporary name and renamed. Which samples land in which part depends only on the input
   and the options, so the output is byte-identical whatever the number of worker processes.
3. When every group is done, parts are renamed in order to ``{prefix}-000000.tar``, ... (per split
   folder when there are splits); then ``sizes.json``, ``failures.jsonl`` and, last,
   ``index.json``: the completion record.

Work in progress lives in ``OUTPUT/.build/`` beside a fingerprint of the input and options. After
a crash or ``kill -9``, the same command again keeps the finished groups, redoes the rest and
gives the same files as an uninterrupted build; a different input or options start afresh.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from data_tools.errors import BuildError, StrictFailure
from data_tools.members import AUDIO_FORMATS, IMAGE_FORMATS, Processing, SampleFailure, make_members
from data_tools.progress import Progress
from data_tools.sources import Failure, Row, detect_format, input_fingerprint, read_input, sanitize_key
from data_tools.tarwriter import ShardFile, encode_sample, finished_size
from pretrain.member_names import key_problem, member_problem
from pretrain.shard_index import FORMAT, INDEX, SIZES, dumps, index_document, load_index, sizes_document

__all__ = ["BuildError", "BuildOptions", "StrictFailure", "build_shards"]

WORK_DIR = ".build"
NO_SPLIT = "all"
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class BuildOptions:
    shard_size: int = 1000
    prefix: str = "shard"
    mapping: dict = field(default_factory=dict)
    input_format: str = "auto"
    max_shard_bytes: int | None = None
    workers: int = 1
    key_column: str = "key"
    sanitize_keys: bool = False
    ignore: tuple = ()
    optional: tuple = ()
    split_column: str | None = None
    split_ratios: dict | None = None  # split name -> fraction, in the order given
    seed: int = 0
    class_folders: str = "auto"  # auto | yes | no
    base_dir: str | None = None
    processing: Processing = field(default_factory=Processing)
    strict: bool = False
    progress: bool | None = None  # None: only on a terminal, never under CI


# ------------------------------------------------------------------------------------ validation


def _validate(o: BuildOptions) -> None:
    if not isinstance(o.shard_size, int) or o.shard_size <= 0:
        raise BuildError(f"--shard-size: must be a positive number of samples, got {o.shard_size}")
    if o.max_shard_bytes is not None and o.max_shard_bytes < 10240:
        raise BuildError(f"--max-shard-bytes: must be at least 10240 (one tar record), got {o.max_shard_bytes}")
    if not isinstance(o.workers, int) or o.workers < 1:
        raise BuildError(f"--workers: must be at least 1, got {o.workers}")
    if not _NAME_OK.fullmatch(o.prefix or ""):
        raise BuildError(f"--prefix: letters, digits, '_' and '-' only, got {o.prefix!r}")
    for f, name in o.mapping.items():
        problem = member_problem(name or "")
        if problem:
            raise BuildError(f"--map {f}={name}: {problem}")
    if o.split_column and o.split_ratios:
        raise BuildError("--split-column and --split are exclusive: split by a column or by ratios, not both")
    if o.split_ratios is not None:
        if not o.split_ratios:
            raise BuildError("--split: give at least one NAME=FRACTION")
        for name, frac in o.split_ratios.items():
            if not _NAME_OK.fullmatch(name):
                raise BuildError(f"--split {name}={frac}: a split name is letters, digits, '_' and '-'")
            if not (isinstance(frac, (int, float)) and 0 < frac <= 1):
                raise BuildError(f"--split {name}={frac}: the fraction must be in (0, 1]")
        total = sum(o.split_ratios.values())
        if abs(total - 1.0) > 1e-6:
            raise BuildError(f"--split: the fractions must add up to 1, they add up to {total:g}")
    if o.class_folders not in ("auto", "yes", "no"):
        raise BuildError(f"--class-folders: expected auto, yes or no, got {o.class_folders!r}")
    p = o.processing
    if p.decode_check not in ("fast", "full", "off"):
        raise BuildError(f"decode check: expected fast, full or off, got {p.decode_check!r}")
    if p.image_format is not None and p.image_format not in IMAGE_FORMATS:
        raise BuildError(f"--image-format: expected one of {', '.join(IMAGE_FORMATS)}, got {p.image_format!r}")
    if p.image_max_side is not None and p.image_max_side <= 0:
        raise BuildError(f"--image-max-side: must be a positive number of pixels, got {p.image_max_side}")
    if not 1 <= p.image_quality <= 100:
        raise BuildError(f"--image-quality: must be 1..100, got {p.image_quality}")
    if p.audio_format is not None and p.audio_format not in AUDIO_FORMATS:
        raise BuildError(f"--audio-format: expected one of {', '.join(AUDIO_FORMATS)}, got {p.audio_format!r}")
    if p.audio_rate is not None and p.audio_rate <= 0:
        raise BuildError(f"--audio-rate: must be a positive sample rate in Hz, got {p.audio_rate}")


def _check_fields(o: BuildOptions, fields: list[str], folder: bool) -> None:
    """Flags that name fields must name fields of the input (a typo stops at once)."""
    known = set(fields)
    listing = ", ".join(fields) if fields else "none"
    what = "member extension" if folder else "field"

    def need(flag: str, name: str) -> None:
        if name not in known:
            raise BuildError(f"{flag}: no {what} {name!r} in the input ({what}s: {listing})")

    for f, name in o.mapping.items():
        need(f"--map {f}={name}", f)
    for f in o.ignore:
        need(f"--ignore {f}", f)
    for f in o.optional:
        need(f"--optional {f}", f)
    if o.split_column:
        if folder:
            raise BuildError("--split-column: a folder input has no columns; split it with --split NAME=FRACTION")
        need("--split-column", o.split_column)
    if not folder and o.key_column != "key":
        need("--key-column", o.key_column)
    for f in fields:
        if f in o.mapping or f in o.ignore or f in (o.key_column, o.split_column):
            continue
        if not f or "/" in f:
            raise BuildError(f"the {what} {f!r} cannot name a tar member; rename it with --map or drop it with --ignore")


# -------------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    splits: dict  # split name -> list[Row] in input order
    failures: list  # Failure
    rows: int
    classes: list


class _PlanStop(Exception):
    """--strict met a bad row while planning; the rows planned before it are checked first."""

    def __init__(self, failure: Failure, planned: list):
        self.failure, self.planned = failure, planned


def _key_of(value, sanitize: bool) -> tuple[str | None, str | None]:
    """(key, None) or (None, reason)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"a key must be a string or an integer, got {type(value).__name__}"
    key = str(value)
    if sanitize:
        key = sanitize_key(key)
    problem = key_problem(key)
    if problem:
        return None, problem + ("" if not key else "; --sanitize-keys replaces them with '_'")
    return key, None


def _plan(o: BuildOptions, items, fields: list[str], folder: bool, classes: list) -> Plan:
    items = list(items)  # for JSONL this also completes ``fields``
    _check_fields(o, fields, folder)
    excluded = set(o.ignore)
    if not folder:
        excluded.add(o.key_column)
    if o.split_column:
        excluded.add(o.split_column)
    required = [f for f in fields if f not in excluded and f not in o.optional]
    failures: list[Failure] = []
    planned: list[Row] = []
    seen: dict[str, dict] = {}
    n_rows = 0

    def reject(f: Failure) -> None:
        if o.strict:
            raise _PlanStop(f, planned)
        failures.append(f)

    for item in items:
        n_rows += 1
        if isinstance(item, Failure):
            reject(item)
            continue
        row, values = item, item.fields
        key = row.key
        if key is None:
            kv = values.get(o.key_column)
            if kv is None:
                key = f"{row.row:09d}"
            else:
                key, why = _key_of(kv, o.sanitize_keys)
                if why:
                    reject(Failure(row.row, row.loc, "bad_key", why, field=o.key_column))
                    continue
        split = NO_SPLIT
        if o.split_column:
            sv = values.get(o.split_column)
            if sv is None:
                reject(Failure(row.row, row.loc, "missing_value", f"no value for the split column {o.split_column!r}", key, o.split_column))
                continue
            split = str(sv)
            if not _NAME_OK.fullmatch(split):
                reject(Failure(row.row, row.loc, "bad_split", f"split name {split!r}: letters, digits, '_' and '-' only", key, o.split_column))
                continue
        missing = [f for f in required if values.get(f) is None]
        if missing:
            reject(Failure(row.row, row.loc, "missing_value",
                           f"no value for {', '.join(map(repr, missing))} (--optional FIELD allows that)", key, missing[0]))
            continue
        members = {f: v for f, v in values.items() if f not in excluded and v is not None}
        if not members:
            reject(Failure(row.row, row.loc, "no_fields", "the sample has no fields besides its key", key))
            continue
        if key in seen:
            first = ", ".join(f"{k} {v}" for k, v in seen[key].items())
            reject(Failure(row.row, row.loc, "duplicate_key", f"duplicate key {key!r} (first at {first})", key))
            continue
        seen[key] = row.loc
        row.key, row.split, row.fields = key, split, members
        planned.append(row)

    if n_rows == 0:
        raise BuildError("--input: the input holds no samples")
    splits: dict[str, list[Row]] = {}
    if o.split_ratios:
        order = sorted(planned, key=lambda r: hashlib.sha256(f"{o.seed}\0{r.key}".encode("utf-8", "surrogateescape")).digest())
        counts = _apportion(len(order), list(o.split_ratios.values()))
        start = 0
        for name, count in zip(o.split_ratios, counts):
            chosen = order[start:start + count]
            start += count
            for r in chosen:
                r.split = name
            splits[name] = sorted(chosen, key=lambda r: r.row)
    elif o.split_column:
        for r in planned:
            splits.setdefault(r.split, []).append(r)
        splits = dict(sorted(splits.items()))
    else:
        splits[NO_SPLIT] = planned
    return Plan(splits, failures, n_rows, classes)


def _apportion(n: int, fractions: list[float]) -> list[int]:
    """Exact counts summing to n (largest remainder, ties to the earlier split)."""
    raw = [n * f for f in fractions]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


# ----------------------------------------------------------------------------------- group work


@dataclass(frozen=True)
class Settings:
    work: str
    base_dir: str
    mapping: dict
    folder: bool
    processing: Processing
    max_shard_bytes: int | None
    strict: bool


def _group_stem(group: int) -> str:
    return f"g{group:06d}"


def run_group(task: tuple, s: Settings, tick=None) -> dict:
    """One group of rows -> tar part(s) and a JSON record in the work folder."""
    split, group, rows = task
    folder = Path(s.work) / split
    folder.mkdir(parents=True, exist_ok=True)
    stem = _group_stem(group)
    parts, failures = [], []
    current = None
    oversize = 0
    try:
        for row in rows:
            try:
                members = make_members(row.fields, base_dir=s.base_dir, mapping=s.mapping,
                                       folder=s.folder, processing=s.processing)
                try:
                    block = encode_sample(row.key, members)
                except ValueError as err:  # a name or size beyond what a USTAR header holds
                    raise SampleFailure("tar_limit", str(err)) from None
            except SampleFailure as err:
                f = Failure(row.row, row.loc, err.kind, err.reason, row.key, err.field)
                if s.strict:
                    raise StrictFailure(f"--strict: {f.where()}: {f.reason}") from None
                failures.append(f.record())
            else:
                if (current is not None and s.max_shard_bytes is not None
                        and finished_size(current.payload + len(block)) > s.max_shard_bytes):
                    parts.append(_close_part(current))
                    current = None
                if current is None:
                    current = ShardFile(folder / f"{stem}-p{len(parts):03d}.tar")
                current.add(block, members)
                if s.max_shard_bytes is not None and current.samples == 1 and finished_size(len(block)) > s.max_shard_bytes:
                    oversize += 1
            if tick is not None:
                tick(1)
        if current is not None:
            parts.append(_close_part(current))
            current = None
    finally:
        if current is not None:
            current.abandon()
    record = {"split": split, "group": group, "rows": len(rows), "parts": parts,
              "failures": failures, "oversize": oversize}
    tmp = folder / f"{stem}.json.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f"{stem}.json")
    return record


def _close_part(part: ShardFile) -> dict:
    info = part.close()
    return {"file": part.path.name, **info}


# ----------------------------------------------------------------------------------------- build


def _options_record(o: BuildOptions, input_path: Path, fmt: str) -> dict:
    """The options that shape the output (not --workers, --strict or progress), as recorded in index.json."""
    rec = {
        "input": str(input_path),
        "format": fmt,
        "shard_size": o.shard_size,
        "max_shard_bytes": o.max_shard_bytes,
        "prefix": o.prefix,
        "map": dict(o.mapping),
    }
    if fmt == "folder":
        rec["class_folders"] = o.class_folders
    else:
        rec["key_column"] = o.key_column
        rec["sanitize_keys"] = o.sanitize_keys
    rec["ignore"] = list(o.ignore)
    rec["optional"] = list(o.optional)
    if o.split_column:
        rec["split_column"] = o.split_column
    if o.split_ratios:
        rec["split"] = dict(o.split_ratios)
        rec["seed"] = o.seed
    if o.base_dir is not None:
        rec["base_dir"] = o.base_dir
    rec["processing"] = asdict(o.processing)
    return rec


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pattern(prefix: str, count: int) -> str:
    if count == 1:
        return f"{prefix}-000000.tar"
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar"


def _lock(work: Path):
    import fcntl

    fh = open(work / "lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise BuildError(f"--output: another build is writing to {work.parent} right now") from None
    return fh


def build_shards(
    manifest: str | Path,
    output: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    mapping: dict[str, str] | None = None,
    **options,
) -> dict:
    """Builds shards from ``manifest`` (a JSONL/CSV/TSV/Parquet file or a folder) into ``output``.

    Keyword options are the fields of ``BuildOptions``. Returns the index (as written to
    ``index.json``). Raises ``BuildError`` for bad options or an unreadable input, and
    ``StrictFailure`` for the first bad input when ``strict=True``.
    """
    start = time.monotonic()
    unknown = set(options) - set(BuildOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"build_shards: unknown options {sorted(unknown)}")
    o = BuildOptions(shard_size=shard_size, prefix=prefix, mapping=dict(mapping or {}), **options)
    if isinstance(o.processing, dict):
        o = replace(o, processing=Processing(**o.processing))
    o.ignore, o.optional = tuple(o.ignore), tuple(o.optional)
    _validate(o)
    src, out = Path(manifest), Path(output)
    if not src.exists():
        raise BuildError(f"--input: no such file or folder: {src}")
    if out.exists() and not out.is_dir():
        raise BuildError(f"--output: {out} exists and is not a folder")
    fmt = detect_format(src, o.input_format)
    folder = fmt == "folder"
    if folder and os.path.realpath(src) == os.path.realpath(out):
        raise BuildError("--output: must not be the input folder itself (use a new or sub-folder)")
    info: dict = {}
    fields, items = read_input(src, fmt, class_folders=o.class_folders, exclude=out if folder else None, info=info)
    base_dir = o.base_dir if o.base_dir is not None else str(src if folder else src.parent)
    try:
        plan = _plan(o, items, fields, folder, info.get("classes", []))
    except _PlanStop as stop:
        # Report the first bad input in input order: a row before this one may fail its checks.
        for row in stop.planned:
            try:
                make_members(row.fields, base_dir=base_dir, mapping=o.mapping, folder=folder, processing=o.processing)
            except SampleFailure as err:
                f = Failure(row.row, row.loc, err.kind, err.reason, row.key, err.field)
                raise StrictFailure(f"--strict: {f.where()}: {f.reason}") from None
        raise StrictFailure(f"--strict: {stop.failure.where()}: {stop.failure.reason}") from None
    options_rec = _options_record(o, src, fmt)
    fingerprint = hashlib.sha256(json.dumps(
        {"format": FORMAT, "options": options_rec, "input": input_fingerprint(src, fmt, out if folder else None)},
        sort_keys=True).encode()).hexdigest()

    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK_DIR
    work.mkdir(exist_ok=True)
    lock = _lock(work)
    try:
        index = _build_locked(o, plan, out, work, fingerprint, options_rec, folder, base_dir, start)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        lock.close()
    return index


def _build_locked(o, plan, out, work, fingerprint, options_rec, folder, base_dir, start) -> dict:
    plan_path = work / "plan.json"
    state = None
    if plan_path.exists():
        try:
            state = json.loads(plan_path.read_text())
        except ValueError:
            state = None
    if not state or state.get("fingerprint") != fingerprint:
        for child in work.iterdir():
            if child.name == "lock":
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        old = []
        if (out / INDEX).exists():
            try:
                old = [s["name"] for s in load_index(out / INDEX)["shards"]]
            except ValueError:  # not an index of ours: no shards to remove
                old = []
        state = {"fingerprint": fingerprint, "previous_shards": old}
        _write_atomic(plan_path, json.dumps(state))
    # The index is the completion record: gone from here until this build completes.
    (out / INDEX).unlink(missing_ok=True)
    # Temporary files of a killed run (ours by name: NAME.tmp.PID).
    for leftover in work.rglob("*.tmp.*"):
        leftover.unlink(missing_ok=True)
    names = "|".join(map(re.escape, (INDEX, "failures.jsonl", SIZES)))
    ours = re.compile(rf"({names}|{re.escape(o.prefix)}-\d{{6}}\.tar)\.tmp\.\d+")
    for sdir in {out} | {_split_dir(out, split, o) for split in plan.splits}:
        if sdir.is_dir():
            for leftover in sdir.iterdir():
                if ours.fullmatch(leftover.name):
                    leftover.unlink(missing_ok=True)

    settings = Settings(str(work), base_dir, dict(o.mapping), folder, o.processing, o.max_shard_bytes, o.strict)
    tasks, done_rows, total_rows = [], 0, 0
    groups: dict[str, int] = {}
    for split, rows in plan.splits.items():
        n_groups = math.ceil(len(rows) / o.shard_size)
        groups[split] = n_groups
        for g in range(n_groups):
            chunk = rows[g * o.shard_size:(g + 1) * o.shard_size]
            total_rows += len(chunk)
            if _group_done(work, split, g):
                done_rows += len(chunk)
            else:
                tasks.append((split, g, chunk))

    progress = Progress(total_rows, initial=done_rows, enabled=o.progress)
    try:
        if tasks:
            if o.workers == 1 or len(tasks) == 1:
                done = [done_rows]

                def tick(n: int) -> None:
                    done[0] += n
                    progress.update(done[0])

                for t in tasks:
                    run_group(t, settings, tick)
            else:
                from data_tools.workers import Pool

                pool = Pool(min(o.workers, len(tasks)), settings)
                ok = False
                try:
                    pool.run(tasks, lambda rows: progress.update(done_rows + rows))
                    ok = True
                finally:
                    pool.close(kill=not ok)
        progress.update(total_rows)
    finally:
        progress.close()  # the bar's line ends before any error message
    return _finalize(o, plan, out, work, groups, state, options_rec, start)


def _group_done(work: Path, split: str, group: int) -> bool:
    return (work / split / f"{_group_stem(group)}.json").exists()


def _split_dir(out: Path, split: str, o: BuildOptions) -> Path:
    """Shards of a build without splits lie in the output folder itself; else one folder per split."""
    return out / split if (o.split_column or o.split_ratios) else out


def _finalize(o, plan, out, work, groups, state, options_rec, start) -> dict:
    shards, failures = [], [f.record() for f in plan.failures]
    oversize = 0
    for split, n_groups in groups.items():
        sdir = _split_dir(out, split, o)
        sdir.mkdir(parents=True, exist_ok=True)
        number = 0
        for g in range(n_groups):
            record = json.loads((work / split / f"{_group_stem(g)}.json").read_text())
            failures.extend(record["failures"])
            oversize += record.get("oversize", 0)
            for part in record["parts"]:
                name = f"{o.prefix}-{number:06d}.tar"
                number += 1
                src, dst = work / split / part["file"], sdir / name
                if src.exists():
                    os.replace(src, dst)
                elif not (dst.exists() and dst.stat().st_size == part["bytes"] and _sha256_file(dst) == part["sha256"]):
                    raise BuildError(f"work file {src} is missing; delete {work} and run the command again")
                rel = str(dst.relative_to(out))
                shards.append({"name": rel, "split": split, "samples": part["samples"], "bytes": part["bytes"],
                               "sha256": part["sha256"], "members": part["members"],
                               "modalities": part["modalities"]})

    failures.sort(key=lambda r: (r["row"], r.get("field") or ""))
    total = sum(s["samples"] for s in shards)
    keep = {s["name"] for s in shards}
    # Shards of an earlier build in this folder that this one does not replace.
    stale = set(state.get("previous_shards", []))
    shard_re = re.compile(rf"{re.escape(o.prefix)}-\d{{6}}\.tar")
    for split in groups:
        sdir = _split_dir(out, split, o)
        for p in sdir.iterdir():
            rel = str(p.relative_to(out))
            if shard_re.fullmatch(p.name) or (p.name.startswith(f"{o.prefix}-") and ".tar.tmp." in p.name):
                stale.add(rel)
    for rel in sorted(stale - keep):
        target = out / rel
        if ".." in Path(rel).parts or not target.is_file():
            continue
        if target.name.endswith(".tar") or ".tar.tmp." in target.name:
            target.unlink(missing_ok=True)

    by_kind: dict[str, int] = {}
    for f in failures:
        by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
    if total == 0:
        _write_atomic(out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
        raise BuildError(f"no sample passed the checks: {len(failures)} of {plan.rows} rows rejected "
                         f"({_kinds_line(by_kind)}); see {out / 'failures.jsonl'}")
    patterns = {}
    for split in groups:
        mine = [s for s in shards if s["split"] == split]
        sdir_rel = "" if _split_dir(out, split, o) == out else f"{split}/"
        patterns[split] = sdir_rel + _pattern(o.prefix, len(mine)) if mine else None
        _write_atomic(_split_dir(out, split, o) / SIZES, dumps(sizes_document(mine)))
    _write_atomic(out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    index = index_document(shards, patterns, plan.rows, by_kind, oversize, plan.classes, options_rec)
    _write_atomic(out / INDEX, dumps(index))
    index["elapsed_s"] = time.monotonic() - start  # for the summary; not written
    return index


def _kinds_line(by_kind: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0])))


def summary(index: dict, output: str | Path) -> str:
    """The human summary the CLI prints after a build."""
    from data_tools.progress import human_bytes, table

    rows = []
    for name, s in index["splits"].items():
        rows.append([name, s["shards"], s["samples"], human_bytes(s["bytes"]), s["pattern"] or "-"])
    if len(rows) > 1:
        rows.append(["total", len(index["shards"]), index["total_samples"], human_bytes(index["total_bytes"]), ""])
    lines = [table(["split", "shards", "samples", "bytes", "shards pattern"], rows, right=(1, 2, 3))]
    fails = index["failures"]
    if fails["total"]:
        lines.append(f"skipped {fails['total']} of {index['rows']} input rows: {_kinds_line(fails['by_kind'])} "
                     f"(one line each in {Path(output) / 'failures.jsonl'})")
    else:
        lines.append(f"no input rejected ({index['rows']} rows)")
    if index.get("oversize_shards"):
        lines.append(f"note: {index['oversize_shards']} shard(s) exceed --max-shard-bytes: each holds one sample larger than the limit")
    if index.get("classes"):
        cls = index["classes"]
        shown = ", ".join(f"{c}={i}" for i, c in enumerate(cls[:6])) + (", ..." if len(cls) > 6 else "")
        lines.append(f"class folders: {len(cls)} classes as .cls labels ({shown})")
    elapsed = index.get("elapsed_s")
    tail = f" in {elapsed:.1f} s ({index['rows'] / max(elapsed, 1e-9):.0f} rows/s)" if elapsed else ""
    lines.append(f"wrote {index['total_samples']} samples in {len(index['shards'])} shards to {output}{tail}")
    return "\n".join(lines)
