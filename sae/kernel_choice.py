"""The kernel path a training run takes where the config leaves it open, chosen by timing on the device it trains
on: sparse training kernels against plain dense autograd (`fast: null`), then a bf16 against an fp32 encoder
matmul (`encoder_bf16: null`). Rank 0 times, every rank takes its answer, and the checkpoint records both, so
every process and every resume runs one path (the CPU tuning of the sparse kernels says nothing about a GPU)."""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from sae.distributed import broadcast_flag
from sae.saes import SAE, kernels

TIMING_REPEATS = 3


def _step_seconds(sae: SAE, x: torch.Tensor, target: torch.Tensor) -> float:
    """Best of TIMING_REPEATS forward + backward training steps (after one warm-up), synchronised on CUDA."""
    dead = torch.zeros(sae.shape.d_sae, dtype=torch.bool, device=x.device)
    cuda = x.device.type == "cuda"
    best = float("inf")
    for i in range(TIMING_REPEATS + 1):
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        sae.training_step(x, target, sparsity_scale=1.0, dead_mask=dead).loss.backward()
        if cuda:
            torch.cuda.synchronize(x.device)
        if i:
            best = min(best, time.perf_counter() - start)
        sae.zero_grad(set_to_none=True)
    return best


def sparse_is_faster(sae: SAE, rows: int) -> bool:
    """Whether this SAE's sparse training kernels beat dense autograd for a batch of `rows` on its device; each
    path runs on its own copy, so the SAE and its statistics are left as they were."""
    device = sae.W_enc.device
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, sae.shape.d_in, device=device, generator=gen)
    target = torch.randn(rows, sae.shape.d_out, device=device, generator=gen)
    seconds = {}
    for fast in (True, False):
        probe = copy.deepcopy(sae)
        probe.hyper = dataclasses.replace(probe.hyper, fast=fast)
        seconds[fast] = _step_seconds(probe, x, target)
    return seconds[True] <= seconds[False]


def settle_kernels(saes: list[SAE], rows: int, rank: int, world: int) -> None:
    """Fix each SAE's open kernel choices once, before the first step (see the module's docstring)."""
    for sae in saes:
        device = sae.W_enc.device
        if hasattr(sae.hyper, "fast") and sae.hyper.fast is None:
            faster = rank == 0 and sparse_is_faster(sae, rows)
            sae.hyper = dataclasses.replace(sae.hyper, fast=broadcast_flag(faster, world, device))
        if getattr(sae.hyper, "encoder_bf16", False) is not None or not getattr(sae.hyper, "fast", False):
            continue
        faster = rank == 0 and kernels.bf16_is_faster(str(device), sae.shape.d_in, sae.shape.d_sae)
        sae.hyper = dataclasses.replace(sae.hyper, encoder_bf16=broadcast_flag(faster, world, device))
