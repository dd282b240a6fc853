"""Caching speed, side by side in one process on the same sequences.

Four ways to get a layer's activations, each timed on the same token batches:
- bare forward: the model run only to the deepest cached layer, nothing kept (the limit);
- run_with_cache: TransformerLens `run_with_cache` over the full model, activations kept in
  memory (what most users write);
- run_with_cache, stop_at_layer: the same, told to stop after the deepest cached layer (what a
  careful user writes), activations kept in memory;
- saekit: `sae.cache.write_cache`, the full sharded, checksummed cache written to disk.

Repeats are interleaved and the median is reported, so a noisy neighbour hurts all of them alike;
the load average is printed with the table.

    python scripts/bench_cache.py --json bench_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae.cache import write_cache
from sae.hooks import stop_layer
from sae.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hooks", nargs="+", default=["blocks.6.hook_mlp_out"])
    parser.add_argument("--sequences", type=int, default=192, help="sequences per measurement")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    model = load_model(args.model, "auto")
    torch.manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.sequences, args.context))
    n_tokens = tokens.numel()
    stop_at = stop_layer(args.hooks)
    device = model.cfg.device
    batches = [tokens[i:i + args.batch_size].to(device) for i in range(0, args.sequences, args.batch_size)]

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                model(b, stop_at_layer=stop_at)

    def run_with_cache_full() -> None:
        kept = []
        with torch.inference_mode():
            for b in batches:
                _, cache = model.run_with_cache(b, names_filter=lambda n: n in args.hooks)
                kept.append({h: cache[h].cpu() for h in args.hooks})

    def run_with_cache_stop() -> None:
        kept = []
        with torch.inference_mode():
            for b in batches:
                _, cache = model.run_with_cache(b, names_filter=lambda n: n in args.hooks, stop_at_layer=stop_at)
                kept.append({h: cache[h].cpu() for h in args.hooks})

    def saekit() -> None:
        out = Path(tempfile.mkdtemp(prefix="bench-cache-"))
        try:
            write_cache(model, tokens, args.hooks, out, corpus_fingerprint="bench", dtype=args.dtype,
                        batch_size=args.batch_size, progress=False)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    runs = {"bare_forward": bare, "run_with_cache_full": run_with_cache_full,
            "run_with_cache_stop_at_layer": run_with_cache_stop, "saekit": saekit}
    bare()  # warm-up: allocator, kernels
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    tps = {k: n_tokens / statistics.median(v) for k, v in times.items()}
    print(f"\n{args.model} {', '.join(args.hooks)} | {n_tokens:,} tokens per run | device {device} "
          f"| threads {torch.get_num_threads()} | stop_at_layer={stop_at} | 1-min load average {load_before:.1f} "
          f"before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
    print(f"{'method':<30}{'tokens/s':>12}{'vs bare':>10}")
    for name, value in tps.items():
        print(f"{name:<30}{value:>12,.0f}{value / tps['bare_forward']:>9.2f}x")
    print(f"\nsaekit / bare forward   = {tps['saekit'] / tps['bare_forward']:.2f}  (target >= 0.95)")
    print(f"saekit / run_with_cache = {tps['saekit'] / tps['run_with_cache_full']:.2f}  (target > 1)")
    print(f"saekit / run_with_cache with stop_at_layer = {tps['saekit'] / tps['run_with_cache_stop_at_layer']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"tokens_per_s": tps, "stop_at_layer": stop_at,
                                         "load_average": [load_before, os.getloadavg()[0]]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
