"""Smoke runs of the caching and analysis benchmarks on a tiny random Llama: every method of the side-by-side
table runs on the same tokens (run_with_cache both over the full model and with stop_at_layer), the analysis
baselines get the same warm-up and best-of-N, and the JSON carries what the README quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_cache_times_every_method_on_the_same_tokens(tiny_llama_dir, tmp_path):
    out = tmp_path / "cache.json"
    text = run_script("bench_cache.py", "--model", str(tiny_llama_dir), "--hooks", "blocks.1.hook_mlp_out",
                      "--sequences", "8", "--context", "16", "--batch-size", "4", "--repeats", "2", "--json", str(out))
    figures = json.loads(out.read_text())
    assert set(figures["tokens_per_s"]) == {"bare_forward", "run_with_cache_full", "run_with_cache_stop_at_layer",
                                           "saekit"}
    assert all(v > 0 for v in figures["tokens_per_s"].values()) and figures["stop_at_layer"] == 2
    assert "saekit / run_with_cache with stop_at_layer" in text and text.count("repeat ") == 2


def test_bench_analyze_gives_every_method_the_same_warm_up_and_best_of_n(tiny_llama_dir, tmp_path):
    out = tmp_path / "analyze.json"
    text = run_script("bench_analyze.py", "--model", str(tiny_llama_dir), "--hook", "blocks.1.hook_mlp_out",
                      "--d-sae", "128", "--k", "4", "--sequences", "8", "--context", "16", "--batch-size", "4",
                      "--repeats", "2", "--threads", "1", "--json", str(out))
    figures = json.loads(out.read_text())
    assert set(figures["tokens_per_s"]) == {"bare_forward", "saekit", "naive"}
    runs = figures["seconds"]
    assert len(runs["bare_runs"]) == len(runs["saekit_pass_runs"]) == len(runs["naive_runs"]) == 2
    assert figures["setup"]["warmup"] == "one batch each" and "best of 2 after one warm-up batch each" in text
