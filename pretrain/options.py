"""The bottom of the configuration: typed options with errors that name the key, and registries.

Every configurable part of the system declares its options as a dataclass beside its code (a
decoder's ``Options``, a tower's ``Options``, a loss's ``Options``, ``DataConfig``, ...).
``from_dict(cls, values, key)`` turns a plain mapping (YAML) into such a dataclass, checking every
value against the field's type; a wrong type or an unknown key raises ``ConfigError`` whose message
names the full dotted key. A dataclass may define ``check(self, key)`` for what types cannot say
(ranges, exclusive fields); ``from_dict`` calls it.

A ``Registry`` maps names to classes that take their ``Options``: decoders, towers, losses and
evaluation tasks are all registered and built the same way::

    TOWERS = Registry("tower type")

    @TOWERS.register("mlp")
    class MLP(Backbone):
        @dataclass
        class Options:
            hidden: list[int] = field(default_factory=lambda: [256])

    options = TOWERS.options("mlp", {"hidden": [64]}, "model.towers.x.type", "model.towers.x.options")

This module imports nothing of the project: everything else builds on it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Callable, Literal, Optional, TypeVar, Union


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


def require(cond: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("key: message")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (dataclasses, Optional/Union, Literal, list, dict, bool, int,
    float, str, Any), or ``ConfigError`` naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # Optional[X]: X's own message
            return convert(value, options[0], key)
        for option in options:
            try:
                return convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = args or (str, Any)
        return {str(k): convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


T = TypeVar("T")


def from_dict(cls: type[T], values: Optional[dict], key: str = "") -> T:
    """An instance of the dataclass ``cls`` from a mapping, every field type-checked, then its own
    ``check(key)`` if it has one. A class with a ``from_config(values, key)`` classmethod builds
    itself (options whose fields depend on a name, like ``loss``)."""
    values = dict(values or {})
    if hasattr(cls, "from_config"):
        return cls.from_config(values, key)  # type: ignore[attr-defined]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in values.items():
        where = f"{key}.{k}" if key else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where}: unknown key ({hint}known keys here: {', '.join(sorted(names))})")
        kwargs[k] = convert(v, hints[k], where)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(key)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (what ``from_dict`` reads back)."""
    if hasattr(obj, "to_config"):
        return obj.to_config()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


@dataclasses.dataclass
class NoOptions:
    """The options of a registered class that has none."""


class Registry:
    """Names -> classes with an ``Options`` dataclass; ``what`` names the kind in messages."""

    def __init__(self, what: str, base: Optional[type] = None, hint: str = ""):
        self.what, self.base, self.hint = what, base, hint
        self._classes: dict[str, type] = {}

    def register(self, name: str, cls: Optional[type] = None, *, replace: bool = False,
                 check: Optional[Callable[[str, type], None]] = None):
        """Registers ``cls`` under ``name``; usable as a decorator (``@REG.register("x")``)."""

        def add(c: type) -> type:
            if self.base is not None and not (isinstance(c, type) and issubclass(c, self.base)):
                raise TypeError(f"{self.what} {name!r}: {c!r} is not a {self.base.__name__} subclass")
            if name in self._classes and self._classes[name] is not c and not replace:
                raise ValueError(f"{self.what} {name!r} is already registered "
                                 f"({self._classes[name].__qualname__}); pass replace=True")
            if check is not None:
                check(name, c)
            self._classes[name] = c
            if "registered_name" not in vars(c):
                c.registered_name = name  # the name configs use for it
            return c

        return add(cls) if cls is not None else add

    def names(self) -> list[str]:
        return sorted(self._classes)

    def items(self) -> list[tuple[str, type]]:
        """(name, class) in registration order."""
        return list(self._classes.items())

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def get(self, name: Optional[str], key: str) -> type:
        """The class registered as ``name``, or ``ConfigError`` naming ``key`` and the choices."""
        if not name:
            raise ConfigError(f"{key}: required (one of {', '.join(self.names())})")
        if name not in self._classes:
            hint = f"; {self.hint}" if self.hint else ""
            raise ConfigError(f"{key}: unknown {self.what} {name!r} (known: {', '.join(self.names())}{hint})")
        return self._classes[name]

    def options(self, name: Optional[str], values: Optional[dict], key: str, options_key: str):
        """The typed, checked ``Options`` of ``name`` from a mapping; ``key`` names the name's
        field, ``options_key`` the options' (``model.towers.x.type``, ``model.towers.x.options``)."""
        cls = self.get(name, key)
        return from_dict(getattr(cls, "Options", NoOptions), values, options_key)
