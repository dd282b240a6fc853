"""Run configuration: typed dataclasses loaded from YAML and validated at the edge.

Every mistake (unknown key, wrong type, bad value) is reported as one `SaekitError` that names the
key, the file and what was expected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sae.errors import SaekitError
from sae.io import atomic_write_text

DType = Literal["float32", "float16", "bfloat16"]


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    device: str = "auto"


@dataclass
class CorpusConfig:
    source: str = "embedded"
    context_size: int = 128
    max_sequences: int | None = 4000
    held_out_fraction: float = 0.05
    seed: int = 0


@dataclass
class CacheConfig:
    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_mlp_out"])
    dtype: DType = "float32"
    batch_size: int = 32  # sequences per forward pass
    shard_sequences: int = 256  # sequences per shard file


Architecture = Literal["topk", "batchtopk", "jumprelu", "relu"]


@dataclass
class SAESpec:
    """One SAE to train; several in one run share a single read of the cache."""

    hook: str = "blocks.6.hook_mlp_out"
    target_hook: str | None = None  # set to train a transcoder (e.g. mlp.hook_post -> hook_mlp_out)
    architecture: Architecture = "topk"
    expansion: int = 8  # d_sae = expansion * width of the hook
    k: int = 32  # topk / batchtopk
    sparsity_coef: float | None = None  # L1 (relu) or L0 (jumprelu) weight; None: the architecture's default
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 16384), as in sparsify
    id: str | None = None  # folder name under saes/; None: derived from the fields above

    @property
    def sae_id(self) -> str:
        if self.id:
            return self.id
        target = f"-to-{self.target_hook}" if self.target_hook else ""
        sparsity = f"-k{self.k}" if self.architecture in ("topk", "batchtopk") else ""
        return f"{self.hook}{target}-{self.architecture}-x{self.expansion}{sparsity}"


@dataclass
class TrainConfig:
    saes: list[SAESpec] = field(default_factory=lambda: [SAESpec()])
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


@dataclass
class EvalConfig:
    sequences: int = 64  # held-out sequences for CE loss recovered and KL
    batch_size: int = 16


@dataclass
class AnalyzeConfig:
    """The feature analysis pass (features/analyze.py): which tokens, and how much to keep per unit."""

    split: Literal["held_out", "train", "held_out+train"] = "held_out+train"  # held-out sequences first
    sequences: int | None = 256  # cap on analysed sequences; None: the whole split
    source: Literal["auto", "model", "cache"] = "auto"  # auto: the activation cache when it holds every needed
    # hook for exactly these (train) sequences, else run the model to the SAE's layer
    batch_size: int = 32  # sequences per forward pass
    neurons: bool = True  # also analyse the MLP neurons (blocks.L.mlp.hook_post) of the SAE's layer
    top_examples: int = 20  # top activating contexts per unit, at most one per sequence
    intervals: int = 10  # equal-width activation intervals per unit (even: they merge pairwise)
    interval_examples: int = 5  # uniformly sampled examples per interval
    window_before: int = 16  # context tokens stored before an example's token
    window_after: int = 6  # ... and after it
    n_logits: int = 10  # top and bottom output tokens per unit
    n_related: int = 10  # neighbours, co-firing and correlated units kept per unit
    seed: int = 0


@dataclass
class LabelConfig:
    """The entity-attribute labeler (features/label.py) and monosemanticity scores (features/semantics.py);
    the thresholds are justified in features/label.py's docstring."""

    sae: str | None = None  # SAE id under saes/ to label; None: every SAE of train.saes
    entities: str = "builtin"  # "builtin" (features/data) or a folder of <name>.csv + <name>.templates.json
    entity_types: list[str] | None = None  # only these entity types; None: all in `entities`
    max_entities: int | None = 300  # per entity type, a deterministic sample (by name hash); None: all
    templates: int = 1  # attribute prompts per attribute the knowledge filter averages over (the first n)
    knowledge_filter: bool = True  # keep only entities whose attribute the model ranks first among the values
    pooling: Literal["last", "max"] = "last"  # the entity's last token, or max over its tokens
    start_token: bool = True  # begin prompts with the corpus's document separator, as the training text does
    batch_size: int = 64  # prompts per forward pass
    min_class_size: int = 5  # a value needs this many known entities to be scored or probed
    min_positives: int = 10  # ... and this many to be tagged
    feature_on: Literal["best_f1", "fires"] = "best_f1"  # "on" for a feature: above its best-F1 threshold, the
    # rule neurons get (a like-for-like comparison), or any firing (activation > 0)
    min_f1: float = 0.6
    min_auroc: float = 0.85
    test_fraction: float = 0.25  # held-out share of each value's entities for the probes
    probe_k: int = 8  # units in the k-sparse probe
    probe_l2: float = 1e-2  # on standardised inputs; 1e-3..1e-1 give mean accuracies within 1%
    probe_steps: int = 200  # LBFGS iterations
    causal_tags: int = 24  # tags checked causally per kind (the best tag of each value, round-robin); 0: none
    causal_prompts: int = 8  # attribute prompts per checked tag
    causal_controls: int = 10  # random units ablated for comparison per checked tag
    causal_min_effect: float = 0.1  # nats: smallest mean log-prob drop that counts as causal
    causal_min_z: float = 2.0  # ... and its smallest z-score against the controls
    semantics: bool = True  # also score every unit's monosemanticity from the store's examples
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "default"
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


_POSITIVE = {"corpus.context_size", "corpus.max_sequences", "cache.batch_size", "cache.shard_sequences",
             "train.batch_size", "train.total_tokens", "train.log_every_steps", "train.checkpoint_every_tokens",
             "train.dead_after_tokens", "eval.sequences", "eval.batch_size",
             "analyze.sequences", "analyze.batch_size", "analyze.top_examples", "analyze.intervals",
             "analyze.interval_examples", "analyze.n_logits", "analyze.n_related",
             "label.max_entities", "label.templates", "label.batch_size", "label.min_class_size",
             "label.min_positives", "label.probe_k", "label.probe_steps", "label.causal_prompts"}


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
        return _build(tp, value, key, source)
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


def _build(cls: Any, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SaekitError(f"{source}: unknown config key '{full}'{hint} Valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], full, source)
        if full in _POSITIVE and kwargs[key] is not None and kwargs[key] <= 0:
            raise SaekitError(f"{source}: key '{full}' must be a positive integer, got {value!r}")
    return cls(**kwargs)


def _check(cfg: RunConfig, source: str) -> None:
    if not 0.0 <= cfg.corpus.held_out_fraction < 1.0:
        raise SaekitError(f"{source}: key 'corpus.held_out_fraction' must be in [0, 1), "
                          f"got {cfg.corpus.held_out_fraction}")
    ids = [s.sae_id for s in cfg.train.saes]
    if len(set(ids)) != len(ids):
        raise SaekitError(f"{source}: two entries of 'train.saes' have the same id; give them distinct 'id' keys")
    for i, spec in enumerate(cfg.train.saes):
        if spec.expansion <= 0 or spec.k <= 0:
            raise SaekitError(f"{source}: key 'train.saes[{i}]': expansion and k must be positive")
    if cfg.analyze.intervals % 2:
        raise SaekitError(f"{source}: key 'analyze.intervals' must be even (intervals merge pairwise when a larger "
                          f"activation appears), got {cfg.analyze.intervals}")
    if cfg.analyze.window_before < 0 or cfg.analyze.window_after < 0:
        raise SaekitError(f"{source}: keys 'analyze.window_before' and 'analyze.window_after' must be >= 0")
    lab = cfg.label
    for key in ("min_f1", "min_auroc", "test_fraction"):
        if not 0.0 <= getattr(lab, key) <= 1.0:
            raise SaekitError(f"{source}: key 'label.{key}' must be in [0, 1], got {getattr(lab, key)}")
    if not 0.0 < lab.test_fraction < 1.0:
        raise SaekitError(f"{source}: key 'label.test_fraction' must be strictly between 0 and 1")
    if lab.min_class_size < 2:
        raise SaekitError(f"{source}: key 'label.min_class_size' must be at least 2 (one to train, one to test)")
    if lab.causal_tags < 0 or lab.causal_controls < 0 or lab.probe_l2 < 0:
        raise SaekitError(f"{source}: keys 'label.causal_tags', 'label.causal_controls' and 'label.probe_l2' "
                          "must be >= 0")
    if not cfg.cache.hooks:
        raise SaekitError(f"{source}: key 'cache.hooks' must list at least one hook, "
                          "e.g. [blocks.6.hook_mlp_out]")


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    if not isinstance(data, dict):
        raise SaekitError(f"{source}: the config must be a YAML mapping of sections (model, corpus, cache, ...)")
    cfg = _build(RunConfig, data, "", source)
    _check(cfg, source)
    return cfg


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise SaekitError(f"override '{item}' must look like section.key=value, e.g. corpus.max_sequences=8000")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate, and return it."""
    path = Path(path)
    if not path.is_file():
        raise SaekitError(f"config file {path} does not exist; the default is configs/smollm2_mlp.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SaekitError(f"{path} is not valid YAML: {exc}") from None
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise SaekitError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return config_from_dict(data, str(path))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config next to the run's outputs, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
