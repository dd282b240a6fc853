"""The train stage of a run: SAEs sized and scaled from the run's cache, trained, and exported.

The trainer (`sae.trainer.train`) knows no paths; this top-layer module gives it the run's batches,
checkpoint file and metrics journal, then writes each trained SAE in SAE-Lens format.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from features.run_config import RunConfig
from sae.distributed import dist_info
from sae.formats import save_sae
from sae.metrics import MetricsLog
from sae.trainer import Trained, build_job, train
from sae.training_data import cache_source, reader_sample, spec_hooks


def train_from_cache(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                     progress: bool = True) -> list[Path]:
    """Train every SAE of `cfg.train.saes` from the run's cache; returns the exported SAE folders (rank 0)."""
    rank, world = dist_info()
    tc, layout = cfg.train, cfg.layout
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hooks = spec_hooks(tc.saes)
    readers, batches = cache_source(layout.cache_dir, hooks, tc.batch_size, tc.seed, rank, world)
    samples = {h: reader_sample(r) for h, r in readers.items()}
    model_name = readers[hooks[0]].manifest["model"]
    jobs = [build_job(spec, samples[spec.hook], samples[spec.target_hook or spec.hook], hooks, model_name, tc.seed,
                      device) for spec in tc.saes]
    wandb_init = None
    if tc.wandb:
        wandb_init = {"project": tc.wandb_project or "saekit", "name": cfg.name, "dir": str(layout.wandb_dir),
                      "mode": "online" if tc.wandb_project else "offline", "config": asdict(cfg)}
    trained = train(jobs, batches, tc, hooks=hooks, checkpoint=layout.checkpoint, resume=resume,
                    overwrite=overwrite, metrics=MetricsLog(layout.metrics, wandb_init), progress=progress)
    manifest = readers[hooks[0]].manifest
    return [_export(cfg, t, manifest["context_size"]) for t in trained]


def _export(cfg: RunConfig, t: Trained, context_size: int) -> Path:
    """Fold the scaling into the weights and write the SAE-Lens directory of the run."""
    return save_sae(t.sae, cfg.layout.sae(t.name), sparsity=t.firing_frequency.float(),
                    metadata={"context_size": context_size, "prepend_bos": False,
                              "dataset_path": str(cfg.corpus.source), "run_name": cfg.name})
