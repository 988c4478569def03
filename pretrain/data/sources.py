"""Shard sources: URL patterns -> shard lists with sample counts, and opening any shard URL.

- ``expand_urls``: brace patterns (``shard-{000000..000099}.tar``), a list of patterns, or patterns
  joined by ``::`` (OpenCLIP's spelling) -> one flat list of URLs.
- ``open_url``: a local path or ``file:`` URL -> ``open()``; ``pipe:CMD``, ``http(s)://``, ``gs://``,
  ``ais://``, ``sftp://``, ``hf://`` ... -> webdataset's ``gopen`` (curl, gsutil, a shell pipe);
  any other scheme (``s3://``, ``memory://``, ``az://``, ...) -> ``fsspec``.
- ``resolve_split``: the sources of a split with their weights and per-shard sample counts, from
  an explicit number, an ``index.json`` written by ``python -m data_tools build`` (``shards[]`` with
  ``name`` and ``samples``, names relative to the index's folder), or OpenCLIP's ``sizes.json``
  (shard file name -> samples), or img2dataset's ``<shard>_stats.json`` (its ``successes``). Local
  shards find these files beside them (or one folder up, where ``data_tools`` puts the index of a
  split build); local shards with none of them are counted from their tar headers (one log line says
  so). A count that is needed and cannot be found for remote shards is an error that says how to
  give one, never a guess.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

from pretrain.options import ConfigError
from pretrain.shard_index import INDEX, SIZES, ShardIndexError, shard_counts

log = logging.getLogger("pretrain.data")


class DataSourceError(ConfigError):
    """A split's shards or counts cannot be resolved; the message names the config key."""


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expands a pattern, each entry of a list, or ``::``-joined patterns into shard URLs."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for part in str(pattern).split("::"):
            part = part.strip()
            if part:
                out.extend(braceexpand.braceexpand(part))
    return out


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # "C:\\..." is a path, not a scheme


def local_path(url: str) -> Optional[Path]:
    """The filesystem path of a local shard URL, or None for a remote one."""
    scheme = _scheme(url)
    if scheme == "":
        return Path(url)
    if scheme == "file":
        return Path(url2pathname(urlparse(url).path))
    return None


def _wds_gopen(url: str):
    """webdataset's ``gopen`` module where it opens ``url``'s scheme (curl, gsutil, a pipe, ...), else None."""
    import importlib

    module = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function)
    scheme = _scheme(url)
    return module if scheme in module.gopen_schemes and scheme != "__default__" else None


def open_url(url: str):
    """A binary file object reading the shard at ``url`` (see the module docstring for schemes)."""
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    gopen = _wds_gopen(url)
    if gopen is not None:
        return gopen.gopen(url, "rb")
    problem = missing_filesystem(url)
    if problem is not None:
        raise ImportError(problem)
    import fsspec

    return fsspec.open(url, "rb").open()


# this project's extras that install an fsspec filesystem, by URL scheme
_FILESYSTEM_EXTRAS = {"s3": "s3", "s3a": "s3"}


def missing_filesystem(url: str) -> Optional[str]:
    """Why ``url`` cannot be opened here: fsspec's filesystem for its scheme is not installed (s3fs
    for ``s3://``) or the scheme is unknown. None for local paths, webdataset's schemes and
    installed fsspec filesystems."""
    if local_path(url) is not None or _wds_gopen(url) is not None:
        return None
    import fsspec

    scheme = _scheme(url)
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as err:
        extra = _FILESYSTEM_EXTRAS.get(scheme)
        how = f"pip install -e '.[{extra}]'" if extra else "install the fsspec filesystem for it"
        return f"{scheme}:// URLs need a filesystem that is not installed ({err}): {how}"
    return None


@dataclass
class ShardRef:
    url: str
    source: int  # index of its source in the split
    samples: Optional[int]  # from an index, sizes.json; None when only the source total is known


@dataclass
class SourceInfo:
    key: str  # config key, for messages
    weight: float
    first: int  # shard indices [first, first + count) in the split's shard list
    count: int
    samples: Optional[int]  # total samples of the source
    counted_by: str  # where the count came from

    @property
    def mean_shard_samples(self) -> float:
        return (self.samples or 0) / max(1, self.count)


@dataclass
class SplitSources:
    shards: list[ShardRef]
    sources: list[SourceInfo]
    total_samples: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        for s in self.sources:
            n = f"{s.samples} samples" if s.samples is not None else "samples unknown"
            w = f", weight {s.weight:g}" if len(self.sources) > 1 else ""
            parts.append(f"{s.key}: {s.count} shards, {n} ({s.counted_by}){w}")
        return "; ".join(parts)

    def fingerprint(self) -> list:
        """What a saved loader position is only valid for: the shard list and the weights."""
        return [[s.url for s in self.shards], [s.weight for s in self.sources]]


def _read_json_url(url: str, key: str) -> object:
    try:
        with open_url(url) as f:
            raw = f.read()
    except Exception as err:  # noqa: BLE001 - any opener's error, reported with the key
        raise DataSourceError(f"{key}: cannot read {url}: {err}") from None
    try:
        return json.loads(raw)
    except ValueError as err:
        raise DataSourceError(f"{key}: {url} is not valid JSON: {err}") from None


def _counts_from_json(doc: object, where: str, key: str) -> dict[str, int]:
    """name (relative path or file name) -> samples, from an index.json or a sizes.json document."""
    try:
        return shard_counts(doc)
    except ShardIndexError as err:
        raise DataSourceError(f"{key}: {where}: {err}") from None


class _LocalCounts:
    """Looks up shard counts in index.json / sizes.json files beside local shards (cached per folder)."""

    def __init__(self, key: str):
        self.key = key
        self._by_dir: dict[Path, dict[Path, tuple[int, str]]] = {}

    def _load_dir(self, folder: Path) -> dict[Path, tuple[int, str]]:
        if folder in self._by_dir:
            return self._by_dir[folder]
        table: dict[Path, tuple[int, str]] = {}
        for name in (SIZES, INDEX):  # index.json wins where both list a shard
            f = folder / name
            if f.is_file():
                try:
                    doc = json.loads(f.read_text())
                except ValueError as err:
                    raise DataSourceError(f"{self.key}: {f} is not valid JSON: {err}") from None
                for rel, n in _counts_from_json(doc, str(f), self.key).items():
                    table[(folder / rel).resolve()] = (n, name)
        self._by_dir[folder] = table
        return table

    def lookup(self, path: Path) -> Optional[tuple[int, str]]:
        resolved = path.resolve()
        for folder in (resolved.parent, resolved.parent.parent):
            hit = self._load_dir(folder).get(resolved)
            if hit is not None:
                return hit
        return self._img2dataset(resolved)

    def _img2dataset(self, path: Path) -> Optional[tuple[int, str]]:
        """img2dataset writes ``00000_stats.json`` beside ``00000.tar``; its ``successes`` are the
        samples in the tar."""
        stats = path.with_name(path.stem + "_stats.json")
        if not stats.is_file():
            return None
        try:
            n = json.loads(stats.read_text()).get("successes")
        except (ValueError, AttributeError) as err:
            raise DataSourceError(f"{self.key}: {stats} is not img2dataset's stats JSON: {err}") from None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataSourceError(f"{self.key}: {stats}: 'successes' is not a sample count ({n!r})")
        return n, "_stats.json"


def _match_remote(url: str, table: dict[str, int]) -> Optional[int]:
    if url in table:
        return table[url]
    best = None
    for name, n in table.items():
        if url.endswith("/" + name) and (best is None or len(name) > len(best[0])):
            best = (name, n)
    if best is not None:
        return best[1]
    return table.get(posixpath.basename(url))


def _remote_counts(urls: list[str], key: str) -> list[tuple[Optional[int], str]]:
    """(count, file) per remote shard from an index.json or sizes.json in its folder (a folder without
    them, or one that cannot be read, gives None)."""
    tables: dict[str, tuple[dict[str, int], str]] = {}
    out = []
    for u in urls:
        folder = u.rsplit("/", 1)[0]
        if folder not in tables:
            tables[folder] = ({}, "")
            for name in (INDEX, SIZES):
                try:
                    tables[folder] = (_counts_from_json(_read_json_url(f"{folder}/{name}", key), name, key), name)
                    break
                except DataSourceError:
                    continue
        table, name = tables[folder]
        out.append((table.get(u.rsplit("/", 1)[1]), name))
    return out


def _resolve_source(urls, samples: Optional[int], index: Optional[str], key: str, source_id: int,
                    need_counts: bool, check_local: bool, count=None) -> tuple[list[ShardRef], Optional[int], str]:
    shard_urls = expand_urls(urls)
    if not shard_urls:
        raise DataSourceError(f"{key}: no shard URLs (got {urls!r})")
    for scheme_url in {_scheme(u): u for u in shard_urls}.values():  # once per scheme, before any read
        problem = missing_filesystem(scheme_url)
        if problem is not None:
            raise DataSourceError(f"{key}: {scheme_url}: {problem}")
    if check_local:
        for u in shard_urls:
            p = local_path(u)
            if p is not None and not p.is_file():
                raise DataSourceError(f"{key}: no such shard: {u}")
    if samples is not None:
        return [ShardRef(u, source_id, None) for u in shard_urls], samples, "explicit count"
    counts: list[Optional[int]] = [None] * len(shard_urls)
    origin = "unknown"
    if index is not None:
        table = _counts_from_json(_read_json_url(index, key), index, key)
        ipath = local_path(index)
        for i, u in enumerate(shard_urls):
            p = local_path(u)
            if ipath is not None and p is not None:
                try:
                    rel = os.path.relpath(p.resolve(), ipath.resolve().parent)
                except ValueError:
                    rel = None
                if rel is not None and rel in table:
                    counts[i] = table[rel]
                    continue
            counts[i] = _match_remote(u, table)
        origin = Path(urlparse(index).path).name or index
    else:
        finder = _LocalCounts(key)
        origins = set()
        for i, u in enumerate(shard_urls):
            p = local_path(u)
            if p is None:
                continue
            hit = finder.lookup(p)
            if hit is not None:
                counts[i], name = hit
                origins.add(name)
        origin = "+".join(sorted(origins)) or "unknown"
        remote = [i for i, u in enumerate(shard_urls) if counts[i] is None and local_path(u) is None]
        if remote and need_counts:  # remote shards: an index.json or sizes.json in their folder, if any
            found = _remote_counts([shard_urls[i] for i in remote], key)
            for i, (n, name) in zip(remote, found):
                if n is not None:
                    counts[i] = n
                    origins.add(name)
            origin = "+".join(sorted(origins)) or "unknown"
    missing = [u for u, n in zip(shard_urls, counts) if n is None]
    if missing and need_counts and count is not None and all(local_path(u) is not None for u in missing):
        # local shards nobody counted: read their tar headers (member data is skipped)
        counted = {i: count(u) for i, u in enumerate(shard_urls) if counts[i] is None}
        for i, n in counted.items():
            counts[i] = n
        log.warning("[data] %s: counted %d samples in %d shards from their tar headers (no index.json, sizes.json "
                    "or _stats.json beside them)", key, sum(counted.values()), len(counted))
        origin = "+".join(o for o in (origin if origin != "unknown" else "", "tar headers") if o)
        missing = []
    if missing and need_counts:
        where = (f"the index {index}" if index else
                 "an index.json, sizes.json or img2dataset _stats.json beside it (or, for a URL, in its folder)")
        raise DataSourceError(
            f"{key}: no sample count for {len(missing)} of {len(shard_urls)} shards (first: {missing[0]}) in "
            f"{where}. Give the count: .samples (total samples of these shards), .index (an index.json from "
            f"`python -m data_tools build` or an OpenCLIP sizes.json; a path or URL), or build the shards with "
            f"`python -m data_tools build`."
        )
    total = None if missing else sum(counts)  # type: ignore[arg-type]
    return [ShardRef(u, source_id, n) for u, n in zip(shard_urls, counts)], total, origin


def resolve_split(split, key: str, need_counts: bool, check_local: bool = True, count=None) -> SplitSources:
    """``split`` is a ``SplitConfig``: ``urls`` (+ ``samples``/``index``) or ``sources``. ``count(url)``
    (the tar reader's header count) counts local shards that nothing else counts."""
    entries = []
    if split.sources:
        for i, s in enumerate(split.sources):
            entries.append((s.urls, s.samples, s.index, s.weight, f"{key}.sources[{i}]"))
    else:
        entries.append((split.urls, split.samples, split.index, 1.0, f"{key}.urls"))
    shards: list[ShardRef] = []
    sources: list[SourceInfo] = []
    for sid, (urls, samples, index, weight, skey) in enumerate(entries):
        refs, total, origin = _resolve_source(urls, samples, index, skey, sid, need_counts, check_local, count)
        sources.append(SourceInfo(skey, float(weight), len(shards), len(refs), total, origin))
        shards.extend(refs)
    totals = [s.samples for s in sources]
    total = None if any(t is None for t in totals) else sum(totals)  # type: ignore[misc]
    return SplitSources(shards, sources, total)
