"""The field's checkpoint formats, in and out: ``model.init_from`` and ``pretrain.export --format``.

A format (``open_clip``: ``pretrain.models.openclip``; ``hf``: ``pretrain.models.hf_clip``) is a
registered ``CheckpointFormat`` that knows three things, all through the field's own library:

- ``follow(tree, init)``: with ``model.init_from`` set and no ``model.towers``, the recipe follows
  the loaded model (its towers with ``head: none``, ``model.embed_dim``, the text decoder's
  tokenizer and context length, the image decoder's size and normalisation); applied to the plain
  recipe before it is checked, so the run's ``config.yaml`` says what was used;
- ``load(model, init)``: the checkpoint's weights into the built towers of this format (those named
  in ``init.towers``, default all), the temperature and bias too unless ``init.temperature`` is
  false; a missing, unexpected or mis-shaped tensor stops with a ``ConfigError`` naming it;
- ``check(cfg, decoders)``: from the recipe alone, a ``ConfigError`` (``refusal``: the reason and
  every format with what it holds) for a model this format cannot hold (tower types, heads) or
  whose preprocessing it cannot carry (the decoders' settings, the tokenizer); ``pretrain.export``
  calls it before the ZeRO consolidation, ``export`` again first;
- ``export(model, cfg, out)``: the trained model in the library's own layout, with the run's image
  preprocessing and tokenizer in the library's own files, so its loaders give our embeddings.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from pretrain.distributed import gathered
from pretrain.options import ConfigError, Registry


class CheckpointFormat:
    tower_types: tuple[str, ...] = ()  # the tower types whose weights this format holds
    holds: str = ""  # the models it can hold, in one line (a refusal lists every format's)

    def follow(self, tree: dict, init: dict) -> dict:
        raise NotImplementedError

    def check(self, cfg, decoders: dict[str, Any]) -> None:
        """Nothing is refused before the weights are read unless a format says so."""

    def load(self, model, init) -> None:
        raise NotImplementedError

    def export(self, model, cfg, out: Path) -> list[Path]:
        raise NotImplementedError


FORMATS = Registry("checkpoint format", base=CheckpointFormat)


def follow_init_from(tree: Any) -> Any:
    """The plain recipe with what ``model.init_from`` implies filled in (see the module docstring);
    unchanged without ``init_from`` or when ``model.towers`` is given."""
    model = tree.get("model") if isinstance(tree, dict) else None
    init = model.get("init_from") if isinstance(model, dict) else None
    if not isinstance(init, dict) or model.get("towers"):
        return tree
    fmt = FORMATS.get(init.get("format", "open_clip"), "model.init_from.format")()
    return fmt.follow(tree, init)


def load_init(model, init) -> None:
    """Applies ``model.init_from`` to a built model."""
    FORMATS.get(init.format, "model.init_from.format")().load(model, init)


NATIVE = "native (any model: model.safetensors + config.yaml, for Embedder and pretrain.eval)"


def refusal(fmt: str, why: str) -> ConfigError:
    """The error of an export that cannot be written: the reason, then every format and what it holds."""
    others = ", ".join(f"{name} ({FORMATS.get(name, '--format').holds})" for name in FORMATS.names())
    return ConfigError(f"--format {fmt}: {why}. Formats: {NATIVE}, {others}")


def tower_configs(cfg) -> dict[str, Any]:
    """modality -> the ``TowerConfig`` its tower is built from (the configured one, or its decoder's
    default), read from the recipe alone."""
    from pretrain.models.config import default_tower

    out = {}
    for m, spec in cfg.data.modalities.items():
        out[m] = cfg.model.towers.get(m) or default_tower(spec.decoder_name(m), spec.options)
    return out


def decoders_of(model) -> dict[str, Any]:
    """modality -> the data decoder its tower was built with."""
    return {m: tower.backbone.ctx.decoder for m, tower in model.towers.items()}


def pair(fmt: str, towers: dict[str, Any], image_type: str, text_type: str, what: str = "") -> tuple[str, str]:
    """The (image, text) modalities of the first tower of each type among ``towers`` (modality ->
    ``TowerConfig``), or the ``refusal`` saying this model has no such pair."""
    image = next((m for m, t in towers.items() if t is not None and t.type == image_type), None)
    text = next((m for m, t in towers.items() if t is not None and t.type == text_type), None)
    if image is None or text is None:
        has = ", ".join(f"{m}: {t.type if t is not None else 'none'}" for m, t in towers.items())
        raise refusal(fmt, f"needs an {image_type} and an {text_type} tower{what}; this model has {has}")
    return image, text


def check_projects_itself(fmt: str, towers: dict[str, Any], modalities: tuple[str, ...], holder: str) -> None:
    """The towers of ``modalities`` hold nothing beside the library's own modules: no head, no
    missingness embedding (``holder`` names the library's model, for the message)."""
    for m in modalities:
        tower = towers[m]
        if tower.head != "none":
            raise refusal(fmt, f"model.towers.{m}.head is {tower.head}: a {holder} projects its features itself and "
                               f"has no place for a head (train with head: none)")
        if tower.missing != "mask":
            raise refusal(fmt, f"model.towers.{m}.missing is {tower.missing}: a {holder} has no place for the "
                               f"missingness embedding")


def towers_of(model, types: tuple[str, ...], only=None) -> dict[str, Any]:
    """modality -> tower, for the towers whose backbone is one of ``types`` (and in ``only``)."""
    out = {}
    for m, tower in model.towers.items():
        if getattr(tower.backbone, "registered_name", None) in types and (only is None or m in only):
            out[m] = tower
    return out


def split_pair(towers: dict, image_type: str, text_type: str) -> tuple[Optional[str], Optional[str]]:
    """The modalities of the first tower of each type (None where there is none)."""
    image = next((m for m, t in towers.items() if t.backbone.registered_name == image_type), None)
    text = next((m for m, t in towers.items() if t.backbone.registered_name == text_type), None)
    return image, text


def load_checked(model, mapped: dict[str, torch.Tensor], prefixes: list[str], what: str, path: str) -> None:
    """Loads ``mapped`` into ``model`` after ``check_fit``; a loaded logit scale above the model's
    clamp (``model.max_logit_scale``) is refused, since training would silently cut it."""
    if "logit_scale" in mapped and float(mapped["logit_scale"]) > model.max_log_scale + 1e-6:
        raise ConfigError(f"model.max_logit_scale: {math.exp(model.max_log_scale):g} clamps the logit scale of "
                          f"{path} ({math.exp(float(mapped['logit_scale'])):.4g}); raise it")
    with gathered(model):  # a model built partitioned (train.zero3_init): whole while it loads
        check_fit(model.state_dict(), mapped, prefixes, what)
        model.load_state_dict(mapped, strict=False)


def check_fit(own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], prefixes: list[str], what: str,
              key: str = "model.init_from") -> None:
    """Every tensor of ``own`` under ``prefixes`` is in ``loaded`` with its shape, and ``loaded``
    holds nothing else; otherwise a ``ConfigError`` naming the keys."""
    mine = {k: v for k, v in own.items() if any(k.startswith(p) for p in prefixes)}
    missing = sorted(set(mine) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    shapes = [f"{k} {tuple(loaded[k].shape)} vs {tuple(mine[k].shape)}" for k in sorted(set(mine) & set(loaded))
              if tuple(loaded[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}, e.g. {unexpected[:4]}")
        if shapes:
            parts.append(f"{len(shapes)} of other shapes, e.g. {shapes[:3]}")
        raise ConfigError(f"{key}: {what} does not fit this model: " + "; ".join(parts))
