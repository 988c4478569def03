"""Typed configuration tree: YAML file + dotted ``key=value`` overrides, validated with clear errors.

Every section is a dataclass. ``load_config(path, overrides)`` reads the YAML, applies the overrides
(``train.steps=20``, ``data.train.urls=[a.tar,b.tar]``; values are parsed as YAML scalars/lists),
and converts the result into the tree. An unknown key or a value of the wrong type raises
``ConfigError`` whose message names the full dotted key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


# ----------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    """One weighted source of shards (``data.train.sources[i]``)."""

    urls: Union[str, list[str]] = ""  # brace pattern(s), a list of shard paths/URLs (pipe:, http(s), s3 via fsspec)
    weight: float = 1.0  # resampled mode: share of the samples drawn from this source
    samples: Optional[int] = None  # explicit sample count of these shards (else from index.json / sizes.json)
    index: Optional[str] = None  # an index.json (data_tools) or sizes.json (OpenCLIP) listing the shards' counts


@dataclass
class SplitConfig:
    urls: Union[str, list[str]] = ""  # brace pattern(s) or list of shard paths/URLs (one source)
    samples: Optional[int] = None  # with urls: explicit sample count (else from index.json / sizes.json)
    index: Optional[str] = None  # with urls: where the counts are (default: beside local shards)
    sources: list[SourceConfig] = field(default_factory=list)  # several sources instead of urls
    mode: Literal["epoch", "resampled"] = "epoch"  # training: each sample once per epoch, or shards drawn by weight
    shuffle_buffer: int = 0  # samples permuted together (a window; 0 or 1: keep shard order)
    workers: int = 0  # DataLoader worker processes per rank


@dataclass
class ModalityConfig:
    """One modality of a sample (``data.modalities.<name>``): the decoder that makes its tensor."""

    decoder: Optional[str] = None  # a registered decoder name; default: the modality's name
    members: list[str] = field(default_factory=list)  # tar member extensions read, by preference (default: the decoder's)
    required: bool = True  # absent: drop the sample (required) or a placeholder with mask False
    options: dict[str, Any] = field(default_factory=dict)  # the decoder's options


def _default_modalities() -> dict[str, ModalityConfig]:
    return {"image": ModalityConfig(decoder="image"), "text": ModalityConfig(decoder="text")}


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=lambda: SplitConfig(shuffle_buffer=1000))
    val: SplitConfig = field(default_factory=SplitConfig)
    modalities: dict[str, ModalityConfig] = field(default_factory=_default_modalities)
    labels: Optional[ModalityConfig] = field(
        default_factory=lambda: ModalityConfig(decoder="class_label", required=False)
    )  # class labels (Batch.labels, -1 where absent) for evaluation; null: none
    image_size: int = 32  # images are resized to image_size x image_size RGB
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    context_length: int = 32  # text tokens per sample (byte tokenizer, with BOS/EOS)
    imports: list[str] = field(default_factory=list)  # modules that register more decoders
    max_member_bytes: int = 256 * 2**20  # larger tar members are skipped and counted
    max_consecutive_bad: int = 1000  # stop with an error after this many dropped samples in a row (0: never)
    bad_log_per_minute: int = 10  # log lines about bad samples, per process (the rest are only counted)


@dataclass
class TowerConfig:
    """One modality's encoder (``model.towers.<modality>``; the name matches data.modalities)."""

    type: str = ""  # required: a registered backbone: timm, text_transformer, hf_text, audio_cnn, hf_audio, mlp
    options: dict[str, Any] = field(default_factory=dict)  # the backbone's options (see pretrain/models/towers.py)
    head: Literal["linear", "mlp"] = "linear"  # projection to model.embed_dim
    freeze: Literal["none", "backbone", "all"] = "none"  # lock the backbone (LiT) or the whole tower
    missing: Literal["mask", "indicator"] = "mask"  # absent samples: left out of the loss, or a learned embedding
    grad_checkpointing: bool = False  # recompute backbone activations in backward


def default_tower(modality: "ModalityConfig", name: str) -> Optional[TowerConfig]:
    """The tower a modality gets when ``model.towers`` names none for it, by its decoder."""
    decoder = modality.decoder or name
    if decoder == "image":
        return TowerConfig(type="timm", options={"name": "resnet10t"})
    if decoder == "text":
        return TowerConfig(type="text_transformer", options={"width": 128, "layers": 2, "heads": 4})
    if decoder == "audio" and (modality.options or {}).get("features") == "log_mel":
        return TowerConfig(type="audio_cnn")
    if decoder in ("npy", "json"):
        return TowerConfig(type="mlp")
    return None


@dataclass
class ModelConfig:
    embed_dim: int = 64
    # one per data modality; a modality left out gets its decoder's default (image: timm resnet10t,
    # text: text_transformer, audio log-mel: audio_cnn, npy/json: mlp)
    towers: dict[str, TowerConfig] = field(default_factory=dict)
    init_temperature: float = 0.07  # logit_scale starts at log(1/T)
    init_logit_bias: float = -10.0  # for objectives with a learnable bias (siglip)
    max_logit_scale: float = 100.0  # the temperature clamp: 1/T never exceeds this


@dataclass
class LossConfig:
    """The objective and its options (an option left unset takes the objective's default; one
    the named objective does not have is an error). See pretrain/losses/."""

    name: Literal["clip", "clip_lite", "symile", "siglip"] = "clip"
    anchor: Optional[str] = None  # clip, clip_lite, siglip: pairs (anchor, other) instead of all pairs
    negative: Optional[Literal["global", "local"]] = None  # clip_lite (default global)
    negative_sampling: Optional[Literal["n", "n_squared"]] = None  # symile (default n)
    chunk_size: Optional[int] = None  # symile n_squared: logits per chunk
    seed: Optional[int] = None  # symile n: permutation seed
    exchange: Optional[Literal["all_gather", "ring"]] = None  # siglip (default all_gather)


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 32
    grad_accumulation_steps: int = 1  # micro-batches per step; negatives span all of them (exact feature caching)
    seed: int = 0
    lr: float = 1e-3
    optimizer: Literal["adamw", "lamb"] = "adamw"  # lamb: layer-wise trust ratio (needs zero_stage 0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.1
    warmup_steps: int = 10
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    schedule: Literal["cosine", "constant"] = "cosine"  # after linear warmup
    global_batch_size: int = 0  # if set, must equal micro_batch_size x grad_accumulation_steps x world size
    log_every: int = 10
    log_keys: bool = False  # write the sample keys of every step to output_dir/keys/rank{r}.jsonl
    checkpoint: bool = True  # save checkpoints (always at the end and on SIGTERM/SIGUSR1)
    checkpoint_every: int = 0  # also every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    resume: str = "auto"  # auto: newest complete checkpoint in output_dir if any; none; or a folder
    stop_at_step: int = 0  # end this run early at that step with a checkpoint (schedule unchanged)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config
    peak_tflops: float = 0.0  # one device's peak for the MFU metric (0: known GPUs' datasheet value; CPU: none)
    max_nonfinite_steps: int = 5  # consecutive non-finite losses (steps skipped) before the run stops


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
        split: SplitConfig = field(default_factory=SplitConfig)  # training features (urls unset: data.train)
        max_train_samples: int = 0  # cap on the training samples embedded (0: the whole split, once)
        l2: float = 1e-3  # L2 penalty on the weights (standardised features)
        max_iter: int = 100  # L-BFGS iterations

    enabled: bool = True
    every: int = 0  # also evaluate every N training steps (0: only at the end)
    batch_size: int = 128
    tasks: Optional[list[Literal["zeroshot", "retrieval", "symile", "linear_probe"]]] = None  # None: all that apply
    classnames: list[str] = field(default_factory=list)  # index = label in the .cls member
    templates: list[str] = field(default_factory=lambda: ["{}"])  # zero-shot prompt templates
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])  # R@k reported
    chunk_size: int = 4096  # scores are computed in blocks of chunk_size x chunk_size (memory bound)
    plots: bool = True  # PNGs under output_dir/eval/plots (recall vs step, a similarity matrix)
    zeroshot: ZeroShot = field(default_factory=ZeroShot)
    retrieval: Retrieval = field(default_factory=Retrieval)
    symile: Symile = field(default_factory=Symile)
    linear_probe: LinearProbe = field(default_factory=LinearProbe)

    def check(self, data: DataConfig) -> None:
        """Cross-field checks (called by ``validate``), each error naming its key."""
        names = list(data.modalities)

        def known(key: str, value: str) -> None:
            _require(value in names, key, f"no such modality in data.modalities ({', '.join(names)})")

        _require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _require(self.batch_size > 0, "eval.batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.chunk_size > 0, "eval.chunk_size", f"must be > 0, got {self.chunk_size}")
        _require(bool(self.recall_at) and all(k > 0 for k in self.recall_at), "eval.recall_at",
                 f"must be positive integers, got {self.recall_at}")
        for i, tmpl in enumerate(self.templates):
            _require("{}" in tmpl, f"eval.templates[{i}]", f"must contain '{{}}' for the class name: {tmpl!r}")
        tasks = self.tasks if self.tasks is not None else []
        if "zeroshot" in tasks or (self.tasks is None and self.classnames):
            _require(len(self.classnames) >= 2, "eval.classnames", "needs at least 2 class names for zero-shot")
            known("eval.zeroshot.text", self.zeroshot.text)
            _require(data.labels is not None, "data.labels", "zero-shot needs class labels (a class_label decoder)")
        for i, m in enumerate(self.zeroshot.modalities or []):
            known(f"eval.zeroshot.modalities[{i}]", m)
        for i, pair in enumerate(self.retrieval.pairs or []):
            _require(len(pair) == 2 and pair[0] != pair[1], f"eval.retrieval.pairs[{i}]",
                     f"a pair is [query, candidate] of two different modalities, got {pair}")
            for j, m in enumerate(pair):
                known(f"eval.retrieval.pairs[{i}][{j}]", m)
        if "symile" in tasks:
            _require(len(names) >= 2, "eval.tasks", "symile retrieval needs at least 2 modalities")
        for i, m in enumerate(self.symile.targets or []):
            known(f"eval.symile.targets[{i}]", m)
        _require(self.symile.candidates >= 0, "eval.symile.candidates", f"must be >= 0, got {self.symile.candidates}")
        _require(bool(self.symile.scoring), "eval.symile.scoring", "needs mip and/or pairwise")
        p = self.linear_probe
        if "linear_probe" in tasks:
            _require(data.labels is not None, "data.labels", "the linear probe needs class labels (a class_label decoder)")
        for i, m in enumerate(p.modalities or []):
            known(f"eval.linear_probe.modalities[{i}]", m)
        _require(p.max_train_samples >= 0, "eval.linear_probe.max_train_samples", f"must be >= 0, got {p.max_train_samples}")
        _require(p.l2 >= 0, "eval.linear_probe.l2", f"must be >= 0, got {p.l2}")
        _require(p.max_iter > 0, "eval.linear_probe.max_iter", f"must be > 0, got {p.max_iter}")
        _require(not p.split.sources, "eval.linear_probe.split.sources", "give eval.linear_probe.split.urls")


@dataclass
class Config:
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# Conversion with dotted-key errors
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # Optional[X]: X's own message
            return _convert(value, options[0], key)
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = args or (str, Any)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
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


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{key}: unknown key (known keys here: {known})")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


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
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        with open(path) as f:
            loaded = yaml.safe_load(f)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _validate_split(s: SplitConfig, key: str, training: bool) -> None:
    _require(s.workers >= 0, f"{key}.workers", f"must be >= 0, got {s.workers}")
    _require(s.shuffle_buffer >= 0, f"{key}.shuffle_buffer", f"must be >= 0, got {s.shuffle_buffer}")
    _require(training or s.mode == "epoch", f"{key}.mode", "evaluation reads each sample once (mode: epoch)")
    if s.sources:
        _require(not s.urls, f"{key}.urls", f"give either {key}.urls or {key}.sources, not both")
        for name in ("samples", "index"):
            _require(getattr(s, name) is None, f"{key}.{name}", f"goes with {key}.urls; set it per source in {key}.sources")
        _require(training, f"{key}.sources", f"evaluation reads one list of shards: give {key}.urls (a list joins several)")
    for i, src in enumerate(s.sources):
        _require(bool(src.urls), f"{key}.sources[{i}].urls", "is required (shard paths or brace pattern)")
        _require(src.weight > 0, f"{key}.sources[{i}].weight", f"must be > 0, got {src.weight}")
        _require(s.mode == "resampled" or src.weight == 1.0, f"{key}.sources[{i}].weight",
                 "weights apply in mode: resampled (epoch mode reads every sample once per epoch)")
    for i, src in enumerate([s] + list(s.sources)):
        where = key if i == 0 else f"{key}.sources[{i - 1}]"
        _require(src.samples is None or src.samples > 0, f"{where}.samples", f"must be > 0, got {src.samples}")


def _validate_data(d: DataConfig) -> None:
    _require(bool(d.train.urls) or bool(d.train.sources), "data.train.urls",
             "is required (shard paths or brace pattern), or data.train.sources")
    _validate_split(d.train, "data.train", training=True)
    _validate_split(d.val, "data.val", training=False)
    _require(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    _require(d.context_length >= 4, "data.context_length", f"must be >= 4, got {d.context_length}")
    for name in ("image_mean", "image_std"):
        _require(len(getattr(d, name)) == 3, f"data.{name}", "must have 3 values (RGB)")
    _require(bool(d.modalities), "data.modalities", "needs at least one modality")
    _require(d.max_member_bytes > 0, "data.max_member_bytes", f"must be > 0, got {d.max_member_bytes}")
    _require(d.max_consecutive_bad >= 0, "data.max_consecutive_bad", f"must be >= 0, got {d.max_consecutive_bad}")
    _require(d.bad_log_per_minute >= 0, "data.bad_log_per_minute", f"must be >= 0, got {d.bad_log_per_minute}")
    for name in d.modalities:
        _require(name.isidentifier() and not name.startswith("_"), f"data.modalities.{name}",
                 "a modality name must be an identifier (letters, digits, _) not starting with _")
    from pretrain.data.pipeline import build_modalities

    build_modalities(d, train=True)  # decoder names, options and members, each error naming its key
    build_modalities(d, train=False)


def _validate_towers(m: ModelConfig, d: DataConfig) -> None:
    """Tower types and option names (the models themselves are built, and checked further, at start)."""
    from pretrain.models.towers import get_tower_class

    for name, tower in m.towers.items():
        key = f"model.towers.{name}"
        _require(name in d.modalities, key, f"no such modality in data.modalities ({', '.join(d.modalities)})")
        cls = get_tower_class(tower.type, f"{key}.type")
        _build(cls.Options, dict(tower.options or {}), f"{key}.options")
    for name, modality in d.modalities.items():
        if name not in m.towers and default_tower(modality, name) is not None:
            m.towers[name] = default_tower(modality, name)
    # a modality with neither a tower nor a default one stops the run when the model is built


def validate(cfg: Config) -> None:
    """Checks across fields that types alone cannot express."""
    t = cfg.train
    _require(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    _require(t.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0 <= t.warmup_steps, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    _require(t.log_every > 0, "train.log_every", f"must be > 0, got {t.log_every}")
    _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {t.checkpoint_every}")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    _require(0 <= t.stop_at_step, "train.stop_at_step", f"must be >= 0, got {t.stop_at_step}")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", f"must be >= 1, got {t.max_nonfinite_steps}")
    _require(t.grad_accumulation_steps >= 1, "train.grad_accumulation_steps",
             f"must be >= 1, got {t.grad_accumulation_steps}")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"two values in [0, 1), got {t.betas}")
    owned = {"train_micro_batch_size_per_gpu": "train.micro_batch_size", "train_batch_size": "train.micro_batch_size",
             "gradient_accumulation_steps": "train.grad_accumulation_steps", "gradient_clipping": "train.grad_clip",
             "bf16": "train.precision", "fp16": "train.precision", "optimizer": "train.optimizer",
             "scheduler": "train.schedule"}
    for k in t.deepspeed:
        _require(k not in owned, f"train.deepspeed.{k}", f"set by {owned.get(k)}; give it there")
    _require("stage" not in (t.deepspeed.get("zero_optimization") or {}), "train.deepspeed.zero_optimization.stage",
             "set by train.zero_stage; give it there")
    _require(t.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0, got {t.peak_tflops}")
    _require(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    _require(t.optimizer != "lamb" or t.zero_stage == 0, "train.optimizer",
             "lamb computes a trust ratio per parameter, which ZeRO stages 1-3 cut into flat partitions: "
             "use train.zero_stage=0 with lamb")
    _require(t.global_batch_size >= 0, "train.global_batch_size", f"must be >= 0, got {t.global_batch_size}")
    _validate_data(cfg.data)
    m = cfg.model
    _require(m.embed_dim > 0, "model.embed_dim", f"must be > 0, got {m.embed_dim}")
    _validate_towers(m, cfg.data)
    _require(0 < m.init_temperature, "model.init_temperature", "must be > 0")
    from pretrain.losses import LossInputError, build_loss

    try:
        build_loss(to_dict(cfg.loss))
    except LossInputError as err:
        raise ConfigError(str(err)) from None
    cfg.eval.check(cfg.data)
