"""The engine's config sections (model, corpus, cache, train, eval) and the YAML validator every section uses.

Each section is a dataclass that checks itself in `__post_init__`; `build_dataclass` turns a YAML
mapping into one. Every mistake (unknown key, wrong type, bad value) is reported as one `SaekitError` that names the
key, the file and what was expected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from sae.errors import SaekitError
from sae.hooks import expand_hooks
from sae.io import atomic_write_text
from sae.saes import ArchConfig, TopKConfig, config_class, hyper_fields
from sae.saes.base import DType


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    device: str = "auto"


@dataclass
class CorpusConfig:
    POSITIVE: ClassVar[tuple[str, ...]] = ("context_size", "max_sequences")
    source: str = "embedded"
    context_size: int = 128
    max_sequences: int | None = 4000
    held_out_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise SaekitError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")


@dataclass
class CacheConfig:
    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size", "shard_sequences")
    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_mlp_out"])
    dtype: DType = "float32"
    batch_size: int = 32  # sequences per forward pass
    shard_sequences: int = 256  # sequences per shard file

    def __post_init__(self) -> None:
        if not self.hooks:
            raise SaekitError("'hooks' must list at least one hook, e.g. [blocks.6.hook_mlp_out]")
        self.hooks = expand_hooks(self.hooks)  # blocks.{0..6}.hook_mlp_out -> one name per layer


@dataclass
class SAESpec:
    """One SAE to train (a `train.saes[i]` entry); several in one run share a single read of the data.

    `hyper` is the architecture's own hyperparameter dataclass (`sae.saes`), parsed from the same flat
    YAML mapping, so every hyperparameter the SAE has can be set there."""

    hook: str = "blocks.6.hook_mlp_out"
    target_hook: str | None = None  # set to train a transcoder (e.g. mlp.hook_post -> hook_mlp_out)
    expansion: int = 8  # d_sae = expansion * width of the hook
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 16384), as in sparsify
    id: str | None = None  # folder name of the exported SAE; None: derived from the fields above
    hyper: ArchConfig = field(default_factory=TopKConfig)

    @property
    def architecture(self) -> str:
        return self.hyper.architecture

    @property
    def sae_id(self) -> str:
        if self.id:
            return self.id
        target = f"-to-{self.target_hook}" if self.target_hook else ""
        k = getattr(self.hyper, "k", None)
        sparsity = f"-k{k}" if k is not None else ""
        return f"{self.hook}{target}-{self.architecture}-x{self.expansion}{sparsity}"

    def to_dict(self) -> dict[str, Any]:
        """The flat YAML form, as written in a config file."""
        out = {"hook": self.hook, "target_hook": self.target_hook, "architecture": self.architecture,
               "expansion": self.expansion, "lr": self.lr, "id": self.id}
        return {**out, **hyper_fields(self.hyper)}


@dataclass
class TrainConfig:
    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size", "total_tokens", "log_every_steps", "checkpoint_every_tokens",
                                           "dead_after_tokens", "buffer_tokens", "streams")
    saes: list[SAESpec] = field(default_factory=lambda: [SAESpec()])
    # Where batches come from: "cache" (the cache stage's files) or "model" (on the fly: the forward pass feeds
    # a shuffle buffer, no cache stage, no disk; for more distinct tokens than the disk holds).
    source: Literal["cache", "model"] = "cache"
    buffer_tokens: int = 131_072  # on the fly: shuffle-window rows over all processes (two windows are held)
    streams: int | None = None  # on the fly: data-order streams (None: one per process); fixes the order
    batch_size: int = 4096  # tokens per optimiser step, summed over all processes
    total_tokens: int = 2_000_000
    lr_warmup_steps: int = 50
    lr_decay_fraction: float = 0.2  # linear decay to zero over this last share of steps
    sparsity_warmup_fraction: float = 0.1  # relu / jumprelu: sparsity weight ramps up over this share
    dead_after_tokens: int = 250_000  # a latent silent this long counts as dead (AuxK, logs)
    checkpoint_every_tokens: int = 500_000
    log_every_steps: int = 10
    seed: int = 0
    wandb_project: str | None = None  # None: wandb runs offline into the run directory
    wandb: bool = True

    def __post_init__(self) -> None:
        ids = [s.sae_id for s in self.saes]
        if len(set(ids)) != len(ids):
            raise SaekitError("two entries of 'saes' have the same id; give them distinct 'id' keys")


@dataclass
class EvalConfig:
    POSITIVE: ClassVar[tuple[str, ...]] = ("sequences", "batch_size")
    sequences: int = 64  # held-out sequences for CE loss recovered and KL
    batch_size: int = 16


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    bad = SaekitError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build_dataclass(tp, value, key, source)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key, source)
            except SaekitError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise bad
    if not isinstance(value, tp):
        raise bad
    return value


def _positive(cls: Any, name: str, value: Any, key: str, source: str) -> None:
    if name in getattr(cls, "POSITIVE", ()) and value is not None and value <= 0:
        raise SaekitError(f"{source}: key '{key}' must be a positive integer, got {value!r}")


def _construct(cls: Any, kwargs: dict[str, Any], prefix: str, source: str) -> Any:
    """Build the dataclass; its own `__post_init__` checks come back prefixed with where they came from."""
    try:
        return cls(**kwargs)
    except SaekitError as exc:
        named = "key '" in str(exc)  # the section's own message already names its key
        where = f"{source}: key '{prefix}'" if prefix and not named else source
        raise SaekitError(f"{where}: {exc}") from None


def build_dataclass(cls: Any, data: dict[str, Any], prefix: str = "", source: str = "<config>") -> Any:
    """A validated `cls` from a mapping: unknown keys are errors (with a 'did you mean'), types are checked."""
    if cls is SAESpec:
        return _build_spec(data, prefix, source)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            _unknown(key, full, names, source)
        kwargs[key] = _convert(value, hints[key], full, source)
        _positive(cls, key, kwargs[key], full, source)
    return _construct(cls, kwargs, prefix, source)


def _unknown(key: Any, full: str, names: list[str], source: str) -> None:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise SaekitError(f"{source}: unknown config key '{full}'{hint} Valid keys here: {', '.join(names)}")


def _build_spec(data: dict[str, Any], prefix: str, source: str) -> SAESpec:
    """A flat `train.saes[i]` mapping: the spec's own keys, and the chosen architecture's hyperparameters."""
    arch = data.get("architecture", "topk")
    try:
        hyper_cls = config_class(str(arch))
    except SaekitError as exc:
        raise SaekitError(f"{source}: key '{prefix}.architecture': {exc}") from None
    own = [f.name for f in dataclasses.fields(SAESpec) if f.name != "hyper"]
    hyper_names = [f.name for f in dataclasses.fields(hyper_cls)]
    spec_part = {k: v for k, v in data.items() if k in own}
    hyper_part = {k: v for k, v in data.items() if k in hyper_names}
    for key in data:
        if key not in own and key not in hyper_names and key != "architecture":
            _unknown(key, f"{prefix}.{key}", own + ["architecture"] + hyper_names, source)
    hyper = build_dataclass(hyper_cls, hyper_part, prefix, source)
    return build_dataclass(_SpecFields, spec_part, prefix, source).to_spec(hyper)


@dataclass
class _SpecFields:
    """The spec's own keys, validated like any section before the hyperparameters join them."""

    POSITIVE: ClassVar[tuple[str, ...]] = ("expansion",)
    hook: str = "blocks.6.hook_mlp_out"
    target_hook: str | None = None
    expansion: int = 8
    lr: float | None = None
    id: str | None = None

    def to_spec(self, hyper: ArchConfig) -> SAESpec:
        return SAESpec(**dataclasses.asdict(self), hyper=hyper)


def to_plain(obj: Any) -> Any:
    """Config dataclasses as plain YAML-ready data; SAE specs in their flat written form."""
    if isinstance(obj, SAESpec):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` (the value in YAML syntax) -> (key path, value)."""
    if "=" not in item:
        raise SaekitError(f"override '{item}' must look like section.key=value, e.g. corpus.max_sequences=8000")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def read_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML mapping with `section.key=value` overrides applied, before validation."""
    path = Path(path)
    if not path.is_file():
        raise SaekitError(f"config file {path} does not exist; the default is configs/smollm2_mlp.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SaekitError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SaekitError(f"{path}: the config must be a YAML mapping of sections (model, corpus, cache, ...)")
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise SaekitError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


def write_yaml(cfg: Any, path: Path) -> None:
    """Write a resolved config next to the run's outputs, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_plain(cfg), sort_keys=False))
