"""The cache and train commands as users launch them: several processes under torchrun, and on the fly.

Each test drives `features.cli` on a tiny random Llama saved as a local HF directory (the conftest's
`tiny_llama_dir`), over the embedded corpus, on the CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from features import cli, pipeline
from features.run_config import load_config
from sae.cache import read_manifest
from sae.errors import SaekitError

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ["blocks.1.mlp.hook_post", "blocks.2.hook_mlp_out"]


def _config(tmp_path: Path, name: str, model: Path, **train: object) -> Path:
    """A small run: 47 train sequences of 32 tokens, 5 per forward pass, shards of 8 sequences (6 shards)."""
    data = {"name": name, "runs_dir": str(tmp_path / "runs"), "model": {"name": str(model), "device": "cpu"},
            "corpus": {"context_size": 32, "max_sequences": 50, "held_out_fraction": 0.04},
            "cache": {"hooks": HOOKS, "batch_size": 5, "shard_sequences": 8},
            "train": {"batch_size": 128, "total_tokens": 128 * 12, "lr_warmup_steps": 2, "log_every_steps": 4,
                      "wandb": False, "saes": [{"hook": HOOKS[1], "expansion": 2, "k": 4}], **train}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args: list[str], processes: int = 1) -> str:
    """`python -m features.cli ARGS`, or the same under torchrun with `processes` gloo processes; returns what
    they printed (stdout, then stderr)."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(launcher + ["-m", "features.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _rows(folder: Path) -> dict[str, torch.Tensor]:
    """Every row of a hook's cache in shard order: token ids, sequence, position and activations."""
    shards = [load_file(str(folder / s["file"])) for s in read_manifest(folder)["shards"]]
    return {key: torch.cat([s[key] for s in shards]) for key in ("token_ids", "sequence", "position", "activations")}


@pytest.mark.slow
def test_cache_under_torchrun_with_two_processes_equals_one_process(tiny_llama_dir, tmp_path):
    """`torchrun --nproc_per_node 2 ... cache` (gloo): one merged manifest, no partial manifests left, and
    the same rows as one process, by token ids and by values; every process exits cleanly."""
    caches = {}
    for name, processes in (("one", 1), ("two", 2)):
        said = _cli(["cache", "--config", str(_config(tmp_path, name, tiny_llama_dir))], processes)
        caches[name] = tmp_path / "runs" / name / "cache"
    assert said.count("with 2 processes") == 2 and "(rank 0 of 2)" in said  # each wrote its share of the shards
    for hook in HOOKS:
        one, two = caches["one"] / hook, caches["two"] / hook
        manifest = read_manifest(two)
        assert manifest["complete"] and len(manifest["shards"]) == 6 and "rank" not in manifest
        assert not list(two.glob("manifest.rank-*.json"))
        a, b = _rows(one), _rows(two)
        train = load_file(str(tmp_path / "runs" / "two" / "tokens.safetensors"))["train"]
        assert len(a["token_ids"]) == train.numel() > 40 * 32
        assert torch.equal(b["token_ids"], train.flatten())
        for key in ("token_ids", "sequence", "position", "activations"):
            assert torch.equal(a[key], b[key]), f"{hook}: {key} differ"


@pytest.mark.slow
def test_run_with_train_source_model_trains_on_the_fly_without_a_cache(tiny_llama_dir, tmp_path, monkeypatch):
    """`saekit run` with train.source: model: no cache stage, the SAE is trained from the forward pass (the
    checkpoint says so), and the later stages get the trained SAE (here stubbed: they are tested elsewhere)."""
    later = []
    for stage in ("stage_eval", "stage_analyze", "stage_label"):
        monkeypatch.setattr(pipeline, stage, lambda cfg, model, *a, _s=stage, **kw: later.append(_s))
    path = _config(tmp_path, "fly", tiny_llama_dir, source="model", buffer_tokens=640)
    assert cli.main(["run", "--config", str(path)]) == 0
    cfg = load_config(path)
    assert not cfg.layout.cache_dir.exists()
    assert later == ["stage_eval", "stage_analyze", "stage_label"]
    (sae_dir,) = pipeline.sae_dirs(cfg)
    assert (sae_dir / "sae_weights.safetensors").is_file()
    with safe_open(str(cfg.layout.checkpoint), "pt") as fh:
        info = json.loads(fh.metadata()["saekit"])
    assert info["step"] == 12
    assert info["data"]["source"] == "model" and info["data"]["hooks"] == [HOOKS[1]]
    assert info["data"]["buffer_tokens"] == 640 and info["data"]["forward_sequences"] == 5


def test_train_source_must_be_cache_or_model(tmp_path):
    path = _config(tmp_path, "bad", tmp_path, source="disk")
    with pytest.raises(SaekitError, match=r"key 'train.source' must be 'cache' \| 'model', got 'disk'"):
        load_config(path)
    path = _config(tmp_path, "bad", tmp_path, buffer_tokens=0)
    with pytest.raises(SaekitError, match=r"key 'train.buffer_tokens' must be a positive integer"):
        load_config(path)


def test_plan_says_cache_size_buffer_memory_and_times_and_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    """`saekit plan`: the cache size per hook is tokens x width x bytes + 10 per row; the buffer is what the
    on-the-fly source would allocate (and a too-large one is flagged); times come from measured rates."""
    from sae.models import load_model
    from sae.sources import BufferSpec, ModelBatches

    path = _config(tmp_path, "plan", tiny_llama_dir, buffer_tokens=640)
    assert cli.main(["plan", "--config", str(path), "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    n = int(50 * (1 - 0.04)) * 32
    assert f"train tokens: {n:,} (corpus.max_sequences, at most)" in out
    model = load_model(str(tiny_llama_dir), "cpu")
    for hook in HOOKS:
        width = model.blocks[1].mlp.W_in.shape[1] if "hook_post" in hook else model.cfg.d_model
        assert f"cache {hook}: {n * (width * 4 + 10) / 1e9:,.2f} GB ({width} x 4 bytes (float32) + 10 per token)" in out
    spec = BufferSpec(128, 640, 5, 0, streams=2)
    source = ModelBatches(model, torch.zeros(47, 32, dtype=torch.long), [HOOKS[1]], spec, rank=0, world=2)
    assert f"buffer of 640 tokens = {source.buffer_bytes():,} bytes (" in out and ": fits" in out
    assert "SAE training" in out and "expected on the fly:" in out and "expected: cache stage about" in out
    cli.main(["plan", "--config", str(path), "--set", "train.buffer_tokens=4000000000000"])
    assert "REFUSED at start" in capsys.readouterr().out


def test_under_torchrun_each_process_loads_the_model_on_its_own_gpu(monkeypatch):
    """World > 1 with GPUs: "auto" and "cuda" become the process's current device (LOCAL_RANK's, set when it
    joined the group), not GPU 0 for all; an explicit device, or one process, is left as configured."""
    import sae.distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(sae.distributed, "dist_info", lambda: (3, 8))
    assert [pipeline.model_device(d) for d in ("auto", "cuda", "cpu", "cuda:1")] == ["cuda:3", "cuda:3", "cpu",
                                                                                   "cuda:1"]
    monkeypatch.setattr(sae.distributed, "dist_info", lambda: (0, 1))
    assert pipeline.model_device("auto") == "auto" and pipeline.model_device("cuda") == "cuda"


@pytest.mark.slow
def test_train_on_the_fly_under_torchrun_equals_one_process(tiny_llama_dir, tmp_path):
    """`torchrun --nproc_per_node 2 ... train` with train.source: model and train.streams: 2: rank 0
    tokenises while rank 1 waits, each process forwards its own sequences, and the SAE is the one a single
    process running both streams trains."""
    weights = {}
    for name, processes in (("one", 1), ("two", 2)):
        path = _config(tmp_path, name, tiny_llama_dir, source="model", buffer_tokens=640, streams=2,
                       saes=[{"hook": HOOKS[1], "expansion": 2, "k": 4, "encoder_bf16": False}])
        _cli(["train", "--config", str(path)], processes)
        cfg = load_config(path)
        assert not cfg.layout.cache_dir.exists()
        (sae_dir,) = pipeline.sae_dirs(cfg)
        weights[name] = load_file(str(sae_dir / "sae_weights.safetensors"))
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["two"][key], value, rtol=1e-4, atol=1e-5, msg=key)
