"""Shard-building CLI: ``python -m data_tools build --input MANIFEST --output DIR``."""
from __future__ import annotations

import argparse
import sys

from data_tools.build import BuildError, build_shards


def _parse_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        field, sep, name = item.partition("=")
        if not sep or not field or not name:
            raise BuildError(f"--map: expected FIELD=MEMBER (e.g. caption=txt), got {item!r}")
        mapping[field] = name
    return mapping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write tar shards and index.json from a JSONL manifest")
    b.add_argument("--input", required=True, help="JSONL manifest, one sample per line")
    b.add_argument("--output", required=True, help="folder for the shards and index.json")
    b.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    b.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")
    b.add_argument("--map", action="append", default=[], metavar="FIELD=MEMBER",
                   help="name a field's member, e.g. caption=txt (repeatable)")
    args = parser.parse_args(argv)
    try:
        index = build_shards(args.input, args.output, args.shard_size, args.prefix, _parse_map(args.map))
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {index['total_samples']} samples in {len(index['shards'])} shards to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
