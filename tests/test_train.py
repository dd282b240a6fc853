import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from features.run_config import config_from_dict
from features.training import train_from_cache
from sae.cache import write_cache
from sae.checkpoint import checkpoint_step
from sae.config import SAESpec, TrainConfig
from sae.errors import SaekitError
from sae.formats import load_sae
from sae.saes import TopKConfig
from sae.sources import tensor_batches
from sae.trainer import build_job, train

POST, OUT = "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"


def make_run(tmp_path, model, name="run", n_seq=200, ctx=32, overrides=None):
    data = {"name": name, "runs_dir": str(tmp_path / "runs"),
            "train": {"batch_size": 256, "total_tokens": 256 * 60, "lr_warmup_steps": 5, "log_every_steps": 5,
                      "checkpoint_every_tokens": 256 * 20, "dead_after_tokens": 2048, "wandb": False,
                      "saes": [{"hook": POST, "expansion": 4, "k": 8}], **(overrides or {})}}
    cfg = config_from_dict(data, "test")
    tokens = torch.randint(0, model.cfg.d_vocab, (n_seq, ctx), generator=torch.Generator().manual_seed(0))
    write_cache(model, tokens, [POST, OUT], cfg.run_dir / "cache", corpus_fingerprint="t", batch_size=50,
                shard_sequences=25, progress=False)
    return cfg, data


def train_run(cfg, **kw):
    return train_from_cache(cfg, progress=False, **kw)


def weights(folder):
    return load_file(str(folder / "sae_weights.safetensors"))


def test_topk_trains_and_loss_falls(tiny_model, tmp_path):
    cfg, _ = make_run(tmp_path, tiny_model, overrides={"total_tokens": 256 * 120})
    (folder,) = train_run(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < 0.6 * rows[0]["fvu"]
    assert rows[-1]["l0"] <= 8
    sae = load_sae(folder)
    assert sae.shape.d_in == 64 and sae.shape.d_sae == 256 and sae.input_scale == 1.0
    assert (folder / "sparsity.safetensors").is_file()


def test_many_saes_and_a_transcoder_from_one_read(tiny_model, tmp_path):
    saes = [{"hook": POST, "architecture": "topk", "expansion": 2, "k": 4},
            {"hook": POST, "architecture": "batchtopk", "expansion": 2, "k": 4},
            {"hook": OUT, "architecture": "relu", "expansion": 4},
            {"hook": OUT, "architecture": "jumprelu", "expansion": 4},
            {"hook": POST, "target_hook": OUT, "architecture": "topk", "expansion": 2, "k": 8}]
    cfg, _ = make_run(tmp_path, tiny_model, overrides={"saes": saes})
    folders = train_run(cfg)
    assert len(folders) == 5 and len({f.name for f in folders}) == 5
    transcoder = load_sae(folders[-1])
    assert transcoder.shape.is_transcoder and transcoder.shape.d_in == 64 and transcoder.shape.d_out == 32
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["sae"] for r in rows} == {f.name for f in folders}


def test_trainer_on_an_in_memory_iterator_needs_no_run_directory(tmp_path, monkeypatch):
    """The trainer takes jobs, batches and a TrainConfig: no paths, no RunConfig, nothing written."""
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(128, 32, generator=gen), dim=1)
    codes = torch.zeros(8192, 128).scatter(1, torch.randint(0, 128, (8192, 3), generator=gen), 1.0)
    acts = codes @ truth
    spec = SAESpec(hook=POST, expansion=4, lr=3e-3, hyper=TopKConfig(k=4))
    job = build_job(spec, acts[:4096], acts[:4096], [POST], model_name="tiny")
    cfg = TrainConfig(batch_size=512, total_tokens=512 * 150, lr_warmup_steps=5, log_every_steps=10)
    fvu_before = ((job.sae(acts * job.sae.input_scale) - acts * job.sae.input_scale).pow(2).sum(-1).mean()
                  / (acts * job.sae.input_scale).var(0).sum()).item()
    (trained,) = train([job], tensor_batches([acts], cfg.batch_size), cfg, progress=False)
    x = acts * trained.sae.input_scale
    with torch.no_grad():
        fvu = ((trained.sae(x) - x).pow(2).sum(-1).mean() / x.var(0).sum()).item()
    assert fvu < 0.5 * fvu_before
    assert trained.firing_frequency.shape == (128,) and trained.firing_frequency.sum() > 0
    assert list(tmp_path.iterdir()) == []


def test_existing_checkpoint_needs_resume_or_overwrite(tiny_model, tmp_path):
    cfg, _ = make_run(tmp_path, tiny_model)
    train_run(cfg)
    with pytest.raises(SaekitError, match="--resume.*--overwrite"):
        train_run(cfg)
    train_run(cfg, overwrite=True)


def test_resume_refuses_changed_config(tiny_model, tmp_path):
    cfg, data = make_run(tmp_path, tiny_model)
    train_run(cfg)
    data["train"]["saes"] = [{"hook": POST, "expansion": 4, "k": 16, "id": cfg.train.saes[0].sae_id}]
    changed = config_from_dict(data, "test")
    with pytest.raises(SaekitError, match=r"config changed.*\.k: checkpoint 8, config 16"):
        train_run(changed, resume=True)


def test_cache_width_differs_from_checkpoint_d_in(tiny_model, tmp_path):
    cfg, _ = make_run(tmp_path, tiny_model)
    train_run(cfg)
    narrower = HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=48, d_vocab=500, n_ctx=64, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, model_name="tiny"))
    tokens = torch.randint(0, 500, (200, 32), generator=torch.Generator().manual_seed(0))
    write_cache(narrower, tokens, [POST, OUT], cfg.run_dir / "cache", corpus_fingerprint="t", overwrite=True,
                progress=False)
    with pytest.raises(SaekitError, match="d_in: checkpoint 64, config 48"):
        train_run(cfg, resume=True)


def test_nan_in_batch_names_step_and_keeps_checkpoint(tiny_model, tmp_path):
    cfg, _ = make_run(tmp_path, tiny_model, overrides={"total_tokens": 256 * 200})
    cache_dir = cfg.run_dir / "cache"

    def poison(act, hook):
        act[7, 3, 0] = float("nan")  # one row of the last shard
        return act

    tokens = torch.randint(0, 500, (200, 32), generator=torch.Generator().manual_seed(0))
    with tiny_model.hooks(fwd_hooks=[(POST, poison)]):
        write_cache(tiny_model, tokens[:50], [POST, OUT], cache_dir, corpus_fingerprint="nan", batch_size=50,
                    shard_sequences=25, overwrite=True, progress=False)
    ckpt = cfg.layout.checkpoint
    with pytest.raises(SaekitError, match=r"step \d+: NaN or Inf in the batch of blocks.1.mlp.hook_post"):
        train_run(cfg)
    if ckpt.is_file():  # whatever checkpoint was written before the NaN is complete and loadable
        assert checkpoint_step(ckpt) > 0
        load_file(str(ckpt))


def _write_cfg(tmp_path, data, name):
    data = json.loads(json.dumps(data))
    data["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _clone_cache(cfg, tmp_path, name):
    shutil.copytree(cfg.run_dir / "cache", tmp_path / "runs" / name / "cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(tiny_model, tmp_path):
    """DDP over 2 gloo processes, each reading half of every global batch, matches one process."""
    cfg, data = make_run(tmp_path, tiny_model, name="base", overrides={"total_tokens": 256 * 30})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("single", [sys.executable, "-m", "features.cli"]),
                           ("ddp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", str(_free_port()), "-m", "features.cli"])):
        _clone_cache(cfg, tmp_path, name)
        path = _write_cfg(tmp_path, data, name)
        proc = subprocess.run(launcher + ["train", "--config", str(path)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    sid = cfg.train.saes[0].sae_id
    one = weights(tmp_path / "runs" / "single" / "saes" / sid)
    two = weights(tmp_path / "runs" / "ddp" / "saes" / sid)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


def test_sigkill_then_resume_sees_every_batch_once(tiny_model, tmp_path):
    cfg, data = make_run(tmp_path, tiny_model, name="base", n_seq=400,
                         overrides={"total_tokens": 256 * 3000, "checkpoint_every_tokens": 256 * 100,
                                "log_every_steps": 50})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("clean", "killed"):
        _clone_cache(cfg, tmp_path, name)
    clean = _write_cfg(tmp_path, data, "clean")
    subprocess.run([sys.executable, "-m", "features.cli", "train", "--config", str(clean)], env=env, check=True,
                   capture_output=True)
    killed = _write_cfg(tmp_path, data, "killed")
    cmd = [sys.executable, "-m", "features.cli", "train", "--config", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "runs" / "killed" / "checkpoints" / "state.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (checkpoint_step(ckpt) or 0) >= 300:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < checkpoint_step(ckpt) < 3000
    subprocess.run(cmd + ["--resume"], env=env, check=True, capture_output=True)
    sid = cfg.train.saes[0].sae_id
    a, b = weights(tmp_path / "runs" / "clean" / "saes" / sid), weights(tmp_path / "runs" / "killed" / "saes" / sid)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    journal = (tmp_path / "runs" / "killed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in journal]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 2999
