"""SAE architectures, one per file, each registered with its own hyperparameter dataclass.

A new architecture is one file here: a config subclassing `ArchConfig`, a module subclassing `SAE`,
`@register("name", Config)`, and an import below.
"""

from sae.saes.base import (
    ARCHITECTURES,
    DTYPES,
    SAE,
    ArchConfig,
    Provenance,
    SAEShape,
    TrainOutput,
    build_sae,
    config_class,
    hyper_fields,
    register,
)
from sae.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from sae.saes.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from sae.saes.relu import ReLUConfig, ReLUSAE
from sae.saes.topk import TopKConfig, TopKSAE

__all__ = ["ARCHITECTURES", "DTYPES", "SAE", "ArchConfig", "BatchTopKConfig", "BatchTopKSAE", "JumpReLUConfig",
           "JumpReLUSAE", "MatryoshkaConfig", "MatryoshkaSAE", "Provenance", "ReLUConfig", "ReLUSAE", "SAEShape",
           "TopKConfig", "TopKSAE", "TrainOutput", "build_sae", "config_class", "hyper_fields", "register"]
