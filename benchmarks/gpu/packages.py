"""The GPU machine's two package lists, read one way by fetch_wheels.sh, rehearse.sh and the test
(tests/test_gpu_shape.py): image_packages.txt (what the machine's image holds) and carry.txt (what
travels to it, and how). Standard library only: fetch_wheels.sh runs it with any python3.

    python3 benchmarks/gpu/packages.py carried HOW   # carry.txt's requirements fetched as HOW, one a line
    python3 benchmarks/gpu/packages.py link SITE     # links the image's distributions that this Python
                                                     # has installed into SITE (rehearse.sh)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOWS = ("wheel", "with-deps", "source")


def norm(name: str) -> str:
    """A distribution's name as pip compares them, less a CUDA suffix (nvidia-cublas-cu12 is the
    image's nvidia-cublas)."""
    return re.sub(r"-cu\d+$", "", re.sub(r"[-_.]+", "-", name).lower())


def _lines(path: Path) -> list[list[str]]:
    """The words of each line, comments and blank lines left out."""
    return [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def image(path: Path = HERE / "image_packages.txt") -> set[str]:
    return {norm(name) for (name,) in _lines(path)}


def carried(path: Path = HERE / "carry.txt") -> dict[str, tuple[str, str]]:
    """name -> (the pip requirement, how it is fetched: one of HOWS)."""
    out = {}
    for words in _lines(path):
        if len(words) != 2 or words[1] not in HOWS:
            raise ValueError(f"{path}: {' '.join(words)!r}: want a requirement and one of {', '.join(HOWS)}")
        out[norm(re.match(r"[A-Za-z0-9._-]+", words[0]).group())] = (words[0], words[1])
    return out


def link(site: Path) -> tuple[int, int]:
    """Links each image distribution that this Python has installed (its top-level files and folders,
    its metadata among them) into ``site``; returns (linked, not installed here)."""
    import importlib.metadata as md

    wanted, linked = image(), set()
    for dist in md.distributions():
        name = norm(dist.metadata["Name"])
        if name not in wanted:
            continue
        linked.add(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if Path(str(f)).parts[0] != ".."}:
            target = Path(dist.locate_file(top))
            if target.exists() and not (site / top).exists():
                (site / top).symlink_to(target)
    return len(linked), len(wanted - linked)


if __name__ == "__main__":
    verb, arg = sys.argv[1:3]
    if verb == "carried":
        print("\n".join(req for req, how in carried().values() if how == arg))
    elif verb == "link":
        (site,) = Path(arg).glob("lib/python*/site-packages")
        linked, absent = link(site)
        print(f"rehearsal image: {linked} distributions linked; not installed here (not needed by the project): {absent}")
    else:
        sys.exit(f"unknown verb {verb!r}: carried HOW | link VENV")
