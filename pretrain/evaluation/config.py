"""The evaluation section of a recipe (``eval.*``; ``pretrain.evaluation``, ``python -m pretrain.eval``)."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal, Optional, Union

from pretrain.data.config import SplitConfig
from pretrain.evaluation.prompts import resolve
from pretrain.evaluation.tasks import BUILT_IN, EVALUATORS, metric_roots
from pretrain.options import ConfigError, convert, require, to_dict


@dataclass
class EvalDataset:
    """One more held-out dataset (``eval.datasets[i]``), evaluated beside ``data.val`` with the same
    model and decoders; its metrics are ``eval/<name>/...`` (``data.val``'s stay ``eval/...``)."""

    name: str = ""  # in the metric keys: letters, digits, _
    urls: Union[str, list[str]] = ""  # its shards (brace pattern(s) or a list)
    samples: Optional[int] = None
    index: Optional[str] = None
    tasks: Optional[list[str]] = None  # default: eval.tasks
    classnames: Optional[Union[str, list[str]]] = None  # default: eval.classnames; a named set or a file
    templates: Optional[Union[str, list[str]]] = None  # default: eval.templates; a named set or a file
    captions: Literal["first", "all"] = "first"  # all: every caption of a sample (COCO / Flickr30k retrieval)
    max_captions: int = 5  # with captions: all

    def check(self, key: str) -> None:
        require(self.name.isidentifier(), f"{key}.name", f"letters, digits and _ (it names the metrics), got "
                f"{self.name!r}")
        require(bool(self.urls), f"{key}.urls", "is required (shard paths or brace pattern)")
        require(self.max_captions >= 1, f"{key}.max_captions", f"must be >= 1, got {self.max_captions}")
        for what in ("classnames", "templates"):
            if getattr(self, what) is not None:
                _check_list(resolve(getattr(self, what), what, f"{key}.{what}"), what, f"{key}.{what}")

    def split(self) -> SplitConfig:
        return SplitConfig(urls=self.urls, samples=self.samples, index=self.index)


def _check_list(items: list[str], what: str, key: str) -> None:
    if what == "templates":
        require(bool(items), key, "needs at least one template")
        for i, tmpl in enumerate(items):
            require("{}" in tmpl, f"{key}[{i}]", f"must contain '{{}}' for the class name: {tmpl!r}")


def _default_sections() -> dict[str, Any]:
    return {name: cls.Options() for name, cls in EVALUATORS.items()}


@dataclass
class EvalConfig:
    """Held-out evaluation (``pretrain.evaluation``; ``python -m pretrain.eval``). ``tasks`` unset
    runs every task that applies: zero-shot with class names, retrieval, Symile retrieval with 3+
    modalities; the linear probe only when listed.

    The general options are the fields below; each registered task's own options are the section
    ``eval.<task>.*`` (its ``Options``, ``pretrain.evaluation.tasks``): ``cfg.eval.section(name)``,
    or ``cfg.eval.<task>`` for short. A task registered by a module of ``data.imports`` is known
    once the data section is read (``pretrain.config`` reads it first)."""

    enabled: bool = True
    every: int = 0  # also evaluate every N training steps (0: only at the end)
    batch_size: int = 128
    tasks: Optional[list[str]] = None  # registered evaluation tasks (None: all that apply)
    # index = label in the .cls member; a list, a named set (imagenet) or a text file (one per line)
    classnames: Union[str, list[str]] = field(default_factory=list)
    # zero-shot prompts: a list, a named set (openai_imagenet: CLIP's 80, simple_imagenet) or a file
    templates: Union[str, list[str]] = field(default_factory=lambda: ["{}"])
    datasets: list[EvalDataset] = field(default_factory=list)  # more held-out datasets beside data.val
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])  # R@k reported
    chunk_size: int = 4096  # scores are computed in blocks of chunk_size x chunk_size (memory bound)
    plots: bool = True  # PNGs under output_dir/eval/plots (recall vs step, a similarity matrix)
    # task name -> its Options (the sections eval.<task>.*; defaults for every task registered when made)
    sections: dict[str, Any] = field(default_factory=_default_sections)

    @classmethod
    def from_config(cls, values: dict, key: str = "eval") -> "EvalConfig":
        """The general options, type-checked, and each ``eval.<task>`` section by that task's
        ``Options``; any other key is refused, naming it."""
        hints = typing.get_type_hints(cls)
        general, sections = {}, {}
        for k, v in (values or {}).items():
            where = f"{key}.{k}"
            if k in GENERAL:
                general[k] = convert(v, hints[k], where)
            elif k in EVALUATORS:
                sections[k] = convert({} if v is None else v, EVALUATORS.get(k, where).Options, where)
            else:
                close = difflib.get_close_matches(str(k), [*GENERAL, *EVALUATORS.names()], n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ConfigError(f"{where}: unknown key ({hint}general options: {', '.join(sorted(GENERAL))}; evaluation "
                                  f"tasks, each with its options eval.<task>.*: {', '.join(EVALUATORS.names())}; "
                                  f"{EVALUATORS.hint})")
        obj = cls(**general, sections={**_default_sections(), **sections})
        obj.check(key)
        return obj

    def to_config(self) -> dict:
        """The general options, then the sections of the built-in tasks and of any other task whose
        options differ from its defaults (a process that never imported a plugin can read what a
        process that did wrote, unless it is configured; then data.imports names the plugin)."""
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sections"}
        for name, options in self.sections.items():
            values = to_dict(options)
            if values and (name in BUILT_IN or options != type(options)()):
                out[name] = values
        return out

    def section(self, name: str) -> Any:
        """The options of task ``name`` (its defaults when the config was made before it was registered)."""
        if name not in self.sections:
            self.sections[name] = EVALUATORS.get(name, "eval.tasks").Options()
        return self.sections[name]

    def __getattr__(self, name: str) -> Any:  # cfg.eval.symile: the symile task's options
        if name.startswith("_") or name == "sections" or name not in EVALUATORS:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")
        return self.section(name)

    def check(self, key: str = "eval") -> None:
        """What the section alone decides (``check_against`` checks the names it uses)."""
        require(self.every >= 0, f"{key}.every", f"must be >= 0, got {self.every}")
        require(self.batch_size > 0, f"{key}.batch_size", f"must be > 0, got {self.batch_size}")
        require(self.chunk_size > 0, f"{key}.chunk_size", f"must be > 0, got {self.chunk_size}")
        require(bool(self.recall_at) and all(k > 0 for k in self.recall_at), f"{key}.recall_at",
                f"must be positive integers, got {self.recall_at}")
        _check_list(self.template_list(key), "templates", f"{key}.templates")
        self.class_list(key)
        names = [d.name for d in self.datasets]
        require(len(set(names)) == len(names), f"{key}.datasets", f"names must differ, got {names}")
        for name, options in self.sections.items():
            require(name not in GENERAL, f"{key}.{name}", f"the evaluation task {name!r} has the name of a general "
                    "option of eval; register it under another name")
            check = getattr(options, "check", None)
            if callable(check):
                check(f"{key}.{name}")

    def class_list(self, key: str = "eval") -> list[str]:
        """``classnames`` as a list (a named set or a file read)."""
        return resolve(self.classnames, "classnames", f"{key}.classnames")

    def template_list(self, key: str = "eval") -> list[str]:
        return resolve(self.templates, "templates", f"{key}.templates")

    def for_dataset(self, ds: EvalDataset) -> "EvalConfig":
        """The section as one of ``eval.datasets`` sees it: its tasks, class names and templates
        where given (the tasks' options are shared)."""
        return dataclasses.replace(
            self, datasets=[], tasks=self.tasks if ds.tasks is None else ds.tasks,
            classnames=self.classnames if ds.classnames is None else ds.classnames,
            templates=self.templates if ds.templates is None else ds.templates)

    def planned(self, cfg, names: list[str]) -> list[str]:
        """``tasks``, or (unset) every default task that applies to ``cfg`` (``cfg.data``,
        ``cfg.eval``), in registration order."""
        if self.tasks is not None:
            return list(self.tasks)
        return [name for name, c in EVALUATORS.items() if c.default and c(self.section(name)).applies(cfg, names)]

    def check_against(self, data, key: str = "eval") -> None:
        """The tasks it names are registered (after data.imports, which may register them) and
        each task's checks against ``data`` (a DataConfig): the modalities, labels and class names
        its options and its running need; each of ``datasets`` likewise for the tasks it runs."""
        names = list(data.modalities)
        for i, task in enumerate(self.tasks or []):
            EVALUATORS.get(task, f"{key}.tasks[{i}]")
        view = SimpleNamespace(data=data, eval=self)
        planned = self.planned(view, names)
        for name, c in EVALUATORS.items():
            c(self.section(name)).check(view, name in planned, key)
        roots = metric_roots()
        for i, d in enumerate(self.datasets):
            where = f"{key}.datasets.{d.name}"
            require(d.name not in roots, f"{key}.datasets[{i}].name",
                    f"{d.name!r} is the name of evaluation metrics (eval/{d.name}/...); choose another")
            for j, task in enumerate(d.tasks or []):
                EVALUATORS.get(task, f"{where}.tasks[{j}]")
            ds_view = SimpleNamespace(data=data, eval=self.for_dataset(d))
            for name in ds_view.eval.planned(ds_view, names):
                EVALUATORS.get(name, f"{where}.tasks")(self.section(name)).check(ds_view, True, where)


GENERAL = frozenset(f.name for f in dataclasses.fields(EvalConfig) if f.name != "sections")  # eval.<option>
