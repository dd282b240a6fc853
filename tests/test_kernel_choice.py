"""The kernel path left open in the config (`fast: null`, `encoder_bf16: null`) is timed once on the training
device, recorded in the checkpoint and reused on resume (sae/kernel_choice.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sae import kernel_choice
from sae.config import SAESpec, TrainConfig
from sae.saes import TopKConfig, kernels
from sae.sources import tensor_batches
from sae.trainer import build_job, train

HOOK = "blocks.0.mlp.hook_post"


def planted(n: int = 4096) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1)
    return torch.zeros(n, 64).scatter(1, torch.randint(0, 64, (n, 3), generator=gen), 1.0) @ truth


def job_for(acts: torch.Tensor, **hyper):
    spec = SAESpec(hook=HOOK, expansion=4, lr=3e-3, hyper=TopKConfig(k=4, **hyper))
    return build_job(spec, acts[:2048], acts[:2048], [HOOK], model_name="tiny")


def test_sparse_is_faster_times_both_paths_on_copies_and_leaves_the_sae_alone():
    job = job_for(planted(), fast=None)
    before = {k: v.clone() for k, v in job.sae.state_dict().items()}
    assert isinstance(kernel_choice.sparse_is_faster(job.sae, 256), bool)
    assert job.sae.hyper.fast is None and all(torch.equal(v, job.sae.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in job.sae.parameters())


@pytest.mark.parametrize("sparse_wins", [True, False])
def test_an_open_choice_is_timed_once_recorded_and_reused_on_resume(tmp_path, monkeypatch, sparse_wins):
    acts = planted()
    calls = []

    def timed(sae, rows):
        calls.append(rows)
        return sparse_wins

    monkeypatch.setattr(kernel_choice, "sparse_is_faster", timed)
    monkeypatch.setattr(kernels, "bf16_is_faster", lambda device, d_in, d_sae: False)
    cfg = TrainConfig(batch_size=256, total_tokens=256 * 12, lr_warmup_steps=2, log_every_steps=4,
                      checkpoint_every_tokens=256 * 6)
    ckpt = tmp_path / "state.safetensors"
    (trained,) = train([job_for(acts, fast=None)], tensor_batches([acts], 256), cfg, checkpoint=ckpt,
                       progress=False)
    assert calls == [256] and trained.sae.hyper.fast is sparse_wins
    with safe_open(str(ckpt), "pt") as fh:
        saved = json.loads(fh.metadata()["saekit"])["jobs"]
    assert [j["fast"] for j in saved.values()] == [sparse_wins]

    monkeypatch.setattr(kernel_choice, "sparse_is_faster", lambda sae, rows: pytest.fail("timed again on resume"))
    (again,) = train([job_for(acts, fast=None)], tensor_batches([acts], 256), cfg, checkpoint=ckpt, resume=True,
                     progress=False)
    assert again.sae.hyper.fast is sparse_wins
    (fixed,) = train([job_for(acts, fast=True)], tensor_batches([acts], 256), cfg, checkpoint=tmp_path / "b",
                     progress=False)
    assert fixed.sae.hyper.fast is True  # a value set in the config is never timed
