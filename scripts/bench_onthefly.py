"""On-the-fly training against the bare forward pass it is built on, in one process on the same tokens.

- bare forward: the model run only to the hook's layer over the tokens, in inference mode, nothing kept
  (the limit: on-the-fly training cannot run faster than the forward pass that feeds it);
- on-the-fly training: `sae.sources.ModelBatches` (forward, shuffle buffer) feeding `sae.trainer.train`
  (one SAE step per batch) over the same tokens. The forward passes run on the trainer's prefetch thread,
  overlapping the SAE steps; `--no-overlap` runs them in turn instead, for comparison.

Defaults are the project's default sizes: SmolLM2-135M, blocks.6.hook_mlp_out, TopK 8x k32, batch 4096,
32 sequences of 128 tokens per forward pass. The on-the-fly figure is end to end (the first buffer window
fills before the first step) and steady (over the middle windows, each dealt out while the next one is
forwarded, so as many tokens are forwarded as trained). Each figure is the best of
`--repeats` interleaved runs after one warm-up of each; the load average is printed with the table. On a
shared machine wall-clock figures favour the path with more busy threads (the overlapped one has two), so
tokens per CPU-second are printed too: the work each path does per token, whatever the neighbours do.

    python scripts/bench_onthefly.py --json bench_onthefly.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae import corpus, trainer
from sae.config import SAESpec, TrainConfig
from sae.hooks import stop_layer
from sae.io import atomic_write_text
from sae.models import load_model
from sae.saes import TopKConfig
from sae.sources import BufferSpec, ModelBatches
from sae.trainer import build_job, train


class _Clock:
    """A metrics sink that only notes when each logged step finished (for the steady-state rate)."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float]] = []

    def open(self, resume_step: int) -> None:
        self.marks = []

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.marks.append((rows[0]["step"], time.perf_counter()))

    def close(self) -> None:
        pass


class Timing(NamedTuple):
    wall: float  # seconds, end to end
    cpu: float  # CPU seconds of the whole process (all threads): robust to a busy machine
    steady: float | None = None  # tokens/s over the middle buffer windows (on-the-fly runs)


def bare_forward(model: Any, tokens: torch.Tensor, hook: str, per_pass: int) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(tokens), per_pass):
            model(tokens[i:i + per_pass].to(model.cfg.device), stop_at_layer=stop_layer([hook]))
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


@contextmanager
def _in_turn() -> Iterator[None]:
    """The trainer without its prefetch thread: each batch (forward passes included) is made when asked for."""
    plain = trainer.prefetch
    trainer.prefetch = lambda stream, depth=3: stream  # type: ignore[assignment]
    try:
        yield
    finally:
        trainer.prefetch = plain


def onthefly(model: Any, tokens: torch.Tensor, args: argparse.Namespace, overlap: bool) -> Timing:
    """Training one fresh SAE over `tokens` on the fly (the SAE's setup forward pass is not timed)."""
    spec = BufferSpec(args.batch_size, args.buffer_batches * args.batch_size, args.per_pass, seed=0)
    steps = tokens.numel() // args.batch_size
    source = ModelBatches(model, tokens, [args.hook], spec, total_batches=steps)
    sae = SAESpec(hook=args.hook, expansion=args.expansion, hyper=TopKConfig(k=args.k))
    sample = source.sample(8192)[0]
    job = build_job(sae, sample, sample, [args.hook], model.cfg.model_name, device=str(model.cfg.device))
    cfg = TrainConfig(batch_size=args.batch_size, total_tokens=steps * args.batch_size, lr_warmup_steps=2,
                      log_every_steps=1, wandb=False)
    clock = _Clock()
    wall, cpu = time.perf_counter(), time.process_time()
    with nullcontext() if overlap else _in_turn():
        train([job], source, cfg, metrics=clock, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # Steady: the steps of windows 1 .. n-2, during which windows 2 .. n-1 are forwarded (as many tokens as
    # trained); window 0 fills before the first step and the last window is dealt with nothing left to forward.
    first, last = args.buffer_batches - 1, steps - args.buffer_batches - 1
    if last <= first:
        return Timing(wall, cpu)
    (s0, t0), (s1, t1) = clock.marks[first], clock.marks[last]
    return Timing(wall, cpu, (s1 - s0) * args.batch_size / (t1 - t0))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.6.hook_mlp_out")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=16, help="training steps (batches) per measurement")
    parser.add_argument("--buffer-batches", type=int, default=4, help="shuffle window, in batches")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--per-pass", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-overlap", action="store_true", help="also time forward and SAE step in turn")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, "auto")
    n_seq = args.batches * args.batch_size // args.context
    tokens = corpus.tokenize_sequences(corpus.iter_documents("embedded"), model.tokenizer, args.context,
                                       max_sequences=n_seq)[:n_seq]
    runs: dict[str, Callable[[], Timing]] = {
        "bare_forward": lambda: bare_forward(model, tokens, args.hook, args.per_pass),
        "onthefly_train": lambda: onthefly(model, tokens, args, overlap=True)}
    if args.no_overlap:
        runs["onthefly_in_turn"] = lambda: onthefly(model, tokens, args, overlap=False)
    load_before = os.getloadavg()
    for fn in runs.values():  # warm-up: kernels, the timed encoder choice, allocator
        fn()
    best: dict[str, Timing] = {}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour hurts every path alike
        for name, fn in runs.items():
            got = fn()
            if name not in best or got.wall < best[name].wall:
                best[name] = got
    _report(args, tokens.numel(), best, load_before)
    return 0


def _report(args: argparse.Namespace, n_tokens: int, best: dict[str, Timing], load_before: tuple) -> None:
    load = os.getloadavg()
    tps = {name: n_tokens / t.wall for name, t in best.items()}
    per_cpu = {name: n_tokens / t.cpu for name, t in best.items()}
    print(f"\n{args.model} to {args.hook}; TopK {args.expansion}x k{args.k}, batch {args.batch_size}; {n_tokens:,} "
          f"tokens, {args.per_pass} sequences of {args.context} per pass, buffer {args.buffer_batches} batches; "
          f"{torch.get_num_threads()} threads; best of {args.repeats}; load average before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load)}\n")
    print("| path             | seconds | tokens/s | vs bare | steady tok/s | vs bare | tokens/CPU-s | vs bare |")
    print("|------------------|---------|----------|---------|--------------|---------|--------------|---------|")
    bare = tps["bare_forward"]
    for name, t in best.items():
        steady = f"{t.steady:>12,.0f} | {t.steady / bare:>6.2f}x" if t.steady else f"{'':>12} | {'':>7}"
        print(f"| {name:<16} | {t.wall:>7.1f} | {tps[name]:>8,.0f} | {tps[name] / bare:>6.2f}x | {steady} | "
              f"{per_cpu[name]:>12,.0f} | {per_cpu[name] / per_cpu['bare_forward']:>6.2f}x |")
    ratio = tps["onthefly_train"] / bare
    steady = best["onthefly_train"].steady
    print(f"\non-the-fly / bare forward: {ratio:.2f}x end to end"
          + (f", {steady / bare:.2f}x steady" if steady else "") + " (target >= 0.85x)")
    if args.json:
        atomic_write_text(args.json, json.dumps({
            "tokens_per_s": tps, "tokens_per_cpu_s": per_cpu,
            "steady_tokens_per_s": {n: t.steady for n, t in best.items() if t.steady}, "ratio": ratio,
            "tokens": n_tokens, "load_average": {"before": load_before, "after": load},
            "threads": torch.get_num_threads(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
