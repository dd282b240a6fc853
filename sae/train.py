"""The training loop: one read of the activation cache trains every SAE of a run.

Reads top to bottom: set up processes, open the cache, build (or restore) the SAEs, then for each
global batch take every SAE one Adam step. Under `torchrun` each rank reads its own rows of each
global batch and gradients are averaged, so N processes compute what one would with the same
global batch. Checkpoints hold everything needed to continue exactly (weights, optimiser moments,
schedule position, firing statistics, data position) in one atomically written file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from sae.architectures import SAE, SAEConfig, build_sae
from sae.cache import ActivationBatches, CacheReader, hook_dir
from sae.config import RunConfig, SAESpec
from sae.errors import SaekitError
from sae.export import save_sae
from sae.io import atomic_save_tensors, atomic_write_text

CHECKPOINT_FILE = "state.safetensors"
# Fields whose change makes a checkpoint meaningless for the new config.
RESUME_FIELDS = ("hook", "target_hook", "architecture", "expansion", "k", "d_in", "d_out")


@dataclass
class Member:
    """One SAE being trained, with its optimiser and firing statistics."""

    spec: SAESpec
    sae: SAE
    opt: torch.optim.Adam
    lr: float
    in_idx: int  # index of its input hook in the batch
    out_idx: int  # index of its target hook in the batch
    tokens_since_fired: Tensor  # [d_sae] int64
    recent_fires: Tensor  # [d_sae] int64 fire counts over the final phase, for exported sparsity
    recent_tokens: int = 0


# ---------------------------------------------------------------------------------------------
# Processes


def dist_info() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_mean_(tensors: list[Tensor], world: int) -> None:
    if world > 1:
        for t in tensors:
            dist.all_reduce(t)
            t /= world


def _all_sum_(t: Tensor, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------
# Set-up


def _hooks(specs: list[SAESpec]) -> list[str]:
    out: list[str] = []
    for s in specs:
        for h in (s.hook, s.target_hook):
            if h and h not in out:
                out.append(h)
    return out


def _scale(reader: CacheReader, n: int = 32768) -> float:
    """Scalar that brings the mean activation norm to sqrt(d), estimated on an even sample of rows."""
    rows = np.linspace(0, reader.n_rows - 1, min(n, reader.n_rows)).astype(np.int64)
    norms = reader.activations(rows).norm(dim=1)
    norms = norms[torch.isfinite(norms)]
    if norms.numel() == 0 or norms.mean() <= 0:
        raise SaekitError(f"the cache at {reader.folder} holds no finite, non-zero activations; rebuild it")
    return math.sqrt(reader.d) / norms.mean().item()


def _sample(reader: CacheReader, n: int = 16384) -> Tensor:
    rows = np.linspace(0, reader.n_rows - 1, min(n, reader.n_rows)).astype(np.int64)
    x = reader.activations(rows)
    return x[torch.isfinite(x).all(dim=1)]


def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 2**14)


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam (betas 0.9/0.999), fused where torch has the kernel: one pass per parameter instead of
    foreach's chain of elementwise ops, about 5x faster on CPU for an SAE's few large tensors."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
    except RuntimeError:  # a device without a fused kernel
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def _sae_config(spec: SAESpec, readers: dict[str, CacheReader], scales: dict[str, float], seed: int) -> SAEConfig:
    r_in = readers[spec.hook]
    r_out = readers[spec.target_hook or spec.hook]
    return SAEConfig(
        d_in=r_in.d, d_sae=spec.expansion * r_in.d, architecture=spec.architecture, k=spec.k,
        sparsity_coef=spec.sparsity_coef, is_transcoder=spec.target_hook is not None, d_out=r_out.d,
        input_scale=scales[spec.hook], target_scale=scales[spec.target_hook or spec.hook], seed=seed,
        model_name=r_in.manifest["model"], hook_name=spec.hook, hook_name_out=spec.target_hook,
    )


def _resume_view(spec: SAESpec, cfg: SAEConfig) -> dict[str, Any]:
    return {"hook": spec.hook, "target_hook": spec.target_hook, "architecture": spec.architecture,
            "expansion": spec.expansion, "k": spec.k, "d_in": cfg.d_in, "d_out": cfg.d_out}


def _lr_at(step: int, total: int, base: float, warmup: int, decay_fraction: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step >= decay_start and decay_fraction > 0:
        return base * max(0.0, (total - step) / (total - decay_start))
    return base


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(path: Path, members: list[Member], step: int, meta: dict[str, Any]) -> None:
    tensors: dict[str, Tensor] = {"rng/torch": torch.get_rng_state()}
    for m in members:
        sid = m.spec.sae_id
        for name, t in m.sae.state_dict().items():
            tensors[f"{sid}/sae/{name}"] = t.detach().cpu()
        names = {id(p): n for n, p in m.sae.named_parameters()}
        for group in m.opt.param_groups:
            for p in group["params"]:
                for key, value in m.opt.state.get(p, {}).items():
                    tensors[f"{sid}/opt/{names[id(p)]}/{key}"] = torch.as_tensor(value).cpu()
        tensors[f"{sid}/tokens_since_fired"] = m.tokens_since_fired.cpu()
        tensors[f"{sid}/recent_fires"] = m.recent_fires.cpu()
    info = {**meta, "step": step,
            "saes": {m.spec.sae_id: {"resume": _resume_view(m.spec, m.sae.cfg), "recent_tokens": m.recent_tokens,
                                     "config": dataclasses.asdict(m.sae.cfg)} for m in members}}
    atomic_save_tensors(path, tensors, metadata={"saekit": json.dumps(info)})


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint resumes at, or None when there is none."""
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:
        return int(json.loads((fh.metadata() or {})["saekit"])["step"])


def _load_checkpoint(path: Path, members: list[Member], meta: dict[str, Any]) -> int:
    """Restore state into `members`; refuses when what matters differs. Returns the next step."""
    with safe_open(str(path), "pt") as fh:
        info = json.loads((fh.metadata() or {})["saekit"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    diffs = [f"train.{k}: checkpoint {info.get(k)!r}, config {v!r}" for k, v in meta.items() if info.get(k) != v]
    saved = info["saes"]
    for m in members:
        sid = m.spec.sae_id
        if sid not in saved:
            diffs.append(f"SAE '{sid}' is not in the checkpoint (it has {', '.join(saved)})")
            continue
        now = _resume_view(m.spec, m.sae.cfg)
        diffs += [f"{sid}.{k}: checkpoint {saved[sid]['resume'].get(k)!r}, config {v!r}"
                  for k, v in now.items() if saved[sid]["resume"].get(k) != v]
    if diffs:
        raise SaekitError(f"cannot resume from {path}: the config changed in ways that matter: {'; '.join(diffs)}. "
                          "Restore those settings, or start over without --resume (with --overwrite).")
    for m in members:
        sid = m.spec.sae_id
        cfg_saved = saved[sid]["config"]
        m.sae.cfg.input_scale, m.sae.cfg.target_scale = cfg_saved["input_scale"], cfg_saved["target_scale"]
        m.sae.load_state_dict({k.split("/sae/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{sid}/sae/")})
        params = dict(m.sae.named_parameters())
        for name, p in params.items():
            state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{sid}/opt/{name}/")}
            if state:
                m.opt.state[p] = {k: (v if k != "step" else v.float()) for k, v in state.items()}
        m.tokens_since_fired.copy_(tensors[f"{sid}/tokens_since_fired"])
        m.recent_fires.copy_(tensors[f"{sid}/recent_fires"])
        m.recent_tokens = saved[sid]["recent_tokens"]
    torch.set_rng_state(tensors["rng/torch"])
    return int(info["step"])


# ---------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.jsonl, an append-only journal (one JSON object per line), plus wandb.

    A kill can tear only the last line; on resume the journal is rewritten atomically with just
    the complete lines from before the checkpoint, so every step appears exactly once.
    """

    def __init__(self, path: Path, cfg: RunConfig, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.wandb: Any = None
        if not enabled:
            return
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", resume_step) < resume_step:
                    kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
        self.fh = open(path, "a")  # noqa: SIM115 - held open for the whole run, closed in close()
        if cfg.train.wandb:
            import wandb

            mode = "online" if cfg.train.wandb_project else "offline"
            self.wandb = wandb.init(project=cfg.train.wandb_project or "saekit", name=cfg.name, mode=mode,
                                    dir=str(cfg.run_dir), config=dataclasses.asdict(cfg), resume="allow")

    def log(self, rows: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        self.fh.write("".join(json.dumps(r) + "\n" for r in rows))
        self.fh.flush()
        if self.wandb is not None:
            flat = {f"{r['sae']}/{k}": v for r in rows for k, v in r.items() if k not in ("sae", "step")}
            self.wandb.log(flat, step=rows[0]["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
        if self.wandb is not None:
            self.wandb.finish()


def _prefetch(stream: Any, depth: int = 3) -> Any:
    """Read the next batches on a thread while the current one trains (gathers release the GIL)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)

    def work() -> None:
        try:
            for item in stream:
                q.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    threading.Thread(target=work, daemon=True, name="saekit-prefetch").start()
    while True:
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Train every SAE in `cfg.train.saes` from the run's cache; returns the exported SAE folders."""
    rank, world = dist_info()
    tc = cfg.train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hooks = _hooks(tc.saes)
    readers = {h: CacheReader(hook_dir(cfg.run_dir / "cache", h)) for h in hooks}
    stream = ActivationBatches([readers[h] for h in hooks], tc.batch_size, tc.seed, rank, world)
    total_steps = tc.total_tokens // tc.batch_size
    if total_steps == 0:
        raise SaekitError(f"train.total_tokens={tc.total_tokens} is smaller than train.batch_size={tc.batch_size}")
    scales = {h: _scale(r) for h, r in readers.items()}

    members = []
    for spec in tc.saes:
        sae_cfg = _sae_config(spec, readers, scales, tc.seed)
        sae = build_sae(sae_cfg).to(device)
        sae.init_b_dec(_sample(readers[spec.target_hook or spec.hook]).to(device) * sae_cfg.target_scale)
        lr = spec.lr or default_lr(sae_cfg.d_sae)
        opt = make_optimizer(list(sae.parameters()), lr)
        zeros = torch.zeros(sae_cfg.d_sae, dtype=torch.int64, device=device)
        members.append(Member(spec, sae, opt, lr, hooks.index(spec.hook), hooks.index(spec.target_hook or spec.hook),
                              zeros.clone(), zeros.clone()))

    ckpt = cfg.run_dir / "checkpoints" / CHECKPOINT_FILE
    meta = {"batch_size": tc.batch_size, "seed": tc.seed, "total_tokens": tc.total_tokens}
    start = 0
    if resume:
        if not ckpt.is_file():
            raise SaekitError(f"--resume: no checkpoint at {ckpt}; run `saekit train` without --resume")
        start = _load_checkpoint(ckpt, members, meta)
    elif ckpt.is_file() and not overwrite:
        raise SaekitError(f"{ckpt} exists from an earlier training run; pass --resume to continue it "
                          "or --overwrite to start again")

    log = MetricsLog(cfg.run_dir / "metrics.jsonl", cfg, start, enabled=rank == 0)
    ckpt_every = max(1, tc.checkpoint_every_tokens // tc.batch_size)
    log_every = tc.log_every_steps
    final_phase = int(total_steps * (1 - max(tc.lr_decay_fraction, 0.1)))
    bar = tqdm(total=total_steps, initial=start, unit="step", disable=not (progress and rank == 0),
               desc=f"training {len(members)} SAE(s)", dynamic_ncols=True)
    batches = _prefetch(stream(start_batch=start))
    t_last, step_last = time.perf_counter(), start
    try:
        for step in range(start, total_steps):
            batch = [t.to(device, non_blocking=True) for t in next(batches)]
            for i, t in enumerate(batch):
                if not torch.isfinite(t).all():
                    raise _nan_error(step, f"cache batch of {hooks[i]}", ckpt)
            rows = []
            for m in members:
                x = batch[m.in_idx] * m.sae.cfg.input_scale
                target = batch[m.out_idx] * m.sae.cfg.target_scale
                for group in m.opt.param_groups:
                    group["lr"] = _lr_at(step, total_steps, m.lr, tc.lr_warmup_steps, tc.lr_decay_fraction)
                warm = min(1.0, (step + 1) / max(1, tc.sparsity_warmup_fraction * total_steps))
                dead = m.tokens_since_fired >= tc.dead_after_tokens
                out = m.sae.training_step(x, target, sparsity_coef=warm * float(m.sae.cfg.sparsity_coef or 0.0),
                                          dead_mask=dead)
                if not torch.isfinite(out.loss):
                    raise _nan_error(step, f"loss of SAE {m.spec.sae_id}", ckpt)
                out.loss.backward()
                _all_mean_([p.grad for p in m.sae.parameters() if p.grad is not None], world)
                m.sae.remove_parallel_grad_()
                m.opt.step()
                m.opt.zero_grad(set_to_none=True)
                m.sae.normalize_decoder_()
                _all_mean_(list(m.sae.buffers()), world)
                fires = _all_sum_(out.fire_counts.clone(), world)
                m.tokens_since_fired += tc.batch_size
                m.tokens_since_fired[fires > 0] = 0
                if step >= final_phase:
                    m.recent_fires += fires
                    m.recent_tokens += tc.batch_size
                if rank == 0 and (step % log_every == 0 or step == total_steps - 1):
                    var = (target - target.mean(0)).pow(2).sum(-1).mean()
                    rows.append({"step": step, "tokens": (step + 1) * tc.batch_size, "sae": m.spec.sae_id,
                                 "loss": out.loss.item(), "mse": out.mse.item(), "fvu": (out.mse / var).item(),
                                 "l0": out.l0.item(), "aux_loss": out.aux_loss.item(),
                                 "dead_fraction": dead.float().mean().item(), "lr": m.opt.param_groups[0]["lr"]})
            if rows:
                now = time.perf_counter()
                tps = (step + 1 - step_last) * tc.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, step + 1
                for r in rows:
                    r["tokens_per_s"] = tps
                log.log(rows)
                first = rows[0]
                bar.set_postfix(tok_s=f"{tps:,.0f}", l0=f"{first['l0']:.1f}", fvu=f"{first['fvu']:.3f}",
                                dead=f"{first['dead_fraction']:.2f}")
            bar.update(1)
            if (step + 1) % ckpt_every == 0 and step + 1 < total_steps and rank == 0:
                _save_checkpoint(ckpt, members, step + 1, meta)
        if rank == 0:
            _save_checkpoint(ckpt, members, total_steps, meta)
    finally:
        bar.close()
        log.close()
    out = [_export(cfg, m, readers) for m in members] if rank == 0 else []
    if world > 1:  # leave the group explicitly: gloo aborts a process that exits with it still open
        dist.barrier()
        dist.destroy_process_group()
    return out


def _nan_error(step: int, what: str, ckpt: Path) -> SaekitError:
    kept = f"the last good checkpoint {ckpt} is intact" if ckpt.is_file() else "no checkpoint was written yet"
    return SaekitError(f"step {step}: NaN or Inf in the {what}; training stopped and {kept}. Check the cache "
                       "(rebuild it with `saekit cache --overwrite`) or lower the learning rate, then rerun.")


def _export(cfg: RunConfig, m: Member, readers: dict[str, CacheReader]) -> Path:
    """Fold the scaling into the weights and write the SAE-Lens directory under saes/<id>/."""
    sae = m.sae.cpu()
    sae.fold_scaling()
    freq = m.recent_fires.cpu().double() / max(m.recent_tokens, 1)
    manifest = readers[m.spec.hook].manifest
    out = cfg.run_dir / "saes" / m.spec.sae_id
    save_sae(sae, out, sparsity=freq.float(),
             metadata={"model_name": manifest["model"], "hook_name": m.spec.hook,
                       "context_size": manifest["context_size"], "prepend_bos": False,
                       "dataset_path": str(cfg.corpus.source), "run_name": cfg.name})
    return out
