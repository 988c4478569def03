"""``verify DIR`` and ``stats DIR``: check a built shard folder against its index; describe shards.

DIR is a build's output folder or one split's folder of it: ``index.json`` is looked for beside the
shards, then one folder up (``pretrain.shard_index.find_index``, as the training reader does), and
only the shards it lists in DIR are checked. Member names follow ``pretrain.member_names``.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

from data_tools.members import SampleFailure, check_audio, check_image
from data_tools.progress import human_bytes, table
from pretrain.member_names import AUDIO_EXTS, IMAGE_EXTS, MODALITIES, last_ext, modality, split_name
from pretrain.shard_index import INDEX, SIZES, ShardIndexError, find_index, in_folder, load_index, sizes_document


class _HashingReader:
    """A read-only file wrapper that hashes everything read through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, size=-1):
        data = self.f.read(size)
        self.h.update(data)
        self.n += len(data)
        return data

    def drain(self):
        for chunk in iter(lambda: self.read(1 << 20), b""):
            pass


def scan_shard(path: Path, decode: bool = False) -> dict:
    """One pass over a tar: sha256, samples in order with their members, and problems found."""
    problems: list[str] = []
    samples: list[tuple[str, list[str]]] = []
    keys_here: set[str] = set()
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for info in tar:
                    name = info.name
                    if not info.isfile():
                        problems.append(f"entry {name!r} is not a regular file")
                        continue
                    parsed = split_name(name)
                    if parsed is None or "/" in name:  # a build writes no folders inside a tar
                        problems.append(f"entry {name!r} is not KEY.MEMBER")
                        continue
                    key, member = parsed
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        problems.append(f"entry {name!r} is truncated")
                    if samples and samples[-1][0] == key:
                        samples[-1][1].append(member)
                    else:
                        if key in keys_here:
                            problems.append(f"members of sample {key!r} are not adjacent")
                        keys_here.add(key)
                        samples.append((key, [member]))
                    if decode:
                        ext = last_ext(member)
                        try:
                            if ext in IMAGE_EXTS:
                                check_image(data, "full")
                            elif ext in AUDIO_EXTS:
                                check_audio(data, "full")
                        except SampleFailure as err:
                            problems.append(f"{name}: {err.reason}")
            reader.drain()
        except (tarfile.TarError, EOFError, OSError) as err:
            problems.append(f"does not read as a tar archive: {err}")
    return {"sha256": reader.h.hexdigest(), "bytes": reader.n, "samples": samples, "problems": problems}


def verify(folder: str | Path, require: list[str] | None = None, decode: bool = False) -> tuple[list[str], dict]:
    """(problems, facts) for a shard folder written by ``build``; no problems means it is sound."""
    here = Path(folder)
    if not here.is_dir():
        return [f"{here}: no such folder"], {}
    index, index_path, where, problem = _index_of(here)
    if problem:
        return [problem], {}
    out = index_path.parent  # shard names are relative to the index's folder
    shards = in_folder(index["shards"], where)
    problems: list[str] = []
    required = list(dict.fromkeys(list(index.get("required_members", [])) + list(require or [])))
    owner: dict[str, str] = {}
    total = 0
    for s in shards:
        name = s["name"]
        path = out / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != s["bytes"]:
            problems.append(f"{name}: {size} bytes, index.json says {s['bytes']}")
        scan = scan_shard(path, decode=decode)
        problems += [f"{name}: {p}" for p in scan["problems"]]
        if scan["sha256"] != s["sha256"]:
            problems.append(f"{name}: sha256 {scan['sha256'][:16]}... does not match index.json ({s['sha256'][:16]}...)")
        if len(scan["samples"]) != s["samples"]:
            problems.append(f"{name}: {len(scan['samples'])} samples, index.json says {s['samples']}")
        counts: dict[str, int] = {}
        for key, members in scan["samples"]:
            total += 1
            if key in owner:
                problems.append(f"{name}: key {key!r} also in {owner[key]}")
            owner[key] = name
            for m in members:
                counts[m] = counts.get(m, 0) + 1
            lacking = [m for m in required if m not in members]
            if lacking:
                problems.append(f"{name}: sample {key!r} lacks required member(s) {', '.join(lacking)}")
            if len(set(members)) != len(members):
                problems.append(f"{name}: sample {key!r} has a member twice")
        if "members" in s and counts != s["members"]:
            problems.append(f"{name}: member counts {counts} do not match index.json {s['members']}")
    if where == "." and total != index.get("total_samples", total):
        problems.append(f"index.json: total_samples {index['total_samples']} but the shards hold {total}")
    split_total = index.get("splits", {}).get(where, {}).get("samples") if where != "." else None
    if split_total is not None and total != split_total:
        problems.append(f"index.json: split {where!r} has {split_total} samples but its shards hold {total}")
    # sizes.json beside each split's shards, and shards that the index does not know
    listed = {s["name"] for s in shards}
    dirs = sorted({str(Path(s["name"]).parent) for s in shards})
    prefix = index.get("options", {}).get("prefix")
    shard_re = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar") if prefix else re.compile(r".+\.tar")
    for d in dirs:
        sdir = out / d
        sizes_path = sdir / SIZES
        mine = sizes_document([s for s in shards if str(Path(s["name"]).parent) == d])
        if sizes_path.exists():
            try:
                if json.loads(sizes_path.read_text()) != mine:
                    problems.append(f"{sizes_path.relative_to(out)}: does not match index.json")
            except ValueError:
                problems.append(f"{sizes_path.relative_to(out)}: not valid JSON")
        for p in sorted(sdir.iterdir()):
            rel = p.name if d == "." else f"{d}/{p.name}"
            if shard_re.fullmatch(p.name) and rel not in listed:
                problems.append(f"{rel}: a shard that index.json does not list")
    facts = {"shards": len(shards), "samples": total, "bytes": sum(s["bytes"] for s in shards), "required": required,
             "index": INDEX if where == "." else f"../{INDEX} (split {where})"}
    return problems, facts


def _index_of(here: Path) -> tuple[dict | None, Path | None, str, str | None]:
    """(index, its path, ``here`` relative to its folder, None) or (..., the problem)."""
    found = find_index(here)
    if found is None:
        return None, None, ".", (f"{here / INDEX}: missing, and none one folder up (the build did not complete, "
                                 f"or this is not a shard folder)")
    index_path, rel = found
    try:
        index = load_index(index_path)
    except ShardIndexError as err:
        return None, index_path, rel, f"{index_path}: not a shard index ({err})"
    if rel != "." and not in_folder(index["shards"], rel):
        return index, index_path, rel, (f"{here / INDEX}: missing, and {index_path} lists no shard in {rel}/ "
                                        f"(the build did not complete, or this is not a shard folder)")
    return index, index_path, rel, None


def _find_tars(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.tar") if not any(part.startswith(".") for part in p.relative_to(out).parts))


def stats(folder: str | Path) -> dict:
    """Samples, bytes, per-member and per-modality presence, per-shard rows. Uses index.json when
    present, otherwise reads the tars' headers (any webdataset folder, img2dataset's included)."""
    out = Path(folder)
    index, index_path, rel, problem = _index_of(out) if out.is_dir() else (None, None, ".", "no folder")
    if index is None and index_path is not None:
        raise ShardIndexError(problem)
    shards = []
    source = INDEX if rel == "." else f"../{INDEX}"
    modal_counts: dict[str, int] | None = None
    if not problem:
        for s in in_folder(index["shards"], rel):
            shards.append({"name": s["name"], "split": s.get("split"), "samples": s["samples"], "bytes": s["bytes"],
                           "members": s.get("members", {})})
            if "modalities" in s:
                modal_counts = modal_counts if modal_counts is not None else {m: 0 for m in MODALITIES}
                for m, c in s["modalities"].items():
                    modal_counts[m] = modal_counts.get(m, 0) + c
        failures = index.get("failures")
    else:
        source = "tar headers"
        failures = None
        modal_counts = {m: 0 for m in MODALITIES}
        for path in _find_tars(out):
            members: dict[str, int] = {}
            keys: list[str] = []
            with tarfile.open(path) as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    parsed = split_name(info.name)
                    if parsed is None:
                        continue
                    key, member = parsed
                    if not keys or keys[-1] != key:
                        keys.append(key)
                        sample_mods: set[str] = set()
                    members[member] = members.get(member, 0) + 1
                    mod = modality(member)
                    if mod not in sample_mods:
                        sample_mods.add(mod)
                        modal_counts[mod] += 1
            shards.append({"name": str(path.relative_to(out)), "split": None, "samples": len(keys),
                           "bytes": path.stat().st_size, "members": dict(sorted(members.items()))})
    total = sum(s["samples"] for s in shards)
    members: dict[str, int] = {}
    for s in shards:
        for m, c in s["members"].items():
            members[m] = members.get(m, 0) + c
    if modal_counts is None:
        # An index without per-shard modality counts: a modality's presence is at least its most
        # common member's count, exact when each sample has at most one member per modality.
        modal_counts = {m: 0 for m in MODALITIES}
        for m, c in members.items():
            mod = modality(m)
            modal_counts[mod] = max(modal_counts[mod], c)
    return {
        "folder": str(out),
        "source": source,
        "shards": len(shards),
        "samples": total,
        "bytes": sum(s["bytes"] for s in shards),
        "members": {m: {"samples": c, "fraction": c / total if total else 0.0} for m, c in sorted(members.items())},
        "modalities": {m: {"samples": c, "fraction": c / total if total else 0.0}
                       for m, c in modal_counts.items() if c},
        "failures": failures,
        "per_shard": shards,
    }


def format_stats(st: dict, all_shards: bool = False) -> str:
    lines = [f"{st['folder']}: {st['samples']} samples in {st['shards']} shards, {human_bytes(st['bytes'])} "
             f"(from {st['source']})", ""]
    lines.append(table(["modality", "samples", "present"],
                       [[m, v["samples"], f"{100 * v['fraction']:.1f}%"] for m, v in st["modalities"].items()],
                       right=(1, 2)))
    lines.append("")
    lines.append(table(["member", "samples", "present"],
                       [[m, v["samples"], f"{100 * v['fraction']:.1f}%"] for m, v in st["members"].items()],
                       right=(1, 2)))
    if st.get("failures"):
        f = st["failures"]
        kinds = ", ".join(f"{k} {v}" for k, v in f["by_kind"].items())
        lines += ["", f"rejected at build time: {f['total']}" + (f" ({kinds})" if kinds else "")]
    rows = [[s["name"], s["samples"], human_bytes(s["bytes"]), " ".join(sorted(s["members"]))] for s in st["per_shard"]]
    note = None
    if len(rows) > 50 and not all_shards:
        note = f"... {len(rows) - 25} more shards (--all-shards lists every one)"
        rows = rows[:20] + [["...", "", "", ""]] + rows[-5:]
    lines += ["", table(["shard", "samples", "bytes", "members"], rows, right=(1, 2))]
    if note:
        lines.append(note)
    return "\n".join(lines)


def format_verify(folder, problems: list[str], facts: dict) -> str:
    if not problems:
        return (f"OK: {folder}: {facts['shards']} shards, {facts['samples']} samples, {human_bytes(facts['bytes'])}; "
                f"every shard opens, checksums and counts match {facts.get('index', INDEX)}, every sample has "
                f"{', '.join(facts['required']) or 'its members'}")
    shown = problems[:200]
    more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"FAILED: {folder}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in shown) + more


__all__ = ["verify", "stats", "scan_shard", "format_stats", "format_verify", "modality"]
