"""Batch sources the trainer draws from, other than the disk cache (`sae.cache.ActivationBatches`): tensors in
memory, and the model itself (on-the-fly training: no cache, activations straight from the forward pass).

On the fly, the model runs over the tokenised train split in inference mode, capturing every hook in one
forward pass that stops after the deepest hooked layer. Rows reach the trainer through a bounded, seeded
shuffle:

- the train sequences are split into `streams` (by default one per process): each epoch e has a seeded
  permutation P_e of the sequences and stream s reads P_e[s::streams], `forward_sequences` at a time (a
  *chunk*: one forward pass);
- a stream gathers a *window* of chunks (buffer_tokens / streams tokens, rounded up to whole chunks) after
  the rows carried over from its previous window, permutes them with a generator seeded by (seed, stream,
  window), and deals them out as batch shares of batch_size / streams rows; the fewer than one share left
  over are carried into the next window, so no token is dropped;
- a global batch is the streams' shares in stream order. Under torchrun process r runs streams
  [r*S/N, (r+1)*S/N): it forwards only its own sequences and yields its rows of every global batch.

The order is index arithmetic, so resuming at batch b replays it without the model up to b's window, then
forwards only what that window's rows came from (the carried rows' chunks and the window's own), each
chunk with its original sequences: the resumed run sees the same (sequence, position) pairs in the same
order, with the same activations, as a run that was never stopped. Memory: two windows per stream (one
dealt out while the next fills, one forward pass between the trainer's steps, on its prefetch thread).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae.corpus import token_fingerprint
from sae.errors import SaekitError
from sae.hooks import capturing, hook_width, stop_layer, validate_hooks
from sae.trainer import Batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# Share of the available memory the shuffle buffer may take: the model, the SAEs and Adam need the rest.
MEMORY_FRACTION = 0.5


def tensor_batches(tensors: list[Tensor], batch_size: int, seed: int = 0) -> Batches:
    """Shuffled global batches from in-memory activations (one [n, d] tensor per hook, rows aligned),
    reshuffled every epoch, resumable at any batch: for notebooks and tests."""
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise SaekitError("tensor_batches: every tensor needs the same number of rows (one row per token)")
    if n < batch_size:
        raise SaekitError(f"tensor_batches: {n} rows is fewer than one batch of {batch_size}; pass more "
                          "activations or a smaller train.batch_size")
    per_epoch = n // batch_size

    def batches(start: int = 0) -> Iterator[list[Tensor]]:
        step = start
        while True:
            epoch, i = divmod(step, per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            rows = order[i * batch_size:(i + 1) * batch_size]
            yield [t[rows] for t in tensors]
            step += 1

    return batches


# ---------------------------------------------------------------------------------------------
# On the fly: the order, as index arithmetic


@dataclass(frozen=True)
class BufferSpec:
    """How the on-the-fly source orders tokens; equal specs over equal tokens give equal batches."""

    batch_size: int  # rows of each global batch (train.batch_size)
    buffer_tokens: int  # shuffle-window rows, all streams together (train.buffer_tokens)
    forward_sequences: int = 32  # sequences per forward pass (cache.batch_size)
    seed: int = 0
    streams: int = 1  # independent streams the sequences are split into; each process runs streams / world

    def __post_init__(self) -> None:
        for name in ("batch_size", "buffer_tokens", "forward_sequences", "streams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SaekitError(f"on-the-fly source: {name} must be a positive integer, got {value!r}")
        if self.seed < 0:
            raise SaekitError(f"on-the-fly source: train.seed must be >= 0, got {self.seed}")
        if self.batch_size % self.streams:
            raise SaekitError(f"train.batch_size={self.batch_size} must split evenly over {self.streams} streams "
                              "(one per process); choose a batch size divisible by the number of processes")
        if self.buffer_tokens < self.batch_size:
            raise SaekitError(f"train.buffer_tokens={self.buffer_tokens:,} must hold at least one batch "
                              f"(train.batch_size={self.batch_size:,}); a good shuffle needs dozens of batches")


class _Window(NamedTuple):
    """One window of a stream: its rows (carried ones first) as keys, their dealing order, batches dealt."""

    index: int
    first_batch: int  # global batch index of its first share
    n_carry: int  # rows carried in from the previous window, at the front of `pool`
    pool: Tensor  # row keys: chunk number * chunk_rows + row within the chunk
    order: Tensor  # permutation of the pool; share i is order[i * share:(i + 1) * share]
    n_batches: int


@functools.lru_cache(maxsize=4)
def _epoch_order(n_seq: int, seed: int, epoch: int) -> Tensor:
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n_seq))


class _Stream:
    """One stream's order: which sequences each chunk forwards, and how each window deals its rows."""

    def __init__(self, n_seq: int, ctx: int, spec: BufferSpec, index: int) -> None:
        self.n_seq, self.ctx, self.spec, self.index = n_seq, ctx, spec, index
        n_own = len(range(index, n_seq, spec.streams))
        if n_own == 0:
            raise SaekitError(f"{n_seq} train sequences cannot feed {spec.streams} streams (one per process); "
                              "use more sequences (corpus.max_sequences) or fewer processes")
        self.per_epoch = -(-n_own // spec.forward_sequences)
        self.chunk_rows = spec.forward_sequences * ctx
        self.window = max(1, -(-(spec.buffer_tokens // spec.streams) // self.chunk_rows))  # chunks per window
        self.share = spec.batch_size // spec.streams

    def chunk(self, c: int) -> Tensor:
        """Sequence ids of chunk `c` (counting over epochs)."""
        epoch, j = divmod(c, self.per_epoch)
        own = _epoch_order(self.n_seq, self.spec.seed, epoch)[self.index::self.spec.streams]
        return own[j * self.spec.forward_sequences:(j + 1) * self.spec.forward_sequences]

    def chunks(self, window: int) -> range:
        return range(window * self.window, (window + 1) * self.window)

    def plan(self) -> Iterator[_Window]:
        """Every window in order, without the model."""
        carry, first = torch.empty(0, dtype=torch.long), 0
        for w in itertools.count():
            pool = torch.cat([carry] + [c * self.chunk_rows + torch.arange(len(self.chunk(c)) * self.ctx)
                                        for c in self.chunks(w)])
            order = torch.from_numpy(np.random.default_rng([self.spec.seed, self.index, w]).permutation(len(pool)))
            n_batches = len(pool) // self.share
            yield _Window(w, first, len(carry), pool, order, n_batches)
            carry, first = pool[order[n_batches * self.share:]], first + n_batches

    def locate(self, keys: Tensor) -> Tensor:
        """[n, 2] (sequence, position) of row keys."""
        c, r = keys // self.chunk_rows, keys % self.chunk_rows
        seq = torch.empty_like(keys)
        for chunk in c.unique().tolist():
            where = c == chunk
            seq[where] = self.chunk(chunk)[r[where] // self.ctx]
        return torch.stack([seq, r % self.ctx], dim=1)


# ---------------------------------------------------------------------------------------------
# On the fly: the activations


def available_bytes(device: torch.device) -> int:
    """Memory this process may still take on `device`: free GPU memory, or the host's available RAM
    (psutil's estimate when it is installed, else the free pages from os.sysconf)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def buffer_bytes(spec: BufferSpec, context_size: int, widths: list[int], dtype: torch.dtype,
                 streams_here: int = 1) -> int:
    """Bytes of the shuffle buffer on a process running `streams_here` streams of `spec` over hooks of
    `widths`: two windows (one dealt out while the next fills) of whole forward passes plus carried rows.
    Index arithmetic only, so `saekit plan` can say it before any model runs."""
    chunk_rows = spec.forward_sequences * context_size
    window = max(1, -(-(spec.buffer_tokens // spec.streams) // chunk_rows)) * chunk_rows
    rows = spec.batch_size // spec.streams + window
    return 2 * streams_here * rows * sum(widths) * torch.empty((), dtype=dtype).element_size()


class ModelBatches:
    """`Batches` straight from the model's forward pass: several hooks from one pass, rows aligned.

    Refuses at construction a buffer larger than MEMORY_FRACTION of the available memory. `data` is what
    a checkpoint must record so that a resume with other tokens, hooks or buffer settings is refused."""

    def __init__(self, model: HookedTransformer, tokens: Tensor, hooks: list[str], spec: BufferSpec,
                 rank: int = 0, world: int = 1, total_batches: int | None = None) -> None:
        """`total_batches`: the batches training will take; no window past them is forwarded (the stream
        ends there), so the overlap does not cost forward passes nobody trains on."""
        validate_hooks(model, hooks)
        if spec.streams % world:
            raise SaekitError(f"{spec.streams} buffer streams cannot be split over {world} processes; use a "
                              "multiple of the number of processes")
        self.model, self.tokens, self.hooks, self.spec = model, tokens, hooks, spec
        self.end = sys.maxsize if total_batches is None else total_batches
        self.device, self.dtype = torch.device(model.cfg.device or "cpu"), model.cfg.dtype
        self.widths = [hook_width(model, h) for h in hooks]
        per = spec.streams // world
        self.streams = [_Stream(tokens.shape[0], tokens.shape[1], spec, s) for s in range(rank * per, (rank + 1) * per)]
        self._check_memory()
        self.data = {"source": "model", "model": model.cfg.model_name, "corpus": token_fingerprint(tokens),
                     "hooks": list(hooks), "context_size": tokens.shape[1], "buffer_tokens": spec.buffer_tokens,
                     "forward_sequences": spec.forward_sequences, "streams": spec.streams}

    def buffer_bytes(self) -> int:
        """Two windows (with their carried rows) per stream of this process, every hook."""
        return buffer_bytes(self.spec, self.tokens.shape[1], self.widths, self.dtype, len(self.streams))

    def _check_memory(self) -> None:
        need, have = self.buffer_bytes(), available_bytes(self.device)
        if need <= MEMORY_FRACTION * have:
            return
        s = self.streams[0]
        fits = int(MEMORY_FRACTION * have / need * s.window * s.chunk_rows) * self.spec.streams
        where = "this machine's RAM" if self.device.type == "cpu" else str(self.device)
        raise SaekitError(
            f"train.buffer_tokens={self.spec.buffer_tokens:,}: the on-the-fly shuffle buffer would need "
            f"{need:,} bytes ({need / 2**30:.1f} GiB: 2 windows of {s.window * s.chunk_rows:,} tokens x "
            f"{sum(self.widths):,} values per token x {len(self.streams)} stream(s) on this process), but "
            f"{where} has {have / 2**30:.1f} GiB available and at most {MEMORY_FRACTION:.0%} of it may go to the "
            f"buffer. Lower train.buffer_tokens to about {max(fits, 0):,} or less.")

    def _alloc(self, rows: int) -> list[Tensor]:
        return [torch.empty(rows, d, dtype=self.dtype, device=self.device) for d in self.widths]

    def _forward(self, seqs: Tensor, out: list[Tensor], offset: int) -> None:
        """Forward `seqs` once, writing each hook's rows into `out` from row `offset`."""
        index = {h: i for i, h in enumerate(self.hooks)}

        def sink(name: str, act: Tensor) -> None:
            flat = act.reshape(-1, act.shape[-1])
            out[index[name]][offset:offset + flat.shape[0]].copy_(flat)

        with torch.inference_mode(), capturing(self.model, self.hooks, sink=sink):
            self.model(self.tokens[seqs].to(self.device), stop_at_layer=stop_layer(self.hooks))

    def sample(self, n_tokens: int = 16384) -> list[Tensor]:
        """Activations of evenly spaced train sequences (the same on every process), one [n, d] tensor per
        hook: for sizing, scaling and centring the SAEs."""
        n_seq, ctx = self.tokens.shape
        ids = torch.from_numpy(np.unique(np.linspace(0, n_seq - 1, min(n_seq, -(-n_tokens // ctx))).round()
                                         .astype(np.int64)))
        out = self._alloc(len(ids) * ctx)
        step = self.spec.forward_sequences
        for i in range(0, len(ids), step):
            self._forward(ids[i:i + step], out, i * ctx)
        return [t.float() for t in out]

    def positions(self, start: int = 0) -> Iterator[Tensor]:
        """[rows, 2] (sequence, position) of this process's rows of each global batch from `start`, without
        running the model: the order `__call__` yields."""
        gens = [_stream_positions(s, start) for s in self.streams]
        for parts in zip(*gens, strict=True):
            yield torch.cat(parts)

    def __call__(self, start: int = 0) -> Iterator[list[Tensor]]:
        """This process's rows of every global batch from `start` on, one tensor per hook."""
        gens = [self._stream_batches(s, start) for s in self.streams]
        if len(gens) == 1:
            yield from gens[0]
            return
        for parts in zip(*gens, strict=True):
            yield [torch.cat(per_hook) for per_hook in zip(*parts, strict=True)]

    def _recompute(self, stream: _Stream, keys: Tensor, out: list[Tensor]) -> None:
        """Rows `keys` into out[:len(keys)]: each chunk they came from forwarded again, as it was."""
        chunk_of = keys // stream.chunk_rows
        scratch = self._alloc(stream.chunk_rows)
        for c in chunk_of.unique().tolist():
            where = (chunk_of == c).nonzero().squeeze(1)
            self._forward(stream.chunk(c), scratch, 0)
            rows = (keys[where] % stream.chunk_rows).to(self.device)
            for o, s in zip(out, scratch, strict=True):
                o[where.to(self.device)] = s[rows]

    def _fill(self, stream: _Stream, win: _Window, out: list[Tensor]) -> Iterator[None]:
        """Forward the window's chunks into `out` after its carried rows, one pass per step."""
        offset = win.n_carry
        for c in stream.chunks(win.index):
            seqs = stream.chunk(c)
            self._forward(seqs, out, offset)
            offset += len(seqs) * stream.ctx
            yield

    def _stream_batches(self, stream: _Stream, start: int) -> Iterator[list[Tensor]]:
        """One stream's shares from global batch `start`: the window holding it is rebuilt (its carried rows
        recomputed), then each window is dealt out while the next one fills."""
        if start >= self.end:
            return
        plan = stream.plan()
        win = next(w for w in plan if w.first_batch + w.n_batches > start)
        cur = self._alloc(stream.share + stream.window * stream.chunk_rows)
        spare = self._alloc(len(cur[0]))
        self._recompute(stream, win.pool[:win.n_carry], cur)
        for _ in self._fill(stream, win, cur):
            pass
        skip = start - win.first_batch
        while True:
            nxt = next(plan)
            more = nxt.first_batch < self.end
            order = win.order.to(self.device)
            for s, c in zip(spare, cur, strict=True):
                s[:nxt.n_carry] = c[order[win.n_batches * stream.share:]]
            fill, done, todo = self._fill(stream, nxt, spare) if more else iter(()), 0, win.n_batches - skip
            for i in range(skip, min(win.n_batches, self.end - win.first_batch)):
                rows = order[i * stream.share:(i + 1) * stream.share]
                yield [c[rows] for c in cur]
                due = math.ceil((i - skip + 1) * stream.window / todo)  # spread the next window's passes
                done += sum(1 for _ in itertools.islice(fill, max(due - done, 0)))
            for _ in fill:
                pass
            if not more:
                return
            win, skip, cur, spare = nxt, 0, spare, cur


def _stream_positions(stream: _Stream, start: int) -> Iterator[Tensor]:
    for win in stream.plan():
        for i in range(max(start - win.first_batch, 0), win.n_batches):
            yield stream.locate(win.pool[win.order[i * stream.share:(i + 1) * stream.share]])
