"""Shard tools: ``python -m data_tools build|verify|stats``.

  build   manifest (JSONL, CSV/TSV, Parquet) or folder -> webdataset tar shards, index.json,
          sizes.json, failures.jsonl; resumable, byte-identical whatever --workers
  verify  every shard opens, required members present, counts and checksums match index.json
          (a split's folder is checked against the index one folder up)
  stats   samples, bytes, per-modality presence, per-shard table
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from data_tools.errors import BuildError, StrictFailure
from data_tools.members import AUDIO_FORMATS, IMAGE_FORMATS, Processing
from pretrain.cli import exit_process, run_cli

EXIT_BAD_INPUT = 1  # --strict stopped at a bad input; verify found problems
EXIT_USAGE = 2  # bad flags or an unreadable input
INTERRUPTED = "interrupted: run the same command again to resume"  # Ctrl-C during a build (exit 130)


def _parse_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        field, sep, name = item.partition("=")
        if not sep or not field or not name:
            raise BuildError(f"--map: expected FIELD=MEMBER (e.g. caption=txt), got {item!r}")
        if field in mapping:
            raise BuildError(f"--map: field {field!r} is mapped twice")
        mapping[field] = name
    return mapping


def _parse_splits(items: list[str]) -> dict[str, float] | None:
    if not items:
        return None
    out: dict[str, float] = {}
    for item in items:
        name, sep, frac = item.partition("=")
        try:
            value = float(frac)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            raise BuildError(f"--split: expected NAME=FRACTION (e.g. train=0.9), got {item!r}")
        if name in out:
            raise BuildError(f"--split: split {name!r} given twice")
        out[name] = value
    return out


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 500000000, 512M or 1G, got {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="write tar shards, index.json, sizes.json and failures.jsonl",
                       description="Build webdataset tar shards from a manifest or a folder.")
    g = b.add_argument_group("input and output")
    g.add_argument("--input", required=True, metavar="SRC",
                   help="manifest (.jsonl, .csv, .tsv, .parquet) or folder (files sharing a stem form a sample)")
    g.add_argument("--output", required=True, metavar="DIR", help="folder for the shards and index.json")
    g.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "tsv", "parquet", "folder"],
                   help="input type (default: from the suffix, or folder)")
    g.add_argument("--base-dir", metavar="DIR", help="resolve relative file paths here (default: the manifest's folder)")
    g.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar (default 'shard')")
    g.add_argument("--shard-size", type=int, default=1000, metavar="N",
                   help="samples per shard: each shard holds the passing samples of N input rows (default 1000)")
    g.add_argument("--max-shard-bytes", type=_parse_bytes, metavar="B",
                   help="start a new shard before one would pass B bytes (e.g. 512M; default: no limit)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes (default 1); the output is byte-identical whatever N")
    f = b.add_argument_group("fields, keys and splits")
    f.add_argument("--map", action="append", default=[], metavar="FIELD=MEMBER",
                   help="name a field's member, e.g. caption=txt image=jpg label=cls (repeatable); "
                        "for a folder FIELD is a file extension, e.g. jpeg=jpg")
    f.add_argument("--key-column", default="key", metavar="FIELD",
                   help="field naming each sample (default 'key'; rows without it get their 0-based row number)")
    f.add_argument("--sanitize-keys", action="store_true",
                   help="replace dots, slashes and spaces in keys with '_' instead of rejecting the row")
    f.add_argument("--ignore", action="append", default=[], metavar="FIELD", help="leave a field out (repeatable)")
    f.add_argument("--optional", action="append", default=[], metavar="FIELD",
                   help="a field that may be missing or null (otherwise such a row is rejected; repeatable)")
    f.add_argument("--split-column", metavar="FIELD", help="a field naming each row's split (one folder of shards per split)")
    f.add_argument("--split", action="append", default=[], metavar="NAME=FRACTION",
                   help="split by ratio, e.g. --split train=0.9 --split val=0.1 (exact counts, seeded)")
    f.add_argument("--seed", type=int, default=0, help="seed of the --split assignment (default 0)")
    f.add_argument("--class-folders", default="auto", choices=["auto", "yes", "no"],
                   help="folder input: top-level folders are classes, giving a .cls label (default auto: "
                        "when the top level holds only folders)")
    p = b.add_argument_group("processing (all off by default: bytes pass through)")
    p.add_argument("--image-format", choices=sorted(IMAGE_FORMATS), help="re-encode images to this format")
    p.add_argument("--image-max-side", type=int, metavar="PX", help="shrink images so the longer side is at most PX (aspect kept)")
    p.add_argument("--image-quality", type=int, default=90, metavar="Q", help="JPEG/WebP quality when re-encoding (default 90)")
    p.add_argument("--audio-format", choices=sorted(AUDIO_FORMATS), help="re-encode audio to this format (16-bit)")
    p.add_argument("--audio-rate", type=int, metavar="HZ", help="resample audio to HZ")
    p.add_argument("--normalize-text", action="store_true",
                   help="text members: Unicode NFC, whitespace runs to one space, ends stripped")
    p.add_argument("--no-decode-check", action="store_true",
                   help="skip the check that every image and audio member decodes")
    p.add_argument("--full-decode-check", action="store_true",
                   help="decode every image in full (default: a fast structural check: PNG chunk CRCs, "
                        "JPEG markers through end-of-image; audio is decoded in full by both)")
    r = b.add_argument_group("behaviour")
    r.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal anyway)")

    v = sub.add_parser("verify", help="check a shard folder against its index.json (beside it or one folder up)")
    v.add_argument("dir", metavar="DIR", help="a build's output folder, or one split's folder of it")
    v.add_argument("--require", action="append", default=[], metavar="MEMBER",
                   help="a member every sample must have, besides those every sample had at build time (repeatable)")
    v.add_argument("--decode", action="store_true", help="also decode every image and audio member in full")

    s = sub.add_parser("stats", help="samples, bytes, per-modality presence, per-shard table")
    s.add_argument("dir", metavar="DIR", help="a shard folder (a build's, one split's of it, or any webdataset folder)")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    s.add_argument("--all-shards", action="store_true", help="list every shard (default: at most 50 rows)")
    return parser


def _build(args) -> int:
    from data_tools.build import build_shards, summary

    if args.no_decode_check and args.full_decode_check:
        raise BuildError("--no-decode-check and --full-decode-check are exclusive")
    processing = Processing(
        decode_check="off" if args.no_decode_check else "full" if args.full_decode_check else "fast",
        image_format=args.image_format, image_max_side=args.image_max_side, image_quality=args.image_quality,
        audio_format=args.audio_format, audio_rate=args.audio_rate, normalize_text=args.normalize_text,
    )
    index = build_shards(
        args.input, args.output, shard_size=args.shard_size, prefix=args.prefix, mapping=_parse_map(args.map),
        input_format=args.format, max_shard_bytes=args.max_shard_bytes, workers=args.workers,
        key_column=args.key_column, sanitize_keys=args.sanitize_keys, ignore=tuple(args.ignore),
        optional=tuple(args.optional), split_column=args.split_column, split_ratios=_parse_splits(args.split),
        seed=args.seed, class_folders=args.class_folders, base_dir=args.base_dir, processing=processing,
        strict=args.strict, progress=False if args.no_progress else None,
    )
    print(summary(index, args.output))
    return 0


def _verify(args) -> int:
    from data_tools.verify import format_verify, verify

    problems, facts = verify(args.dir, require=args.require, decode=args.decode)
    print(format_verify(args.dir, problems, facts), file=sys.stderr if problems else sys.stdout)
    return EXIT_BAD_INPUT if problems else 0


def _stats(args) -> int:
    from data_tools.verify import format_stats, stats

    if not Path(args.dir).is_dir():
        raise BuildError(f"{args.dir}: no such folder")
    st = stats(args.dir)
    if st["shards"] == 0:
        raise BuildError(f"{args.dir}: no index.json and no .tar shards")
    print(json.dumps(st, indent=1) if args.json else format_stats(st, args.all_shards))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        # StrictFailure first (it is a BuildError); OSError: the output folder cannot be written, a disk is full, ...
        errors = [(StrictFailure, EXIT_BAD_INPUT), ((BuildError, OSError), EXIT_USAGE)]
        return run_cli(lambda: _build(args), errors=errors, interrupted=INTERRUPTED)
    if args.command == "verify":
        return run_cli(lambda: _verify(args))
    return run_cli(lambda: _stats(args), errors=[(BuildError, EXIT_USAGE)])


if __name__ == "__main__":
    exit_process(main())
