"""The train stage of a run: SAEs sized and scaled from the run's data, trained, and exported.

The data is either the run's activation cache (`train_from_cache`) or the model's forward pass over the
train split (`train_from_model`, on the fly: no cache stage). The trainer (`sae.trainer.train`) knows no
paths; this top-layer module gives it the run's batches, checkpoint file and metrics journal, then writes
each trained SAE in SAE-Lens format.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from features.run_config import RunConfig
from sae.distributed import dist_info
from sae.formats import save_sae
from sae.metrics import MetricsLog
from sae.sources import BufferSpec, ModelBatches
from sae.trainer import Batches, Trained, build_job, train
from sae.training_data import cache_source, reader_sample, spec_hooks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def train_from_cache(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                     progress: bool = True) -> list[Path]:
    """Train every SAE of `cfg.train.saes` from the run's cache; returns the exported SAE folders (rank 0)."""
    rank, world = dist_info()
    hooks = spec_hooks(cfg.train.saes)
    readers, batches = cache_source(cfg.layout.cache_dir, hooks, cfg.train.batch_size, cfg.train.seed, rank, world)
    manifest = readers[hooks[0]].manifest
    samples = [reader_sample(readers[h]) for h in hooks]
    data = {"source": "cache", "corpus": manifest["corpus_fingerprint"]}
    return _train_and_export(cfg, _Data(hooks, samples, batches, data, manifest["model"], manifest["context_size"]),
                             resume, overwrite, progress)


def train_from_model(cfg: RunConfig, model: HookedTransformer, tokens: Tensor, buffer_tokens: int,
                     streams: int | None = None, resume: bool = False, overwrite: bool = False,
                     progress: bool = True) -> list[Path]:
    """Train every SAE of `cfg.train.saes` on the fly from `model` run over `tokens` (the train split
    [n_seq, ctx]), through a shuffle buffer of `buffer_tokens` rows; `cache.batch_size` sequences per forward
    pass. `streams` (default: one per process) fixes the data order; the same value reproduces a run on
    any number of processes that divides it. Returns the exported SAE folders (rank 0)."""
    rank, world = dist_info()
    hooks = spec_hooks(cfg.train.saes)
    spec = BufferSpec(cfg.train.batch_size, buffer_tokens, cfg.cache.batch_size, cfg.train.seed, streams or world)
    source = ModelBatches(model, tokens, hooks, spec, rank, world, cfg.train.total_tokens // cfg.train.batch_size)
    data = _Data(hooks, source.sample(), source, source.data, model.cfg.model_name, tokens.shape[1])
    return _train_and_export(cfg, data, resume, overwrite, progress)


class _Data(NamedTuple):
    """What the train stage needs from either source."""

    hooks: list[str]
    samples: list[Tensor]  # one per hook: sizing, scaling and centring the SAEs
    batches: Batches
    meta: dict[str, Any]  # recorded in the checkpoint; a resume must match it
    model_name: str
    context_size: int


def _train_and_export(cfg: RunConfig, data: _Data, resume: bool, overwrite: bool, progress: bool) -> list[Path]:
    tc, layout = cfg.train, cfg.layout
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sample = dict(zip(data.hooks, data.samples, strict=True))
    jobs = [build_job(spec, sample[spec.hook], sample[spec.target_hook or spec.hook], data.hooks, data.model_name,
                      tc.seed, device) for spec in tc.saes]
    wandb_init = None
    if tc.wandb:
        wandb_init = {"project": tc.wandb_project or "saekit", "name": cfg.name, "dir": str(layout.wandb_dir),
                      "mode": "online" if tc.wandb_project else "offline", "config": asdict(cfg)}
    trained = train(jobs, data.batches, tc, hooks=data.hooks, checkpoint=layout.checkpoint, resume=resume,
                    overwrite=overwrite, metrics=MetricsLog(layout.metrics, wandb_init), progress=progress,
                    data=data.meta)
    return [_export(cfg, t, data.context_size) for t in trained]


def _export(cfg: RunConfig, t: Trained, context_size: int) -> Path:
    """Fold the scaling into the weights and write the SAE-Lens directory of the run."""
    return save_sae(t.sae, cfg.layout.sae(t.name), sparsity=t.firing_frequency.float(),
                    metadata={"context_size": context_size, "prepend_bos": False,
                              "dataset_path": str(cfg.corpus.source), "run_name": cfg.name, "seed": cfg.train.seed})
