import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae.cache import ActivationBatches, CacheReader, batch_indices, read_manifest, write_cache
from sae.errors import SaekitError

HOOKS = ["blocks.1.mlp.hook_post", "blocks.2.hook_mlp_out"]


@pytest.fixture()
def tokens():
    return torch.randint(0, 500, (40, 16), generator=torch.Generator().manual_seed(1))


def build(tiny_model, tokens, path, **kw):
    args = dict(corpus_fingerprint="fp", batch_size=3, shard_sequences=8, progress=False)
    args.update(kw)
    return write_cache(tiny_model, tokens, HOOKS, path, **args)


def test_roundtrip_matches_model_and_traces_rows(tiny_model, tokens, tmp_path):
    folders = build(tiny_model, tokens, tmp_path)
    _, ref = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in HOOKS)
    for hook in HOOKS:
        reader = CacheReader(folders[hook], expect={"model": "tiny", "hook": hook})
        assert reader.n_rows == tokens.numel() and reader.manifest["complete"]
        rows = np.array([0, 17, 200, tokens.numel() - 1])
        got = reader.activations(rows)
        want = ref[hook].reshape(-1, ref[hook].shape[-1])[rows]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        meta = reader.tokens(rows)
        assert torch.equal(meta["token_ids"], tokens.reshape(-1)[rows])
        assert torch.equal(tokens[meta["sequence"], meta["position"]], meta["token_ids"])
    assert CacheReader(folders[HOOKS[0]]).d == 64 and CacheReader(folders[HOOKS[1]]).d == 32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_dtypes(tiny_model, tokens, tmp_path, dtype):
    folders = build(tiny_model, tokens, tmp_path, dtype=dtype)
    full = CacheReader(build(tiny_model, tokens, tmp_path / "f32")[HOOKS[1]])
    low = CacheReader(folders[HOOKS[1]])
    rows = np.arange(50)
    torch.testing.assert_close(low.activations(rows), full.activations(rows), rtol=2e-2, atol=2e-2)
    assert low.manifest["dtype"] == dtype


def test_truncated_shard_is_named_on_open(tiny_model, tokens, tmp_path):
    folder = build(tiny_model, tokens, tmp_path)[HOOKS[0]]
    shard = folder / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SaekitError, match="shard-00002.safetensors is truncated or altered.*rerun `saekit cache`"):
        CacheReader(folder)


def test_altered_shard_never_yields_rows(tiny_model, tokens, tmp_path):
    folder = build(tiny_model, tokens, tmp_path)[HOOKS[0]]
    shard = folder / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CacheReader(folder)
    reader.activations(np.array([0, 1]))  # shard 0 is fine
    bad_row = 8 * 16 + 3  # first rows of shard 1
    with pytest.raises(SaekitError, match="shard-00001.safetensors"):
        reader.activations(np.array([bad_row]))


def test_rerun_rewrites_damaged_shard(tiny_model, tokens, tmp_path):
    folder = build(tiny_model, tokens, tmp_path)[HOOKS[0]]
    good = (folder / "shard-00003.safetensors").read_bytes()
    (folder / "shard-00003.safetensors").write_bytes(good[:-10])
    build(tiny_model, tokens, tmp_path)
    assert (folder / "shard-00003.safetensors").read_bytes() == good
    CacheReader(folder).activations(np.arange(tokens.numel()))


def test_cache_for_other_model_hook_or_width_is_refused(tiny_model, tokens, tmp_path):
    folder = build(tiny_model, tokens, tmp_path)[HOOKS[0]]
    with pytest.raises(SaekitError, match="model: cache has 'tiny', expected 'smollm2-135m'"):
        CacheReader(folder, expect={"model": "smollm2-135m"})
    with pytest.raises(SaekitError, match="d: cache has 64, expected 576"):
        CacheReader(folder, expect={"d": 576})
    with pytest.raises(SaekitError, match="hook: cache has 'blocks.1.mlp.hook_post'"):
        CacheReader(folder, expect={"hook": "blocks.6.mlp.hook_post"})
    with pytest.raises(SaekitError, match="corpus_fingerprint.*--overwrite"):
        build(tiny_model, tokens, tmp_path, corpus_fingerprint="other-corpus")
    build(tiny_model, tokens, tmp_path, corpus_fingerprint="other-corpus", overwrite=True)
    assert read_manifest(folder)["corpus_fingerprint"] == "other-corpus"


def test_missing_cache_says_how_to_build(tmp_path):
    with pytest.raises(SaekitError, match="saekit cache"):
        CacheReader(tmp_path / "nothing")


def test_batches_cover_each_row_once_per_epoch_and_are_seeded():
    batches = list(batch_indices(1000, 64, seed=3, epoch=0, shard_rows=100, buffer_shards=3))
    seen = np.concatenate(batches)
    assert len(seen) == 15 * 64 and len(np.unique(seen)) == len(seen)
    again = list(batch_indices(1000, 64, seed=3, epoch=0, shard_rows=100, buffer_shards=3))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = next(batch_indices(1000, 64, seed=4, epoch=0, shard_rows=100, buffer_shards=3))
    assert not np.array_equal(batches[0], other)
    # rows from several shards are mixed within one batch
    assert len(np.unique(batches[0] // 100)) >= 2


def test_ranks_split_global_batches_and_resume_skips(tiny_model, tokens, tmp_path):
    folders = build(tiny_model, tokens, tmp_path)
    readers = [CacheReader(folders[h]) for h in HOOKS]
    single = ActivationBatches(readers, batch_size=32, seed=0)
    halves = [ActivationBatches(readers, batch_size=32, seed=0, rank=r, world_size=2) for r in range(2)]
    stream, s0, s1 = single(), halves[0](), halves[1]()
    for _ in range(single.batches_per_epoch + 3):  # crosses an epoch boundary
        full = next(stream)
        a, b = next(s0), next(s1)
        for i in range(len(HOOKS)):
            assert torch.equal(torch.cat([a[i], b[i]]), full[i])
    fresh = single()
    for _ in range(7):
        next(fresh)
    assert torch.equal(next(single(start_batch=7))[0], next(fresh)[0])


def test_unaligned_caches_are_refused(tiny_model, tokens, tmp_path):
    a = CacheReader(build(tiny_model, tokens, tmp_path / "a")[HOOKS[0]])
    b = CacheReader(build(tiny_model, tokens[:20], tmp_path / "b")[HOOKS[1]])
    with pytest.raises(SaekitError, match="do not align row for row"):
        ActivationBatches([a, b], batch_size=16)


def _cli_config(tmp_path, model_dir, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  name: {model_dir}\n  device: cpu\n"
        "corpus:\n  source: embedded\n  context_size: 64\n  max_sequences: 1600\n"
        "cache:\n  hooks: [blocks.3.mlp.hook_post, blocks.3.hook_mlp_out]\n  batch_size: 8\n  shard_sequences: 8\n")
    return path


def _all_rows(folder):
    reader = CacheReader(folder)
    rows = np.arange(reader.n_rows)
    return reader.tokens(rows), reader.activations(rows)


def test_sigkill_mid_cache_then_resume_is_exact(tmp_path, tiny_llama_dir):
    """Kill a real `saekit cache` process mid-way; the rerun ends with exactly the uninterrupted rows."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = _cli_config(tmp_path, tiny_llama_dir, "killed")
    cmd = [sys.executable, "-m", "features.cli", "cache", "--config", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "runs" / "killed" / "cache" / "blocks.3.mlp.hook_post" / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the cache run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"], "the run finished before the kill; make the test job bigger"
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    clean = _cli_config(tmp_path, tiny_llama_dir, "clean")
    subprocess.run([sys.executable, "-m", "features.cli", "cache", "--config", str(clean)], env=env, check=True,
                   capture_output=True)
    for hook in ["blocks.3.mlp.hook_post", "blocks.3.hook_mlp_out"]:
        meta_k, acts_k = _all_rows(tmp_path / "runs" / "killed" / "cache" / hook)
        meta_c, acts_c = _all_rows(tmp_path / "runs" / "clean" / "cache" / hook)
        assert torch.equal(meta_k["token_ids"], meta_c["token_ids"])
        pairs = meta_k["sequence"] * 64 + meta_k["position"]
        n_train = load_file(str(tmp_path / "runs" / "clean" / "tokens.safetensors"))["train"].shape[0]
        assert len(torch.unique(pairs)) == len(pairs) == n_train * 64  # none missing, none duplicated
        torch.testing.assert_close(acts_k, acts_c)
