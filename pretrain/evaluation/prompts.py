"""Zero-shot class names and prompt templates: a list in the config, a named set, or a text file.

Named sets (the lists OpenCLIP ships, ``open_clip.zero_shot_metadata``; the ``openclip`` extra):

- templates ``openai_imagenet``: the 80 prompts of CLIP's ImageNet evaluation ("a bad photo of a
  {}.", ...); ``simple_imagenet``: OpenCLIP's 7-prompt subset;
- class names ``imagenet``: the 1,000 ImageNet-1k class names, in label order.

A string that is not a set's name is a text file, one entry per non-empty line (a template holds
``{}`` where the class name goes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from pretrain.options import ConfigError

TEMPLATE_SETS = {"openai_imagenet": "OPENAI_IMAGENET_TEMPLATES", "simple_imagenet": "SIMPLE_IMAGENET_TEMPLATES"}
CLASSNAME_SETS = {"imagenet": "IMAGENET_CLASSNAMES"}


def _named(sets: dict[str, str], name: str, key: str) -> list[str]:
    try:
        from open_clip import zero_shot_metadata
    except ImportError:
        raise ConfigError(f"{key}: the named set {name!r} comes from open-clip-torch: pip install -e '.[openclip]'") \
            from None
    items = getattr(zero_shot_metadata, sets[name])
    return [item("{}") if callable(item) else str(item) for item in items]


def resolve(spec: Union[str, list[str]], kind: str, key: str) -> list[str]:
    """The list ``spec`` stands for; ``kind`` is ``templates`` or ``classnames``."""
    if isinstance(spec, list):
        return list(spec)
    sets = TEMPLATE_SETS if kind == "templates" else CLASSNAME_SETS
    if spec in sets:
        return _named(sets, spec, key)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{key}: neither a named set ({', '.join(sets)}) nor a file: {spec}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
