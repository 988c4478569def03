"""One row's fields -> the bytes of its tar members: value rules, checks and optional processing.

Value rules (manifests), each giving bytes and the extension they are written under:

- a string naming an existing file (relative to the manifest's folder, or absolute) -> that file's
  bytes, under the file's suffix;
- a string that is not a file but must be one (its field is mapped to an image or audio member, or
  it looks like a media path: one line ending in ``.jpg``, ``.wav``, ...) -> ``missing_file``;
- any other string -> UTF-8 text, ``txt``;
- a number, boolean, list or object -> JSON (``json.dumps``), ``json``;
- raw bytes (Parquet binary) -> as they are, ``bin``; a Hugging Face image struct
  ``{"bytes": ..., "path": "x.jpg"}`` -> its bytes under the path's suffix;
- anything else (dates, NaN, ...) -> ``unsupported_value``.

The member's name comes from the project's one rule, ``pretrain.member_names.member_names``
(``jpg``, ``txt``, ``cls`` for the fields that claim them, ``<field>.<ext>`` for the rest);
``--map field=name`` replaces it (``--map caption=txt`` gives ``<key>.txt``).

Checks by the member's last extension: ``txt`` must be non-empty UTF-8; ``json`` from a file must
parse; ``cls`` must be an integer; images and audio must decode (a fast structural check by
default, a full decode on request, or none). Processing (all off by default) re-encodes and
resizes images, resamples and re-encodes audio, and normalises text.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import unicodedata
from dataclasses import dataclass

from data_tools.sources import FileRef
from pretrain.member_names import AUDIO_EXTS, IMAGE_EXTS, MEDIA_EXTS, TEXT_EXTS, FieldValue, last_ext, member_names

_MEDIA_PATH = re.compile(r"[^\n\r\0]{1,4096}\.(?:" + "|".join(sorted(MEDIA_EXTS)) + r")", re.IGNORECASE)

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
AUDIO_FORMATS = {"flac": "FLAC", "wav": "WAV"}
PIL_TO_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class SampleFailure(Exception):
    """A bad input: skipped, counted and reported (or, with --strict, fatal)."""

    def __init__(self, kind: str, reason: str, field: str | None = None):
        super().__init__(reason)
        self.kind, self.reason, self.field = kind, reason, field


@dataclass(frozen=True)
class Processing:
    decode_check: str = "fast"  # fast | full | off
    image_format: str | None = None  # jpg | png | webp
    image_max_side: int | None = None
    image_quality: int = 90
    audio_format: str | None = None  # flac | wav
    audio_rate: int | None = None
    normalize_text: bool = False


def _replace_ext(name: str, ext: str) -> str:
    head, dot, _ = name.rpartition(".")
    return f"{head}.{ext}" if dot else ext


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SampleFailure("missing_file", f"missing file: {path}") from None
    except OSError as err:
        raise SampleFailure("missing_file", f"cannot read file {path}: {err.strerror}") from None


def raw_member(field: str, value, *, base_dir: str, mapping: dict) -> tuple[str, bytes, bool]:
    """(extension of its bytes, bytes, came from a file) for one field; raises SampleFailure."""
    override = mapping.get(field)
    from_file = False
    if isinstance(value, FileRef):
        data, ext, from_file = _read_file(value.path), field, True
    elif isinstance(value, str):
        path = None
        if len(value) <= 4096 and "\n" not in value and "\0" not in value and value.strip():
            candidate = os.path.join(base_dir, value)
            if os.path.isfile(candidate):
                path = candidate
        if path is not None:
            suffix = os.path.splitext(value)[1].lstrip(".").lower()
            if not suffix and override is None:
                raise SampleFailure("bad_file", f"file {value!r} has no extension to name its member; name it with --map {field}=EXT")
            data, ext, from_file = _read_file(path), suffix, True
        else:
            target = last_ext(override) if override else None
            if (target in MEDIA_EXTS) or (target is None and _MEDIA_PATH.fullmatch(value)):
                raise SampleFailure("missing_file", f"missing file: {value} (relative to {base_dir})")
            try:
                data = value.encode("utf-8")
            except UnicodeEncodeError:
                raise SampleFailure("non_utf8_text", "text is not valid UTF-8") from None
            ext = "txt"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data, ext = bytes(value), "bin"
    elif isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        # A Hugging Face datasets Image/Audio struct: {"bytes": ..., "path": "name.jpg"}.
        data = bytes(value["bytes"])
        ext = os.path.splitext(str(value.get("path") or ""))[1].lstrip(".").lower() or "bin"
        from_file = True
    elif isinstance(value, (bool, int, float, list, dict)):
        try:
            data = json.dumps(value, allow_nan=False).encode("utf-8")
        except ValueError:
            raise SampleFailure("unsupported_value", "NaN or infinity cannot be stored as JSON") from None
        except TypeError as err:
            raise SampleFailure("unsupported_value", f"unsupported value inside {type(value).__name__}: {err}") from None
        ext = "json"
    else:
        raise SampleFailure("unsupported_value", f"unsupported value type {type(value).__name__}: {value!r:.80}")
    return ext, data, from_file


# --------------------------------------------------------------------------------------- checks


def _check_jpeg(data: bytes) -> None:
    """Marker walk from SOI to the first scan, a frame header on the way, an EOI after the scan."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ValueError("not a JPEG (no start-of-image marker)")
    i, frame = 2, False
    while True:
        while i < n and data[i] != 0xFF:
            i += 1  # tolerate garbage between segments, as decoders do
        while i < n and data[i] == 0xFF:
            i += 1  # fill bytes
        if i >= n:
            raise ValueError("truncated JPEG (no scan)")
        marker = data[i]
        i += 1
        if marker == 0xD9:
            raise ValueError("JPEG ends before its first scan")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if i + 2 > n:
            raise ValueError("truncated JPEG header")
        (length,) = struct.unpack_from(">H", data, i)
        if length < 2 or i + length > n:
            raise ValueError("truncated JPEG header segment")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            frame = True
        if marker == 0xDA:
            if not frame:
                raise ValueError("JPEG scan without a frame header")
            # Entropy-coded data never holds FF D9 (FF is stuffed as FF 00), so an EOI after the
            # scan header means the compressed data reached its end.
            if not data.endswith(b"\xff\xd9") and data.find(b"\xff\xd9", i + length) < 0:
                raise ValueError("truncated JPEG (no end-of-image marker after the scan)")
            return
        i += length


def check_image(data: bytes, mode: str) -> None:
    from PIL import Image

    if mode == "off":
        return
    try:
        if mode == "fast" and data[:3] == b"\xff\xd8\xff":
            _check_jpeg(data)
            return
        with Image.open(io.BytesIO(data)) as img:
            if mode == "fast" and img.format == "PNG":
                img.verify()  # every chunk's CRC, through IEND
            else:
                img.load()
    except Exception as err:  # PIL raises many types for bad data
        raise SampleFailure("bad_image", f"image does not decode: {err}") from None


def _check_wav_header(data: bytes) -> None:
    if data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return
    fmt = "<I" if data[:4] == b"RIFF" else ">I"
    i = 12
    while i + 8 <= len(data):
        cid = data[i:i + 4]
        (size,) = struct.unpack_from(fmt, data, i + 4)
        if cid == b"data":
            if size not in (0, 0xFFFFFFFF) and i + 8 + size > len(data):
                raise ValueError(f"truncated WAV: the data chunk declares {size} bytes, {len(data) - i - 8} present")
            return
        i += 8 + size + (size & 1)


def _decode_audio(data: bytes):
    import soundfile as sf

    _check_wav_header(data)
    with sf.SoundFile(io.BytesIO(data)) as f:
        frames, rate = f.frames, f.samplerate
        chunks = list(f.blocks(blocksize=1 << 16, dtype="float32", always_2d=True))
    got = sum(len(c) for c in chunks)
    if got == 0:
        raise ValueError("no audio frames")
    if got != frames:
        raise ValueError(f"decoded {got} frames, the header says {frames}")
    return chunks, rate


def check_audio(data: bytes, mode: str) -> None:
    if mode == "off":
        return
    try:
        _decode_audio(data)
    except Exception as err:
        raise SampleFailure("bad_audio", f"audio does not decode: {err}") from None


# ----------------------------------------------------------------------------------- processing


def normalize_text(text: str) -> str:
    """NFC, then every run of whitespace (newlines included) becomes one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def process_image(name: str, data: bytes, p: Processing) -> tuple[str, bytes]:
    if not (p.image_format or p.image_max_side):
        check_image(data, p.decode_check)
        return name, data
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))
        src_ext = PIL_TO_EXT.get(img.format)
        target = p.image_format or src_ext or "png"
        w, h = img.size
        scale = p.image_max_side / max(w, h) if p.image_max_side and max(w, h) > p.image_max_side else None
        if scale is None and target == src_ext:
            img.close()
            check_image(data, p.decode_check)  # nothing to change: keep the bytes
            return (name if last_ext(name) in (target, "jpeg") else _replace_ext(name, target)), data
        if scale is not None and img.format == "JPEG":
            img.draft(img.mode, (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
        img.load()
        img = ImageOps.exif_transpose(img)
        if scale is not None:
            w, h = img.size
            s = p.image_max_side / max(w, h)
            if s < 1:
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
        if target == "jpg" and img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        elif target == "webp" and img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
        elif target == "png" and img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            img = img.convert("RGB")
        out = io.BytesIO()
        if target == "jpg":
            img.save(out, "JPEG", quality=p.image_quality)
        elif target == "webp":
            img.save(out, "WEBP", quality=p.image_quality)
        else:
            img.save(out, "PNG")
    except SampleFailure:
        raise
    except Exception as err:
        raise SampleFailure("bad_image", f"image does not decode: {err}") from None
    return _replace_ext(name, target), out.getvalue()


def process_audio(name: str, data: bytes, p: Processing) -> tuple[str, bytes]:
    if not (p.audio_format or p.audio_rate):
        check_audio(data, p.decode_check)
        return name, data
    import numpy as np
    import soundfile as sf

    src = last_ext(name)
    target = p.audio_format or (src if src in AUDIO_FORMATS else "flac")
    try:
        chunks, rate = _decode_audio(data)
    except Exception as err:
        raise SampleFailure("bad_audio", f"audio does not decode: {err}") from None
    if (p.audio_rate is None or p.audio_rate == rate) and target == src:
        return name, data
    audio = np.concatenate(chunks, axis=0)
    if p.audio_rate is not None and p.audio_rate != rate:
        import soxr

        audio = soxr.resample(audio, rate, p.audio_rate, quality="HQ")
        rate = p.audio_rate
    out = io.BytesIO()
    sf.write(out, np.clip(audio, -1.0, 1.0), rate, format=AUDIO_FORMATS[target], subtype="PCM_16")
    return _replace_ext(name, target), out.getvalue()


def finish_member(name: str, data: bytes, from_file: bool, p: Processing) -> tuple[str, bytes]:
    """Checks and processing by the member's last extension; raises SampleFailure."""
    ext = last_ext(name)
    if ext in TEXT_EXTS:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleFailure("non_utf8_text", f"text is not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if p.normalize_text:
            text = normalize_text(text)
            data = text.encode("utf-8")
        if not text.strip():
            raise SampleFailure("empty_text", "empty text")
        return name, data
    if not data:
        raise SampleFailure("empty_file", "empty member (0 bytes)")
    if ext == "json" and from_file:
        try:
            json.loads(data)
        except ValueError as err:
            raise SampleFailure("bad_json", f"not valid JSON: {err}") from None
    elif ext == "cls":
        try:
            int(data.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise SampleFailure("bad_label", f"a .cls member must be an integer, got {data[:40]!r}") from None
    elif ext in IMAGE_EXTS:
        return process_image(name, data, p)
    elif ext in AUDIO_EXTS:
        return process_audio(name, data, p)
    return name, data


def make_members(fields: dict, *, base_dir: str, mapping: dict, folder: bool, processing: Processing) -> dict[str, bytes]:
    """A sample's members (name -> bytes), named by ``pretrain.member_names.member_names`` (a folder
    input's fields are already member names); raises SampleFailure naming the field."""
    members: dict[str, bytes] = {}
    raws = []
    for field_name, value in fields.items():
        try:
            ext, data, from_file = raw_member(field_name, value, base_dir=base_dir, mapping=mapping)
        except SampleFailure as err:
            err.field = field_name
            raise
        integer = isinstance(value, int) and not isinstance(value, bool)
        raws.append((FieldValue(field_name, ext, from_file, integer), data))
    if folder:
        names = {v.field: mapping.get(v.field, v.field) for v, _ in raws}
    else:
        names = member_names([v for v, _ in raws], mapping)
    for v, data in raws:
        try:
            name, data = finish_member(names[v.field], data, v.from_file, processing)
        except SampleFailure as err:
            err.field = v.field
            raise
        if name in members:
            raise SampleFailure("member_clash", f"member {name!r} would be written twice", v.field)
        members[name] = data
    return members
