"""Smoke test for scripts/bench_train.py: a tiny cache, a few steps of all three trainers, the JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sae.cache import write_cache

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_figures_for_every_trainer(bench, tiny_model, tmp_path, capsys):
    tokens = torch.randint(0, 500, (48, 16), generator=torch.Generator().manual_seed(0))
    hook = "blocks.2.hook_mlp_out"
    folder = write_cache(tiny_model, tokens, [hook], tmp_path / "cache", corpus_fingerprint="fp", batch_size=8,
                         shard_sequences=16, progress=False)[hook]
    out = tmp_path / "bench.json"
    rc = bench.main(["--cache", str(folder), "--tokens", "512", "--batch-size", "64", "--k", "4", "--expansion", "4",
                     "--held-out", "128", "--chunk-steps", "2", "--warmup-steps", "2", "--device", "cpu",
                     "--json", str(out), "--no-progress"])
    assert rc == 0
    figures = json.loads(out.read_text())
    names = ["saekit", "sae-lens"] + (["eai-sparsify"] if bench.sparsify_available() else [])
    for key in ("tokens_per_s", "fvu", "l0"):
        assert sorted(figures[key]) == sorted(names)
        assert all(math.isfinite(v) and v > 0 for v in figures[key].values())
    assert all(v <= 4 for v in figures["l0"].values())
    printed = capsys.readouterr().out
    assert "encoder-matmul roofline" in printed and "saekit / faster peer" in printed


def test_missing_cache_names_the_command_that_builds_it(bench, tmp_path, capsys):
    assert bench.main(["--cache", str(tmp_path / "absent")]) == 1
    assert bench.BUILD_CMD in capsys.readouterr().err
