import json
import os
import shutil
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
    while proc.poll() is None:
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


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo)

RANK_SCRIPT = """
import os, sys, time
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from sae.cache import write_cache
from sae.distributed import dist_info, leave

out, n_seq = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = HookedTransformer(HookedTransformerConfig(
    n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=500, n_ctx=64, act_fn="silu",
    normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, model_name="tiny",
    default_prepend_bos=False)).eval()
tokens = torch.randint(0, 500, (n_seq, 16), generator=torch.Generator().manual_seed(1))
ranks = dist_info()
with open(os.path.join(out, f"pid-{ranks[0]}"), "w") as fh:
    fh.write(str(os.getpid()))
if os.environ.get("SLOW_RANK") == str(ranks[0]):  # a straggler, so a test can kill it mid-way
    fast = model.forward
    model.forward = lambda *a, **kw: (time.sleep(0.05), fast(*a, **kw))[1]
write_cache(model, tokens, HOOK_NAMES, os.path.join(out, "cache"), corpus_fingerprint="fp", batch_size=3,
            shard_sequences=4, progress=False, ranks=ranks)
leave(ranks[1])
""".replace("HOOK_NAMES", repr(HOOKS))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_run(tmp_path, out, n_seq, world, env=None, wait=True):
    """Run RANK_SCRIPT as one process or under torchrun with `world` gloo processes."""
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    str(world), "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = launcher + [str(script), str(out), str(n_seq)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "cache"


def _same_rows(a, b):
    """Two caches hold the same shards byte for byte, and the same rows by token ids and values."""
    for hook in HOOKS:
        ma, mb = read_manifest(a / hook), read_manifest(b / hook)
        assert ma["complete"] and mb["complete"] and "rank" not in ma
        assert [(s["index"], s["rows"], s["sha256"]) for s in ma["shards"]] == \
            [(s["index"], s["rows"], s["sha256"]) for s in mb["shards"]]
        assert not list((a / hook).glob("manifest.rank-*.json"))
        meta_a, acts_a = _all_rows(a / hook)
        meta_b, acts_b = _all_rows(b / hook)
        for key in ("token_ids", "sequence", "position"):
            assert torch.equal(meta_a[key], meta_b[key])
        assert torch.equal(acts_a, acts_b)


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    return _cache_run(tmp, tmp / "run", 60, world=1)


def test_two_processes_write_the_rows_one_process_does(one_process_cache, tmp_path):
    two = _cache_run(tmp_path, tmp_path / "two", 60, world=2)
    _same_rows(two, one_process_cache)
    assert CacheReader(two / HOOKS[0]).n_rows == 60 * 16


def test_several_ranks_need_their_process_group(tiny_model, tokens, tmp_path):
    with pytest.raises(SaekitError, match="launch with torchrun"):
        build(tiny_model, tokens, tmp_path, ranks=(1, 2))
    with pytest.raises(SaekitError, match=r"rank 2 is not in \[0, 2\)"):
        build(tiny_model, tokens, tmp_path, ranks=(2, 2))


def _listed_parts(cache):
    return {(hook, s["file"]): s for hook in HOOKS for part in (cache / hook).glob("manifest.rank-*.json")
            for s in json.loads(part.read_text())["shards"]}


@pytest.mark.slow
def test_a_killed_rank_leaves_complete_shards_and_reruns_finish(one_process_cache, tmp_path):
    """SIGKILL one of two ranks mid-way: only whole shards remain; a rerun keeps them and ends with the rows
    one uninterrupted process writes; so does a rerun with another number of processes."""
    out = tmp_path / "killed"
    proc = _cache_run(tmp_path, out, 60, world=2, env={"SLOW_RANK": "1"}, wait=False)
    part = out / "cache" / HOOKS[1] / "manifest.rank-00001.json"
    while proc.poll() is None:
        if part.exists() and len(json.loads(part.read_text())["shards"]) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the cache run ended before a rank could be killed"
    os.kill(int((out / "pid-1").read_text()), signal.SIGKILL)
    assert proc.wait() != 0  # torchrun stops the other rank and fails
    cache = out / "cache"
    assert not (cache / HOOKS[0] / "manifest.json").exists()
    for hook in HOOKS:  # every shard file under its final name is whole: it parses and has all its rows
        for shard in (cache / hook).glob("shard-*.safetensors"):
            assert load_file(str(shard))["activations"].shape[0] == 4 * 16
    kept = _listed_parts(cache)
    assert 0 < len(kept) < 2 * 15
    stamps = {key: (cache / key[0] / key[1]).stat().st_mtime_ns for key in kept}
    shutil.copytree(out, tmp_path / "copy")

    _cache_run(tmp_path, out, 60, world=2)
    assert {key: (cache / key[0] / key[1]).stat().st_mtime_ns for key in kept} == stamps  # kept, not rewritten
    _same_rows(cache, one_process_cache)
    _same_rows(_cache_run(tmp_path, tmp_path / "copy", 60, world=1), one_process_cache)
