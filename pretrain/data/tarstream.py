"""Reading one tar shard into raw samples, safely.

A sample is a run of consecutive members sharing a key (``pretrain.member_names.split_name``,
webdataset's convention: the name up to the first dot of its file name is the key, the rest the
member; ``a/b/000123.jpg`` has key ``a/b/000123`` and member ``jpg``, lowercased). Members are read
into memory only; nothing is ever extracted, unpickled or torch-loaded, and member names never
reach the filesystem. Refused, counted and skipped:

- ``refused_member``: a pickle or torch file (last extension ``pyd``, ``pickle``, ``pkl``, ``pth``,
  ``pt``, ``ckpt``), whatever a decoder asks for;
- ``unsafe_member_name``: an absolute name or one with a ``..`` component;
- ``non_file_member``: a symlink, hard link, device or FIFO (never followed);
- ``oversize_member``: a member larger than ``max_member_bytes``;
- ``corrupt_tar``: a broken or truncated archive (the rest of the shard is skipped; the sample
  being read when it broke is dropped); ``unreadable_shard``: the shard cannot be opened or is
  empty (a missing file, a failed ``pipe:`` command or download).

A remote read (http(s), fsspec URLs such as ``s3://``, ``pipe:`` and webdataset's other openers) that
fails or is cut mid-stream is opened again (``Retry``: ``data.retries`` times after a failure that
made no progress, with exponential backoff) at the tar header of the first sample not yet passed on
(``RawSample.next_at``: a Range request, a seek, or a command run again whose first bytes are
dropped); only when the retries are spent does it count as above. A local file is never retried.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Container, Iterator, Optional

from pretrain.data.sources import local_path, open_url, transient
from pretrain.member_names import is_refused, split_name


def split_member_name(name: str) -> Optional[tuple[str, str]]:
    """(key, member lowercased) of a tar entry's name, or None when it has no member."""
    parsed = split_name(name)
    return None if parsed is None else (parsed[0], parsed[1].lower())


def is_unsafe_name(name: str) -> bool:
    return name.startswith("/") or name.startswith("\\") or ".." in name.replace("\\", "/").split("/")


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]  # member (lowercased) -> bytes (only the wanted ones)
    url: str
    index: int  # position of the sample in its shard
    seen: tuple[str, ...] = ()  # every member of the sample (for messages)
    epoch: int = -1  # the epoch of the stream that read it (set by the loader)
    # the byte offset in the tar of the header where sample index + 1 begins (where a read continues
    # after this sample); None in a compressed tar (a read there starts over and skips samples)
    next_at: Optional[int] = None


Report = Callable[[str, str, int], None]  # (reason, detail, sample index it belongs to)


class TarFormatError(Exception):
    """A broken archive: bad header checksum, truncated data, an unparseable extended header."""


class TarTruncated(TarFormatError):
    """The stream ended inside the archive (a truncated file, or a cut download or pipe)."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_META_LIMIT = 1 << 20  # GNU long names and pax headers larger than this are not believed
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))
FILE, DIR, OTHER = 0, 1, 2  # member kinds: regular file; directory; link, device, FIFO, sparse


class _Prefixed:
    """A read-only stream: some bytes already read, then the rest of ``raw``."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if 0 <= n <= len(self.head):
                out, self.head = self.head[:n], self.head[n:]
                return out
            out, self.head = self.head, b""
            return out + (self.raw.read(n - len(out)) if n >= 0 else self.raw.read())
        return self.raw.read(n)

    def skip(self, n: int) -> bool:
        """Moves ``n`` bytes on without reading them where the stream can seek (a local file);
        False where it cannot (the caller reads instead)."""
        if self.head or not getattr(self.raw, "seekable", lambda: False)():
            return False
        self.raw.seek(n, 1)
        return True


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        if field[0] != 0x80:
            raise TarFormatError("negative or oversized base-256 number")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r}") from None


def _checksum_ok(hdr: bytes) -> bool:
    want = _number(hdr[148:156])
    unsigned = sum(hdr) - sum(hdr[148:156]) + 8 * 32
    if want == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in hdr[:148] + hdr[156:]) + 8 * 32
    return want == signed


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        sp = data.find(b" ", pos)
        if sp < 0:
            raise TarFormatError("bad pax record")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise TarFormatError("bad pax record length") from None
        if length <= 0 or pos + length > len(data):
            raise TarFormatError("bad pax record length")
        key, eq, value = data[sp + 1:pos + length - 1].partition(b"=")
        if not eq:
            raise TarFormatError("bad pax record")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class TarMembers:
    """The members of a tar stream, strictly parsed (ustar, GNU long names, pax headers; gzip,
    bz2 or xz compressed). Iterate for (name, kind, size, linkname); ``data()`` reads the current
    member's bytes, otherwise they are skipped. Nothing touches the filesystem.

    ``offset``: where in the archive ``raw`` begins (a read resumed at a header); ``header_at`` is the
    offset of the first header block (extended headers included) of the member last yielded, and
    ``offset`` the bytes of the archive consumed so far (in a compressed one: of the tar inside)."""

    def __init__(self, raw, offset: int = 0):
        head = raw.read(_BLOCK)
        self.empty = not head
        self.compressed = False
        self.offset = self.header_at = offset
        for magic, kind in _COMPRESSED:
            if offset == 0 and head.startswith(magic):  # a resumed read starts at a tar header
                self.compressed = True
                import bz2
                import gzip
                import lzma

                src = _Prefixed(head, raw)
                self.f = (gzip.GzipFile(fileobj=src, mode="rb") if kind == "gzip"
                          else bz2.BZ2File(src, mode="rb") if kind == "bz2" else lzma.LZMAFile(src, mode="rb"))
                break
        else:
            self.f = _Prefixed(head, raw)
        self.pending = 0
        self.size = 0

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        while len(data) < n:
            more = self.f.read(n - len(data))
            if not more:
                raise TarTruncated(f"truncated: {len(data)} of {n} bytes")
            data += more
        self.offset += n
        return data

    def _skip(self, n: int) -> None:
        if isinstance(self.f, _Prefixed) and self.f.skip(n):
            self.offset += n
            return
        while n > 0:
            chunk = self.f.read(min(n, 1 << 20))
            if not chunk:
                raise TarTruncated("truncated inside a member")
            n -= len(chunk)
            self.offset += len(chunk)

    def data(self) -> bytes:
        out = self._read(self.size)
        self.pending -= self.size
        return out

    def __iter__(self) -> Iterator[tuple[str, int, int, str]]:
        long_name: Optional[str] = None
        pax: dict[str, str] = {}
        first: Optional[int] = None  # where the current member's headers began
        while True:
            if self.pending:
                self._skip(self.pending)
                self.pending = 0
            if first is None:
                first = self.offset
            hdr = self.f.read(_BLOCK)
            while 0 < len(hdr) < _BLOCK:
                more = self.f.read(_BLOCK - len(hdr))
                if not more:
                    raise TarTruncated("truncated header")
                hdr += more
            if not hdr or hdr == _ZERO_BLOCK:
                return  # end of archive (a missing end block is tolerated, like tarfile does)
            if not _checksum_ok(hdr):
                raise TarFormatError("bad header checksum")
            self.offset += _BLOCK
            size = _number(hdr[124:136])
            flag = hdr[156:157]
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
            if flag in (b"L", b"K", b"x", b"g"):
                if size > _META_LIMIT:
                    raise TarFormatError(f"extended header of {size} bytes")
                meta = self._read(padded)[:size]
                if flag == b"L":
                    long_name = meta.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif flag == b"x":
                    pax = _pax(meta)
                continue
            name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:263] == b"ustar\x00":  # POSIX: a prefix holds the leading directories
                prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix:
                    name = f"{prefix}/{name}"
            name = pax.get("path", long_name or name)
            link = pax.get("linkpath", hdr[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise TarFormatError("bad pax size") from None
                padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
            long_name, pax = None, {}
            kind = FILE if flag in (b"0", b"\0", b"7") else DIR if flag == b"5" else OTHER
            # links and devices carry no data in the archive (a hard link's size is its target's)
            self.size = size if kind == FILE else 0
            self.pending = padded if kind != OTHER or flag == b"S" else 0
            self.header_at, first = first, None
            yield name, kind, self.size, link


def count_samples(url: str) -> int:
    """The samples of a shard, from its tar headers alone (member data is skipped, by seeking in a
    local uncompressed tar): runs of members sharing a key, as ``iter_shard`` reads them."""
    count, key = 0, None
    with open_url(url) as stream:
        for name, kind, _size, _link in TarMembers(stream):
            parsed = None if kind == DIR or is_unsafe_name(name) else split_member_name(name)
            if parsed is not None and parsed[0] != key:
                count, key = count + 1, parsed[0]
    return count


log = logging.getLogger("pretrain.data")
_JITTER = random.SystemRandom()  # backoff jitter: not the global generators (decoders seed those), and no
# state a forked loader worker would share with its siblings


@dataclass
class Retry:
    """How a failed remote read is retried (``data.retries``, ``data.retry_backoff``): up to
    ``attempts`` times after a failure that delivered nothing new since the last one (a read that
    passes on samples before it breaks again starts a fresh count), waiting ``backoff * 2**(n-1)``
    seconds before the n-th (at most ``cap``; times 0.5 to 1, at random, so that streams retrying
    together spread out). ``told(detail)`` hears of each retry before its wait."""

    attempts: int
    backoff: float = 1.0
    told: Callable[[str], None] = lambda detail: None
    cap: float = 30.0

    def delay(self, n: int) -> float:
        return min(self.cap, self.backoff * 2 ** (n - 1)) * (0.5 + 0.5 * _JITTER.random())


class _Empty(Exception):
    """The stream gave no bytes at all (a failed download or command)."""


class _CloseError(Exception):
    """Closing the stream failed (a pipe's exit status) after everything was read."""

    def __init__(self, err: Exception):
        super().__init__(str(err))
        self.err = err


def iter_shard(
    url: str,
    wanted: Optional[Container[str]],
    select: Callable[[int], bool],
    report: Report,
    max_member_bytes: int,
    start: tuple[int, int] = (0, 0),
    retry: Optional[Retry] = None,
) -> Iterator[RawSample]:
    """Samples of one shard in order. ``select(i)`` says whether sample ``i`` is wanted (the
    others are skipped without reading their members); of a wanted sample, only the members ``in
    wanted`` are read (None: all); ``report`` receives every problem. ``start``: (byte offset,
    sample index), a position where sample ``index`` begins (a ``RawSample.next_at`` and its index
    + 1; (0, 0): the start); ``retry``: how a remote read that fails is continued (None: never)."""
    at: tuple[Optional[int], int] = start  # where the next attempt begins: (byte offset or None, sample index)
    remote = local_path(url) is None
    tries = 0  # failed attempts since the last one that made progress
    told: set = set()  # problems reported by failed attempts (not again when their sample is re-read)
    restarted = False
    while True:
        cursor = list(at)
        said: list = []
        where = {"index": at[1] - 1, "opened": False, "headers": 0}

        def tell(reason: str, detail: str, i: int, said=said) -> None:
            if (reason, detail, i) not in told:
                said.append((reason, detail, i))
                report(reason, detail, i)

        err = yield from _attempt(url, wanted, select, tell, max_member_bytes, cursor, where)
        if err is None:
            return
        told.update(said)
        resumed_at = at[0] is not None and at[0] > 0
        if (resumed_at and not restarted and where["headers"] == 0 and isinstance(err, TarFormatError)
                and not isinstance(err, TarTruncated)):
            # no tar header where a saved position says a sample begins: the shard is not the one the
            # position was taken in; read it from the start (skipping by sample index, as before byte offsets)
            log.warning("[data] %s: no tar header at byte %d (the shard changed?): reading it from the start",
                        url, at[0])
            at, restarted = (None, at[1]), True
            continue
        progressed = (cursor[1], cursor[0]) != (at[1], at[0])
        tries = 0 if progressed else tries
        cause = err.err if isinstance(err, _CloseError) else err
        if retry is not None and remote and tries < retry.attempts and _retryable(cause):
            tries += 1
            retry.told(f"{url}: {type(cause).__name__}: {cause} (at sample {cursor[1]}; retry {tries} of "
                       f"{retry.attempts})")
            time.sleep(retry.delay(tries))
            at = (cursor[0], cursor[1])
            continue
        _report_failure(url, err, where, select, report, tries)
        return


def _retryable(err: Exception) -> bool:
    """A cut stream (truncated, empty) or a transient error of the opener; not a broken archive."""
    if isinstance(err, (TarTruncated, _Empty)):
        return True
    return not isinstance(err, TarFormatError) and transient(err)


def _report_failure(url: str, err: Exception, where: dict, select, report: Report, tries: int) -> None:
    """The reason a read that failed for good counts under (as before retries existed)."""
    index = where["index"]
    at = max(index, 0)
    if not select(at):
        return
    after = f"; {tries} retries" if tries else ""
    if not where["opened"]:
        report("unreadable_shard", f"{url}: {err}{after}", at)
    elif isinstance(err, _Empty):
        report("unreadable_shard", f"{url}: empty (a failed download or command?){after}", at)
    elif isinstance(err, _CloseError):
        report("unreadable_shard" if index < 0 else "corrupt_tar", f"{url}: {err.err}{after}", at)
    else:
        # nothing came (a failed download or pipe command): unreadable; otherwise corrupt
        unread = index < 0 and not isinstance(err, (TarFormatError, EOFError, OSError))
        unread = unread or (index < 0 and isinstance(err, OSError) and not isinstance(err, EOFError)
                            and "exit" in str(err))
        reason = "unreadable_shard" if unread else "corrupt_tar"
        report(reason, f"{url}: {type(err).__name__}: {err} (after {at} samples; rest of shard skipped{after})", at)


def _attempt(url, wanted, select, report: Report, max_member_bytes: int, cursor: list, where: dict):
    """One read of the shard from ``cursor`` (byte offset, or None: from the start skipping the samples
    before its index; the sample index there). Yields the samples, moving ``cursor`` past each one
    (and past skipped ones) as it is passed on; returns None, or the exception that ended the read."""
    byte, first = cursor
    try:
        stream = open_url(url, start=byte or 0)
    except Exception as err:  # noqa: BLE001 - any opener's error
        return err
    where["opened"] = True
    skip_below = first  # samples before it were passed on by an earlier attempt
    index = (first if byte else 0) - 1
    key: Optional[str] = None
    members: dict[str, bytes] = {}
    seen: list[str] = []
    selected = False
    err: Optional[Exception] = None

    def move(tar: TarMembers, to: int) -> None:  # the sample `to` begins at the current member's header
        if to >= skip_below and not tar.compressed:
            cursor[:] = [tar.header_at, to]
        elif to >= skip_below:
            cursor[:] = [None, to]

    try:
        tar = TarMembers(stream, offset=byte or 0)
        if tar.empty:
            if not byte:
                err = _Empty()
            # a resumed read at the very end: nothing left
        else:
            for name, kind, size, _link in tar:
                where["headers"] += 1
                if kind == DIR:
                    continue
                if is_unsafe_name(name):
                    if index + 1 >= skip_below and (selected or (key is None and select(index + 1))):
                        report("unsafe_member_name", f"{url}: member {name!r}", max(index, 0))
                    continue
                parsed = split_member_name(name)
                if parsed is None:
                    continue
                mkey, ext = parsed
                if mkey != key:
                    done = key is not None and selected
                    index += 1
                    where["index"] = index
                    if done:
                        move(tar, index)
                        yield RawSample(key, members, url, index - 1, tuple(seen), next_at=cursor[0])
                    elif key is not None:
                        move(tar, index)
                    key, members, selected, seen = mkey, {}, index >= skip_below and select(index), []
                if not selected:
                    continue
                seen.append(ext)
                if kind != FILE:
                    report("non_file_member", f"{url}: {name!r} is a link or special file", index)
                    continue
                if is_refused(ext):
                    report("refused_member", f"{url}: {name!r} (pickle/torch members are never loaded)", index)
                    continue
                if wanted is not None and ext not in wanted:
                    continue
                if size > max_member_bytes:
                    report("oversize_member", f"{url}: {name!r} has {size} bytes (limit {max_member_bytes})", index)
                    continue
                if ext in members:
                    report("duplicate_member", f"{url}: {name!r} appears twice in sample {mkey!r}", index)
                    continue
                members[ext] = tar.data()
            if key is not None:
                tar.header_at = tar.offset  # the end of the members: where a further read would begin
                move(tar, index + 1)
                if selected:
                    yield RawSample(key, members, url, index, tuple(seen), next_at=cursor[0])
    except GeneratorExit:  # the reader was closed (the epoch moved on): nothing to report
        try:
            stream.close()
        except Exception:  # noqa: BLE001, S110 - a pipe killed by the close
            pass
        raise
    except Exception as e:  # noqa: BLE001 - format, decompression, OS, HTTP and pipe errors alike
        err = e
    try:
        stream.close()
    except Exception as e:  # noqa: BLE001 - a pipe's exit status
        if err is None:
            err = _CloseError(e)
    return err
