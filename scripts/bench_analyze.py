"""Benchmark the feature analysis pass on the same tokens, in one process:

- bare: the model's forward pass to the SAE's layer, nothing else (the limit);
- saekit: `features.analyze.analyze`'s streaming pass (forward, encode, every statistic, top-k tables,
  interval samples with context windows, correlations) for every feature and every neuron of the layer;
  its once-per-unit finishing work (logit effects, neighbours, co-firing) is timed separately;
- naive: what a user would write: dense activations per batch, `torch.topk` over tokens per unit, then
  Python-side merging of each unit's best examples and running sums.

All three get the same warm-up (one batch each) and are repeated in interleaved rounds, best of `--repeats`
each, so drift and background load hit them alike. Then the store is written and its size and query
latencies (feature page, filtered lists, text search) measured.

    .venv/bin/python scripts/bench_analyze.py --sequences 128 --d-sae 16384 --json bench.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from features.analyze import AnalyzeConfig, analyze, vocab_strings, write_analysis
from features.store import FeatureStore, UnitQuery
from sae import corpus
from sae.hooks import neuron_hook, run_to, stop_layer
from sae.io import atomic_write_json
from sae.models import load_model
from sae.saes import Provenance, SAEShape, TopKConfig, build_sae


def bare_forward(model: Any, tokens: torch.Tensor, stop: int, batch_size: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of the forward pass alone."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for lo in range(0, len(tokens), batch_size):
            model(tokens[lo:lo + batch_size], stop_at_layer=stop)
    return time.perf_counter() - start, time.process_time() - cpu


def naive(model: Any, sae: Any, tokens: torch.Tensor, hooks: list[str], batch_size: int,
          k: int = 20) -> tuple[float, float]:
    """Dense activations per batch, topk over tokens per unit, Python lists per unit for the best examples."""
    start, cpu = time.perf_counter(), time.process_time()
    ctx = tokens.shape[1]
    best: dict[str, list[list[tuple[float, int, int]]]] = {}
    sums: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for lo in range(0, len(tokens), batch_size):
            cache = run_to(model, tokens[lo:lo + batch_size], hooks)
            acts = {"feature": sae.encode(cache[hooks[0]].reshape(-1, sae.shape.d_in)),
                    "neuron": cache[hooks[1]].reshape(-1, model.cfg.d_mlp)}
            for kind, a in acts.items():
                stats = torch.stack([(a > 0).sum(0).double(), a.clamp_min(0).sum(0).double(),
                                     a.max(0).values.double()])
                sums[kind] = stats if kind not in sums else torch.stack(
                    [sums[kind][0] + stats[0], sums[kind][1] + stats[1], torch.maximum(sums[kind][2], stats[2])])
                top = a.t().topk(min(k, a.shape[0]), dim=1)
                values, rows = top.values.tolist(), top.indices.tolist()
                lists = best.setdefault(kind, [[] for _ in range(a.shape[1])])
                for u in range(a.shape[1]):
                    new = [(v, lo + r // ctx, r % ctx) for v, r in zip(values[u], rows[u], strict=True) if v > 0]
                    lists[u] = sorted(lists[u] + new, reverse=True)[:k]
    return time.perf_counter() - start, time.process_time() - cpu


def query_latency(path: Path, n_features: int) -> dict[str, float]:
    """Milliseconds (median of repeats) for what the viewer does: open, a feature page, lists, search."""
    out: dict[str, float] = {}

    def timed(name: str, fn: Any, repeats: int = 15) -> None:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1000, 2)
        out[name + "_max"] = round(max(times) * 1000, 2)

    t0 = time.perf_counter()
    store = FeatureStore.open(path)
    store.vocab  # noqa: B018 - loaded once per open store, as a viewer keeps it
    out["open_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    gen = torch.Generator().manual_seed(0)
    picks = iter(torch.randint(0, n_features, (100,), generator=gen).tolist())
    timed("feature_page_ms", lambda: store.feature(next(picks)))
    live = UnitQuery(status="live", order_by="max_act", descending=True)
    timed("list_live_by_max_act_ms", lambda: store.search(live, limit=50, offset=500))
    rare = UnitQuery(min_freq=1e-3, max_freq=1e-2, order_by="freq")
    timed("list_freq_range_ms", lambda: store.search(rare, limit=50))
    timed("text_search_ms", lambda: store.search(UnitQuery("the"), limit=50))
    timed("count_ms", lambda: store.count(UnitQuery("the", status="live")))
    store.close()
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.6.hook_mlp_out")
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved bare, saekit and naive runs; best of each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    tokens = corpus.tokenize_sequences(corpus.iter_documents("embedded"), model.tokenizer, args.context,
                                       max_sequences=args.sequences)
    n_tok = tokens.numel()
    hooks = [args.hook, neuron_hook(args.hook)]
    stop = stop_layer(hooks)
    sae = build_sae(SAEShape(d_in=model.cfg.d_model, d_sae=args.d_sae), TopKConfig(k=args.k),
                    Provenance(model_name=model.cfg.model_name, hook_name=args.hook))
    print(f"{args.model} {args.hook}: random TopK SAE d_sae={args.d_sae} k={args.k} + {model.cfg.d_mlp} neurons; "
          f"{len(tokens)} sequences x {args.context} = {n_tok:,} tokens, batches of {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    cfg = AnalyzeConfig(batch_size=args.batch_size, sequences=None)
    warm = tokens[:args.batch_size]  # the same warm-up for all three: allocator, kernels, first-call caches
    bare_forward(model, warm, stop, args.batch_size)
    analyze(model, sae, warm, cfg, progress=False)
    naive(model, sae, warm, hooks, args.batch_size)
    bares, passes, naives = [], [], []
    for _ in range(args.repeats):  # interleaved rounds, best of each
        bares.append(bare_forward(model, tokens, stop, args.batch_size))
        result = analyze(model, sae, tokens, cfg, progress=False)
        s = result.settings
        passes.append((s["pass_seconds"], s["pass_cpu_seconds"], s["seconds"]))
        naives.append(naive(model, sae, tokens, hooks, args.batch_size))
    t_bare, c_bare = min(bares)
    t_pass, c_pass, t_all = min(passes)
    t_naive, c_naive = min(naives)
    runs = f"best of {args.repeats} after one warm-up batch each"
    print(f"bare forward       {t_bare:7.1f}s  {n_tok / t_bare:8.0f} tok/s   cpu {c_bare:7.1f}s  "
          f"({runs}: " + ", ".join(f"{b:.1f}" for b, _ in bares) + ")")
    print(f"saekit pass        {t_pass:7.1f}s  {n_tok / t_pass:8.0f} tok/s   cpu {c_pass:7.1f}s  "
          f"({t_pass / t_bare:.2f}x bare wall, {c_pass / c_bare:.2f}x cpu; " + ", ".join(f"{p[0]:.1f}" for p in passes)
          + f")  + {t_all - t_pass:.1f}s per-unit finishing (logits, neighbours, co-firing: independent of the "
          "token count)")
    print(f"naive              {t_naive:7.1f}s  {n_tok / t_naive:8.0f} tok/s   cpu {c_naive:7.1f}s  "
          f"({t_naive / t_bare:.2f}x bare; saekit's pass is {t_naive / t_pass:.2f}x faster, and the naive version "
          "keeps only counts, sums, max and top-20 values; " + ", ".join(f"{n:.1f}" for n, _ in naives) + ")")
    print(f"(1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.db"
        t0 = time.perf_counter()
        write_analysis(path, result, vocab=vocab_strings(model), meta={"sae_id": "bench", "model_name": args.model})
        t_write = time.perf_counter() - t0
        size = path.stat().st_size
        n_units = sum(k.n_units for k in result.kinds.values())
        per_1k = size / (n_units / 1000)
        print(f"store              {t_write:7.1f}s to write, {size / 1e6:.1f} MB for {n_units:,} units "
              f"({per_1k / 1e6:.2f} MB per 1k units)")
        latency = query_latency(path, args.d_sae)
    print("queries (median ms): " + ", ".join(f"{k} {v}" for k, v in latency.items() if not k.endswith("_max")))

    out = {"tokens_per_s": {"bare_forward": n_tok / t_bare, "saekit": n_tok / t_pass, "naive": n_tok / t_naive},
           "ratios": {"saekit_pass_over_bare": t_pass / t_bare, "naive_over_saekit_pass": t_naive / t_pass,
                      "saekit_all_over_bare": t_all / t_bare,
                      "cpu_saekit_pass_over_bare": c_pass / c_bare, "cpu_naive_over_saekit_pass": c_naive / c_pass},
           "seconds": {"bare": t_bare, "saekit_pass": t_pass, "saekit_finish": t_all - t_pass, "naive": t_naive,
                       "store_write": t_write, "bare_runs": [b for b, _ in bares],
                       "saekit_pass_runs": [p[0] for p in passes], "naive_runs": [n for n, _ in naives]},
           "cpu_seconds": {"bare": c_bare, "saekit_pass": c_pass, "naive": c_naive},
           "store": {"bytes": size, "units": n_units, "bytes_per_1k_units": per_1k}, "query_ms": latency,
           "setup": {"model": args.model, "hook": args.hook, "d_sae": args.d_sae, "k": args.k, "tokens": n_tok,
                     "batch_size": args.batch_size, "threads": torch.get_num_threads(), "repeats": args.repeats,
                     "warmup": "one batch each"}}
    if args.json:
        atomic_write_json(Path(args.json), out)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
