"""`saekit plan`: what a run will cost before it runs: cache size, on-the-fly buffer memory, and time.

Sizes are arithmetic on the config and the model's hook widths. Times come from throughput measured here
and now on this machine: a few forward passes to the deepest hooked layer (which bounds the cache writer and
on-the-fly training) and a few training steps of the configured SAEs on random activations. Nothing is
written: no run directory, no token file, no cache.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors import safe_open

from features.run_config import RunConfig
from sae.hooks import hook_width, stop_layer, validate_hooks
from sae.sources import MEMORY_FRACTION, BufferSpec, available_bytes, buffer_bytes
from sae.trainer import build_job, train
from sae.training_data import spec_hooks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ROW_META_BYTES = 10  # token id (int32), sequence (int32), position (int16) per cached row


class Rates(NamedTuple):
    forward: float  # tokens/s of the bare forward pass to the deepest hooked layer
    train: float  # tokens/s of one training step of every configured SAE together


def _train_tokens(cfg: RunConfig) -> tuple[int | None, str]:
    """Train tokens and where the figure comes from: the run's token file, else the corpus settings."""
    c = cfg.corpus
    if cfg.layout.tokens.is_file():
        with safe_open(str(cfg.layout.tokens), "pt") as fh:
            n_seq, ctx = fh.get_slice("train").get_shape()
        return n_seq * ctx, "the run's token file"
    if c.max_sequences is None:
        return None, "the whole corpus (not tokenised yet)"
    return int(c.max_sequences * (1 - c.held_out_fraction)) * c.context_size, "corpus.max_sequences, at most"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: RunConfig, model: HookedTransformer, repeats: int = 2) -> Rates:
    """Best of `repeats` after a warm-up: a forward pass of `cache.batch_size` random sequences, and training
    steps of the configured SAEs at `train.batch_size` rows of random activations."""
    hooks = sorted({h for s in cfg.train.saes for h in (s.hook, s.target_hook) if h} | set(cfg.cache.hooks))
    device = torch.device(model.cfg.device or "cpu")
    seqs = torch.randint(0, model.cfg.d_vocab, (cfg.cache.batch_size, cfg.corpus.context_size),
                         generator=torch.Generator().manual_seed(0)).to(device)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(seqs, stop_at_layer=stop_layer(hooks))
            _sync(device)
            best = min(best, time.perf_counter() - t0) if i else best
    forward = seqs.numel() / best
    return Rates(forward, _train_rate(cfg, model, repeats))


def _train_rate(cfg: RunConfig, model: HookedTransformer, repeats: int) -> float:
    """Steady tokens/s of the configured SAEs' steps: runs of 4 and 12 steps, best of `repeats` each after a
    warm-up, and the rate over their difference, so the per-run start-up (threads, first allocations), paid
    once by a real run, does not count."""
    tc = cfg.train
    hooks = spec_hooks(tc.saes)
    gen = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    acts = [torch.randn(tc.batch_size, hook_width(model, h), generator=gen).to(device) for h in hooks]
    sample = dict(zip(hooks, acts, strict=True))
    jobs = [build_job(s, sample[s.hook], sample[s.target_hook or s.hook], hooks, device=device) for s in tc.saes]

    def run(steps: int) -> float:
        short = dataclasses.replace(tc, total_tokens=steps * tc.batch_size, wandb=False, log_every_steps=10**9,
                                    lr_warmup_steps=1)
        t0 = time.perf_counter()
        train(jobs, lambda start: iter(lambda: acts, None), short, progress=False)
        return time.perf_counter() - t0

    run(4)  # warm-up, and the timed kernel choice
    few, many = (min(run(n) for _ in range(repeats)) for n in (4, 12))
    return (8 if many > few else 12) * tc.batch_size / (many - few if many > few else many)


def _hours(tokens: int, rate: float) -> str:
    s = tokens / rate
    return f"{s / 3600:,.1f} h" if s >= 3600 else f"{s:,.0f} s"


def plan(cfg: RunConfig, model: HookedTransformer, processes: int, say: Callable[[str], None]) -> None:
    """Print the cache size per hook, the on-the-fly buffer per process and the expected times."""
    validate_hooks(model, cfg.cache.hooks + spec_hooks(cfg.train.saes))
    n_tokens, where = _train_tokens(cfg)
    tc, elem = cfg.train, torch.empty((), dtype=getattr(torch, cfg.cache.dtype)).element_size()
    say(f"train tokens: {'unknown' if n_tokens is None else f'{n_tokens:,}'} ({where}); training reads "
        f"{tc.total_tokens:,} tokens in batches of {tc.batch_size:,} on {processes} process(es)")
    total = 0
    for hook in cfg.cache.hooks:
        per_token = hook_width(model, hook) * elem + ROW_META_BYTES
        total += per_token * (n_tokens or 0)
        size = "?" if n_tokens is None else f"{per_token * n_tokens / 1e9:,.2f} GB"
        say(f"cache {hook}: {size} ({hook_width(model, hook)} x {elem} bytes ({cfg.cache.dtype}) + "
            f"{ROW_META_BYTES} per token)")
    say(f"cache, all hooks: {total / 1e9:,.2f} GB" if n_tokens else "cache, all hooks: ? (tokenise to know)")
    streams = tc.streams or processes
    spec = BufferSpec(tc.batch_size, tc.buffer_tokens, cfg.cache.batch_size, tc.seed, streams)
    widths = [hook_width(model, h) for h in spec_hooks(tc.saes)]
    need = buffer_bytes(spec, cfg.corpus.context_size, widths, model.cfg.dtype, streams // processes)
    have = available_bytes(torch.device(model.cfg.device or "cpu"))
    verdict = "fits" if need <= MEMORY_FRACTION * have else "REFUSED at start: lower train.buffer_tokens"
    say(f"on the fly (train.source: model): buffer of {tc.buffer_tokens:,} tokens = {need:,} bytes "
        f"({need / 2**30:,.2f} GiB) per process; {have / 2**30:,.1f} GiB available here, "
        f"{MEMORY_FRACTION:.0%} may go to it: {verdict}")
    rates = measure(cfg, model)
    say(f"measured here ({model.cfg.device}, {torch.get_num_threads()} threads): forward to the hooked layers "
        f"{rates.forward:,.0f} tok/s, SAE training {rates.train:,.0f} tok/s (per process)")
    scale = processes * 1.0
    if n_tokens:
        say(f"expected: cache stage about {_hours(n_tokens, rates.forward * scale)} (the writer runs near the "
            f"forward's rate), training from the cache {_hours(tc.total_tokens, rates.train * scale)}")
    say(f"expected on the fly: {_hours(tc.total_tokens, min(rates.forward, rates.train) * scale)} with the "
        f"forward passes overlapping the steps, "
        f"{_hours(tc.total_tokens, scale / (1 / rates.forward + 1 / rates.train))} in turn")
