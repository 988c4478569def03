"""A recipe: the YAML file plus dotted ``key=value`` overrides, assembled from the components'
own sections and checked with errors that name the key.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=20", "data.train.urls=[a.tar,b.tar]"])

Each section is defined and checked beside the code it configures: ``data`` in
``pretrain.data.config``, ``model`` in ``pretrain.models.config``, ``loss`` by the objectives
(``pretrain.losses``), ``train`` in ``pretrain.trainer`` (with its optimizer, engine and checkpoint
fields in ``pretrain.optim``, ``pretrain.engine`` and ``pretrain.checkpoint``), ``eval`` in
``pretrain.evaluation.config``. This module only assembles them and adds the checks across
sections. Values are parsed as YAML (``train.lr=1e-4``); an unknown key or a value of the wrong
type raises ``ConfigError`` naming the full dotted key. Checking builds nothing: decoders, towers
and the loss are built once, when a run starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pretrain.data.config import DataConfig
from pretrain.evaluation.config import EvalConfig
from pretrain.losses import LossConfig
from pretrain.models.config import ModelConfig
from pretrain.models.interop import follow_init_from
from pretrain.options import ConfigError, from_dict, to_dict
from pretrain.trainer import TrainConfig

__all__ = ["Config", "ConfigError", "config_from_dict", "load_config", "parse_overrides", "to_dict"]


@dataclass
class Config:
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self, key: str = "") -> None:
        """Every section's own checks (sections left out of the YAML too) and those across them."""
        self.data.check("data")
        self.model.check("model")
        self.model.check_towers(list(self.data.modalities), "model")
        self.train.check("train")
        self.eval.check("eval")
        self.eval.check_against(self.data, "eval")
        self.loss.check_against(list(self.data.modalities), self.train, "loss")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
        parsed.append((key, value))
    return parsed


def config_from_dict(tree: dict) -> Config:
    """A checked ``Config`` from plain data (a loaded YAML, a run's config.yaml). The data section
    goes first: its ``imports`` register the decoders, towers, losses and evaluation tasks that
    other sections may name."""
    if isinstance(tree, dict):
        tree = follow_init_from({k: tree[k] for k in sorted(tree, key=lambda k: k != "data")})
    return from_dict(Config, tree)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f)  # plain data only: a tag such as !!python/object is never built
            except yaml.constructor.ConstructorError as err:
                raise ConfigError(f"{path}: refused: a YAML tag this loader does not build ({err.problem}"
                                  f"{err.problem_mark or ''}); recipes are plain data") from None
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return config_from_dict(tree)
