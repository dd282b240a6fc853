"""Smoke test for scripts/bench_train.py: a tiny cache (or planted features), a few steps of every trainer, the JSON."""

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
    assert figures["same_optimizer"] is True and len(set(figures["optimizer"].values())) == 1
    assert set(figures["optimizer"]) == set(names)
    assert 0 < figures["roofline_fraction"] < 10 and math.isfinite(figures["roofline_fraction"])
    assert figures["roofline_fraction"] == pytest.approx(
        figures["tokens_per_s"]["saekit"] / figures["roofline_tokens_per_s"]["bf16"])
    assert figures["encoder_path"].startswith("sparse kernels, ")
    printed = capsys.readouterr().out
    assert "encoder-matmul roofline" in printed and "saekit / faster peer" in printed
    assert "optimizer: the same for every trainer, torch.optim.Adam(" in printed
    assert "saekit encoder path: sparse kernels" in printed


def test_synthetic_features_and_each_tools_default_optimizer(bench, tmp_path, capsys):
    """--synthetic needs no cache; planted features are learnable (FVU well under 1); `each-default` says so."""
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: tiny ops on a busy machine are not worth a second one
        rc = bench.main(["--synthetic", "32", "--tokens", "12800", "--batch-size", "128", "--k", "8", "--expansion",
                         "4", "--held-out", "512", "--max-batches", "8", "--warmup-steps", "5", "--lr", "0.01",
                         "--device", "cpu", "--skip", "sae-lens", "--optimizer", "each-default", "--threads", "1",
                         "--json", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    figures = json.loads(out.read_text())
    assert figures["same_optimizer"] is False
    assert figures["optimizer"]["saekit"] == "torch.optim.Adam(fused)"
    assert figures["fvu"]["saekit"] < 0.5
    assert "optimizer: each tool's default" in capsys.readouterr().out


def test_missing_cache_names_the_command_that_builds_it(bench, tmp_path, capsys):
    assert bench.main(["--cache", str(tmp_path / "absent")]) == 1
    assert bench.BUILD_CMD in capsys.readouterr().err
