"""RunConfig: one YAML file configures every stage of a run; each stage receives only its own section.

The sections are defined beside the stages that read them (`sae.config` for the engine,
`features.analyze` and `features.labeling` for the analysis and the labeler); this module only
composes them and resolves the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.analyze import AnalyzeConfig
from features.labeling import LabelConfig
from features.labeling.directions import DirectionsConfig
from features.labeling.lookup import LookupConfig
from features.layout import RunLayout
from sae.config import (
    CacheConfig,
    CorpusConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    build_dataclass,
    read_yaml,
    to_plain,
    write_yaml,
)
from sae.errors import SaekitError


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
    lookup: LookupConfig = field(default_factory=LookupConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    if not isinstance(data, dict):
        raise SaekitError(f"{source}: the config must be a YAML mapping of sections (model, corpus, cache, ...)")
    return build_dataclass(RunConfig, data, "", source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate, and return it."""
    return config_from_dict(read_yaml(path, overrides), str(path))


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return to_plain(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    write_yaml(cfg, path)
