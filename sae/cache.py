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

Several processes (`torchrun --nproc_per_node N ... saekit cache`, `ranks=dist_info()`) share the
work: every rank lists and verifies its own share of the shards already on disk (index % N == rank),
one all-reduce tells them all which indices are still missing, and the missing ones are dealt out
round-robin. Each rank writes only its own shards and records them in its partial manifest
`manifest.rank-RRRRR.json`; after a barrier rank 0 merges the parts into `manifest.json` with one
atomic rename and deletes them, and a second barrier holds every rank until the merged manifest
exists. A killed rank leaves complete shards and its part; any rerun, with any number of
processes, verifies what the manifest and the parts list and writes only the rest. For several
nodes the cache folder must be on a filesystem they share.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save
from torch import Tensor
from tqdm.auto import tqdm

from sae.errors import SaekitError
from sae.hooks import capturing, hook_width, stop_layer, validate_hooks
from sae.io import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

CACHE_FORMAT = "saekit-activation-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
PART_GLOB = "manifest.rank-*.json"
GPU_WRITERS = 4  # shard-writer threads when the model runs on a GPU (one keeps up with a CPU forward)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I16": np.int16}


def hook_dir(cache_dir: Path, hook: str) -> Path:
    return Path(cache_dir) / hook


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def part_name(rank: int) -> str:
    """One rank's partial manifest during a multi-process run."""
    return f"manifest.rank-{rank:05d}.json"


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

    @property
    def n_shards(self) -> int:
        return -(-self.n_sequences // self.shard_sequences)

    def manifest(self, shards: list[dict[str, Any]], **extra: int) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, **self.__dict__, **extra,
                "complete": len(shards) == self.n_shards, "n_rows": sum(s["rows"] for s in shards),
                "shards": sorted(shards, key=lambda s: s["index"])}


def _mismatches(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{k}: cache has {manifest.get(k)!r}, expected {v!r}" for k, v in expected.items() if manifest.get(k) != v]


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SaekitError(f"{path} is not valid JSON ({exc}); delete {path.parent} and rerun `saekit cache`") from None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise SaekitError(f"{path} is not a saekit cache of version {CACHE_VERSION} "
                          f"(format={manifest.get('format')!r}, version={manifest.get('version')!r}); rebuild it")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SaekitError(f"no activation cache at {folder} (manifest.json missing); build it with "
                          "`saekit cache --config <your config>`")
    return _load_manifest(path)


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


def _listed(folder: Path, header: CacheHeader) -> list[dict[str, Any]]:
    """Shards named by the manifest and by partial manifests an interrupted multi-process run left;
    refuses a cache built from other inputs."""
    entries: dict[tuple[int, str], dict[str, Any]] = {}
    for path in [folder / MANIFEST, *sorted(folder.glob(PART_GLOB))]:
        if not path.is_file():
            continue
        manifest = _load_manifest(path)
        wrong = _mismatches(manifest, dict(header.__dict__))
        if wrong:
            raise SaekitError(f"the cache at {folder} was built from other inputs ({'; '.join(wrong)}). "
                              "Use another run name, or pass --overwrite to rebuild it.")
        entries.update({(s["index"], s["sha256"]): s for s in manifest["shards"]})
    return list(entries.values())


def _all_max(mask: Tensor, world: int) -> Tensor:
    """Element-wise OR of a bool mask over the ranks (a gloo or NCCL all-reduce)."""
    if world == 1:
        return mask
    on_gpu = dist.get_backend() == "nccl"
    t = mask.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu", torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().bool()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _check_ranks(ranks: tuple[int, int]) -> None:
    rank, world = ranks
    if not 0 <= rank < world:
        raise SaekitError(f"cache ranks: rank {rank} is not in [0, {world})")
    if world > 1 and not (dist.is_initialized() and dist.get_world_size() == world):
        raise SaekitError(f"caching with {world} processes needs their process group; launch with torchrun and "
                          "pass ranks=sae.distributed.dist_info(), which joins it")


def _resume(folders: dict[str, Path], headers: dict[str, CacheHeader], overwrite: bool,
            ranks: tuple[int, int]) -> tuple[dict[str, list[dict[str, Any]]], list[int]]:
    """(this rank's intact shards per hook, indices still to write); each rank checksums only its own
    share of what is listed, and one all-reduce tells every rank which indices are complete for all hooks."""
    rank, world = ranks
    n_shards = next(iter(headers.values())).n_shards
    good = torch.zeros(len(folders), n_shards, dtype=torch.bool)
    kept: dict[str, list[dict[str, Any]]] = {}
    for j, (hook, folder) in enumerate(folders.items()):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob(".shard-*.tmp"), *folder.glob(".manifest*.tmp")]:
            stale.unlink(missing_ok=True)
        mine = [s for s in ([] if overwrite else _listed(folder, headers[hook])) if s["index"] % world == rank]
        kept[hook] = [s for s in mine if _shard_ok(folder, s, full_check=True)]
        good[j, torch.tensor([s["index"] for s in kept[hook]], dtype=torch.long)] = True
        if len(kept[hook]) < len({s["index"] for s in mine}):
            tqdm.write(f"{folder}: {len({s['index'] for s in mine}) - len(kept[hook])} damaged shard(s) "
                       "will be rewritten")
    complete = _all_max(good, world).all(0)
    done = {h: [s for s in kept[h] if complete[s["index"]]] for h in folders}
    return done, [i for i in range(n_shards) if not complete[i]]


def _rank_keys(ranks: tuple[int, int]) -> dict[str, int]:
    """What a partial manifest adds to the header: whose part it is."""
    return {"rank": ranks[0], "world": ranks[1]} if ranks[1] > 1 else {}


def _start(folders: dict[str, Path], headers: dict[str, CacheHeader], done: dict[str, list[dict[str, Any]]],
           overwrite: bool, ranks: tuple[int, int]) -> str:
    """Record each rank's kept shards in its progress file, then drop the files they supersede; returns
    the progress file's name (the manifest itself for one process, else the rank's part)."""
    rank, world = ranks
    progress = MANIFEST if world == 1 else part_name(rank)
    for hook, folder in folders.items():
        atomic_write_json(folder / progress, headers[hook].manifest(done[hook], **_rank_keys(ranks)))
    _barrier(world)
    if rank == 0:
        current = {part_name(r) for r in range(world)} if world > 1 else set()
        for folder in folders.values():
            for part in folder.glob(PART_GLOB):
                if part.name not in current:
                    part.unlink(missing_ok=True)
            if overwrite and world > 1:
                (folder / MANIFEST).unlink(missing_ok=True)
    return progress


def _merge(folders: dict[str, Path], headers: dict[str, CacheHeader], world: int) -> None:
    """Rank 0, after every rank has written its last shard: the parts become one manifest (atomic rename)."""
    for hook, folder in folders.items():
        shards: dict[int, dict[str, Any]] = {}
        for r in range(world):
            shards.update({s["index"]: s for s in _load_manifest(folder / part_name(r))["shards"]})
        atomic_write_json(folder / MANIFEST, headers[hook].manifest(list(shards.values())))
        for part in folder.glob(PART_GLOB):
            part.unlink(missing_ok=True)


class _ShardWriter:
    """Background threads that serialise, checksum, write and list shards, overlapping disk with compute.

    One thread keeps up with a CPU forward pass; a GPU produces activations faster than one core can
    hash and write them, so there several threads take shards in turn (sha256 and file writes release
    the GIL) and a lock keeps the progress file's updates whole."""

    def __init__(self, folders: dict[str, Path], headers: dict[str, CacheHeader],
                 done: dict[str, list[dict[str, Any]]], progress: str, ranks: tuple[int, int],
                 threads: int = 1) -> None:
        self.folders, self.headers, self.done, self.progress = folders, headers, done, progress
        self.extra = _rank_keys(ranks)
        self.jobs: queue.Queue[tuple[int, int, dict[str, dict[str, Tensor]]] | None] = queue.Queue(maxsize=2 * threads)
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, name=f"saekit-shard-writer-{i}", daemon=True)
                        for i in range(threads)]
        for thread in self.threads:
            thread.start()

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
                    with self.lock:
                        self.done[hook] = [s for s in self.done[hook] if s["index"] != index] + [entry]
                        manifest = self.headers[hook].manifest(self.done[hook], **self.extra)
                        atomic_write_json(folder / self.progress, manifest)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by put/close
                self.error = exc

    def put(self, index: int, first: int, per_hook: dict[str, dict[str, Tensor]]) -> None:
        self._raise()
        self.jobs.put((index, first, per_hook))

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class ShardCapture:
    """Where hook callbacks copy each batch: one preallocated buffer per hook for the current shard.

    From CUDA the copies go asynchronously into pinned memory, so the device is never stalled by one;
    `take()` waits for them before the shard goes to the writer thread.
    """

    def __init__(self, widths: dict[str, int], dtype: torch.dtype) -> None:
        self.widths, self.dtype = widths, dtype
        self.bufs: dict[str, Tensor] = {}
        self.rows = self.offset = 0
        self.cuda = False

    def start(self, rows: int) -> None:
        self.bufs, self.rows, self.offset = {}, rows, 0

    def __call__(self, name: str, act: Tensor) -> None:
        flat = act.reshape(-1, act.shape[-1])
        if name not in self.bufs:
            self.bufs[name] = torch.empty(self.rows, self.widths[name], dtype=self.dtype, pin_memory=act.is_cuda)
        self.cuda |= act.is_cuda
        self.bufs[name][self.offset:self.offset + flat.shape[0]].copy_(flat, non_blocking=act.is_cuda)

    def take(self) -> dict[str, Tensor]:
        if self.cuda:
            torch.cuda.synchronize()
        missing = [h for h in self.widths if h not in self.bufs]
        if missing:
            raise SaekitError(f"the forward pass never reached {', '.join(missing)}; nothing to cache there")
        return self.bufs


def write_shards(capture: ShardCapture, forward: Callable[[Tensor], Any], tokens: Tensor,
                 headers: dict[str, CacheHeader], cache_dir: Path, *, batch_size: int, overwrite: bool = False,
                 progress: bool = True, ranks: tuple[int, int] = (0, 1), writers: int = 1) -> dict[str, Path]:
    """The model-agnostic body of `write_cache`: `forward(batch)` runs the model on token batches while its
    hooks fill `capture`; this rank's missing shards are written by `writers` background threads. `tokens`
    must be the same on every rank."""
    _check_ranks(ranks)
    rank, world = ranks
    n_seq, ctx = tokens.shape
    per_shard = next(iter(headers.values())).shard_sequences
    folders = {h: hook_dir(cache_dir, h) for h in headers}
    done, todo = _resume(folders, headers, overwrite, ranks)
    writer = _ShardWriter(folders, headers, done, _start(folders, headers, done, overwrite, ranks), ranks, writers)
    mine = todo[rank::world]
    who = f" (rank 0 of {world})" if world > 1 else ""
    bar = tqdm(total=sum(min(per_shard, n_seq - i * per_shard) * ctx for i in mine), unit="tok", unit_scale=True,
               desc=f"caching {len(headers)} hook(s){who}", disable=not progress or rank > 0, dynamic_ncols=True)
    try:
        for index in mine:
            first, last = index * per_shard, min(n_seq, (index + 1) * per_shard)
            shard_tokens = tokens[first:last]
            capture.start(shard_tokens.numel())
            for start in range(0, last - first, batch_size):
                capture.offset = start * ctx
                forward(shard_tokens[start:start + batch_size])
                bar.update(min(batch_size, last - first - start) * ctx)
            meta = {"token_ids": shard_tokens.reshape(-1).to(torch.int32),
                    "sequence": torch.arange(first, last, dtype=torch.int32).repeat_interleave(ctx),
                    "position": torch.arange(ctx, dtype=torch.int16).repeat(last - first)}
            writer.put(index, first, {h: {"activations": buf, **meta} for h, buf in capture.take().items()})
    finally:
        bar.close()
        writer.close()
    _barrier(world)
    if world > 1 and rank == 0:
        _merge(folders, headers, world)
    _barrier(world)
    return folders


def write_cache(
    model: HookedTransformer,
    tokens: Tensor,
    hooks: list[str],
    cache_dir: Path,
    *,
    corpus_fingerprint: str,
    dtype: str = "float32",
    batch_size: int = 32,
    shard_sequences: int = 128,
    overwrite: bool = False,
    progress: bool = True,
    ranks: tuple[int, int] = (0, 1),
) -> dict[str, Path]:
    """Run the model once over `tokens` [n_seq, ctx] and cache every hook; resumes where it stopped.

    The forward pass stops after the deepest hooked layer, runs in inference mode, and hands
    finished shards to a writer thread so disk I/O overlaps the next forward passes. Under torchrun,
    `ranks=sae.distributed.dist_info()` splits the shards between the processes.
    """
    validate_hooks(model, hooks)
    if dtype not in TORCH_DTYPES:
        raise SaekitError(f"cache dtype '{dtype}' is not supported; use one of {', '.join(TORCH_DTYPES)}")
    n_seq, ctx = tokens.shape
    headers = {h: CacheHeader(model.cfg.model_name, h, hook_width(model, h), dtype, ctx, corpus_fingerprint,
                              n_seq, shard_sequences) for h in hooks}
    capture = ShardCapture({h: headers[h].d for h in hooks}, TORCH_DTYPES[dtype])
    stop_at, device = stop_layer(hooks), model.cfg.device
    writers = GPU_WRITERS if str(device).startswith("cuda") else 1
    with torch.inference_mode(), capturing(model, hooks, sink=capture):
        return write_shards(capture, lambda batch: model(batch.to(device), stop_at_layer=stop_at), tokens,
                            headers, cache_dir, batch_size=batch_size, overwrite=overwrite, progress=progress,
                            ranks=ranks, writers=writers)


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

