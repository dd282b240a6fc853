"""saekit's GPU path, checked and measured in one run on a bare GPU machine (issue 11, item 4).

    scripts/device_check.sh                          # on the GPU machine: about 5 minutes
    DEVICE_CHECK_SMOKE=1 scripts/device_check.sh     # the same code at small sizes, on this CPU

What the machine has: python3 with torch (CUDA), transformers, safetensors, numpy and triton. What it
lacks: transformer-lens, sae-lens, eai-sparsify, wandb, streamlit, gguf, pytest, and the network. So only
torch is required here; every other package is optional and its absence is reported, not fatal.
Wheels from `scripts/build_device_wheels.sh` (folder `build/device-wheels`, or $DEVICE_WHEELS) are
unpacked into a temporary folder at the *end* of sys.path: they add sparsify, never shadow what the
machine has.

Sections, each printed under a banner, then one summary table:
  [A] kernels: every registered architecture's training step on the device against dense autograd
      (loss, statistics and every gradient), in fp32 and with bf16 (the bf16 encoder matmul of the
      sparse path; bf16 parameters for architectures without a sparse path).
  [B] training: scripts/bench_train.py on synthetic activations with planted sparse features at GPU
      sizes (d=2048, 32x, k=64, batch 8192): saekit vs eai-sparsify (its Triton decoder where Triton
      is present), the same fused Adam for both, held-out FVU, tokens/s, the bf16 roofline fraction.
  [C] cache writer: a random-weight transformers Llama of SmolLM2-135M's shape, run to layer 6 only
      (the equivalent of TransformerLens's stop_at_layer=7): the bare forward, the forward with the
      capture hooks (copy to pinned host memory), and saekit's shard writer (`sae.cache.write_shards`:
      the same code `saekit cache` runs) fed by plain torch forward hooks, because TransformerLens
      cannot be shipped (see scripts/build_device_wheels.sh). Interleaved repeats, medians.
  [D] kernel choice: one TopK training step (forward and backward) at the sizes of [B] by each path:
      sparse kernels with a bf16 or fp32 encoder matmul, dense autograd in fp32, in bf16 autocast, and
      compiled; then which path the trainer takes and whether it is the fastest measured here.

Exit status 1 when a correctness check fails or a section errors; speed targets missed are reported in
the summary, not as failures.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from bench_train import median_time, sync  # noqa: E402 - after the path above

SMOKE = os.environ.get("DEVICE_CHECK_SMOKE") == "1"
WIDTH = 100


class Sizes(NamedTuple):
    d: int  # SAE input width for [B] and [D]
    expansion: int
    k: int
    batch: int
    train_tokens: int
    max_batches: int
    held_out: int
    cache_sequences: int
    cache_context: int
    cache_batch: int
    repeats: int
    kernel_steps: int


GPU = Sizes(d=2048, expansion=32, k=64, batch=8192, train_tokens=400 * 8192, max_batches=16, held_out=16384,
            cache_sequences=4096, cache_context=128, cache_batch=128, repeats=3, kernel_steps=10)
SMALL = Sizes(d=64, expansion=8, k=8, batch=256, train_tokens=40 * 256, max_batches=8, held_out=1024,
              cache_sequences=16, cache_context=64, cache_batch=8, repeats=2, kernel_steps=3)


class Row(NamedTuple):
    """One line of the summary table."""

    section: str
    check: str
    result: str
    target: str
    status: str  # pass | FAIL | below target | finding | skipped | ERROR | info


SUMMARY: list[Row] = []


def banner(title: str) -> None:
    print("\n" + "=" * WIDTH + f"\n{title}\n" + "=" * WIDTH, flush=True)


# ---------------------------------------------------------------------------------------------
# Environment


def unpack_wheels(folder: Path) -> list[str]:
    """Unzip every wheel of `folder` into a temporary directory appended to sys.path (a wheel is a zip of
    its importable files), so the machine's own packages keep precedence."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return []
    target = Path(tempfile.mkdtemp(prefix="saekit-device-wheels-"))
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
    sys.path.append(str(target))
    return [w.name for w in wheels]


DISTRIBUTIONS = {"sae_lens": "sae-lens", "transformer_lens": "transformer-lens"}


def version(module: str) -> str:
    """The installed version, without importing the heavy optional packages (only their presence matters)."""
    import importlib.metadata as md
    import importlib.util

    if module in DISTRIBUTIONS:
        if importlib.util.find_spec(module) is None:
            return "absent"
        return md.version(DISTRIBUTIONS[module])
    try:
        mod = __import__(module)
    except Exception as exc:  # noqa: BLE001 - any failure to import means "not usable here"
        return f"absent ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "present"))


def environment() -> torch.device:
    banner("[0] environment" + ("  (SMOKE MODE: small sizes on this machine)" if SMOKE else ""))
    wheels = unpack_wheels(Path(os.environ.get("DEVICE_WHEELS", REPO / "build" / "device-wheels")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, bf16 supported: "
             f"{torch.cuda.is_bf16_supported()})" if device.type == "cuda" else
             f" ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f})"))
    print(f"wheels unpacked from the wheels folder: {', '.join(wheels) or 'none'}")
    for module in ("numpy", "safetensors", "transformers", "triton", "sparsify", "sae_lens", "transformer_lens"):
        print(f"  {module:<18} {version(module) if module != 'sparsify' else sparsify_version()}")
    if device.type != "cuda" and not SMOKE:
        print("note: no CUDA device; the GPU sizes will run on the CPU (set DEVICE_CHECK_SMOKE=1 for small sizes)")
    return device


def sparsify_version() -> str:
    try:
        from bench_train import import_sparsify

        import_sparsify()
    except Exception as exc:  # noqa: BLE001
        return f"absent ({type(exc).__name__}: {exc})"
    import importlib.metadata as md

    try:
        return md.version("eai-sparsify")
    except md.PackageNotFoundError:
        return "present (from the wheels folder)"


# ---------------------------------------------------------------------------------------------
# [A] kernels against dense autograd


def randomised(arch: str, device: torch.device, **kw: Any) -> Any:
    """An SAE of `arch` with non-trivial biases and thresholds (as tests/test_architectures.py builds them)."""
    from sae.saes import SAEShape, build_sae, config_class

    shape_keys = ("d_in", "d_sae", "d_out", "is_transcoder")
    shape = SAEShape(**{k: kw.pop(k) for k in shape_keys if kw.get(k) is not None})
    cls = config_class(arch)
    names = {f.name for f in dataclasses.fields(cls)}
    sae = build_sae(shape, cls(**{k: v for k, v in kw.items() if k in names}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=gen))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=gen) * 0.3 + 0.05)
    return sae.to(device)


def step_and_grads(sae: Any, x: torch.Tensor, target: torch.Tensor | None, dead: torch.Tensor) -> dict[str, Any]:
    out = sae.training_step(x, target, dead_mask=dead)
    sae.zero_grad(set_to_none=True)
    out.loss.backward()
    got = {f: getattr(out, f).detach().float().cpu() for f in ("loss", "mse", "aux_loss", "l0", "recon")}
    got["fire_counts"] = out.fire_counts.cpu()
    got.update({f"grad {n}": p.grad.float().cpu() for n, p in sae.named_parameters() if p.grad is not None})
    return got


def compare(a: dict[str, Any], b: dict[str, Any], rtol: float = 1e-4, atol: float = 1e-4,
            loose: float | None = None) -> list[str]:
    """Names of the quantities that differ: elementwise within rtol/atol and fire counts exactly, or with
    `loose`, every tensor within that relative (norm) error and the total firing count within it too."""
    bad = [k for k in b if k not in a]
    for key, want in b.items():
        if key not in a:
            continue
        got = a[key]
        if loose is not None:
            got, want = got.double(), want.double()
            err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
            if key == "fire_counts":
                err = abs(got.sum().item() - want.sum().item()) / max(want.sum().item(), 1.0)
            if err > loose:
                bad.append(f"{key} (relative error {err:.2e})")
        elif key == "fire_counts":
            if not torch.equal(got, want):
                bad.append(key)
        elif not torch.allclose(got, want, rtol=rtol, atol=atol):
            bad.append(f"{key} (max abs err {(got - want).abs().max().item():.2e})")
    return bad


def margin_data(sae: Any, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs whose top-k latents win by a clear margin (orthogonal dictionary), so bf16 picks the same ones."""
    d = sae.shape.d_in
    ortho = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_dec.copy_(ortho.to(sae.W_dec.device))
        sae.W_enc.copy_(ortho.t().to(sae.W_enc.device))
    latents = torch.rand(n, d, generator=gen).argsort(dim=1)[:, :k]
    coef = torch.zeros(n, d).scatter(1, latents, 2 + 2 * torch.rand(n, k, generator=gen))
    return coef @ ortho + 0.01 * torch.randn(n, d, generator=gen)


def kernel_case(arch: str, precision: str, transcoder: bool, device: torch.device) -> tuple[str, list[str]]:
    """(what was compared, what differs) for one architecture and precision."""
    from sae.saes import config_class

    has_fast = "fast" in {f.name for f in dataclasses.fields(config_class(arch))}
    gen = torch.Generator().manual_seed(2)
    if precision == "bf16" and has_fast:
        fast = randomised(arch, device, d_in=64, d_sae=64, k=4, fast=True, encoder_bf16=True)
        x = margin_data(fast, 128, 4, gen).to(device)
        target, dead = None, torch.zeros(64, dtype=torch.bool, device=device)
    else:
        kw: dict[str, Any] = dict(d_in=32, d_sae=256, k=8, is_transcoder=transcoder, d_out=24 if transcoder else None)
        fast = randomised(arch, device, fast=True, encoder_bf16=False, **kw)
        x = torch.randn(96, 32, generator=gen).to(device)
        target = torch.randn(96, 24, generator=gen).to(device) if transcoder else None
        dead = (torch.rand(256, generator=gen) < 0.3).to(device)
    if has_fast:
        dense = copy.deepcopy(fast)
        dense.hyper = dataclasses.replace(fast.hyper, fast=False)
        what = f"sparse kernels ({'bf16' if precision == 'bf16' else 'fp32'} encoder) vs dense autograd fp32"
        return what, compare(step_and_grads(fast, x, target, dead), step_and_grads(dense, x, target, dead))
    if precision == "bf16":  # no sparse path: the device's bf16 step against the CPU's, same dtype
        fast = fast.to(torch.bfloat16)
    reference = step_and_grads(copy.deepcopy(fast).cpu(), x.cpu(), None if target is None else target.cpu(),
                               dead.cpu())
    if precision == "bf16":
        what = f"bf16 parameters on {device.type} vs bf16 on cpu (no sparse path; relative error <= 5%)"
        return what, compare(step_and_grads(fast, x, target, dead), reference, loose=0.05)
    return f"fp32 on {device.type} vs fp32 on cpu (no sparse path)", compare(step_and_grads(fast, x, target, dead),
                                                                              reference)


def section_kernels(device: torch.device) -> bool:
    from sae.saes import ARCHITECTURES

    banner(f"[A] kernels on {device}: every architecture's training step against dense autograd (fp32, bf16)")
    ok = True
    for arch in sorted(ARCHITECTURES):
        for precision, transcoder in (("fp32", False), ("fp32", True), ("bf16", False)):
            name = f"{arch} {precision}" + (" transcoder" if transcoder else "")
            try:
                what, bad = kernel_case(arch, precision, transcoder, device)
            except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
                what, bad = "raised", [f"{type(exc).__name__}: {exc}"]
            status = "pass" if not bad else "FAIL"
            ok &= not bad
            print(f"  {name:<28} {status:<5} {what}" + (f"; differs: {', '.join(bad)}" if bad else ""))
            SUMMARY.append(Row("A kernels", name, "match" if not bad else "; ".join(bad)[:60],
                               "loss, stats and grads match", status))
    return ok


# ---------------------------------------------------------------------------------------------
# [B] training speed and quality


def section_training(device: torch.device, sizes: Sizes) -> None:
    import bench_train

    banner(f"[B] training on {device}: saekit vs eai-sparsify on planted sparse features, d={sizes.d}, "
           f"{sizes.expansion}x, k={sizes.k}, batch {sizes.batch}, the same fused Adam")
    skip = ["sae-lens"] if SMOKE or not bench_train.sae_lens_available() else []
    if skip:
        print("SAE-Lens: " + ("skipped in smoke mode (its import alone takes tens of seconds here)" if SMOKE else
                              "not installed (its wheels do not fit in 64 MiB: see scripts/build_device_wheels.sh)"))
    out = Path(tempfile.mkdtemp(prefix="saekit-device-bench-")) / "bench.json"
    argv = ["--synthetic", str(sizes.d), "--expansion", str(sizes.expansion), "--k", str(sizes.k), "--batch-size",
            str(sizes.batch), "--tokens", str(sizes.train_tokens), "--max-batches", str(sizes.max_batches),
            "--held-out", str(sizes.held_out), "--chunk-steps", "10", "--warmup-steps", "20", "--lr",
            "3e-3" if SMOKE else "1e-3", "--device", str(device), "--json", str(out), "--no-progress",
            *(["--skip", *skip] if skip else [])]
    print("python scripts/bench_train.py " + " ".join(a for a in argv if a != str(out)), flush=True)
    if bench_train.main(argv) != 0:
        raise RuntimeError("bench_train failed")
    fig = json.loads(out.read_text())
    tps, fvu = fig["tokens_per_s"], fig["fvu"]
    SUMMARY.append(Row("B training", "saekit tokens/s", f"{tps['saekit']:,.0f}", "-", "info"))
    SUMMARY.append(Row("B training", "bf16 encoder-matmul roofline fraction", f"{fig['roofline_fraction']:.2f}",
                       ">= 0.5", "pass" if fig["roofline_fraction"] >= 0.5 else "below target"))
    if "eai-sparsify" in tps:
        ratio, diff = tps["saekit"] / tps["eai-sparsify"], fvu["saekit"] - fvu["eai-sparsify"]
        good = ratio >= 1.5 and diff <= 0.01
        SUMMARY.append(Row("B training", "saekit / eai-sparsify tokens/s (same Adam)",
                           f"{ratio:.2f}x, FVU {fvu['saekit']:.3f} vs {fvu['eai-sparsify']:.3f}",
                           ">= 1.5x, FVU <= peer + 0.01", "pass" if good else "below target"))
    else:
        SUMMARY.append(Row("B training", "saekit / eai-sparsify", "eai-sparsify not available", "wheels folder",
                           "skipped"))


# ---------------------------------------------------------------------------------------------
# [C] cache writer


def smollm2_shaped(n_layers: int, device: torch.device) -> Any:
    """A random-weight Llama with SmolLM2-135M's shape (no download), cut after `n_layers` layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).eval().model  # the decoder stack only: no unembedding


def section_cache(device: torch.device, sizes: Sizes) -> None:
    from sae.cache import ShardCapture

    layer, hook = 6, "blocks.6.hook_mlp_out"
    banner(f"[C] cache writer on {device}: random SmolLM2-135M-shaped transformers Llama, {hook}, "
           f"{sizes.cache_sequences} x {sizes.cache_context} tokens, batches of {sizes.cache_batch}")
    print("TransformerLens is not on this machine (and its dependencies do not fit in 64 MiB), so the model is a "
          "transformers LlamaForCausalLM cut after layer 6 (what stop_at_layer=7 runs) with a plain torch forward "
          "hook on layers[6].mlp; the writer is sae.cache.write_shards, the code `saekit cache` runs.", flush=True)
    model = smollm2_shaped(layer + 1, device)
    tokens = torch.randint(0, 49152, (sizes.cache_sequences, sizes.cache_context),
                           generator=torch.Generator().manual_seed(0))
    figures: dict[str, float] = {}
    for dtype in ("float32", "bfloat16"):
        figures.update(time_cache(model, tokens, ShardCapture({hook: 576}, getattr(torch, dtype)), hook, dtype,
                                  device, sizes))
    report_cache(figures, tokens.numel(), device)


@contextmanager
def hooked(module: torch.nn.Module, capture: Any, hook: str) -> Iterator[None]:
    """A plain torch forward hook handing the module's output to `capture` (sae/hooks.py does this for
    TransformerLens models; a transformers model needs its own)."""
    handle = module.register_forward_hook(lambda mod, inp, out: capture(hook, out))
    try:
        yield
    finally:
        handle.remove()


def time_cache(model: Any, tokens: torch.Tensor, capture: Any, hook: str, dtype: str, device: torch.device,
               sizes: Sizes) -> dict[str, float]:
    """Seconds (median of interleaved repeats) of the bare forward, forward + capture, and the full writer."""
    from sae.cache import GPU_WRITERS, CacheHeader, write_shards

    mlp = model.layers[6].mlp
    batches = [tokens[i:i + sizes.cache_batch] for i in range(0, len(tokens), sizes.cache_batch)]
    header = {hook: CacheHeader("smollm2-shaped-random", hook, 576, dtype, sizes.cache_context, "device-check",
                                len(tokens), 128 if not SMOKE else 4)}
    root = Path(tempfile.mkdtemp(prefix="saekit-device-cache-"))

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.to(device, non_blocking=True), use_cache=False)

    def capture_only() -> None:
        with torch.inference_mode(), hooked(mlp, capture, hook):
            capture.start(sizes.cache_batch * sizes.cache_context)
            for b in batches:
                capture.offset = 0
                model(input_ids=b.to(device, non_blocking=True), use_cache=False)
            capture.take()

    def writer(threads: int) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), hooked(mlp, capture, hook):
                write_shards(capture, lambda b: model(input_ids=b.to(device, non_blocking=True), use_cache=False),
                             tokens, header, root, batch_size=sizes.cache_batch, overwrite=True, progress=False,
                             writers=threads)
        return run

    runs = {"bare_forward": bare, "forward_and_capture": capture_only, "write_shards_1": writer(1),
            f"write_shards_{GPU_WRITERS}": writer(GPU_WRITERS)}
    bare()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for _ in range(sizes.repeats):
            for name, fn in runs.items():
                times[name].append(median_time(fn, device, 1, warmup=0))
        shard_bytes = sum(f.stat().st_size for f in (root / hook).glob("shard-*.safetensors"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**{f"{k} {dtype}": statistics.median(v) for k, v in times.items()}, f"bytes {dtype}": float(shard_bytes)}


def report_cache(figures: dict[str, float], n_tokens: int, device: torch.device) -> None:
    """The table; the summary takes the writer-thread count `write_cache` uses on this device."""
    from sae.cache import GPU_WRITERS

    bare = statistics.median([figures["bare_forward float32"], figures["bare_forward bfloat16"]])
    used = GPU_WRITERS if device.type == "cuda" else 1
    print(f"\n{'path':<40}{'tokens/s':>14}{'vs bare':>10}{'MB/s to disk':>15}")
    print(f"{'bare forward':<40}{n_tokens / bare:>14,.0f}{1.0:>9.2f}x{'-':>15}")
    for dtype in ("float32", "bfloat16"):
        cap = figures[f"forward_and_capture {dtype}"]
        print(f"{'forward + capture (' + dtype + ')':<40}{n_tokens / cap:>14,.0f}{bare / cap:>9.2f}x{'-':>15}")
        for threads in (1, GPU_WRITERS):
            write = figures[f"write_shards_{threads} {dtype}"]
            label = f"write_shards ({dtype}, {threads} writer{'s' if threads > 1 else ''})"
            print(f"{label:<40}{n_tokens / write:>14,.0f}{bare / write:>9.2f}x"
                  f"{figures[f'bytes {dtype}'] / write / 1e6:>15,.0f}")
        ratio = bare / figures[f"write_shards_{used} {dtype}"]
        SUMMARY.append(Row("C cache", f"writer / bare forward ({dtype}, {used} writer thread(s))", f"{ratio:.2f}x",
                           ">= 0.9x (GPU)", "pass" if ratio >= 0.9 else "below target"))
    print(f"(write_cache uses {GPU_WRITERS} writer threads when the model is on a GPU, 1 on a CPU. The writer's gap "
          "to 'forward + capture' is serialising, checksumming (sha256) and writing the shards in the background; "
          "the gap from bare to capture is the hooks' device-to-host copies)")


# ---------------------------------------------------------------------------------------------
# [D] kernel choice


def kernel_paths(sae_for: Callable[[bool, bool | None], Any], x: torch.Tensor,
                 device: torch.device) -> dict[str, Callable[[], None]]:
    """One forward + backward of a TopK training step by each candidate path (no AuxK: same work for all)."""
    def step(sae: Any, autocast: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = sae.training_step(x, x).loss
            loss.backward()
            sae.zero_grad(set_to_none=True)
        return run

    dense = sae_for(False, None)
    compiled_loss = torch.compile(lambda inp: dense.training_step(inp, inp).loss)

    def compiled() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compiled_loss(x)
        loss.backward()
        dense.zero_grad(set_to_none=True)

    paths = {"sparse kernels, bf16 encoder": step(sae_for(True, True), False),
             "sparse kernels, fp32 encoder": step(sae_for(True, False), False),
             "dense autograd, fp32": step(dense, False),
             "dense autograd, bf16 autocast": step(dense, True),
             "dense autograd, bf16 autocast, torch.compile": compiled}
    if SMOKE and os.environ.get("DEVICE_CHECK_COMPILE") != "1":
        print("  (torch.compile left out in smoke mode: its C++ build takes minutes on a small shared CPU; "
              "DEVICE_CHECK_COMPILE=1 includes it)")
        del paths["dense autograd, bf16 autocast, torch.compile"]
    return paths


def time_paths(paths: dict[str, Callable[[], None]], device: torch.device, steps: int) -> dict[str, float]:
    """Median seconds per call of each path that runs here; rounds interleave the paths, so load drifts
    hit them alike. The first calls (compilation, allocator) are timed apart and left out."""
    live: dict[str, Callable[[], None]] = {}
    for name, fn in paths.items():
        try:
            start = time.perf_counter()
            fn()
            fn()
            sync(device)
            if "compile" in name:
                print(f"  ({name}: first two calls, compilation included, {time.perf_counter() - start:.1f}s)")
            live[name] = fn
        except Exception as exc:  # noqa: BLE001 - e.g. no compiler for torch.compile on this machine
            print(f"  {name:<48} unavailable here: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    samples: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(steps):
        for name, fn in live.items():
            samples[name].append(median_time(fn, device, 1, warmup=0))
    return {name: statistics.median(v) for name, v in samples.items()}


def section_kernel_choice(device: torch.device, sizes: Sizes) -> None:
    from sae.saes import SAEShape, TopKConfig, build_sae, kernels

    d, d_sae = sizes.d, sizes.d * sizes.expansion
    banner(f"[D] kernel choice on {device}: one TopK training step (forward + backward), d={d}, d_sae={d_sae}, "
           f"k={sizes.k}, batch {sizes.batch}")

    def sae_for(fast: bool, bf16: bool | None) -> Any:
        return build_sae(SAEShape(d_in=d, d_sae=d_sae), TopKConfig(k=sizes.k, fast=fast, encoder_bf16=bf16),
                         seed=0).to(device)

    x = torch.randn(sizes.batch, d, generator=torch.Generator().manual_seed(0)).to(device)
    times = time_paths(kernel_paths(sae_for, x, device), device, sizes.kernel_steps)
    for name, sec in times.items():
        print(f"  {name:<48} {sec * 1e3:9.2f} ms  {sizes.batch / sec:>12,.0f} tokens/s")
    bf16 = kernels.bf16_is_faster(str(device), d, d_sae)
    pick = f"sparse kernels, {'bf16' if bf16 else 'fp32'} encoder"
    fastest = min(times, key=times.__getitem__)
    print(f"\nthe trainer takes: {pick}  (TopKConfig.fast defaults to true; the encoder dtype comes from "
          f"kernels.bf16_is_faster('{device.type}', {d}, {d_sae}) = {bf16})")
    print(f"fastest measured here: {fastest}; the trainer's path takes {times[pick] / times[fastest]:.2f}x its time")
    status = "pass" if times[pick] <= 1.1 * times[fastest] else "finding"
    SUMMARY.append(Row("D kernel choice", "trainer's path vs fastest", f"{pick}: {times[pick] / times[fastest]:.2f}x"
                       f" of {fastest}", "<= 1.1x of the fastest", status))


# ---------------------------------------------------------------------------------------------
# Main


def run_section(name: str, fn: Callable[[], Any]) -> bool:
    """Run one section; an exception is printed and recorded, and the remaining sections still run."""
    try:
        result = fn()
        return result is not False
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        SUMMARY.append(Row(name, "section", f"{type(exc).__name__}: {exc}"[:70], "-", "ERROR"))
        return False


def print_summary(seconds: float) -> None:
    banner(f"SUMMARY ({'smoke mode, small sizes' if SMOKE else 'GPU sizes'}; {seconds:.0f}s)")
    cols = [max(len(str(getattr(r, f))) for r in [Row("section", "check", "result", "target", "status"), *SUMMARY])
            for f in Row._fields]
    for row in [Row("section", "check", "result", "target", "status"), *SUMMARY]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, cols, strict=True)))


def main() -> int:
    start = time.perf_counter()
    sizes = SMALL if SMOKE else GPU
    if SMOKE:
        torch.set_num_threads(1)  # small ops on a shared CPU: a second thread only waits
    device = environment()
    ok = run_section("A kernels", lambda: section_kernels(device))
    ok &= run_section("B training", lambda: section_training(device, sizes))
    ok &= run_section("C cache", lambda: section_cache(device, sizes))
    ok &= run_section("D kernel choice", lambda: section_kernel_choice(device, sizes))
    print_summary(time.perf_counter() - start)
    print(f"\ndevice check {'passed' if ok else 'FAILED'}: "
          + ("every kernel matches and every section ran" if ok else "see FAIL / ERROR above"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
