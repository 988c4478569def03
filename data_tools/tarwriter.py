"""Deterministic tar shards, written byte for byte as ``tarfile`` would (USTAR, sorted members,
mode 0444, mtime 0, uid/gid 0, no owner names, end padded to a 10240-byte record), but without
``tarfile``'s per-member overhead, with the sha256 computed on the way out, and atomically: the
file is written under a temporary name that carries the writer's pid and renamed when complete.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from pretrain.member_names import MODALITIES, join_name, modality

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads the archive to a multiple of this
END = b"\0" * (2 * BLOCK)


def _tarfile_header(name: str, size: int) -> bytes:
    """The reference: the header ``tarfile`` writes for our members (used to test the fast path)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


# USTAR fields after ``name`` and ``size``: mode 0444, uid 0, gid 0 | size | mtime 0 | checksum |
# regular file, no link, "ustar\0" "00", empty owner names, empty device fields (as tarfile
# leaves them for a regular file), no prefix, padding.
_MID = b"0000444\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 64 + b"\0" * 16 + b"\0" * 155 + b"\0" * 12
_CONST_SUM = sum(_MID) + sum(_MTIME) + sum(_TAIL) + 8 * 32  # the checksum field counts as 8 spaces


def member_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for a regular file, byte for byte (raises ValueError if
    the name is longer than 100 bytes or the size does not fit the 11-digit octal field)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes (the USTAR limit)")
    if size >= 8 ** 11:
        raise ValueError(f"tar member {name!r} is larger than 8 GiB (the USTAR limit)")
    size_field = b"%011o\0" % size
    chksum = _CONST_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, b"\0" * (100 - len(raw)), _MID, size_field, _MTIME, b"%06o\0 " % chksum, _TAIL))


def encode_sample(key: str, members: dict[str, bytes]) -> bytes:
    """A sample's members (sorted by name, so they are adjacent and ordered) as tar blocks."""
    parts = []
    for name in sorted(members):
        data = members[name]
        parts.append(member_header(join_name(key, name), len(data)))
        parts.append(data)
        pad = -len(data) % BLOCK
        if pad:
            parts.append(b"\0" * pad)
    return b"".join(parts)


def finished_size(payload_bytes: int) -> int:
    """File size of a tar holding ``payload_bytes`` of member blocks, after the end marker and padding."""
    n = payload_bytes + len(END)
    return n + (-n % RECORD)


class ShardFile:
    """One tar being written: ``add`` encoded samples, then ``close`` renames it into place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
        self._f = open(self.tmp, "wb")
        self._h = hashlib.sha256()
        self.payload = 0
        self.samples = 0
        self.members: dict[str, int] = {}
        self.modalities: dict[str, int] = {}

    def add(self, block: bytes, member_names) -> None:
        self._f.write(block)
        self._h.update(block)
        self.payload += len(block)
        self.samples += 1
        kinds = set()
        for name in member_names:
            self.members[name] = self.members.get(name, 0) + 1
            kinds.add(modality(name))
        for kind in kinds:
            self.modalities[kind] = self.modalities.get(kind, 0) + 1

    def close(self) -> dict:
        n = self.payload + len(END)
        tail = END + b"\0" * (-n % RECORD)
        self._f.write(tail)
        self._h.update(tail)
        self._f.close()
        os.replace(self.tmp, self.path)
        return {
            "samples": self.samples,
            "bytes": self.payload + len(tail),
            "sha256": self._h.hexdigest(),
            "members": dict(sorted(self.members.items())),
            "modalities": {m: self.modalities[m] for m in MODALITIES if m in self.modalities},
        }

    def abandon(self) -> None:
        self._f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
