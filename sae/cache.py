"""Sharded on-disk activation cache: one model pass writes many hooks; readers memory-map shards.

Layout, one folder per hook (`cache/<hook>/`):

- `shard-NNNNN.safetensors`: `activations` [rows, d] in the cache dtype, `token_ids` int32 [rows],
  `sequence` int32 [rows] and `position` int16 [rows], so every row traces back to its context.
  Shard i holds sequences [i*S, (i+1)*S) of the token set, in order, all positions.
- `manifest.json`: format version, model, hook, width, dtype, context size, corpus fingerprint,
  shard size, and the list of *complete* shards with row counts and sha256 checksums.

Shards are written atomically and listed only after they are on disk, so a killed run resumes by
writing the shards the manifest lacks. Readers check sizes on open and checksums on first use, and
refuse a damaged shard rather than yield its rows.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from sae.errors import SaekitError
from sae.hooks import capturing, hook_width, stop_layer, validate_hooks
from sae.io import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

CACHE_FORMAT = "saekit-activation-cache"
CACHE_VERSION = 1
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I16": np.int16}


def hook_dir(cache_dir: Path, hook: str) -> Path:
    return Path(cache_dir) / hook


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class CacheHeader:
    """What a cache was built from; two caches may be mixed or resumed only if these agree."""

    model: str
    hook: str
    d: int
    dtype: str
    context_size: int
    corpus_fingerprint: str
    n_sequences: int
    shard_sequences: int

    def manifest(self, shards: list[dict[str, Any]]) -> dict[str, Any]:
        n_shards = -(-self.n_sequences // self.shard_sequences)
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, **self.__dict__,
                "complete": len(shards) == n_shards, "n_rows": sum(s["rows"] for s in shards),
                "shards": sorted(shards, key=lambda s: s["index"])}


def _mismatches(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{k}: cache has {manifest.get(k)!r}, expected {v!r}" for k, v in expected.items() if manifest.get(k) != v]


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise SaekitError(f"no activation cache at {folder} (manifest.json missing); build it with "
                          "`saekit cache --config <your config>`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SaekitError(f"{path} is not valid JSON ({exc}); delete {folder} and rerun `saekit cache`") from None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise SaekitError(f"{path} is not a saekit cache of version {CACHE_VERSION} "
                          f"(format={manifest.get('format')!r}, version={manifest.get('version')!r}); rebuild it")
    return manifest


def _shard_ok(folder: Path, shard: dict[str, Any], full_check: bool) -> bool:
    path = folder / shard["file"]
    if not path.is_file() or path.stat().st_size != shard["bytes"]:
        return False
    if not full_check:
        return True
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest() == shard["sha256"]


def _resume_state(folder: Path, header: CacheHeader, overwrite: bool) -> list[dict[str, Any]]:
    """Shards already complete and intact in `folder`; refuses a cache built from other inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".shard-*.tmp"):
        stale.unlink()
    if overwrite or not (folder / "manifest.json").exists():
        return []
    manifest = read_manifest(folder)
    wrong = _mismatches(manifest, {k: v for k, v in header.__dict__.items()})
    if wrong:
        raise SaekitError(f"the cache at {folder} was built from other inputs ({'; '.join(wrong)}). "
                          "Use another run name, or pass --overwrite to rebuild it.")
    good = [s for s in manifest["shards"] if _shard_ok(folder, s, full_check=True)]
    if len(good) < len(manifest["shards"]):
        tqdm.write(f"{folder}: {len(manifest['shards']) - len(good)} damaged shard(s) will be rewritten")
    return good


class _ShardWriter:
    """Background thread that serialises, writes and lists shards, overlapping disk with compute."""

    def __init__(self, folders: dict[str, Path], headers: dict[str, CacheHeader],
                 done: dict[str, list[dict[str, Any]]]) -> None:
        self.folders, self.headers, self.done = folders, headers, done
        self.jobs: queue.Queue[tuple[int, int, dict[str, dict[str, torch.Tensor]]] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="saekit-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue
            index, first, per_hook = job
            try:
                for hook, tensors in per_hook.items():
                    data = save(tensors)
                    folder = self.folders[hook]
                    atomic_write_bytes(folder / shard_name(index), data)
                    entry = {"index": index, "file": shard_name(index), "first_sequence": first,
                             "rows": int(tensors["activations"].shape[0]), "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}
                    self.done[hook] = [s for s in self.done[hook] if s["index"] != index] + [entry]
                    atomic_write_json(folder / "manifest.json", self.headers[hook].manifest(self.done[hook]))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by put/close
                self.error = exc

    def put(self, index: int, first: int, per_hook: dict[str, dict[str, torch.Tensor]]) -> None:
        self._raise()
        self.jobs.put((index, first, per_hook))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def write_cache(
    model: HookedTransformer,
    tokens: torch.Tensor,
    hooks: list[str],
    cache_dir: Path,
    *,
    corpus_fingerprint: str,
    dtype: str = "float32",
    batch_size: int = 32,
    shard_sequences: int = 128,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Run the model once over `tokens` [n_seq, ctx] and cache every hook; resumes where it stopped.

    The forward pass stops after the deepest hooked layer, runs in inference mode, and hands
    finished shards to a writer thread so disk I/O overlaps the next forward passes.
    """
    validate_hooks(model, hooks)
    if dtype not in TORCH_DTYPES:
        raise SaekitError(f"cache dtype '{dtype}' is not supported; use one of {', '.join(TORCH_DTYPES)}")
    n_seq, ctx = tokens.shape
    torch_dtype = TORCH_DTYPES[dtype]
    folders = {h: hook_dir(cache_dir, h) for h in hooks}
    headers = {h: CacheHeader(model.cfg.model_name, h, hook_width(model, h), dtype, ctx, corpus_fingerprint,
                              n_seq, shard_sequences) for h in hooks}
    done = {h: _resume_state(folders[h], headers[h], overwrite) for h in hooks}
    complete = set.intersection(*({s["index"] for s in done[h]} for h in hooks))
    todo = [i for i in range(-(-n_seq // shard_sequences)) if i not in complete]
    stop_at = stop_layer(hooks)
    device = model.cfg.device
    writer = _ShardWriter(folders, headers, done)
    bar = tqdm(total=sum(min(shard_sequences, n_seq - i * shard_sequences) * ctx for i in todo),
               unit="tok", unit_scale=True, desc=f"caching {len(hooks)} hook(s)", disable=not progress,
               dynamic_ncols=True)
    target: dict[str, Any] = {}  # where the hooks copy the current batch: per-hook buffers and row offset

    def capture(name: str, act: torch.Tensor) -> None:
        flat = act.reshape(-1, act.shape[-1])
        target[name][target["offset"]:target["offset"] + flat.shape[0]].copy_(flat)

    try:
        with torch.inference_mode(), capturing(model, hooks, sink=capture):
            for index in todo:
                first, last = index * shard_sequences, min(n_seq, (index + 1) * shard_sequences)
                shard_tokens = tokens[first:last]
                bufs = {h: torch.empty(shard_tokens.numel(), headers[h].d, dtype=torch_dtype) for h in hooks}
                target.update(bufs)
                for start in range(0, last - first, batch_size):
                    batch = shard_tokens[start:start + batch_size].to(device)
                    target["offset"] = start * ctx
                    model(batch, stop_at_layer=stop_at)
                    bar.update(batch.numel())
                seq_ids = torch.arange(first, last, dtype=torch.int32).repeat_interleave(ctx)
                meta = {"token_ids": shard_tokens.reshape(-1).to(torch.int32),
                        "sequence": seq_ids,
                        "position": torch.arange(ctx, dtype=torch.int16).repeat(last - first)}
                writer.put(index, first, {h: {"activations": bufs[h], **meta} for h in hooks})
    finally:
        bar.close()
        writer.close()
    return folders


# ---------------------------------------------------------------------------------------------
# Reading


def _mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file (the format is a JSON header, then raw bytes)."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        np_dtype = _ST_DTYPES[info["dtype"]]
        count = (end - start) // np.dtype(np_dtype).itemsize
        arr = np.memmap(path, dtype=np_dtype, mode="r", offset=base + start, shape=(count,))
        out[name] = arr.reshape(info["shape"]) if count else np.zeros(info["shape"], np_dtype)
    return out


class CacheReader:
    """Random access to one hook's cache by global row index, shard files memory-mapped.

    `expect` (e.g. {"model": ..., "hook": ..., "d": ...}) refuses a cache built for something else.
    """

    def __init__(self, folder: Path, expect: dict[str, Any] | None = None, allow_incomplete: bool = False) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        wrong = _mismatches(self.manifest, expect or {})
        if wrong:
            raise SaekitError(f"the cache at {self.folder} does not fit: {'; '.join(wrong)}. Rebuild it for this "
                              "model and hook with `saekit cache`, or point to the right cache.")
        if not self.manifest["complete"] and not allow_incomplete:
            raise SaekitError(f"the cache at {self.folder} is incomplete ({len(self.manifest['shards'])} shards); "
                              "rerun `saekit cache` with the same config to finish it")
        self.shards = self.manifest["shards"]
        for shard in self.shards:
            if not _shard_ok(self.folder, shard, full_check=False):
                raise self._damaged(shard)
        self.d: int = self.manifest["d"]
        self.dtype: str = self.manifest["dtype"]
        counts = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.n_rows = int(self.offsets[-1])
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def _damaged(self, shard: dict[str, Any]) -> SaekitError:
        return SaekitError(f"shard {self.folder / shard['file']} is truncated or altered (size or sha256 differs "
                           "from manifest.json). Rebuild it: rerun `saekit cache` with the same config; it verifies "
                           "every shard and rewrites the damaged ones.")

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        with self._lock:
            if i not in self._maps:
                shard = self.shards[i]
                if not _shard_ok(self.folder, shard, full_check=True):
                    raise self._damaged(shard)
                self._maps[i] = _mmap_safetensors(self.folder / shard["file"])
            return self._maps[i]

    def _gather(self, rows: np.ndarray, name: str) -> np.ndarray:
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shard_ids = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        parts = []
        for sid in np.unique(shard_ids):
            sel = sorted_rows[shard_ids == sid] - self.offsets[sid]
            parts.append(self._shard(int(sid))[name][sel])
        out = np.empty((len(rows),) + parts[0].shape[1:], dtype=parts[0].dtype)
        out[order] = np.concatenate(parts)
        return out

    def activations(self, rows: np.ndarray) -> torch.Tensor:
        """Rows as float32, in the order asked for."""
        arr = self._gather(np.asarray(rows, dtype=np.int64), "activations")
        t = torch.from_numpy(arr)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.float()

    def tokens(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        names = ("token_ids", "sequence", "position")
        return {k: torch.from_numpy(self._gather(rows, k).astype(np.int64)) for k in names}


def batch_indices(n_rows: int, batch_size: int, seed: int, epoch: int, shard_rows: int,
                  buffer_shards: int = 8) -> Iterator[np.ndarray]:
    """Seeded token-level shuffle through a bounded buffer: shards in random order, `buffer_shards`
    at a time, rows permuted within each window. Pure index arithmetic, so skipping batches to
    resume costs no I/O, and every rank of a DDP job derives the same global batches."""
    rng = np.random.default_rng([seed, epoch])
    n_shards = -(-n_rows // shard_rows)
    order = rng.permutation(n_shards)
    carry = np.empty(0, dtype=np.int64)
    for w in range(0, n_shards, buffer_shards):
        window = np.concatenate([np.arange(s * shard_rows, min(n_rows, (s + 1) * shard_rows))
                                 for s in order[w:w + buffer_shards]])
        pool = np.concatenate([carry, rng.permutation(window)])
        n_full = len(pool) // batch_size
        for b in range(n_full):
            yield pool[b * batch_size:(b + 1) * batch_size]
        carry = pool[n_full * batch_size:]


class ActivationBatches:
    """Aligned shuffled batches from one or more hooks' caches (e.g. a transcoder's input and target).

    All caches must hold the same rows in the same order (same model pass); that is checked.
    """

    def __init__(self, readers: list[CacheReader], batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        first = readers[0]
        for r in readers[1:]:
            if r.n_rows != first.n_rows or r.manifest["corpus_fingerprint"] != first.manifest["corpus_fingerprint"] \
                    or r.manifest["shard_sequences"] != first.manifest["shard_sequences"]:
                raise SaekitError(f"caches {first.folder} and {r.folder} do not align row for row "
                                  f"({first.n_rows} vs {r.n_rows} rows, or another corpus); cache both hooks "
                                  "in one `saekit cache` run")
        if batch_size % world_size:
            raise SaekitError(f"batch size {batch_size} must divide evenly across {world_size} processes")
        self.readers, self.batch_size, self.seed = readers, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shard_rows = first.manifest["shard_sequences"] * first.manifest["context_size"]

    @property
    def batches_per_epoch(self) -> int:
        return self.readers[0].n_rows // self.batch_size

    def __call__(self, start_batch: int = 0) -> Iterator[list[torch.Tensor]]:
        """Endless stream of this rank's share of each global batch, from global batch `start_batch`."""
        per_rank = self.batch_size // self.world_size
        lo = self.rank * per_rank
        epoch, skip = divmod(start_batch, self.batches_per_epoch)
        while True:
            for b, idx in enumerate(batch_indices(self.readers[0].n_rows, self.batch_size, self.seed, epoch,
                                                  self.shard_rows)):
                if b < skip:
                    continue
                yield [r.activations(idx[lo:lo + per_rank]) for r in self.readers]
            epoch, skip = epoch + 1, 0

