"""N processes compute what one does: BatchTopK's selection over the global batch, and on-the-fly training.

Run as a script under torchrun (`torchrun --nproc_per_node 2 tests/test_ddp.py`) it checks, on every rank,
that the selection made against the global batch equals one process's selection over the concatenated batch,
and that a timed kernel choice is rank 0's everywhere: the subprocess of the first test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

HERE = Path(__file__).resolve()
ONTHEFLY = HERE.parent / "test_onthefly.py"
POST, OUT = "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
            str(_free_port())]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-10000:]  # the ranks' own errors precede the summary


def _weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {d.name: load_file(str(d / "sae_weights.safetensors")) for d in sorted((run_dir / "saes").iterdir())}


def _assert_same(one: dict, two: dict) -> None:
    assert one.keys() == two.keys() and one
    for sid in one:
        for key in one[sid]:
            torch.testing.assert_close(two[sid][key], one[sid][key], rtol=1e-4, atol=1e-5, msg=f"{sid} {key}")


def test_batchtopk_selection_over_two_processes_is_one_process_selection():
    """bf16 pre-activations (many ties at the cut), skewed batches (one process holds most of the top; the
    sampled rows mislead the estimate): each process keeps exactly its rows' share of one process's choice.
    And the timed kernel choice is made once, on rank 0, for every rank."""
    _run(_torchrun(2) + [str(HERE)])


@pytest.mark.slow
def test_batchtopk_torchrun_two_processes_equal_one(tiny_model, tmp_path):
    """As the TopK DDP test, for BatchTopK (bf16 encoder: pre-activations tie at the cut) and Matryoshka (fp32):
    2 gloo processes each reading half of every global batch train the weights one process trains. (The kernel
    path is pinned: chosen by timing, two separate runs could choose differently.)"""
    from sae.cache import write_cache

    saes = [{"hook": POST, "architecture": "batchtopk", "expansion": 4, "k": 8, "encoder_bf16": True},
            {"hook": OUT, "architecture": "matryoshka", "expansion": 4, "k": 4, "prefixes": [0.25],
             "encoder_bf16": False}]
    tokens = torch.randint(0, 500, (200, 32), generator=torch.Generator().manual_seed(0))
    cli = ["-m", "features.cli", "train", "--config"]
    for name, launcher in (("single", [sys.executable, *cli]), ("ddp", _torchrun(2) + cli)):
        data = {"name": name, "runs_dir": str(tmp_path / "runs"),
                "train": {"batch_size": 256, "total_tokens": 256 * 30, "lr_warmup_steps": 5, "log_every_steps": 5,
                          "dead_after_tokens": 2048, "wandb": False, "saes": saes}}
        write_cache(tiny_model, tokens, [POST, OUT], tmp_path / "runs" / name / "cache", corpus_fingerprint="t",
                    batch_size=50, shard_sequences=25, progress=False)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        _run(launcher + [str(path)])
    _assert_same(_weights(tmp_path / "runs" / "single"), _weights(tmp_path / "runs" / "ddp"))


@pytest.mark.slow
def test_onthefly_torchrun_two_processes_equal_one(tmp_path):
    """Each of 2 processes forwards only its own sequences and yields its half of each global batch; one
    process running both streams trains the same TopK and BatchTopK weights."""
    from test_onthefly import run_data

    saes = [{"hook": POST, "expansion": 4, "k": 8, "encoder_bf16": False},
            {"hook": OUT, "architecture": "batchtopk", "expansion": 4, "k": 4, "encoder_bf16": False}]
    for name, launcher in (("single", [sys.executable]), ("ddp", _torchrun(2))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run_data(tmp_path, name, saes=saes, total_tokens=256 * 30)))
        _run(launcher + [str(ONTHEFLY), str(path), "--streams", "2"])
    _assert_same(_weights(tmp_path / "runs" / "single"), _weights(tmp_path / "runs" / "ddp"))


def _check_selection() -> None:
    """Under torchrun: rank r holds rows [r*n, (r+1)*n) of each batch and must select exactly those of the
    one-process selection; the threshold's global minimum must agree too."""
    from sae.distributed import GlobalBatch, dist_info, leave
    from sae.saes import kernels

    rank, world = dist_info()
    group = GlobalBatch()
    gen = torch.Generator().manual_seed(0)
    cases = {"ties": (torch.randn(64, 512, generator=gen) * 0.5).bfloat16(),
             "one process holds the top": torch.randn(64, 512, generator=gen),
             "sampled rows mislead": torch.randn(64, 512, generator=gen)}
    cases["one process holds the top"][32:] += 4
    cases["sampled rows mislead"][::4] += 10
    n = 64 // world
    for name, pre in cases.items():
        crow, cols = kernels.batchtopk_pattern(pre, 4)
        whole = torch.zeros_like(pre, dtype=torch.bool)
        whole[kernels._rows(crow), cols] = True
        mine = pre[rank * n:(rank + 1) * n]
        with kernels.global_batch(group):
            crow, cols = kernels.batchtopk_pattern(mine, 4)
            smallest = kernels.global_min(mine[mine > 1].flatten() if rank else mine[:0].flatten())
        got = torch.zeros_like(mine, dtype=torch.bool)
        got[kernels._rows(crow), cols] = True
        assert torch.equal(got, whole[rank * n:(rank + 1) * n]), f"{name}: rank {rank} selected other latents"
        assert int(whole.sum()) == 4 * 64, name
        top = pre[n:][pre[n:] > 1].min()
        assert smallest is not None and float(smallest) == float(top), name
    _check_kernel_choice(rank, world)
    leave(world)


def _check_kernel_choice(rank: int, world: int) -> None:
    """Kernel paths chosen by timing (sparse vs dense, bf16 vs fp32 encoder) are rank 0's choices on every rank
    (only rank 0 times them)."""
    from sae import kernel_choice
    from sae.saes import SAEShape, TopKConfig, build_sae, kernels

    kernel_choice.sparse_is_faster = lambda sae, rows: rank == 0  # were each rank to time, they would differ
    kernels.bf16_is_faster = lambda device, d_in, d_sae: rank == 0
    sae = build_sae(SAEShape(d_in=8, d_sae=32), TopKConfig(k=2, fast=None))
    kernel_choice.settle_kernels([sae], 64, rank, world)
    assert sae.hyper.fast is True, f"rank {rank} took another decoder path than rank 0"
    assert sae.hyper.encoder_bf16 is True, f"rank {rank} took another encoder path than rank 0"


if __name__ == "__main__":
    _check_selection()
