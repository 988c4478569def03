"""Tar member names: one rule for ``data_tools build``, the training reader, ``verify`` and ``stats``.

**Key and member.** A tar member's name is ``KEY.MEMBER``: the key is the name up to the first dot
of its file name, folders included (webdataset's convention: ``a/b/000123.jpg`` has key
``a/b/000123`` and member ``jpg``); the member is the rest, dots included (``000123.depth.npy`` ->
``depth.npy``). Consecutive entries sharing a key form one sample. Keys written by
``data_tools build`` never contain dots (nor slashes, spaces or control characters). Members are
compared without regard to case (the reader lowercases them).

**What a field is written as** (``data_tools build`` without ``--map``; ``member_names``), the
names webdataset, img2dataset and OpenCLIP use and this project's decoders read by default:

- an image or audio file: its extension (``jpg``, ``png``, ``webp``, ``flac``, ``wav``, ...);
- text (a string, or a ``.txt`` file): ``txt`` for a caption-like field (``caption``, ``text``,
  ``title``, ...) or a sample's only text field;
- an integer in a label-like field (``label``, ``cls``, ``class``, ...): ``cls``;
- anything else, and the second field claiming one of those names: ``FIELD.EXT``, where ``EXT``
  is the file's extension, ``txt`` (text), ``json`` (numbers, lists, objects) or ``bin`` (raw
  bytes): ``depth.npy``, ``url.txt``, ``meta.json``, ``thumb.png``.

``--map FIELD=NAME`` names a member yourself.

**How a modality finds its member** (``MemberRule``): ``data.modalities.<m>.members`` (default: the
decoder's ``members``) lists entries by preference; an entry is a member name (``txt``,
``emb.npy``) or, with a leading dot, a suffix (``.npy``: the member ``npy`` or any member ending in
``.npy``). Three tiers, the first that finds something wins, the entries' order deciding within
a tier:

1. exact: a member equal to an entry (``txt``; ``npy`` for ``.npy``);
2. named after the modality: ``<m>.<entry>`` (modality ``depth`` reads ``depth.npy``; modality
   ``note`` with the text decoder reads ``note.txt``);
3. suffix, for dotted entries only: the one member ending in ``.<entry>``; when several do
   (``a.npy`` and ``b.npy``) none is taken: the sample counts under ``ambiguous_<m>`` (list the
   member to read in ``members``).

So an exact match always comes before a suffix match, and the text decoder's entries (``txt``,
``json``) are plain names: ``KEY.url.txt`` and ``KEY.meta.json`` never become a caption. The ``npy``
and ``json`` decoders list ``.npy`` / ``.json``: a default build's ``KEY.depth.npy`` or
``KEY.meta.json`` is found without configuring ``members``. Pickle and torch members (last
extension ``pyd``, ``pickle``, ``pkl``, ``pth``, ``pt``, ``ckpt``) are never read.

This module imports nothing of the project and nothing heavy (``data_tools`` stays torch-free).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Mapping, Optional, Sequence

# ------------------------------------------------------------------------------ key and member


def split_name(name: str) -> Optional[tuple[str, str]]:
    """(key, member) of a tar entry's name, the member as written; None when the file name has no
    dot after a non-empty stem (``README``, ``.hidden``) or nothing after it."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    member = name[dot + 1:]
    if not member:
        return None
    return name[:dot], member


def join_name(key: str, member: str) -> str:
    return f"{key}.{member}"


KEY_FORBIDDEN = re.compile(r"[.\s/\\\x00-\x1f]")  # a built key never holds these


def key_problem(key: str) -> Optional[str]:
    """Why ``key`` cannot be a built sample's key (None when it can)."""
    if not key:
        return "empty key"
    bad = KEY_FORBIDDEN.search(key)
    if bad:
        return f"key {key!r} contains {bad.group()!r} (keys never contain dots, slashes or spaces)"
    return None


def member_problem(member: str) -> Optional[str]:
    """Why ``member`` cannot be a member name (None when it can)."""
    if not member:
        return "a member name cannot be empty"
    if "/" in member or "\\" in member:
        return "a member name cannot contain '/'"
    if any(c.isspace() or ord(c) < 32 for c in member):
        return "a member name cannot contain spaces"
    if member.startswith(".") or member.endswith(".") or ".." in member:
        return "a member name cannot have a leading, trailing or double dot"
    return None


def last_ext(member: str) -> str:
    """The member's last extension, lowercased (``depth.npy`` -> ``npy``)."""
    return member.rsplit(".", 1)[-1].lower()


# ------------------------------------------------------------------------- kinds of member

# by preference: the image and audio decoders' default members, and what the builder names bare
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
AUDIO_EXTS = ("flac", "wav", "ogg", "mp3", "opus")
TEXT_EXTS = ("txt", "text")
MEDIA_EXTS = frozenset(IMAGE_EXTS + AUDIO_EXTS)
REFUSED_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt"})

MODALITIES = ("image", "text", "audio", "label", "json", "other")


def is_refused(member: str) -> bool:
    """A pickle or torch member (by its last extension): never read, whatever asks for it."""
    return last_ext(member) in REFUSED_EXTENSIONS


def modality(member: str) -> str:
    """A member's kind for ``stats`` and ``index.json``, from its last extension."""
    ext = last_ext(member)
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    if ext == "cls":
        return "label"
    if ext == "json":
        return "json"
    return "other"


# -------------------------------------------------------------------- what a field is written as

TEXT_FIELDS = frozenset({"caption", "captions", "text", "txt", "title", "description", "prompt", "sentence"})
LABEL_FIELDS = frozenset({"label", "labels", "cls", "class", "class_id", "category", "target"})


@dataclass(frozen=True)
class FieldValue:
    """One field of a sample as the builder has read it."""

    field: str
    ext: str  # what its bytes are: a file's extension, txt (text), json (a JSON value), bin (bytes)
    from_file: bool = False
    integer: bool = False  # a JSON integer (not a boolean): a label when the field is label-like


def member_names(values: Sequence[FieldValue], mapping: Mapping[str, str] = {}) -> dict[str, str]:
    """field -> member name for the fields of one sample (the module docstring's rule): ``mapping``
    (``--map``) first; then the shared names (``jpg``, ``txt``, ``cls``, ...), the first claimant of
    a name winning (caption-like fields before other text); every other field ``FIELD.EXT``."""
    taken = set(mapping.values())
    texts = [v for v in values if v.ext in TEXT_EXTS and v.field not in mapping]
    claims = []
    for order, v in enumerate(values):
        if v.field in mapping:
            continue
        caption_like = v.field.lower() in TEXT_FIELDS
        if v.from_file and v.ext in MEDIA_EXTS:  # images and audio; other files (npy, ...) keep the field name
            claims.append((0, order, v.field, v.ext))
        elif v.ext in TEXT_EXTS and (caption_like or len(texts) == 1):
            claims.append((0 if caption_like else 1, order, v.field, "txt"))
        elif v.ext == "json" and v.integer and v.field.lower() in LABEL_FIELDS:
            claims.append((0, order, v.field, "cls"))
    out = {v.field: mapping[v.field] for v in values if v.field in mapping}
    for _, _, field, name in sorted(claims):
        if name not in taken:
            out[field] = name
            taken.add(name)
    for v in values:
        out.setdefault(v.field, f"{v.field}.{v.ext}")
    return out


# ------------------------------------------------------------------ how a modality finds its member


def entry_problem(entry: str) -> Optional[str]:
    """Why ``entry`` cannot be a ``members`` entry (a member name, or ``.SUFFIX``)."""
    name = entry[1:] if entry.startswith(".") else entry
    problem = member_problem(name)
    if problem is not None:
        return f"{entry!r}: {problem} (give a member name such as txt or emb.npy, or a suffix such as .npy)"
    if is_refused(name):
        return f"{entry!r} is a pickle/torch format; such members are always refused"
    return None


class MemberRule:
    """Which member of a sample one modality reads: ``entries`` (by preference) matched in three
    tiers, exact, named after the modality, then by suffix (the module docstring)."""

    def __init__(self, modality: str, entries: Sequence[str]):
        self.modality = modality
        self.entries = tuple(e.lower() for e in entries)
        names = [e[1:] if e.startswith(".") else e for e in self.entries]
        self.exact = tuple(dict.fromkeys(names))
        self.named = tuple(dict.fromkeys(f"{modality.lower()}.{n}" for n in names))
        self.suffixes = tuple(dict.fromkeys("." + e[1:] for e in self.entries if e.startswith(".")))
        self._wanted = frozenset(self.exact + self.named)

    def wants(self, member: str) -> bool:
        """Whether ``member`` (lowercased) could be this modality's: the reader keeps its bytes."""
        return member in self._wanted or (bool(self.suffixes) and member.endswith(self.suffixes))

    def find(self, members: Collection[str]) -> tuple[Optional[str], tuple[str, ...]]:
        """(the member to read or None, the candidates when a suffix matched several) among a
        sample's lowercased ``members``."""
        for tier in (self.exact, self.named):
            for name in tier:
                if name in members:
                    return name, ()
        for suffix in self.suffixes:
            hits = tuple(sorted(m for m in members if m.endswith(suffix)))
            if len(hits) == 1:
                return hits[0], ()
            if hits:
                return None, hits
        return None, ()

    def describe(self) -> str:
        """The entries as a message says them: ``txt/json``, ``depth.npy/.npy``."""
        return "/".join(self.entries)


class WantedMembers:
    """The members some modality could read (``in`` asks every rule): what the reader keeps."""

    def __init__(self, rules: Sequence[MemberRule]):
        self.rules = tuple(rules)
        self._exact = frozenset(n for r in rules for n in r._wanted)
        self._suffixes = tuple(dict.fromkeys(s for r in rules for s in r.suffixes))

    def __contains__(self, member: str) -> bool:
        return member in self._exact or (bool(self._suffixes) and member.endswith(self._suffixes))


__all__ = [
    "AUDIO_EXTS", "FieldValue", "IMAGE_EXTS", "KEY_FORBIDDEN", "LABEL_FIELDS", "MEDIA_EXTS", "MODALITIES",
    "MemberRule", "REFUSED_EXTENSIONS", "TEXT_EXTS", "TEXT_FIELDS", "WantedMembers", "entry_problem", "is_refused",
    "join_name", "key_problem", "last_ext", "member_names", "member_problem", "modality", "split_name",
]
