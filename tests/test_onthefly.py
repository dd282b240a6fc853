"""On-the-fly training: the model's forward pass feeds the trainer through a bounded, seeded shuffle buffer.

Run as a script (`python tests/test_onthefly.py CONFIG [--resume] [--streams N]`, or under torchrun) it trains
the run of CONFIG on the fly from the tiny model: the subprocess the SIGKILL and torchrun tests start.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from features.run_config import config_from_dict, load_config
from features.training import train_from_model
from sae import corpus
from sae.checkpoint import checkpoint_step
from sae.errors import SaekitError
from sae.hooks import run_to
from sae.saes import kernels
from sae.sources import BufferSpec, ModelBatches

POST, OUT = "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"
HERE = Path(__file__).resolve()


def tiny() -> HookedTransformer:
    """The conftest's tiny model, built the same way (seed 0), so a subprocess gets the same weights."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=500, n_ctx=64, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, model_name="tiny",
        default_prepend_bos=False)
    return HookedTransformer(cfg).eval()


def tiny_tokens(n_seq: int = 300, ctx: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 500, (n_seq, ctx), generator=torch.Generator().manual_seed(seed))


def run_data(tmp_path: Path, name: str = "run", saes: list | None = None, **train: object) -> dict:
    """A run config: 10 sequences per forward pass, so a 2,000-token buffer is windows of 7 passes (2,240 rows)
    that deal 8 or 9 batches of 256 and carry the rest: resumes land mid-window and across epochs."""
    return {"name": name, "runs_dir": str(tmp_path / "runs"), "cache": {"batch_size": 10},
            "train": {"batch_size": 256, "total_tokens": 256 * 60, "lr_warmup_steps": 5, "log_every_steps": 5,
                      "checkpoint_every_tokens": 256 * 20, "dead_after_tokens": 2048, "wandb": False,
                      "saes": saes or [{"hook": POST, "expansion": 4, "k": 8}], **train}}


def weights(cfg, sid: str) -> dict[str, torch.Tensor]:
    return load_file(str(cfg.layout.sae(sid) / "sae_weights.safetensors"))


def journal(cfg) -> list[dict]:
    return [json.loads(line) for line in cfg.layout.metrics.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The order and the buffer


def test_every_token_is_dealt_once_per_epoch_and_resume_continues_the_order():
    """Index arithmetic alone: over ten epochs' worth of batches each (sequence, position) is dealt ten times,
    give or take the buffer's spill across an epoch's end, and the order from any batch is the tail of the
    order from 0, both for one process holding both streams and for the two processes that split them."""
    n_seq, ctx = 300, 32
    spec = BufferSpec(batch_size=256, buffer_tokens=2000, forward_sequences=10, seed=3, streams=2)
    model, tokens = tiny(), tiny_tokens(n_seq, ctx)
    both = ModelBatches(model, tokens, [POST], spec)
    n_batches = 10 * n_seq * ctx // 256
    dealt = list(itertools.islice(both.positions(0), n_batches))
    assert all(d.shape == (256, 2) for d in dealt)
    counts = torch.bincount((torch.cat(dealt) * torch.tensor([ctx, 1])).sum(1), minlength=n_seq * ctx)
    assert counts.sum() == 10 * n_seq * ctx and counts.min() >= 9 and counts.max() <= 11
    assert (counts == 10).float().mean() > 0.8
    halves = [ModelBatches(model, tokens, [POST], spec, rank=r, world=2) for r in range(2)]
    for start in (0, 1, 8, 9, 37, 200):
        here = list(itertools.islice(both.positions(start), 3))
        assert all(torch.equal(a, b) for a, b in zip(here, dealt[start:start + 3], strict=True))
        split = [next(h.positions(start)) for h in halves]
        assert torch.equal(torch.cat(split), dealt[start])
    first_window = [torch.cat(list(itertools.islice(h.positions(0), 8)))[:, 0].tolist() for h in halves]
    assert set(first_window[0]).isdisjoint(first_window[1])  # each process forwards its own sequences


def test_batches_are_the_models_activations_and_a_resume_rebuilds_them_bitwise(tiny_model):
    """Two hooks of two layers from one forward pass: each row is the model's activation at the (sequence,
    position) the plan names, and starting at batch b (mid-window, with carried rows, across an epoch's end)
    yields exactly the batches an uninterrupted stream yields from b."""
    hooks = [POST, "blocks.0.hook_mlp_out"]
    tokens = tiny_tokens()
    spec = BufferSpec(batch_size=256, buffer_tokens=2000, forward_sequences=10, seed=1, streams=2)
    src = ModelBatches(tiny_model, tokens, hooks, spec)
    n = 60
    batches = list(itertools.islice(src(0), n))
    places = list(itertools.islice(src.positions(0), n))
    reference = run_to(tiny_model, tokens, hooks)
    for i in (0, 9, 37, 59):
        for h, got in zip(hooks, batches[i], strict=True):
            torch.testing.assert_close(got, reference[h][places[i][:, 0], places[i][:, 1]], rtol=1e-5, atol=1e-6)
    for start in (8, 9, 17, 41):
        resumed = src(start)
        for i in range(start, min(start + 10, n)):
            assert all(torch.equal(a, b) for a, b in zip(next(resumed), batches[i], strict=True)), (start, i)
    bounded = ModelBatches(tiny_model, tokens, hooks, spec, total_batches=12)  # forwards nothing past batch 12
    tail = list(bounded(7))
    assert len(tail) == 5 and all(torch.equal(a, b) for got, want in zip(tail, batches[7:12], strict=True)
                                  for a, b in zip(got, want, strict=True))
    assert list(bounded(12)) == []


def test_a_buffer_larger_than_memory_allows_is_refused_with_its_size(tiny_model):
    spec = BufferSpec(batch_size=256, buffer_tokens=2**42, forward_sequences=10)
    with pytest.raises(SaekitError, match=r"buffer_tokens=4,398,046,511,104: .* would need [\d,]+ bytes .*"
                                          r"Lower train.buffer_tokens to about [\d,]+"):
        ModelBatches(tiny_model, tiny_tokens(), [POST, OUT], spec)
    with pytest.raises(SaekitError, match="must hold at least one batch"):
        BufferSpec(batch_size=256, buffer_tokens=100)


# ---------------------------------------------------------------------------------------------
# Training


def test_onthefly_trains_several_saes_from_one_forward_pass_and_loss_falls(tiny_model, tmp_path):
    saes = [{"hook": POST, "expansion": 4, "k": 8}, {"hook": OUT, "architecture": "batchtopk", "expansion": 4, "k": 4},
            {"hook": POST, "target_hook": OUT, "expansion": 2, "k": 8}]
    cfg = config_from_dict(run_data(tmp_path, saes=saes, total_tokens=256 * 120), "test")
    folders = train_from_model(cfg, tiny_model, tiny_tokens(), buffer_tokens=2000, progress=False)
    assert len(folders) == 3 and all((f / "sae_weights.safetensors").is_file() for f in folders)
    rows = journal(cfg)
    for sid in {r["sae"] for r in rows}:
        mine = [r for r in rows if r["sae"] == sid]
        assert mine[-1]["fvu"] < 0.7 * mine[0]["fvu"], sid
    assert not cfg.layout.cache_dir.exists()  # no cache stage


def test_resume_refuses_a_changed_corpus_or_hook_set_naming_it(tiny_model, tmp_path):
    data = run_data(tmp_path, saes=[{"hook": POST, "expansion": 4, "k": 8, "id": "sae"}])
    cfg = config_from_dict(data, "test")
    train_from_model(cfg, tiny_model, tiny_tokens(), buffer_tokens=2000, progress=False)
    with pytest.raises(SaekitError, match=r"data\.corpus: checkpoint '[0-9a-f]+', now '[0-9a-f]+'"):
        train_from_model(cfg, tiny_model, tiny_tokens(seed=1), buffer_tokens=2000, resume=True, progress=False)
    data["train"]["saes"][0]["hook"] = OUT
    moved = config_from_dict(data, "test")
    with pytest.raises(SaekitError, match=rf"data\.hooks: checkpoint \['{POST}'\], now \['{OUT}'\]"):
        train_from_model(moved, tiny_model, tiny_tokens(), buffer_tokens=2000, resume=True, progress=False)
    with pytest.raises(SaekitError, match=r"data\.buffer_tokens: checkpoint 2000, now 4000"):
        train_from_model(cfg, tiny_model, tiny_tokens(), buffer_tokens=4000, resume=True, progress=False)


def test_the_timed_kernel_choice_is_recorded_and_reused_on_resume(tiny_model, tmp_path, monkeypatch):
    cfg = config_from_dict(run_data(tmp_path, total_tokens=256 * 20), "test")
    monkeypatch.setattr(kernels, "bf16_is_faster", lambda device, d_in, d_sae: True)
    train_from_model(cfg, tiny_model, tiny_tokens(), buffer_tokens=2000, progress=False)
    with safe_open(str(cfg.layout.checkpoint), "pt") as fh:
        saved = json.loads(fh.metadata()["saekit"])["jobs"]
    assert [job["encoder_bf16"] for job in saved.values()] == [True]

    def timed_again(device: str, d_in: int, d_sae: int) -> bool:
        raise AssertionError("a resumed run timed the kernels again instead of reusing the recorded choice")

    monkeypatch.setattr(kernels, "bf16_is_faster", timed_again)
    (folder,) = train_from_model(cfg, tiny_model, tiny_tokens(), buffer_tokens=2000, resume=True, progress=False)
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["saekit"]["hyper"]["encoder_bf16"] is True


@pytest.mark.slow
def test_sigkill_then_resume_sees_every_token_once(tmp_path):
    """A run killed mid-window and resumed ends with the weights and journal of a run that was never stopped:
    the resumed run trained on the same (sequence, position) pairs in the same order (a batch repeated, skipped
    or reordered after the resume would change the losses logged after it and the final weights)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = {}
    for name in ("clean", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(run_data(tmp_path, name, total_tokens=256 * 800,
                                                       checkpoint_every_tokens=256 * 100, log_every_steps=50)))
    subprocess.run([sys.executable, str(HERE), str(paths["clean"])], env=env, check=True, capture_output=True)
    cmd = [sys.executable, str(HERE), str(paths["killed"])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed, clean = load_config(paths["killed"]), load_config(paths["clean"])
    while proc.poll() is None and (checkpoint_step(killed.layout.checkpoint) or 0) < 200:
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < checkpoint_step(killed.layout.checkpoint) < 800
    subprocess.run(cmd + ["--resume"], env=env, check=True, capture_output=True)
    sid = clean.train.saes[0].sae_id
    a, b = weights(clean, sid), weights(killed, sid)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in journal(killed)]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 799
    # Step by step, before and after the kill, the batches were the same: every logged loss is the clean run's.
    fields = ("step", "loss", "mse", "fvu", "l0")
    got, want = ([[r[f] for f in fields] for r in journal(c)] for c in (killed, clean))
    assert len(got) == len(want) == 17
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.real
def test_onthefly_on_the_real_model_reads_real_text(real_model, tmp_path):
    """SmolLM2 over embedded prose: the rows are its activations, and an SAE trained on them learns."""
    hook = "blocks.2.hook_mlp_out"
    tokens = corpus.tokenize_sequences(corpus.iter_documents("embedded"), real_model.tokenizer, 64, max_sequences=48)
    spec = BufferSpec(batch_size=512, buffer_tokens=1536, forward_sequences=8, seed=0)
    src = ModelBatches(real_model, tokens, [hook], spec)
    (batch,), place = next(src(0)), next(src.positions(0))
    reference = run_to(real_model, tokens[place[:8, 0].unique()], [hook])[hook]
    seqs = {int(s): i for i, s in enumerate(place[:8, 0].unique())}
    for row, (s, p) in zip(batch[:8], place[:8].tolist(), strict=True):
        torch.testing.assert_close(row, reference[seqs[s], p], rtol=1e-4, atol=1e-4)
    data = run_data(tmp_path, saes=[{"hook": hook, "expansion": 2, "k": 16}], batch_size=512,
                    total_tokens=512 * 24, log_every_steps=23)
    data["cache"] = {"batch_size": 8}
    cfg = config_from_dict(data, "test")
    train_from_model(cfg, real_model, tokens, buffer_tokens=1536, progress=False)
    rows = journal(cfg)
    assert rows[-1]["fvu"] < 0.8 * rows[0]["fvu"]


def test_bench_script_runs_and_writes_its_figures(tiny_llama_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_onthefly", HERE.parents[1] / "scripts" / "bench_onthefly.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(tiny_llama_dir), "--hook", "blocks.1.hook_mlp_out", "--batch-size", "128",
                       "--batches", "6", "--buffer-batches", "2", "--context", "32", "--per-pass", "4",
                       "--expansion", "2", "--k", "4", "--repeats", "1", "--no-overlap", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["tokens_per_s"]) == {"bare_forward", "onthefly_train", "onthefly_in_turn"}
    assert all(v > 0 for v in figures["tokens_per_s"].values()) and figures["tokens"] == 6 * 128
    assert "on-the-fly / bare forward:" in capsys.readouterr().out


def main() -> None:
    """The subprocess: train CONFIG's run on the fly from the tiny model (under torchrun, one stream each)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--buffer-tokens", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    train_from_model(cfg, tiny(), tiny_tokens(), args.buffer_tokens, streams=args.streams, resume=args.resume,
                     progress=False)


if __name__ == "__main__":
    main()
