"""Export: saekit directories load in SAE-Lens with identical outputs; SAE-Lens and sparsify ones load in saekit."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.errors import SaekitError
from sae.formats import export_sparsify, load_sae, load_sparsity, save_sae
from sae.saes import SAE, Provenance, SAEShape, build_sae, config_class

sae_lens = pytest.importorskip("sae_lens")

META = {"context_size": 128, "prepend_bos": True}


def _trained(arch: str, transcoder: bool = False, d_out: int = 12, **kw) -> SAE:
    """An SAE as the trainer leaves it: non-trivial biases and thresholds, activation scales not yet folded."""
    hyper = config_class(arch)
    if any(f.name == "k" for f in dataclasses.fields(hyper)):
        kw = {"k": 6, **kw}
    sae = build_sae(SAEShape(d_in=16, d_sae=64, d_out=d_out if transcoder else 0, is_transcoder=transcoder),
                    hyper(**kw), Provenance(model_name="smollm2-135m", hook_name="blocks.6.hook_mlp_out"))
    sae.set_scales(3.7, 0.6 if transcoder else None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=gen))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(64, generator=gen) * 0.3 + 0.05)
        if arch == "batchtopk":
            sae.threshold.fill_(0.25)
    return sae


def _raw(n: int = 40, d: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 4


CASES = [("topk", False), ("batchtopk", False), ("jumprelu", False), ("relu", False),
         ("relu", True), ("jumprelu", True), ("batchtopk", True), ("topk", True)]


@pytest.mark.parametrize("arch, transcoder", CASES)
def test_sae_lens_loads_our_directory_with_identical_outputs(tmp_path, arch, transcoder):
    sae = _trained(arch, transcoder, d_out=16 if arch == "topk" else 12)
    save_sae(sae, tmp_path, metadata=META)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    want = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}[arch]
    if transcoder and arch != "topk":
        want = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder"}[arch]
    assert theirs.cfg.architecture() == want
    x = _raw()
    s_in, s_t = sae.input_scale, sae.target_scale
    with torch.no_grad():
        acts = theirs.encode(x)
        # SAE-Lens on raw activations == our SAE on the scaled activations it was trained on, unscaled
        torch.testing.assert_close(acts, sae.encode(x * s_in) / s_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(acts), sae.decode(sae.encode(x * s_in)) / s_t, rtol=1e-5, atol=1e-5)
        assert (acts > 0).any()
        ours = load_sae(tmp_path)
        torch.testing.assert_close(ours.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert ours.architecture == arch and ours.shape.is_transcoder == transcoder
    assert sae.input_scale == 3.7  # the caller's SAE is not folded in place


def test_metadata_and_config_round_trip(tmp_path):
    sae = _trained("batchtopk", aux_k_coef=0.05)
    save_sae(sae, tmp_path, metadata={**META, "training": {"lr": 4e-4, "steps": 1000}})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["sae_lens_version"].startswith("6.")
    assert meta["model_name"] == "smollm2-135m" and meta["hook_name"] == "blocks.6.hook_mlp_out"
    assert meta["context_size"] == 128 and meta["prepend_bos"] is True and meta["training"]["steps"] == 1000
    assert meta["saekit"]["architecture"] == "batchtopk"
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    loaded = load_sae(tmp_path)
    assert loaded.hyper.aux_k_coef == 0.05 and loaded.input_scale == 1.0 and loaded.hyper.k == 6
    assert torch.equal(loaded.threshold, torch.full((64,), 0.25 / 3.7))
    assert sae_lens.SAE.load_from_disk(tmp_path).cfg.metadata.saekit["architecture"] == "batchtopk"


def test_save_requires_run_metadata(tmp_path):
    with pytest.raises(SaekitError, match="metadata lacks context_size, prepend_bos"):
        save_sae(_trained("topk"), tmp_path)
    with pytest.raises(SaekitError, match="JSON-serialisable"):
        save_sae(_trained("topk"), tmp_path, metadata={**META, "where": tmp_path})
    assert not (tmp_path / "cfg.json").exists()


def test_save_refuses_diverged_weights(tmp_path):
    sae = _trained("topk")
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    with pytest.raises(SaekitError, match="'W_enc' contains NaN"):
        save_sae(sae, tmp_path, metadata=META)


def test_sparsity_file(tmp_path):
    freq = torch.rand(64) * 0.1
    freq[0] = 0.0
    save_sae(_trained("topk"), tmp_path, sparsity=freq, metadata=META)
    stored = load_file(tmp_path / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(stored, torch.log10(freq + 1e-10))
    torch.testing.assert_close(load_sparsity(tmp_path), freq, rtol=1e-5, atol=1e-9)
    with pytest.raises(SaekitError, match="firing frequencies in \\[0, 1\\]"):
        save_sae(_trained("topk"), tmp_path, sparsity=torch.log10(freq + 1e-10), metadata=META)
    save_sae(_trained("topk"), tmp_path, metadata=META)  # no sparsity now: the stale file must go
    assert load_sparsity(tmp_path) is None


def _sae_lens_dir(tmp_path, arch: str, **cfg_kw) -> tuple[object, torch.Tensor]:
    """Save a randomly initialised SAE-Lens SAE of `arch` and return it with test inputs."""
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = sae_lens.registry.get_sae_class(arch)
    cfg = cfg_cls(d_in=16, d_sae=64, metadata=SAEMetadata(model_name="m", hook_name="blocks.1.hook_mlp_out"),
                  **cfg_kw)
    theirs = cls(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name.startswith("W") else 0.1))
        if hasattr(theirs, "threshold"):
            theirs.threshold.copy_(torch.rand(64, generator=gen) * 0.2)
            theirs.threshold[0] = 0.0
    theirs.save_model(tmp_path)
    return theirs, _raw(d=16, seed=4)


@pytest.mark.parametrize("arch, kw", [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("jumprelu", {}),
    ("topk", {"k": 5}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ("transcoder", {"d_out": 10, "apply_b_dec_to_input": False}),
    ("jumprelu_transcoder", {"d_out": 10, "apply_b_dec_to_input": False}),
])
def test_load_sae_lens_directories(tmp_path, arch, kw):
    theirs, x = _sae_lens_dir(tmp_path, arch, **kw)
    ours = load_sae(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.encode(x) > 0, theirs.encode(x) > 0)
    assert ours.provenance.hook_name == "blocks.1.hook_mlp_out" and ours.provenance.model_name == "m"


def test_load_refuses_gated_and_unfolded_normalisation(tmp_path):
    _sae_lens_dir(tmp_path / "gated", "gated")
    with pytest.raises(SaekitError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path / "gated")
    _sae_lens_dir(tmp_path / "norm", "standard", normalize_activations="expected_average_only_in")
    with pytest.raises(SaekitError, match="normalize_activations is 'expected_average_only_in'"):
        load_sae(tmp_path / "norm")


def test_missing_or_misshapen_tensors_are_named(tmp_path):
    save_sae(_trained("jumprelu"), tmp_path, metadata=META)
    weights = load_file(tmp_path / "sae_weights.safetensors")
    save_file({k: v for k, v in weights.items() if k != "threshold"}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SaekitError, match=r"sae_weights.safetensors: tensor 'threshold' is missing; "
                                          r"expected shape \[64\]"):
        load_sae(tmp_path)
    save_file({**weights, "W_dec": weights["W_dec"][:, :8].contiguous()}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SaekitError, match=r"tensor 'W_dec' has shape \[64, 8\], expected \[64, 16\]"):
        load_sae(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SaekitError, match="not a readable safetensors file"):
        load_sae(tmp_path)
    with pytest.raises(SaekitError, match="has no cfg.json"):
        load_sae(tmp_path / "nowhere")


def _sparsify_dir(path, transcode: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    tensors = {"encoder.weight": torch.randn(64, 16, generator=gen) * 0.3, "encoder.bias": torch.randn(64) * 0.1,
               "W_dec": torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1),
               "b_dec": torch.randn(16, generator=gen)}
    path.mkdir(parents=True)
    save_file(tensors, path / "sae.safetensors")
    (path / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": 5,
        "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": 16}))
    return tensors


@pytest.mark.parametrize("transcode", [False, True])
def test_load_sparsify_directory(tmp_path, transcode):
    t = _sparsify_dir(tmp_path / "layers.6.mlp", transcode)
    ours = load_sae(tmp_path / "layers.6.mlp")
    assert ours.architecture == "topk" and ours.shape.d_sae == 64 and ours.hyper.k == 5
    x = _raw(d=16, seed=6)
    # sparsify's own formula: top-k of relu(encoder(x - b_dec)), embedding-bag decode, + b_dec
    pre = torch.relu((x if transcode else x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(5)
    want = torch.zeros(40, 64).scatter(1, idx, vals)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), want @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)


def test_sparsify_tensor_errors_name_tensor_file_and_shape(tmp_path):
    t = _sparsify_dir(tmp_path / "s")
    save_file({**t, "encoder.bias": torch.zeros(63)}, tmp_path / "s" / "sae.safetensors")
    with pytest.raises(SaekitError, match=r"sae.safetensors: tensor 'encoder.bias' has shape \[63\], expected \[64\]"):
        load_sae(tmp_path / "s")
    save_file({k: v for k, v in t.items() if k != "W_dec"}, tmp_path / "s" / "sae.safetensors")
    with pytest.raises(SaekitError, match=r"sae.safetensors: tensor 'W_dec' is missing; expected shape \[64, 16\]"):
        load_sae(tmp_path / "s")


def test_export_sparsify_round_trip(tmp_path):
    sae = _trained("topk")
    export_sparsify(sae, tmp_path)
    back = load_sae(tmp_path)
    x = _raw()
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x * 3.7) / 3.7, rtol=1e-5, atol=1e-5)
    with pytest.raises(SaekitError, match="sparsify only runs TopK"):
        export_sparsify(_trained("relu"), tmp_path / "relu")


def test_export_sparsify_loads_in_sparsify(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    sae = _trained("topk")
    export_sparsify(sae, tmp_path)
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path)
    x = _raw()
    with torch.no_grad():
        enc = theirs.encode(x)
        dense = torch.zeros(40, 64).scatter(1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(dense, copy.deepcopy(sae).encode(x * 3.7) / 3.7, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(enc.top_acts, enc.top_indices), sae(x * 3.7) / 3.7,
                                   rtol=1e-5, atol=1e-5)


def test_load_directory_written_by_sparsify(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(7)
    theirs = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=64, k=5))
    with torch.no_grad():
        theirs.encoder.bias.normal_(std=0.1)
        theirs.b_dec.normal_()
    theirs.save_to_disk(tmp_path / "layers.3")
    ours = load_sae(tmp_path / "layers.3")
    x = _raw()
    with torch.no_grad():
        enc = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), torch.zeros(40, 64).scatter(1, enc.top_indices, enc.top_acts),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x).sae_out, rtol=1e-5, atol=1e-5)


def test_topk_transcoder_with_other_width_round_trips(tmp_path):
    sae = _trained("topk", transcoder=True, d_out=12)  # SAE-Lens has no class for this; saekit reads it back
    save_sae(sae, tmp_path, metadata=META)
    back = load_sae(tmp_path)
    x = _raw()
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x * 3.7) / 0.6, rtol=1e-5, atol=1e-5)


def test_load_pre_6_sae_lens_topk_config(tmp_path):
    gen = torch.Generator().manual_seed(8)
    t = {"W_enc": torch.randn(16, 64, generator=gen) * 0.3, "b_enc": torch.randn(64, generator=gen) * 0.1,
         "W_dec": torch.randn(64, 16, generator=gen) * 0.3, "b_dec": torch.randn(16, generator=gen)}
    save_file(t, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({
        "d_in": 16, "d_sae": 64, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
        "hook_point": "blocks.2.hook_resid_post", "model_name": "gpt2", "apply_b_dec_to_input": True}))
    ours = load_sae(tmp_path)
    assert ours.architecture == "topk" and ours.hyper.k == 5 and ours.provenance.hook_name == "blocks.2.hook_resid_post"
    x = _raw()
    vals, idx = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).topk(5)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), torch.zeros(40, 64).scatter(1, idx, vals.relu()))
