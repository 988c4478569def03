"""Shard sources: URL patterns -> shard lists with sample counts, and opening any shard URL.

- ``expand_urls``: brace patterns (``shard-{000000..000099}.tar``), a list of patterns, or patterns
  joined by ``::`` (OpenCLIP's spelling) -> one flat list of URLs.
- ``open_url``: a local path or ``file:`` URL -> ``open()``; ``http(s)://`` -> Python's HTTP client
  (a Range request where a read continues mid-shard); ``pipe:CMD``, ``gs://``, ``ais://``,
  ``sftp://``, ``hf://`` ... -> webdataset's ``gopen`` (gsutil, curl, a shell pipe); any other
  scheme (``s3://``, ``memory://``, ``az://``, ...) -> ``fsspec``. ``transient(err)``: whether a
  failed read of a remote shard is worth another try.
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
import pickle
import posixpath
import ctypes
import hashlib
import importlib
import itertools
import re
import stat
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence
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
                # escape only where there is something to unescape: the same URLs, and CPython 3.11's re.sub
                # with a template keeps ~2% of its results alive, scattered over the heap (at 100k shards they
                # held ~10 MB of freed memory resident)
                out.extend(braceexpand.braceexpand(part, escape="\\" in part))
    return out


# urlparse's rule for a scheme (a letter, then letters, digits, "+", "-", "."; up to the first colon),
# checked without urlparse for the common cases: 100k shard URLs went through urlparse 3 times each
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    if ":" not in url:
        return ""  # no colon, no scheme (what urlparse finds too)
    m = _SCHEME.match(url)
    scheme = m.group()[:-1].lower() if m else urlparse(url).scheme  # urlparse: leading blanks, tabs, ...
    return "" if len(scheme) <= 1 else scheme  # "C:\\..." is a path, not a scheme


def _local(url: str) -> Optional[str]:
    """The filesystem path of a local shard URL as a string, or None for a remote one."""
    scheme = _scheme(url)
    if scheme == "":
        return url
    if scheme == "file":
        return url2pathname(urlparse(url).path)
    return None


def local_path(url: str) -> Optional[Path]:
    """The filesystem path of a local shard URL, or None for a remote one."""
    path = _local(url)
    return None if path is None else Path(path)


def _wds_gopen(url: str):
    """webdataset's ``gopen`` module where it opens ``url``'s scheme (curl, gsutil, a pipe, ...), else None."""
    import importlib

    module = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function)
    scheme = _scheme(url)
    return module if scheme in module.gopen_schemes and scheme != "__default__" else None


def open_url(url: str, start: int = 0):
    """A binary file object reading the shard at ``url`` (see the module docstring for schemes) from
    byte ``start`` on: a local file and an fsspec file seek (a ranged GET for ``s3://``), http(s)
    sends a Range request, and a pipe or webdataset's other openers read the first ``start`` bytes
    and drop them (a command is simply run again)."""
    path = local_path(url)
    if path is not None:
        f = open(path, "rb")
        if start:
            f.seek(start)
        return f
    if _scheme(url) in ("http", "https"):
        return _open_http(url, start)
    gopen = _wds_gopen(url)
    if gopen is not None:
        return _dropped(gopen.gopen(url, "rb"), start)
    problem = missing_filesystem(url)
    if problem is not None:
        raise ImportError(problem)
    import fsspec

    f = fsspec.open(url, "rb").open()
    if start:
        f.seek(start)
    return f


HTTP_TIMEOUT = 60.0  # seconds without a byte before an http(s) read counts as failed (and is retried)


class ShortRead(OSError):
    """A stream ended before the byte a resumed read was to start at."""


def _dropped(f, n: int):
    """``f`` after its first ``n`` bytes were read and dropped."""
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            f.close()
            raise ShortRead(f"the stream ended {n} bytes before the position to continue at")
        n -= len(chunk)
    return f


def _open_http(url: str, start: int):
    """An http(s) URL by ``urllib``, with ``Range: bytes=start-`` where ``start`` > 0. (webdataset
    opens these with ``curl --retry 30``: its retries could not continue a body cut mid-stream, were
    not counted, and told a 404 from a 503 only by exit status; here every failure comes back as an
    exception with its status, and ``iter_shard`` retries what is transient.)"""
    import urllib.error
    import urllib.request

    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and start:  # nothing at or after `start`: the end of the shard
            import io

            return io.BytesIO(b"")
        raise
    length = resp.headers.get("Content-Length")
    body = _Whole(resp, int(length)) if length and length.isdigit() else resp
    if start and resp.status != 206:  # the server ignored the range: drop the bytes before it
        return _dropped(body, start)
    return body


class _Whole:
    """An HTTP body that raises ``ShortRead`` when the connection ends before its Content-Length
    (``http.client``'s ``read(n)`` just returns less: a cut at a tar header would look like the end)."""

    def __init__(self, resp, length: int):
        self.resp, self.left = resp, length

    def read(self, n: int = -1) -> bytes:
        data = self.resp.read(n) if n is not None and n >= 0 else self.resp.read()
        self.left -= len(data)
        if not data and n != 0 and self.left > 0:
            raise ShortRead(f"the connection ended {self.left} bytes before the end of the body")
        return data

    def close(self) -> None:
        self.resp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# never retried: the shard is not there, not allowed, or not readable by this opener at all
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ImportError, ValueError,
              TypeError)


def transient(err: BaseException) -> bool:
    """Whether a failed read of a remote shard may succeed if tried again: connection errors, cut
    streams, timeouts, HTTP 5xx, 408 and 429; not a missing object, a refused one (HTTP 4xx), or a
    URL no opener can read."""
    status = getattr(err, "code", None) if type(err).__name__ == "HTTPError" else getattr(err, "status", None)
    if isinstance(status, int) and 400 <= status < 600:
        return status >= 500 or status in (408, 425, 429)
    return not isinstance(err, _PERMANENT)


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


_NONE = -(2**63)  # a shard without its own count, in ShardList's array of counts


class ShardList(Sequence):
    """A split's shards, the sequence of ``ShardRef`` the loader indexes, held compactly: the URLs'
    common prefix once, the rest of each URL in one string with end offsets, counts and sources in
    arrays. A list of ``ShardRef`` objects cost about 230 bytes per shard beyond its URL, in small
    objects spread over the heap that every forked loader worker then maps too (and, once it touches
    them, copies): 41 MB per process at 100k shards (issue 28). Here 12 to 24 bytes per shard plus each
    URL's unshared part, in a few large blocks that also pickle in milliseconds (spawn/forkserver
    workers). Items are made on access; the list is read-only."""

    def __init__(self, urls: Sequence[str], sources: Sequence[int], samples: Sequence[Optional[int]]):
        if not len(urls) == len(sources) == len(samples):
            raise ValueError(f"{len(urls)} URLs, {len(sources)} sources, {len(samples)} counts")
        self.prefix = os.path.commonprefix(list(urls)) if len(urls) else ""
        cut = len(self.prefix)
        self._rest = "".join(u[cut:] for u in urls)
        self._ends = _ints(list(itertools.accumulate(len(u) - cut for u in urls)))
        self._sources = _ints(list(sources))
        # counts in 32 or 64 bits, _NONE for "no count of its own"; any other int (never from a real index) as a list
        self._packed = all(n is None or -2**63 < n < 2**63 for n in samples)
        self._samples = _ints([_NONE if n is None else n for n in samples]) if self._packed else list(samples)

    def __len__(self) -> int:
        return len(self._ends)

    def url(self, i: int) -> str:
        start = self._ends[i - 1] if i > 0 else 0
        return self.prefix + self._rest[start:self._ends[i]]

    def samples(self, i: int) -> Optional[int]:
        n = self._samples[i]
        return None if self._packed and n == _NONE else n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"shard {i} of {n}")
        i %= n
        return ShardRef(self.url(i), self._sources[i], self.samples(i))

    def __iter__(self) -> Iterator[ShardRef]:
        return (self[i] for i in range(len(self)))

    def urls(self) -> list[str]:
        return [self.url(i) for i in range(len(self))]


def _ints(values: list[int]) -> array:
    """``values`` in an array of 32-bit ints where they fit, else 64-bit."""
    small = all(-2**31 <= v < 2**31 for v in values)
    return array("i" if small else "q", values)


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
    shards: Sequence[ShardRef]  # a ShardList from resolve_split
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
        urls = self.shards.urls() if isinstance(self.shards, ShardList) else [s.url for s in self.shards]
        return [urls, [s.weight for s in self.sources]]

    def digest(self, chunk: int = 4096) -> str:
        """``sha256(json.dumps(self.fingerprint()))`` in hex, a chunk of URLs at a time (no list of
        every URL, no text of them all)."""
        h = hashlib.sha256(b"[[")
        for start in range(0, len(self.shards), chunk):
            part = [self.shards[i].url for i in range(start, min(start + chunk, len(self.shards)))]
            h.update(((", " if start else "") + json.dumps(part)[1:-1]).encode())
        h.update(("], " + json.dumps([s.weight for s in self.sources]) + "]").encode())
        return h.hexdigest()


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


class _Folders:
    """``is_file`` and ``realpath`` (pathlib's ``Path.is_file()`` and ``str(Path.resolve())``, same
    answers) of many paths, at a few system calls per folder: ``resolve()`` makes an lstat per
    component and a stat, ``is_file()`` a stat, and at 100k shards in one folder that was ~20 s of
    a rank's start-up (issue 28). A folder asked about more than ``LIST_AFTER`` times is listed once
    (``os.scandir``: which names are regular files and which symlinks, from the directory entries);
    each folder is resolved once, and a path whose last component is not a symlink resolves to its
    resolved folder joined with that name. Anything unusual (a symlink, a name such as ``..``, a
    trailing slash, a folder that cannot be listed) goes to pathlib."""

    LIST_AFTER = 32

    def __init__(self):
        self._real: dict[str, str] = {}
        self._asked: dict[str, int] = {}
        self._listed: dict[str, Optional[tuple[set, set]]] = {}  # folder -> (regular files, symlinks)

    def _listing(self, folder: str) -> Optional[tuple[set, set]]:
        if folder in self._listed:
            return self._listed[folder]
        asked = self._asked[folder] = self._asked.get(folder, 0) + 1
        if asked <= self.LIST_AFTER:
            return None
        regular: set[str] = set()
        links: set[str] = set()
        try:
            with os.scandir(folder or ".") as entries:
                for e in entries:
                    if e.is_symlink():
                        links.add(e.name)
                    elif e.is_file(follow_symlinks=False):
                        regular.add(e.name)
            listing: Optional[tuple[set, set]] = (regular, links)
        except OSError:
            listing = None
        self._listed[folder] = listing
        return listing

    def is_file(self, path: str) -> bool:
        head, tail = os.path.split(path)
        listing = None if tail in ("", ".", "..") else self._listing(head)
        if listing is None or tail in listing[1]:
            return Path(path).is_file()
        return tail in listing[0]

    def realpath(self, path: str) -> str:
        """``str(Path(path).resolve())``."""
        head, tail = os.path.split(path)
        if tail in ("", ".", ".."):
            return str(Path(path).resolve())
        listing = self._listing(head)
        if listing is None:
            try:
                link = stat.S_ISLNK(os.lstat(path).st_mode)
            except OSError:  # what realpath does too: not there (or not readable), so not a link
                link = False
        else:
            link = tail in listing[1]
        if link:
            return str(Path(path).resolve())
        prefix = self._real.get(head)
        if prefix is None:  # the resolved folder, with a separator
            prefix = self._real[head] = os.path.join(str(Path(head or ".").resolve()), "")
        return prefix + tail

    def resolved_names(self, folder: str, names) -> Iterator[str]:
        """``realpath(os.path.join(folder, name))`` for each name, where ``folder`` is resolved already."""
        listing = self._listing(folder) if len(names) <= self.LIST_AFTER else self._list_now(folder)
        prefix = os.path.join(folder, "")
        for name in names:
            if listing is not None and name not in listing[1] and name not in ("", ".", "..") and os.sep not in name \
                    and (os.altsep is None or os.altsep not in name):
                yield prefix + name
            else:
                yield self.realpath(os.path.join(folder, name))

    def _list_now(self, folder: str) -> Optional[tuple[set, set]]:
        if folder not in self._listed:
            self._asked[folder] = self.LIST_AFTER
        return self._listing(folder)


class _LocalCounts:
    """Looks up shard counts in index.json / sizes.json files beside local shards (each folder's
    files read once per split, whichever source asks)."""

    def __init__(self, folders: _Folders):
        self.folders = folders
        # resolved folder -> [(file name, resolved shard path -> samples)], index.json last (it wins)
        self._by_dir: dict[str, list[tuple[str, dict[str, int]]]] = {}
        self._up: dict[str, str] = {}  # resolved folder -> its parent

    def _load_dir(self, folder: str, key: str) -> list[tuple[str, dict[str, int]]]:
        if folder in self._by_dir:
            return self._by_dir[folder]
        tables = []
        for name in (SIZES, INDEX):
            f = os.path.join(folder, name)
            if self.folders.is_file(f):
                try:
                    doc = json.loads(Path(f).read_bytes())
                except ValueError as err:
                    raise DataSourceError(f"{key}: {f} is not valid JSON: {err}") from None
                counts = _counts_from_json(doc, f, key)
                del doc
                tables.append((name, dict(zip(self.folders.resolved_names(folder, counts), counts.values()))))
        self._by_dir[folder] = tables[::-1]  # index.json wins where both list a shard
        return self._by_dir[folder]

    def lookup(self, path: str, key: str) -> Optional[tuple[int, str]]:
        resolved = self.folders.realpath(path)
        parent = os.path.dirname(resolved)
        up = self._up.get(parent)
        if up is None:
            up = self._up[parent] = os.path.dirname(parent)
        for folder in (parent, up):
            for name, table in self._load_dir(folder, key):
                n = table.get(resolved)
                if n is not None:
                    return n, name
        return self._img2dataset(Path(resolved), key)

    def _img2dataset(self, path: Path, key: str) -> Optional[tuple[int, str]]:
        """img2dataset writes ``00000_stats.json`` beside ``00000.tar``; its ``successes`` are the
        samples in the tar."""
        stats = path.with_name(path.stem + "_stats.json")
        if not self.folders.is_file(str(stats)):
            return None
        try:
            n = json.loads(stats.read_text()).get("successes")
        except (ValueError, AttributeError) as err:
            raise DataSourceError(f"{key}: {stats} is not img2dataset's stats JSON: {err}") from None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataSourceError(f"{key}: {stats}: 'successes' is not a sample count ({n!r})")
        return n, "_stats.json"


def _match_remote(url: str, table: dict[str, int]) -> Optional[int]:
    """The count of the longest name in ``table`` that ``url`` is or ends with after a "/" (one
    look-up per "/" of the URL: a scan of the table per URL made 100k remote shards quadratic)."""
    if url in table:
        return table[url]
    i = url.find("/")
    while i >= 0:  # left to right: the longest candidate first
        n = table.get(url[i + 1:])
        if n is not None:
            return n
        i = url.find("/", i + 1)
    return table.get(posixpath.basename(url))


def _relpath(real: str, start: str, folders: dict[str, str]) -> Optional[str]:
    """``os.path.relpath(real, start)`` for a resolved path, from its folder's (computed once per
    folder) where the folder lies in ``start``; None where there is none (another drive)."""
    head, tail = os.path.split(real)
    try:
        rel = folders.get(head)
        if rel is None:
            rel = folders[head] = os.path.relpath(head, start)
        if rel == ".":
            return tail
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return os.path.join(rel, tail)
        return os.path.relpath(real, start)
    except ValueError:
        return None
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



def _resolve_source(urls, samples: Optional[int], index: Optional[str], key: str, need_counts: bool,
                    check_local: bool, count, finder: _LocalCounts) -> tuple[list[str], list[Optional[int]], Optional[int], str]:
    """(shard URLs, their counts, the total, where the counts came from) of one source."""
    shard_urls = expand_urls(urls)
    if not shard_urls:
        raise DataSourceError(f"{key}: no shard URLs (got {urls!r})")
    for scheme_url in {_scheme(u): u for u in shard_urls}.values():  # once per scheme, before any read
        problem = missing_filesystem(scheme_url)
        if problem is not None:
            raise DataSourceError(f"{key}: {scheme_url}: {problem}")
    paths = [_local(u) for u in shard_urls]  # local paths as strings; None: remote
    folders = finder.folders
    if check_local:
        for u, p in zip(shard_urls, paths):
            if p is not None and not folders.is_file(p):
                raise DataSourceError(f"{key}: no such shard: {u}")
    if samples is not None:
        return shard_urls, [None] * len(shard_urls), samples, "explicit count"
    counts: list[Optional[int]] = [None] * len(shard_urls)
    origin = "unknown"
    if index is not None:
        table = _counts_from_json(_read_json_url(index, key), index, key)
        ipath = _local(index)
        start: Optional[str] = None
        rel_folders: dict[str, str] = {}
        for i, (u, p) in enumerate(zip(shard_urls, paths)):
            if ipath is not None and p is not None:
                if start is None:
                    start = str(Path(ipath).resolve().parent)
                rel = _relpath(folders.realpath(p), start, rel_folders)
                if rel is not None and rel in table:
                    counts[i] = table[rel]
                    continue
            counts[i] = _match_remote(u, table)
        origin = Path(urlparse(index).path).name or index
    else:
        origins = set()
        for i, p in enumerate(paths):
            if p is None:
                continue
            hit = finder.lookup(p, key)
            if hit is not None:
                counts[i], name = hit
                origins.add(name)
        origin = "+".join(sorted(origins)) or "unknown"
        remote = [i for i, p in enumerate(paths) if counts[i] is None and p is None]
        if remote and need_counts:  # remote shards: an index.json or sizes.json in their folder, if any
            found = _remote_counts([shard_urls[i] for i in remote], key)
            for i, (n, name) in zip(remote, found):
                if n is not None:
                    counts[i] = n
                    origins.add(name)
            origin = "+".join(sorted(origins)) or "unknown"
    missing = [i for i, n in enumerate(counts) if n is None]
    if missing and need_counts and count is not None and all(paths[i] is not None for i in missing):
        # local shards nobody counted: read their tar headers (member data is skipped)
        counted = {i: count(shard_urls[i]) for i in missing}
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
            f"{key}: no sample count for {len(missing)} of {len(shard_urls)} shards (first: {shard_urls[missing[0]]}) "
            f"in {where}. Give the count: .samples (total samples of these shards), .index (an index.json from "
            f"`python -m data_tools build` or an OpenCLIP sizes.json; a path or URL), or build the shards with "
            f"`python -m data_tools build`."
        )
    total = None if missing else sum(counts)  # type: ignore[arg-type]
    return shard_urls, counts, total, origin


def resolve_split(split, key: str, need_counts: bool, check_local: bool = True, count=None) -> SplitSources:
    """``split`` is a ``SplitConfig``: ``urls`` (+ ``samples``/``index``) or ``sources``. ``count(url)``
    (the tar reader's header count) counts local shards that nothing else counts."""
    entries = []
    if split.sources:
        for i, s in enumerate(split.sources):
            entries.append((s.urls, s.samples, s.index, s.weight, f"{key}.sources[{i}]"))
    else:
        entries.append((split.urls, split.samples, split.index, 1.0, f"{key}.urls"))
    _import_openers([p for e in entries for p in ([e[0]] if isinstance(e[0], str) else e[0])])
    finder = _LocalCounts(_Folders())
    urls: list[str] = []
    counts: list[Optional[int]] = []
    source_ids: list[int] = []
    sources: list[SourceInfo] = []
    for sid, (patterns, samples, index, weight, skey) in enumerate(entries):
        mine, n, total, origin = _resolve_source(patterns, samples, index, skey, need_counts, check_local, count, finder)
        sources.append(SourceInfo(skey, float(weight), len(urls), len(mine), total, origin))
        urls += mine
        counts += n
        source_ids += [sid] * len(mine)
    del finder  # its tables (every index entry) go before the shard list is packed
    totals = [s.samples for s in sources]
    total = None if any(t is None for t in totals) else sum(totals)  # type: ignore[misc]
    result = SplitSources(ShardList(urls, source_ids, counts), sources, total)
    del urls, counts, source_ids, sources
    # The few objects that outlive the look-ups (the source records, their counts and names) were made
    # among millions that did not, and each kept a 1 MiB heap arena of those resident: rebuilt now from
    # a pickle (milliseconds), they land in the heap's older pages, and the arenas of the look-ups go
    # back to the system (at 100k shards in 10 sources, 20 MB less per rank, and per forked worker).
    result = pickle.loads(pickle.dumps(result))
    _trim_heap()
    return result


def _import_openers(patterns: list) -> None:
    """Imports the modules that the URL checks import on first use (webdataset's openers; fsspec for
    other schemes) before any long list exists: a module imported among a list's objects kept the heap
    pages of those resident after they were freed."""
    importlib.import_module("webdataset.gopen")
    schemes = {_scheme(part.strip()) for p in patterns for part in str(p).split("::")}
    if schemes - {"", "file"} and any(_wds_gopen(f"{s}://") is None for s in schemes - {"", "file", "pipe"}):
        try:
            importlib.import_module("fsspec")
        except ImportError:
            pass  # missing_filesystem says so, naming the URL


def _trim_heap() -> None:
    """Gives the freed part of the C heap back to the system (glibc's ``malloc_trim``; nothing where
    there is none): glibc kept ~17 MB of what the look-ups of 100k shards freed, which every forked
    loader worker then maps too."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # loaded once: a CDLL is a reference cycle
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
