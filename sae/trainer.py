"""The training loop: one stream of activation batches trains every SAE of a run.

`train(jobs, batches, cfg)` knows no paths and no run: `jobs` are the SAEs with their optimisers,
`batches(start)` yields each global batch (one tensor per hook) from any source (the disk cache, the
model on the fly, a tensor in a notebook). Reads top to bottom: restore, then for each batch take
every SAE one Adam step. Under `torchrun` each rank reads its own rows of each global batch and
gradients are averaged, so N processes compute what one would with the same global batch: BatchTopK
selects against the global batch (`kernels.global_batch`), and a kernel path chosen by timing is chosen
once, on rank 0, and kept in the checkpoint for a resume.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae.checkpoint import load_checkpoint, save_checkpoint
from sae.config import SAESpec, TrainConfig
from sae.distributed import all_mean_, all_sum_, dist_info, global_batch_group, leave
from sae.errors import SaekitError
from sae.kernel_choice import settle_kernels
from sae.saes import SAE, Provenance, SAEShape, build_sae, kernels

Batches = Callable[[int], Iterator[list[Tensor]]]  # start batch -> global batches, one tensor per hook


class MetricsSink(Protocol):
    def open(self, resume_step: int) -> None: ...
    def write(self, rows: list[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


@dataclass
class FiringStats:
    """Per-latent firing counts: dead-latent detection (AuxK) and the exported sparsity."""

    tokens_since_fired: Tensor  # [d_sae] int64
    recent_fires: Tensor  # [d_sae] int64 fire counts over the final phase
    recent_tokens: int = 0


@dataclass
class TrainJob:
    """One SAE being trained: which tensors of each batch it reads and reconstructs, and its optimiser."""

    name: str
    sae: SAE
    lr: float
    in_idx: int = 0  # index of its input hook in each batch
    out_idx: int = 0  # index of its target hook in each batch
    opt: torch.optim.Adam = field(init=False)
    stats: FiringStats = field(init=False)

    def __post_init__(self) -> None:
        self.opt = make_optimizer(list(self.sae.parameters()), self.lr)
        zeros = torch.zeros(self.sae.shape.d_sae, dtype=torch.int64, device=self.sae.W_enc.device)
        self.stats = FiringStats(zeros.clone(), zeros.clone())


class Trained(NamedTuple):
    name: str
    sae: SAE  # scaling not yet folded: formats.save_sae folds it
    firing_frequency: Tensor  # [d_sae] over the final phase of training


def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 2**14)


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam (betas 0.9/0.999), fused where torch has the kernel: one pass per parameter instead of
    foreach's chain of elementwise ops, about 5x faster on CPU for an SAE's few large tensors."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
    except RuntimeError:  # a device without a fused kernel
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def activation_scale(sample: Tensor) -> float:
    """Scalar that brings the mean activation norm of `sample` [n, d] to sqrt(d)."""
    norms = sample.float().norm(dim=1)
    norms = norms[torch.isfinite(norms)]
    if norms.numel() == 0 or norms.mean() <= 0:
        raise SaekitError("the training data holds no finite, non-zero activations; rebuild the cache")
    return math.sqrt(sample.shape[1]) / norms.mean().item()


def build_job(spec: SAESpec, sample_in: Tensor, sample_out: Tensor, hooks: list[str], model_name: str = "",
              seed: int = 0, device: str = "cpu") -> TrainJob:
    """An SAE for `spec` sized, scaled and centred from samples of its input and target activations."""
    transcoder = spec.target_hook is not None
    shape = SAEShape(d_in=sample_in.shape[1], d_sae=spec.expansion * sample_in.shape[1], d_out=sample_out.shape[1],
                     is_transcoder=transcoder)
    sae = build_sae(shape, spec.hyper, Provenance(model_name, spec.hook, spec.target_hook), seed).to(device)
    s_in = activation_scale(sample_in)
    s_out = activation_scale(sample_out) if transcoder else s_in
    sae.set_scales(s_in, s_out)
    finite = sample_out[torch.isfinite(sample_out).all(dim=1)]
    sae.init_b_dec(finite.to(device).float() * s_out)
    return TrainJob(spec.sae_id, sae, spec.lr or default_lr(shape.d_sae), hooks.index(spec.hook),
                    hooks.index(spec.target_hook or spec.hook))


def lr_at(step: int, total: int, base: float, warmup: int, decay_fraction: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step >= decay_start and decay_fraction > 0:
        return base * max(0.0, (total - step) / (total - decay_start))
    return base


def prefetch(stream: Iterator[Any], depth: int = 3) -> Iterator[Any]:
    """Read the next batches on a thread while the current one trains (gathers and forward passes release
    the GIL). Closing the returned generator stops the thread and waits for it, so a source that runs the
    model is done with it when training returns."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in stream:
                if not put(item):
                    return
            put(SaekitError("the batch source ended before training did; give it at least "
                            "train.total_tokens / train.batch_size batches"))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, daemon=True, name="saekit-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _nan_error(step: int, what: str, checkpoint: Path | None) -> SaekitError:
    kept = (f"the last good checkpoint {checkpoint} is intact" if checkpoint and checkpoint.is_file()
            else "no checkpoint was written yet")
    return SaekitError(f"step {step}: NaN or Inf in the {what}; training stopped and {kept}. Check the data "
                       "(rebuild the cache with `saekit cache --overwrite`) or lower the learning rate, then rerun.")


def _start_step(jobs: list[TrainJob], meta: dict[str, Any], checkpoint: Path | None, resume: bool,
                overwrite: bool) -> int:
    if checkpoint is None:
        return 0
    if resume:
        if not checkpoint.is_file():
            raise SaekitError(f"--resume: no checkpoint at {checkpoint}; run `saekit train` without --resume")
        return load_checkpoint(checkpoint, jobs, meta)
    if checkpoint.is_file() and not overwrite:
        raise SaekitError(f"{checkpoint} exists from an earlier training run; pass --resume to continue it "
                          "or --overwrite to start again")
    return 0


def _meta(cfg: TrainConfig, data: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"batch_size": cfg.batch_size, "seed": cfg.seed, "total_tokens": cfg.total_tokens}
    return meta if data is None else {**meta, "data": data}


class _Loop(NamedTuple):
    """Per-run constants of the loop, so each step function takes few arguments."""

    cfg: TrainConfig
    total_steps: int
    final_phase: int
    world: int
    rank: int
    checkpoint: Path | None


def _step(job: TrainJob, batch: list[Tensor], step: int, loop: _Loop) -> dict[str, Any] | None:
    """One Adam step of one SAE; returns its log row on logging steps (rank 0)."""
    tc, sae = loop.cfg, job.sae
    x = batch[job.in_idx] * sae.input_scale
    target = batch[job.out_idx] * sae.target_scale
    for group in job.opt.param_groups:
        group["lr"] = lr_at(step, loop.total_steps, job.lr, tc.lr_warmup_steps, tc.lr_decay_fraction)
    warm = min(1.0, (step + 1) / max(1, tc.sparsity_warmup_fraction * loop.total_steps))
    dead = job.stats.tokens_since_fired >= tc.dead_after_tokens
    out = sae.training_step(x, target, sparsity_scale=warm, dead_mask=dead)
    if not torch.isfinite(out.loss):
        raise _nan_error(step, f"loss of SAE {job.name}", loop.checkpoint)
    out.loss.backward()
    all_mean_([p.grad for p in sae.parameters() if p.grad is not None], loop.world)
    sae.remove_parallel_grad_()
    job.opt.step()
    job.opt.zero_grad(set_to_none=True)
    sae.normalize_decoder_()
    all_mean_(list(sae.buffers()), loop.world)
    fires = all_sum_(out.fire_counts.clone(), loop.world)
    job.stats.tokens_since_fired += tc.batch_size
    job.stats.tokens_since_fired[fires > 0] = 0
    if step >= loop.final_phase:
        job.stats.recent_fires += fires
        job.stats.recent_tokens += tc.batch_size
    if loop.rank != 0 or not (step % tc.log_every_steps == 0 or step == loop.total_steps - 1):
        return None
    var = (target - target.mean(0)).pow(2).sum(-1).mean()
    return {"step": step, "tokens": (step + 1) * tc.batch_size, "sae": job.name, "loss": out.loss.item(),
            "mse": out.mse.item(), "fvu": (out.mse / var).item(), "l0": out.l0.item(),
            "aux_loss": out.aux_loss.item(), "dead_fraction": dead.float().mean().item(),
            "lr": job.opt.param_groups[0]["lr"]}


def _check_finite(batch: list[Tensor], step: int, names: list[str], checkpoint: Path | None) -> None:
    for i, t in enumerate(batch):
        if not torch.isfinite(t).all():
            raise _nan_error(step, f"batch of {names[i] if i < len(names) else f'input {i}'}", checkpoint)


def train(jobs: list[TrainJob], batches: Batches, cfg: TrainConfig, *, hooks: list[str] | None = None,
          checkpoint: Path | None = None, resume: bool = False, overwrite: bool = False,
          metrics: MetricsSink | None = None, progress: bool = True,
          data: dict[str, Any] | None = None) -> list[Trained]:
    """Train every job on `batches` for `cfg.total_tokens`; checkpoints to `checkpoint` when given.

    `hooks` names the tensors of each batch, for error messages; `data` says what the batches are drawn
    from (source, corpus fingerprint, hooks, ...), recorded in the checkpoint and required to match on
    resume. Returns the trained SAEs on rank 0 (an empty list on other ranks)."""
    rank, world = dist_info()
    total_steps = cfg.total_tokens // cfg.batch_size
    if total_steps == 0:
        raise SaekitError(f"train.total_tokens={cfg.total_tokens} is smaller than train.batch_size={cfg.batch_size}")
    meta = _meta(cfg, data)
    loop = _Loop(cfg, total_steps, int(total_steps * (1 - max(cfg.lr_decay_fraction, 0.1))), world, rank, checkpoint)
    start = _start_step(jobs, meta, checkpoint, resume, overwrite)
    settle_kernels([job.sae for job in jobs], max(cfg.batch_size // world, 1), rank, world)
    metrics = metrics if rank == 0 else None
    if metrics is not None:
        metrics.open(start)
    bar = tqdm(total=total_steps, initial=start, unit="step", disable=not (progress and rank == 0),
               desc=f"training {len(jobs)} SAE(s)", dynamic_ncols=True)
    stream = prefetch(batches(start))
    try:
        with kernels.global_batch(global_batch_group(world)):
            _loop(jobs, stream, start, loop, _Journal(metrics, bar, hooks or [], meta))
    finally:
        stream.close()
        bar.close()
        if metrics is not None:
            metrics.close()
    out = [Trained(j.name, j.sae, j.stats.recent_fires.cpu().double() / max(j.stats.recent_tokens, 1))
           for j in jobs] if rank == 0 else []
    leave(world)
    return out


class _Journal(NamedTuple):
    """Where the loop reports: metrics sink (rank 0), progress bar, batch tensor names, checkpoint meta."""

    metrics: MetricsSink | None
    bar: Any
    hooks: list[str]
    meta: dict[str, Any]


def _loop(jobs: list[TrainJob], stream: Iterator[list[Tensor]], start: int, loop: _Loop, out: _Journal) -> None:
    """The steps from `start`: every SAE one Adam step per global batch, logs, periodic checkpoints."""
    cfg, checkpoint = loop.cfg, loop.checkpoint
    ckpt_every = max(1, cfg.checkpoint_every_tokens // cfg.batch_size)
    device = jobs[0].sae.W_enc.device
    t_last, step_last = time.perf_counter(), start
    for step in range(start, loop.total_steps):
        batch = [t.to(device, non_blocking=True) for t in next(stream)]
        _check_finite(batch, step, out.hooks, checkpoint)
        rows = [row for job in jobs if (row := _step(job, batch, step, loop)) is not None]
        if rows:
            now = time.perf_counter()
            tps = (step + 1 - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, step + 1
            for r in rows:
                r["tokens_per_s"] = tps
            if out.metrics is not None:
                out.metrics.write(rows)
            out.bar.set_postfix(tok_s=f"{tps:,.0f}", l0=f"{rows[0]['l0']:.1f}", fvu=f"{rows[0]['fvu']:.3f}",
                                dead=f"{rows[0]['dead_fraction']:.2f}")
        out.bar.update(1)
        if checkpoint and loop.rank == 0 and (step + 1) % ckpt_every == 0 and step + 1 < loop.total_steps:
            save_checkpoint(checkpoint, jobs, step + 1, out.meta)
    if checkpoint and loop.rank == 0:
        save_checkpoint(checkpoint, jobs, loop.total_steps, out.meta)
