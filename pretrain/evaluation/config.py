"""The evaluation section of a recipe (``eval.*``; ``pretrain.evaluation``, ``python -m pretrain.eval``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from pretrain.data.config import SplitConfig
from pretrain.evaluation.prompts import resolve
from pretrain.evaluation.tasks import EVALUATORS
from pretrain.options import require


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


@dataclass
class EvalConfig:
    """Held-out evaluation (``pretrain.evaluation``; ``python -m pretrain.eval``). ``tasks`` unset
    runs every task that applies: zero-shot with class names, retrieval, Symile retrieval with 3+
    modalities; the linear probe only when listed."""

    @dataclass
    class ZeroShot:
        text: str = "text"  # the modality whose tower (and decoder's tokenizer) encodes the prompts
        modalities: Optional[list[str]] = None  # modalities classified (None: every other one)

    @dataclass
    class Retrieval:
        pairs: Optional[list[list[str]]] = None  # [query, candidate] modality pairs (None: every ordered pair)
        class_aware: bool = True  # also count a hit by class where labels exist (eval/retrieval_class/...)

    @dataclass
    class Symile:
        targets: Optional[list[str]] = None  # modalities retrieved given all the others (None: each)
        scoring: list[Literal["mip", "pairwise"]] = field(default_factory=lambda: ["mip"])  # multilinear / sum of dots
        candidates: int = 0  # 0: the whole split; k > 0: 1 positive + k negatives per query (seeded)
        distinct: bool = False  # candidates: the distinct inputs of the target (e.g. all 2^d XOR vectors)
        seed: int = 0  # negatives' seed

    @dataclass
    class LinearProbe:
        modalities: Optional[list[str]] = None  # features probed (None: every modality)
        # head: the normalised features the loss sees; backbone: the pre-head backbone features
        # (the transfer protocol of CLIP-Lite and most representation-learning papers)
        features: Literal["head", "backbone"] = "head"
        split: SplitConfig = field(default_factory=SplitConfig)  # training features (urls unset: data.train)
        max_train_samples: int = 0  # cap on the training samples embedded (0: the whole split, once)
        l2: float = 1e-3  # L2 penalty on the weights (standardised features)
        max_iter: int = 100  # L-BFGS iterations

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
    zeroshot: ZeroShot = field(default_factory=ZeroShot)
    retrieval: Retrieval = field(default_factory=Retrieval)
    symile: Symile = field(default_factory=Symile)
    linear_probe: LinearProbe = field(default_factory=LinearProbe)

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
        require(self.symile.candidates >= 0, f"{key}.symile.candidates", f"must be >= 0, got {self.symile.candidates}")
        require(bool(self.symile.scoring), f"{key}.symile.scoring", "needs mip and/or pairwise")
        p = self.linear_probe
        require(p.max_train_samples >= 0, f"{key}.linear_probe.max_train_samples",
                f"must be >= 0, got {p.max_train_samples}")
        require(p.l2 >= 0, f"{key}.linear_probe.l2", f"must be >= 0, got {p.l2}")
        require(p.max_iter > 0, f"{key}.linear_probe.max_iter", f"must be > 0, got {p.max_iter}")
        require(not p.split.sources, f"{key}.linear_probe.split.sources", f"give {key}.linear_probe.split.urls")

    def class_list(self, key: str = "eval") -> list[str]:
        """``classnames`` as a list (a named set or a file read)."""
        return resolve(self.classnames, "classnames", f"{key}.classnames")

    def template_list(self, key: str = "eval") -> list[str]:
        return resolve(self.templates, "templates", f"{key}.templates")

    def check_against(self, data, key: str = "eval") -> None:
        """The modalities, labels and class names it names exist in ``data`` (a DataConfig)."""
        names = list(data.modalities)
        for i, task in enumerate(self.tasks or []):  # after data.imports (tasks may come from there)
            EVALUATORS.get(task, f"{key}.tasks[{i}]")
        for d in self.datasets:
            where = f"{key}.datasets.{d.name}"
            for i, task in enumerate(d.tasks or []):
                EVALUATORS.get(task, f"{where}.tasks[{i}]")
            if "zeroshot" in (d.tasks if d.tasks is not None else (self.tasks or [])):
                classes = resolve(d.classnames, "classnames", f"{where}.classnames") if d.classnames is not None \
                    else self.class_list(key)
                require(len(classes) >= 2, f"{where}.classnames", "needs at least 2 class names for zero-shot")

        def known(where: str, value: str) -> None:
            require(value in names, where, f"no such modality in data.modalities ({', '.join(names)})")

        tasks = self.tasks if self.tasks is not None else []
        if "zeroshot" in tasks or (self.tasks is None and self.classnames):
            require(len(self.class_list(key)) >= 2, f"{key}.classnames", "needs at least 2 class names for zero-shot")
            known(f"{key}.zeroshot.text", self.zeroshot.text)
            require(data.labels is not None, "data.labels", "zero-shot needs class labels (a class_label decoder)")
        for i, m in enumerate(self.zeroshot.modalities or []):
            known(f"{key}.zeroshot.modalities[{i}]", m)
        for i, pair in enumerate(self.retrieval.pairs or []):
            require(len(pair) == 2 and pair[0] != pair[1], f"{key}.retrieval.pairs[{i}]",
                    f"a pair is [query, candidate] of two different modalities, got {pair}")
            for j, m in enumerate(pair):
                known(f"{key}.retrieval.pairs[{i}][{j}]", m)
        if "symile" in tasks:
            require(len(names) >= 2, f"{key}.tasks", "symile retrieval needs at least 2 modalities")
        for i, m in enumerate(self.symile.targets or []):
            known(f"{key}.symile.targets[{i}]", m)
        if "linear_probe" in tasks:
            require(data.labels is not None, "data.labels", "the linear probe needs class labels (a class_label decoder)")
        for i, m in enumerate(self.linear_probe.modalities or []):
            known(f"{key}.linear_probe.modalities[{i}]", m)
