"""Reading one tar shard into raw samples, safely.

A sample is a run of consecutive members sharing a key (webdataset's convention: the member name
up to the first dot of its file name; ``a/b/000123.jpg`` has key ``a/b/000123`` and extension
``jpg``). Members are read into memory only; nothing is ever extracted, unpickled or torch-loaded,
and member names never reach the filesystem. Refused, counted and skipped:

- ``refused_member``: a pickle or torch file (last extension ``pyd``, ``pickle``, ``pkl``, ``pth``,
  ``pt``, ``ckpt``), whatever a decoder asks for;
- ``unsafe_member_name``: an absolute name or one with a ``..`` component;
- ``non_file_member``: a symlink, hard link, device or FIFO (never followed);
- ``oversize_member``: a member larger than ``max_member_bytes``;
- ``corrupt_tar``: a broken or truncated archive (the rest of the shard is skipped; the sample
  being read when it broke is dropped); ``unreadable_shard``: the shard cannot be opened or is
  empty (a missing file, a failed ``pipe:`` command or download).
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from pretrain.data.sources import open_url

REFUSED_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt"})


def is_refused(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in REFUSED_EXTENSIONS


def split_member_name(name: str) -> Optional[tuple[str, str]]:
    """(key, extension) of a member name, or None when it has no extension."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:  # no dot, or a dot file
        return None
    ext = name[dot + 1:]
    if not ext:
        return None
    return name[:dot], ext.lower()


def is_unsafe_name(name: str) -> bool:
    return name.startswith("/") or name.startswith("\\") or ".." in name.replace("\\", "/").split("/")


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]  # extension -> bytes (only the wanted ones)
    url: str
    index: int  # position of the sample in its shard
    seen: tuple[str, ...] = ()  # every member extension of the sample (for messages)


Report = Callable[[str, str, int], None]  # (reason, detail, sample index it belongs to)


def iter_shard(
    url: str,
    wanted: Optional[frozenset[str]],
    select: Callable[[int], bool],
    report: Report,
    max_member_bytes: int,
) -> Iterator[RawSample]:
    """Samples of one shard in order. ``select(i)`` says whether sample ``i`` is wanted (the
    others are skipped without reading their members); ``report`` receives every problem."""
    try:
        stream = open_url(url)
    except Exception as err:  # noqa: BLE001 - any opener's error
        if select(0):
            report("unreadable_shard", f"{url}: {err}", 0)
        return
    index = -1
    key: Optional[str] = None
    members: dict[str, bytes] = {}
    seen: list[str] = []
    selected = False
    failed = False
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                tar.members = []  # stream mode would keep every header otherwise
                name = info.name
                if info.isdir():
                    continue
                if is_unsafe_name(name):
                    if selected or (key is None and select(index + 1)):
                        report("unsafe_member_name", f"{url}: member {name!r}", max(index, 0))
                    continue
                parsed = split_member_name(name)
                if parsed is None:
                    continue
                mkey, ext = parsed
                if mkey != key:
                    if key is not None and selected:
                        yield RawSample(key, members, url, index, tuple(seen))
                    index += 1
                    key, members, selected, seen = mkey, {}, select(index), []
                if not selected:
                    continue
                seen.append(ext)
                if not info.isreg():
                    report("non_file_member", f"{url}: {name!r} is a link or special file", index)
                    continue
                if is_refused(ext):
                    report("refused_member", f"{url}: {name!r} (pickle/torch members are never loaded)", index)
                    continue
                if wanted is not None and ext not in wanted:
                    continue
                if info.size > max_member_bytes:
                    report("oversize_member", f"{url}: {name!r} has {info.size} bytes (limit {max_member_bytes})", index)
                    continue
                if ext in members:
                    report("duplicate_member", f"{url}: {name!r} appears twice in sample {mkey!r}", index)
                    continue
                f = tar.extractfile(info)
                members[ext] = f.read() if f is not None else b""
            if key is not None and selected:
                yield RawSample(key, members, url, index, tuple(seen))
    except Exception as err:  # noqa: BLE001 - tarfile, zlib, OS and pipe errors alike
        failed = True
        at = max(index, 0)
        if select(at):
            # nothing came (a failed download or pipe command, an empty file): unreadable; else corrupt
            unread = index < 0 and (not isinstance(err, tarfile.TarError) or "empty file" in str(err))
            reason = "unreadable_shard" if unread else "corrupt_tar"
            report(reason, f"{url}: {type(err).__name__}: {err} (after {max(index, 0)} samples; rest of shard skipped)", at)
    finally:
        try:
            stream.close()
        except Exception as err:  # noqa: BLE001 - a pipe's exit status, reported once
            if not failed and select(max(index, 0)):
                report("unreadable_shard" if index < 0 else "corrupt_tar", f"{url}: {err}", max(index, 0))
