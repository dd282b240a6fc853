"""Trainer checkpoints: every SAE of a run, its optimiser, firing statistics and the data position in one
atomically written safetensors file, so SAEs trained together can never be restored at different steps.

The metadata also records what the batches were drawn from (`data`: source, corpus fingerprint, hooks,
buffer settings), which a resume must match, and each SAE's timed kernel choice, which a resume reuses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from sae.errors import SaekitError
from sae.io import atomic_save_tensors
from sae.saes import SAE, hyper_fields

# Settings that choose a kernel, not the function learned: a resumed run may differ in them.
_KERNEL_ONLY = ("fast", "encoder_bf16")


def resume_view(sae: SAE) -> dict[str, Any]:
    """What must match for a checkpoint to continue this SAE: shape, hooks, architecture, hyperparameters."""
    hyper = {k: v for k, v in hyper_fields(sae.hyper).items() if k not in _KERNEL_ONLY}
    return {"architecture": sae.architecture, "hook": sae.provenance.hook_name,
            "target_hook": sae.provenance.hook_name_out, "d_in": sae.shape.d_in, "d_sae": sae.shape.d_sae,
            "d_out": sae.shape.d_out, **hyper}


def save_checkpoint(path: Path, jobs: list[Any], step: int, meta: dict[str, Any]) -> None:
    """`jobs` are the trainer's `TrainJob`s (sae, opt, stats); `meta` the run settings a resume must share."""
    tensors: dict[str, Tensor] = {"rng/torch": torch.get_rng_state()}
    for job in jobs:
        for name, t in job.sae.state_dict().items():
            tensors[f"{job.name}/sae/{name}"] = t.detach().cpu()
        names = {id(p): n for n, p in job.sae.named_parameters()}
        for group in job.opt.param_groups:
            for p in group["params"]:
                for key, value in job.opt.state.get(p, {}).items():
                    tensors[f"{job.name}/opt/{names[id(p)]}/{key}"] = torch.as_tensor(value).cpu()
        tensors[f"{job.name}/tokens_since_fired"] = job.stats.tokens_since_fired.cpu()
        tensors[f"{job.name}/recent_fires"] = job.stats.recent_fires.cpu()
    info = {**meta, "step": step, "format": 2,
            "jobs": {job.name: {"resume": resume_view(job.sae), "recent_tokens": job.stats.recent_tokens,
                                "scales": [job.sae.input_scale, job.sae.target_scale],
                                "encoder_bf16": getattr(job.sae.hyper, "encoder_bf16", None),
                                "fast": getattr(job.sae.hyper, "fast", None)} for job in jobs}}
    atomic_save_tensors(path, tensors, metadata={"saekit": json.dumps(info)})


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint resumes at, or None when there is none."""
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:
        return int(json.loads((fh.metadata() or {})["saekit"])["step"])


# Why a difference in what the batches are drawn from matters, for the refusal message.
_DATA_NOTES = {"source": "the batches come from elsewhere (train.source)",
               "corpus": "the train tokens differ: another corpus, or other corpus settings",
               "hooks": "the set of hooks captured differs", "model": "another model",
               "streams": "the data order depends on the number of processes; resume with the same number"}


def _data_differences(then: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """What the batches are drawn from; a checkpoint of an older saekit (no record) is not compared."""
    if then is None:
        return []
    now = now or {}
    keys = [k for k in {**then, **now} if then.get(k) != now.get(k)]
    return [f"data.{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}"
            + (f" ({_DATA_NOTES[k]})" if k in _DATA_NOTES else "") for k in keys]


def _differences(info: dict[str, Any], jobs: list[Any], meta: dict[str, Any]) -> list[str]:
    diffs = [f"train.{k}: checkpoint {info.get(k)!r}, config {v!r}" for k, v in meta.items()
             if k != "data" and info.get(k) != v]
    diffs += _data_differences(info.get("data"), meta.get("data"))
    saved = info["jobs"]
    for job in jobs:
        if job.name not in saved:
            diffs.append(f"SAE '{job.name}' is not in the checkpoint (it has {', '.join(saved)})")
            continue
        then = saved[job.name]["resume"]
        diffs += [f"{job.name}.{k}: checkpoint {then.get(k)!r}, config {v!r}"
                  for k, v in resume_view(job.sae).items() if then.get(k) != v]
    return diffs


def _reuse_kernel_choice(job: Any, saved: dict[str, Any]) -> None:
    """A timed kernel choice (fast or encoder_bf16 None) is taken from the checkpoint; a value set in the config
    wins."""
    for key in ("fast", "encoder_bf16"):
        choice = saved.get(key)
        if choice is not None and getattr(job.sae.hyper, key, False) is None:
            job.sae.hyper = dataclasses.replace(job.sae.hyper, **{key: choice})


def load_checkpoint(path: Path, jobs: list[Any], meta: dict[str, Any]) -> int:
    """Restore state into `jobs`; refuses when what matters differs. Returns the next step."""
    with safe_open(str(path), "pt") as fh:
        info = json.loads((fh.metadata() or {})["saekit"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if info.get("format") != 2:
        raise SaekitError(f"{path} was written by an older saekit; start over with `saekit train --overwrite`")
    diffs = _differences(info, jobs, meta)
    if diffs:
        raise SaekitError(f"cannot resume from {path}: the config changed in ways that matter: {'; '.join(diffs)}. "
                          "Restore those settings, or start over without --resume (with --overwrite).")
    for job in jobs:
        sid, saved = job.name, info["jobs"][job.name]
        job.sae.set_scales(*saved["scales"])
        _reuse_kernel_choice(job, saved)
        job.sae.load_state_dict({k.split("/sae/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{sid}/sae/")})
        for name, p in job.sae.named_parameters():
            state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{sid}/opt/{name}/")}
            if state:
                job.opt.state[p] = {k: (v if k != "step" else v.float()) for k, v in state.items()}
        job.stats.tokens_since_fired.copy_(tensors[f"{sid}/tokens_since_fired"])
        job.stats.recent_fires.copy_(tensors[f"{sid}/recent_fires"])
        job.stats.recent_tokens = saved["recent_tokens"]
    torch.set_rng_state(tensors["rng/torch"])
    return int(info["step"])
