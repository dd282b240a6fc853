"""TopK SAE training speed and quality: saekit vs SAE-Lens vs EleutherAI sparsify, in one process (issue #3).

What is compared. Three trainers fit a TopK SAE (d_sae = expansion x d, k latents per token) to the
same cached activations (default: SmolLM2-135M `blocks.6.hook_mlp_out`, d=576, 8x = 4,608 latents,
k=32), or with `--synthetic D` to activations with planted sparse features (e.g. the GPU sizes
d=2048, 32x, k=64, batch 8192), with the same batches in the same order, the same token budget and
seed, the same optimizer implementation (`--optimizer`, default torch's fused Adam for all three,
betas 0.9/0.999; `each-default` gives saekit its fused Adam and the peers plain Adam, as their own
loops do, and the JSON then says `"same_optimizer": false`), the same base lr and lr schedule
(saekit's: linear warm-up, constant, linear decay to zero over the last share of steps), the same
dead-latent window and AuxK weight, and the same input normalisation (every activation multiplied
by the one scalar that brings the mean norm to sqrt(d), as saekit's trainer does; it is applied
once, up front, to the tensors all three receive):

- saekit: `sae.saes.build_sae(SAEShape(...), TopKConfig(...))`, fast sparse path (the default), and the
  per-step sequence of `sae/trainer.py`: finite checks, `training_step`, backward,
  `remove_parallel_grad_`, Adam step, `zero_grad`, `normalize_decoder_`, dead-latent counters. The
  table's footer prints which encoder path it took (sparse kernels with a bf16 or fp32 encoder matmul).
- SAE-Lens: `TopKTrainingSAE` with its defaults (fp32, no autocast, decoder norm 0.1 and
  `rescale_acts_by_decoder_norm`, b_dec at zero), stepped as SAE-Lens's `SAETrainer._train_step`
  does: `training_forward_pass(TrainStepInput(...))`, its firing statistics, backward,
  `clip_grad_norm_(1.0)`, Adam step, `zero_grad`.
- eai-sparsify: `SparseCoder` (its fused encoder: relu, top-k, index_add_ backward), stepped as
  sparsify's `Trainer` does for the FVU loss: unit-norm decoder, forward with the dead mask,
  fvu + auxk_alpha * auxk, backward, `remove_gradient_parallel_to_decoder_directions`, Adam step,
  `zero_grad`, dead-latent counters; b_dec starts at the first batch's mean, as sparsify does.
  On CUDA with Triton it decodes with its Triton embedding-bag (the footer says which). Skipped with
  a note when `sparsify` is not installed (`pip install eai-sparsify`); SAE-Lens likewise.

Each tool keeps its own weight initialisation (that is part of the tool); all are seeded alike.

How it is timed. The batches are read from the cache once, into memory, before anything is timed
(cycled when the budget needs more), so the figures compare training steps, not I/O. Steps run in
chunks that alternate between the trainers (the order rotates each round), so background load on
a shared machine hits all of them alike; tokens/s is the median over a trainer's chunks (the first
chunk, warm-up, is left out when there are several). Quality is measured afterwards on held-out
rows never used for training (the last `--held-out` rows of the cache): FVU = sum of squared errors
/ sum of squared deviations from the held-out mean, and L0 = mean number of non-zero latents.

Roofline: the encoder matmul `x @ W_enc` (fp32, and bf16 with x cast) alone, as tokens/s, timed as two
more "trainers" in the same rotation of chunks (so the same load hits it); saekit's tokens/s is
reported as a fraction of the bf16 one (`roofline_fraction` in the JSON). That is the forward
encoder matmul only, a bound no step that computes every pre-activation can beat.

On a CPU shared with other jobs, give `--threads` the number of cores that are actually free:
with more OpenMP threads than free cores, each parallel op waits for a preempted worker, which
costs the sparse path (many small ops) far more than the dense ones (few large matmuls); the
table's footer prints the load average so a reader can tell.

`--profile` also times saekit's step phase by phase (forward, backward, parallel-gradient removal,
Adam, zero_grad, decoder renorm, bookkeeping), lists the heaviest operators from torch.profiler,
compares Adam implementations, and reports how many latents a batch touches (the ceiling on what a
sparse-aware optimiser step could skip).

    python scripts/bench_train.py                                   # runs/bench cache, 2M tokens
    python scripts/bench_train.py --tokens 1000000 --json bench.json --profile
    python scripts/bench_train.py --synthetic 2048 --expansion 32 --k 64 --batch-size 8192   # GPU sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae.cache import CacheReader
from sae.errors import SaekitError
from sae.saes import SAE, SAEShape, TopKConfig, build_sae
from sae.trainer import activation_scale, lr_at
from sae.training_data import reader_sample

DEFAULT_CACHE = Path("runs/bench/cache/blocks.6.hook_mlp_out")
BUILD_CMD = "saekit cache --set name=bench --set corpus.max_sequences=2000"
NAMES = ("saekit", "sae-lens", "eai-sparsify")


# ---------------------------------------------------------------------------------------------
# Data


class Data(NamedTuple):
    batches: list[Tensor]  # [batch, d] each, already scaled, on the device
    held_out: Tensor  # [n, d] scaled, never trained on
    scale: float


def load_data(cache: Path, batch_size: int, max_batches: int, held_out: int, seed: int, device: torch.device) -> Data:
    """Read up to `max_batches` shuffled training batches and the last `held_out` rows, scaled once."""
    if not (cache / "manifest.json").is_file():
        raise SaekitError(f"no activation cache at {cache}. Build the default benchmark cache with `{BUILD_CMD}` "
                          "(writes runs/bench/cache/blocks.6.hook_mlp_out, ~250k rows), or pass --cache PATH")
    reader = CacheReader(cache)
    n_train = reader.n_rows - held_out
    if held_out <= 0 or n_train < batch_size:
        raise SaekitError(f"the cache at {cache} has {reader.n_rows} rows: too few for --held-out {held_out} plus "
                          f"one batch of {batch_size}. Build a bigger one with `{BUILD_CMD}`")
    scale = activation_scale(reader_sample(reader, 32768))
    n_batches = min(max_batches, n_train // batch_size)
    rows = np.random.default_rng(seed).permutation(n_train)[:n_batches * batch_size]
    x = reader.activations(rows) * scale
    batches = [b.to(device).contiguous() for b in x.split(batch_size)]
    held = reader.activations(np.arange(n_train, reader.n_rows)) * scale
    return Data(batches, held.to(device), scale)


def synthetic_data(d: int, k: int, batch_size: int, max_batches: int, held_out: int, seed: int,
                   device: torch.device) -> Data:
    """Activations with planted sparse features: 8*d random unit directions, Zipf-like firing rates, k/2
    of them per token with positive magnitudes, plus 5% noise. Generated on the device, scaled once."""
    gen = torch.Generator(device).manual_seed(seed)
    n_true, k_true = 8 * d, max(k // 2, 1)
    atoms = torch.nn.functional.normalize(torch.randn(n_true, d, generator=gen, device=device), dim=1)
    rates = torch.arange(1, n_true + 1, device=device, dtype=torch.float32).pow(-0.7)

    def sample(n: int) -> Tensor:
        idx = torch.multinomial(rates, n * k_true, replacement=True, generator=gen).view(n, k_true)
        mags = 0.5 + torch.rand(n, k_true, generator=gen, device=device) * 2
        x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=mags, mode="sum")
        return x + 0.05 * x.norm(dim=1, keepdim=True) / math.sqrt(d) * torch.randn(n, d, generator=gen, device=device)

    batches = [sample(batch_size) for _ in range(max_batches)]
    scale = activation_scale(batches[0])
    return Data([b.mul_(scale) for b in batches], sample(held_out).mul_(scale), scale)


# ---------------------------------------------------------------------------------------------
# Trainers: one step each, exactly as the tool's own loop takes it


class Schedule(NamedTuple):
    lr: float
    total_steps: int
    warmup: int
    decay_fraction: float

    def at(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.lr, self.warmup, self.decay_fraction)


ADAM_KINDS = ("fused", "foreach")


def adam(params: list[torch.nn.Parameter], lr: float, kind: str) -> torch.optim.Adam:
    """torch's Adam (betas 0.9/0.999): `fused` (one kernel per tensor) where this device has it, else foreach."""
    if kind == "fused":
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
        except RuntimeError:
            pass
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), foreach=True)


def optimizer_kinds(choice: str) -> dict[str, str]:
    """Adam implementation per trainer: one for all, or each tool's own default."""
    if choice == "each-default":
        return {"saekit": "fused", "sae-lens": "foreach", "eai-sparsify": "foreach"}
    return dict.fromkeys(NAMES, choice)


class Settings(NamedTuple):
    d: int
    expansion: int
    k: int
    batch_size: int
    seed: int
    aux_k_coef: float
    dead_after_tokens: int
    scale: float
    device: torch.device
    adam: dict[str, str]  # Adam implementation per trainer name


class Trainer:
    name: str

    def step(self, x: Tensor, step: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction, number of non-zero latents per token)."""
        raise NotImplementedError


class SaekitTrainer(Trainer):
    """sae/trainer.py's per-step sequence for one TopK SAE on the fast sparse path."""

    name = "saekit"

    def __init__(self, s: Settings, sched: Schedule, first: Tensor, fast: bool = True) -> None:
        self.s, self.sched = s, sched
        shape = SAEShape(d_in=s.d, d_sae=s.expansion * s.d)
        torch.manual_seed(s.seed)
        hyper = TopKConfig(k=s.k, aux_k_coef=s.aux_k_coef, fast=fast)
        self.sae: SAE = build_sae(shape, hyper, seed=s.seed).to(s.device)
        self.sae.set_scales(s.scale)
        self.sae.init_b_dec(first)  # trainer.py: the data's mean (of scaled activations)
        self.opt = adam(list(self.sae.parameters()), sched.lr, s.adam[self.name])
        self.tokens_since_fired = torch.zeros(shape.d_sae, dtype=torch.int64, device=s.device)

    def step(self, x: Tensor, step: int, timer: Callable[[str], None] | None = None) -> None:
        mark = timer or (lambda _: None)
        if not torch.isfinite(x).all():
            raise SaekitError(f"step {step}: non-finite batch")
        for group in self.opt.param_groups:
            group["lr"] = self.sched.at(step)
        dead = self.tokens_since_fired >= self.s.dead_after_tokens
        mark("setup")
        out = self.sae.training_step(x, x, dead_mask=dead)
        if not torch.isfinite(out.loss):
            raise SaekitError(f"step {step}: saekit loss is not finite")
        mark("forward")
        out.loss.backward()
        mark("backward")
        self.sae.remove_parallel_grad_()
        mark("remove_parallel_grad_")
        self.opt.step()
        mark("adam step")
        self.opt.zero_grad(set_to_none=True)
        mark("zero_grad")
        self.sae.normalize_decoder_()
        mark("normalize_decoder_")
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired[out.fire_counts > 0] = 0
        mark("bookkeeping")

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acts = self.sae.encode(x)
        return self.sae.decode(acts), (acts > 0).sum(-1)


class SAELensTrainer(Trainer):
    """SAE-Lens's `SAETrainer._train_step` for `TopKTrainingSAE`, with our schedule set on Adam."""

    name = "sae-lens"

    def __init__(self, s: Settings, sched: Schedule) -> None:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        self.TrainStepInput = TrainStepInput
        self.s, self.sched = s, sched
        cfg = TopKTrainingSAEConfig(d_in=s.d, d_sae=s.expansion * s.d, k=s.k, aux_loss_coefficient=s.aux_k_coef,
                                    dtype="float32", device=str(s.device))
        torch.manual_seed(s.seed)
        self.sae = TopKTrainingSAE(cfg).to(s.device)
        self.opt = adam(list(self.sae.parameters()), sched.lr, s.adam[self.name])
        d_sae = cfg.d_sae
        self.dead_window = math.ceil(s.dead_after_tokens / s.batch_size)  # SAE-Lens counts steps, not tokens
        self.n_forward_passes_since_fired = torch.zeros(d_sae, device=s.device)
        self.act_freq_scores = torch.zeros(d_sae, device=s.device)

    def step(self, x: Tensor, step: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.sched.at(step)
        self.sae.train()
        out = self.sae.training_forward_pass(step_input=self.TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=(self.n_forward_passes_since_fired > self.dead_window).bool(),
            n_training_steps=step, is_logging_step=False))
        with torch.no_grad():
            firing_feats = out.feature_acts.bool().float()
            did_fire = firing_feats.sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            self.n_forward_passes_since_fired += 1
            self.n_forward_passes_since_fired[did_fire] = 0
            self.act_freq_scores += firing_feats.sum(0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.sae.eval()
        acts = self.sae.encode(x)
        return self.sae.decode(acts), (acts > 0).sum(-1)


class SparsifyTrainer(Trainer):
    """sparsify's `Trainer` step for a `SparseCoder` on the FVU loss, with our schedule set on Adam."""

    name = "eai-sparsify"

    def __init__(self, s: Settings, sched: Schedule) -> None:
        SparseCoder, SparseCoderConfig = import_sparsify()
        self.s, self.sched = s, sched
        cfg = SparseCoderConfig(activation="topk", expansion_factor=s.expansion, k=s.k, normalize_decoder=True)
        torch.manual_seed(s.seed)
        self.sae = SparseCoder(s.d, cfg, device=s.device, dtype=torch.float32)
        self.opt = adam(list(self.sae.parameters()), sched.lr, s.adam[self.name])
        self.num_tokens_since_fired = torch.zeros(self.sae.num_latents, dtype=torch.long, device=s.device)
        self.started = False

    def step(self, x: Tensor, step: int) -> None:
        sae = self.sae
        for group in self.opt.param_groups:
            group["lr"] = self.sched.at(step)
        if not self.started:  # sparsify: b_dec starts at the first batch's mean
            sae.b_dec.data = x.mean(0).to(sae.dtype)
            self.started = True
        sae.set_decoder_norm_to_unit_norm()
        dead = self.num_tokens_since_fired > self.s.dead_after_tokens
        out = sae(x=x, y=x, dead_mask=dead)
        did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=x.device)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + self.s.aux_k_coef * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            self.num_tokens_since_fired += x.shape[0]
            self.num_tokens_since_fired[did_fire] = 0

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        top_acts, top_indices, _ = self.sae.encode(x)
        return self.sae.decode(top_acts, top_indices), (top_acts > 0).sum(-1)


def import_sparsify() -> tuple[Any, Any]:
    """sparsify's SparseCoder and its config. The package's __init__ also imports its trainer (datasets,
    schedulefree, ...), which a bare GPU machine lacks and the coder does not need: then the two modules
    are loaded under an empty package instead."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            raise
        package = types.ModuleType("sparsify")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["sparsify"] = package
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder

        package.SparseCoder, package.SparseCoderConfig = SparseCoder, SparseCoderConfig  # type: ignore[attr-defined]
    return SparseCoder, SparseCoderConfig


def sparsify_available() -> bool:
    try:
        import_sparsify()
    except ImportError:
        return False
    return True


def sae_lens_available() -> bool:
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        return False
    return True


def sparsify_decoder() -> str:
    """Which decode sparsify picked at import: its Triton embedding-bag (CUDA with Triton) or plain torch."""
    module = sys.modules.get("sparsify.utils")
    return getattr(getattr(module, "decoder_impl", None), "__name__", "unknown")


def encoder_path(sae: SAE) -> str:
    """The encoder path saekit's trainer takes for this SAE, in words."""
    if not getattr(sae.hyper, "fast", False):
        return "dense autograd, fp32"
    return f"sparse kernels, {'bf16' if sae._use_bf16() else 'fp32'} encoder matmul (fp32 master weights)"


# ---------------------------------------------------------------------------------------------
# Timing and evaluation


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_interleaved(trainers: list[Trainer], batches: list[Tensor], total_steps: int, chunk_steps: int,
                      device: torch.device, progress: bool = True) -> dict[str, list[float]]:
    """Every trainer takes the same `total_steps` steps; chunks alternate between trainers (rotating which
    goes first each round). Returns each trainer's tokens/s per chunk."""
    rates: dict[str, list[float]] = {t.name: [] for t in trainers}
    n_rounds = -(-total_steps // chunk_steps)
    t_start = time.perf_counter()
    for r in range(n_rounds):
        lo, hi = r * chunk_steps, min(total_steps, (r + 1) * chunk_steps)
        for i in range(len(trainers)):
            t = trainers[(r + i) % len(trainers)]
            sync(device)
            start = time.perf_counter()
            for step in range(lo, hi):
                t.step(batches[step % len(batches)], step)
            sync(device)
            rates[t.name].append((hi - lo) * batches[0].shape[0] / (time.perf_counter() - start))
        if progress:
            now = ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items())
            print(f"  steps {hi}/{total_steps} ({time.perf_counter() - t_start:.0f}s): tokens/s {now}",
                  file=sys.stderr, flush=True)
    return rates


def median_rate(chunk_rates: list[float]) -> float:
    return statistics.median(chunk_rates[1:] if len(chunk_rates) > 2 else chunk_rates)


@torch.no_grad()
def held_out_quality(trainer: Trainer, x: Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(FVU, L0) over all of x, in chunks."""
    sq_err, l0 = 0.0, 0.0
    for part in x.split(chunk):
        recon, nnz = trainer.reconstruct(part)
        sq_err += (recon.float() - part).pow(2).sum().item()
        l0 += nnz.float().sum().item()
    total_var = (x - x.mean(0)).pow(2).sum().item()
    return sq_err / total_var, l0 / x.shape[0]


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` synchronised calls after `warmup` untimed ones (shared with device_check)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class MatmulProbe(Trainer):
    """The roofline: a step that is only the forward encoder matmul x @ W_enc (fp32, or bf16 with x cast),
    timed in the same rotation as the trainers, so the same load hits it and them."""

    def __init__(self, W_enc: Tensor, bf16: bool) -> None:
        self.name = f"{'bf16' if bf16 else 'fp32'} matmul"
        self.bf16, self.W = bf16, W_enc.detach().bfloat16() if bf16 else W_enc.detach().clone()

    def step(self, x: Tensor, step: int) -> None:
        (x.bfloat16() if self.bf16 else x) @ self.W


# ---------------------------------------------------------------------------------------------
# Profile of saekit's step


def profile_saekit(s: Settings, sched: Schedule, batches: list[Tensor], steps: int, warm_steps: int) -> None:
    """Phase timers, torch.profiler's heaviest ops, Adam variants, and how many latents a batch touches.

    The SAE is first trained `warm_steps` steps so that the profile sees a mid-training state
    (dead latents, hence AuxK, included)."""
    device = s.device
    t = SaekitTrainer(s, sched, batches[0])
    for step in range(warm_steps):
        t.step(batches[step % len(batches)], step)

    phases: dict[str, list[float]] = {}
    last = [0.0]

    def mark(name: str) -> None:
        sync(device)
        now = time.perf_counter()
        phases.setdefault(name, []).append(now - last[0])
        last[0] = now

    for step in range(warm_steps, warm_steps + steps):
        sync(device)
        last[0] = time.perf_counter()
        t.step(batches[step % len(batches)], step, timer=mark)
    total = sum(statistics.median(v) for v in phases.values())
    print(f"\nsaekit step, phase by phase (median of {steps} steps after {warm_steps} warm-up steps; "
          f"dead latents now: {int((t.tokens_since_fired >= s.dead_after_tokens).sum())}):")
    for name, v in phases.items():
        med = statistics.median(v)
        print(f"  {name:<22} {med * 1e3:8.1f} ms  {100 * med / total:5.1f}%")
    print(f"  {'total':<22} {total * 1e3:8.1f} ms  -> {s.batch_size / total:,.0f} tokens/s")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    base = warm_steps + steps
    with profile(activities=activities) as prof:
        for step in range(base, base + min(steps, 5)):
            t.step(batches[step % len(batches)], step)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\ntorch.profiler, {min(steps, 5)} saekit steps, top operators by self time:")
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48))

    # Adam: the default (foreach) step vs fused, on the same parameters with live gradients.
    x = batches[0]
    out = t.sae.training_step(x, x, dead_mask=t.tokens_since_fired >= s.dead_after_tokens)
    out.loss.backward()
    touched = int((out.fire_counts > 0).sum())
    grads = {n: p.grad.clone() for n, p in t.sae.named_parameters()}
    n_params = sum(p.numel() for p in t.sae.parameters())
    results = {}
    for label, kwargs in (("foreach (default)", {"foreach": True}), ("fused", {"fused": True}),
                          ("for-loop", {"foreach": False})):
        try:
            params = [p.detach().clone().requires_grad_() for p in t.sae.parameters()]
            for p, g in zip(params, grads.values(), strict=True):
                p.grad = g.clone()
            opt = torch.optim.Adam(params, lr=1e-4, **kwargs)
            results[label] = median_time(opt.step, device, 9)
        except (RuntimeError, TypeError) as exc:
            print(f"  Adam {label}: not available here ({exc})")
    print(f"\nAdam step over {n_params:,} parameters (median of 9):")
    for label, sec in results.items():
        print(f"  {label:<18} {sec * 1e3:7.1f} ms")
    print(f"latents with a non-zero gradient in one batch of {s.batch_size}: {touched} of {s.expansion * s.d} "
          f"({100 * touched / (s.expansion * s.d):.1f}%); a row-sparse optimiser step could skip at most the rest")
    t.opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Main


def build_trainers(args: argparse.Namespace, data: Data) -> tuple[Settings, Schedule, list[Trainer]]:
    """saekit, and each peer that is installed and not skipped, set up alike."""
    device, (batch_size, d) = data.batches[0].device, data.batches[0].shape
    total_steps = args.tokens // batch_size
    if total_steps == 0:
        raise SaekitError(f"--tokens {args.tokens} is smaller than one batch ({batch_size})")
    s = Settings(d=d, expansion=args.expansion, k=args.k, batch_size=batch_size, seed=args.seed,
                 aux_k_coef=args.aux_k_coef, dead_after_tokens=args.dead_after_tokens, scale=data.scale,
                 device=device, adam=optimizer_kinds(args.optimizer))
    sched = Schedule(args.lr, total_steps, args.warmup_steps, args.decay_fraction)
    trainers: list[Trainer] = [SaekitTrainer(s, sched, data.batches[0])]
    for name, available, cls in (("sae-lens", sae_lens_available, SAELensTrainer),
                                 ("eai-sparsify", sparsify_available, SparsifyTrainer)):
        if name in args.skip:
            continue
        if available():
            trainers.append(cls(s, sched))
        else:
            print(f"note: {name} is not installed; skipping it (pip install {name})", file=sys.stderr)
    return s, sched, trainers


def run(args: argparse.Namespace, data: Data) -> dict[str, Any]:
    """Train every available trainer on `data`, print the table and target line, return the figures."""
    s, sched, trainers = build_trainers(args, data)
    device, total_steps = s.device, sched.total_steps
    print(f"{len(data.batches)} batches of {s.batch_size} x {s.d} in memory (scale {data.scale:.4f}), "
          f"{data.held_out.shape[0]} held-out rows; {total_steps} steps = {total_steps * s.batch_size:,} tokens each; "
          f"d_sae {args.expansion * s.d}, k {args.k}, lr {args.lr}, device {device}, threads {torch.get_num_threads()}",
          file=sys.stderr)
    probes = [MatmulProbe(trainers[0].sae.W_enc, bf16) for bf16 in (False, True)]  # type: ignore[attr-defined]
    load_before = os.getloadavg()[0]
    rates = train_interleaved(trainers + probes, data.batches, total_steps, args.chunk_steps, device,
                              progress=args.progress)
    load_after = os.getloadavg()[0]
    figures: dict[str, Any] = {"tokens_per_s": {}, "fvu": {}, "l0": {}}
    for t in trainers:
        fvu, l0 = held_out_quality(t, data.held_out)
        figures["tokens_per_s"][t.name] = median_rate(rates[t.name])
        figures["fvu"][t.name] = fvu
        figures["l0"][t.name] = l0
    saekit = trainers[0]
    roof = {p.name.split()[0]: median_rate(rates[p.name]) for p in probes}
    same = len({s.adam[t.name] for t in trainers}) == 1
    figures.update(
        roofline_tokens_per_s=roof, roofline_fraction=figures["tokens_per_s"]["saekit"] / roof["bf16"],
        same_optimizer=same, optimizer={t.name: f"torch.optim.Adam({s.adam[t.name]})" for t in trainers},
        encoder_path=encoder_path(saekit.sae),  # type: ignore[attr-defined]
        load_average=[load_before, load_after], device=str(device), threads=torch.get_num_threads())
    if any(t.name == "eai-sparsify" for t in trainers):
        figures["sparsify_decoder"] = sparsify_decoder()
    report(figures)
    if args.profile:
        profile_saekit(s, sched, data.batches, steps=args.profile_steps, warm_steps=min(total_steps, 80))
    return figures


def report(figures: dict[str, Any]) -> None:
    """The table, its footer (load, optimizer, encoder path, roofline) and the target line."""
    tps = figures["tokens_per_s"]
    peers = [n for n in tps if n != "saekit"]
    fastest = max(peers, key=lambda n: tps[n]) if peers else None
    print(f"\n{'method':<14} {'tokens/s':>10} {'held-out FVU':>13} {'L0':>7} {'vs ' + (fastest or 'peer'):>18}")
    for name in tps:
        ratio = f"{tps[name] / tps[fastest]:.2f}x" if fastest else "-"
        print(f"{name:<14} {tps[name]:>10,.0f} {figures['fvu'][name]:>13.4f} {figures['l0'][name]:>7.1f} {ratio:>18}")
    before, after = figures["load_average"]
    print(f"({figures['device']}, {figures['threads']} torch threads; 1-min load average {before:.1f} before, "
          f"{after:.1f} after training, on {os.cpu_count()} cores)")
    opts = sorted(set(figures["optimizer"].values()))
    print("optimizer: " + (f"the same for every trainer, {opts[0]}" if figures["same_optimizer"] else
                           "each tool's default: " + ", ".join(f"{k} {v}" for k, v in figures["optimizer"].items())))
    print(f"saekit encoder path: {figures['encoder_path']}")
    if "sparsify_decoder" in figures:
        print(f"eai-sparsify decoder: {figures['sparsify_decoder']}")
    roof = figures["roofline_tokens_per_s"]
    print(f"\nencoder-matmul roofline (forward x @ W_enc only, timed in the same rotation): fp32 {roof['fp32']:,.0f} "
          f"tokens/s, bf16 {roof['bf16']:,.0f} tokens/s; saekit reaches {figures['roofline_fraction']:.2f} of the "
          "bf16 one (target ≥ 0.5)")
    if fastest:
        diff = figures["fvu"]["saekit"] - figures["fvu"][fastest]
        print(f"saekit / faster peer = {tps['saekit'] / tps[fastest]:.2f}x (target ≥ 4x with the same optimizer), "
              f"FVU saekit - peer = {diff:+.3f} (target ≤ +0.01)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"activation cache folder of one hook (default {DEFAULT_CACHE}; build: {BUILD_CMD})")
    p.add_argument("--synthetic", type=int, metavar="D", default=None,
                   help="train on planted sparse features of width D instead of a cache (no model needed)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per trainer (default 2M)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="base lr (default 3e-3, the default config's)")
    p.add_argument("--warmup-steps", type=int, default=20, help="linear lr warm-up (default config: 20)")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="linear lr decay over this last share")
    p.add_argument("--aux-k-coef", type=float, default=1 / 32, help="AuxK weight, all three (saekit's default)")
    p.add_argument("--dead-after-tokens", type=int, default=250_000, help="dead-latent window, all three")
    p.add_argument("--optimizer", choices=[*ADAM_KINDS, "each-default"], default="fused",
                   help="Adam implementation for every trainer (default fused), or each tool's own default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batches", type=int, default=64, help="distinct batches held in memory (then cycled)")
    p.add_argument("--held-out", type=int, default=16384, help="rows for FVU and L0 only (the cache's last rows)")
    p.add_argument("--chunk-steps", type=int, default=5, help="steps per timed chunk before switching trainer")
    p.add_argument("--skip", nargs="*", default=[], choices=["sae-lens", "eai-sparsify"])
    p.add_argument("--json", type=Path, help="write the figures (tokens_per_s, fvu, l0, roofline, optimizer) here")
    p.add_argument("--profile", action="store_true", help="then profile saekit's step (phases, ops, Adam)")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        if args.synthetic:
            data = synthetic_data(args.synthetic, args.k, args.batch_size, args.max_batches, args.held_out,
                                  args.seed, device)
        else:
            data = load_data(args.cache, args.batch_size, args.max_batches, args.held_out, args.seed, device)
        figures = run(args, data)
    except SaekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
