"""saekit's engine: load a model, cache activations, build, train, evaluate, save and load SAEs.

Names are exported lazily, so `import sae` is cheap and the SAE classes, kernels and trainer import
without transformer-lens (as on a bare GPU machine):

    from sae import SAESpec, TopKConfig, TrainConfig, build_job, tensor_batches, train, save_sae
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "sae.models",
    "SaekitError": "sae.errors",
    "SAE": "sae.saes", "SAEShape": "sae.saes", "Provenance": "sae.saes", "build_sae": "sae.saes",
    "ARCHITECTURES": "sae.saes", "TopKConfig": "sae.saes", "BatchTopKConfig": "sae.saes",
    "JumpReLUConfig": "sae.saes", "ReLUConfig": "sae.saes",
    "SAESpec": "sae.config", "TrainConfig": "sae.config",
    "TrainJob": "sae.trainer", "build_job": "sae.trainer", "train": "sae.trainer",
    "tensor_batches": "sae.sources",
    "save_sae": "sae.formats", "load_sae": "sae.formats",
    "evaluate_sae": "sae.evaluate",
    "write_cache": "sae.cache", "CacheReader": "sae.cache",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sae' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
