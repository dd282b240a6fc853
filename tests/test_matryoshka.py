"""Matryoshka BatchTopK: prefix widths, the summed prefix losses on a hand-checked example (value and gradient), the
sparse path against the dense reference, YAML parsing, training through the trainer, and the SAE-Lens round trip."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import yaml

from sae.config import TrainConfig, build_dataclass
from sae.errors import SaekitError
from sae.formats import load_sae, save_sae
from sae.saes import MatryoshkaConfig, Provenance, SAEShape, build_sae
from sae.saes.matryoshka import prefix_widths
from sae.sources import tensor_batches
from sae.trainer import build_job, train

HOOK = "blocks.1.hook_mlp_out"


def test_prefix_widths():
    assert prefix_widths(4608, None) == [288, 576, 1152, 2304, 4608]  # doubling up to d_sae
    assert prefix_widths(4, None) == [1, 2, 4]  # sizes below one latent are dropped
    assert prefix_widths(100, [0.1, 30, 0.5]) == [10, 30, 50, 100]  # fractions and sizes mix; d_sae is added
    assert prefix_widths(100, [0.25, 1.0]) == [25, 100]
    with pytest.raises(SaekitError, match="increase strictly"):
        prefix_widths(100, [0.5, 0.25])
    with pytest.raises(SaekitError, match="increase strictly"):
        prefix_widths(100, [200])
    for bad in ([], [0.0], [-3], [2.5], [True]):
        with pytest.raises(SaekitError, match="prefixes"):
            MatryoshkaConfig(prefixes=bad)


def hand_sae(fast: bool) -> torch.nn.Module:
    """Identity encoder and decoder on 4 dims, prefixes of 1, 2 and 4 latents: activations equal the inputs."""
    sae = build_sae(SAEShape(d_in=4, d_sae=4), MatryoshkaConfig(k=2, prefixes=[0.25, 2], fast=fast, encoder_bf16=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    return sae


@pytest.mark.parametrize("fast", [False, True])
def test_prefix_losses_by_hand(fast):
    """Two tokens, k=2: BatchTopK keeps the batch's 4 largest values (5, 4, 3, 2), so the codes are
    [4, 3, 2, 0] and [0, 0, 0, 5]. Squared errors per prefix (1, 2, 4 latents): token 0 gives 14, 5, 1;
    token 1 gives 25.25, 25.25, 0.25. Means over tokens: 19.625 + 15.125 + 0.625 = 35.375."""
    sae = hand_sae(fast)
    assert sae.widths == [1, 2, 4]
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.5, 0.0, 0.0, 5.0]])
    out = sae.training_step(x)
    assert out.fire_counts.tolist() == [1, 1, 1, 1] and out.l0 == 2
    torch.testing.assert_close(out.mse, torch.tensor(0.625))
    torch.testing.assert_close(out.loss, torch.tensor(35.375))
    torch.testing.assert_close(out.recon, torch.tensor([[4.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0]]))
    out.loss.backward()
    # d/dW_dec[0]: latent 0 (value 4 on token 0) is in every prefix, so it answers to all three residuals,
    # [0,3,2,1] + [0,0,2,1] + [0,0,0,1], each times -2 * 4 / 2 tokens.
    torch.testing.assert_close(sae.W_dec.grad[0], torch.tensor([0.0, -12.0, -16.0, -12.0]))
    # latent 3 (value 5 on token 1) is only in the full dictionary: the residual [0.5, 0, 0, 0] there
    torch.testing.assert_close(sae.W_dec.grad[3], torch.tensor([-2.5, 0.0, 0.0, 0.0]))
    # b_dec is in every prefix's output: minus the residuals summed over prefixes and tokens, times 2 / 2 tokens
    # (no encoder-side term: each active latent's own dimension is reconstructed exactly, so W_enc's gradient is 0)
    torch.testing.assert_close(sae.b_dec.grad, -torch.tensor([1.5, 3.0, 4.0, 13.0]))


@pytest.mark.parametrize("transcoder", [False, True])
def test_fast_path_equals_dense(transcoder):
    gen = torch.Generator().manual_seed(2)
    shape = SAEShape(d_in=32, d_sae=256, d_out=24 if transcoder else 0, is_transcoder=transcoder)
    fast = build_sae(shape, MatryoshkaConfig(k=8, prefixes=[0.125, 0.25, 0.5], encoder_bf16=False), seed=3)
    with torch.no_grad():
        fast.b_enc.copy_(torch.randn(256, generator=gen) * 0.1)
        fast.b_dec.copy_(torch.randn(shape.d_out, generator=gen))
    dense = copy.deepcopy(fast)
    dense.hyper = dataclasses.replace(fast.hyper, fast=False)
    x = torch.randn(96, 32, generator=gen)
    target = torch.randn(96, 24, generator=gen) if transcoder else None
    dead = torch.rand(256, generator=gen) < 0.3
    outs = [sae.training_step(x, target, dead_mask=dead) for sae in (fast, dense)]
    assert outs[0].aux_loss > 0 and outs[0].loss > outs[0].mse + outs[0].aux_loss  # the inner prefixes count
    for field in ("loss", "mse", "aux_loss", "l0", "recon"):
        torch.testing.assert_close(getattr(outs[0], field), getattr(outs[1], field), rtol=1e-5, atol=1e-5)
    for out in outs:
        out.loss.backward()
    for name, p in dense.named_parameters():
        torch.testing.assert_close(dict(fast.named_parameters())[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(fast.threshold, dense.threshold)


def test_yaml_entry_parses_and_validates():
    text = """
saes:
  - {hook: blocks.1.hook_mlp_out, architecture: matryoshka, expansion: 4, k: 8, prefixes: [0.125, 0.25, 64]}
  - {hook: blocks.1.hook_mlp_out, architecture: matryoshka}
"""
    cfg = build_dataclass(TrainConfig, yaml.safe_load(text), "train", "test.yaml")
    spec, default = cfg.saes
    assert spec.architecture == "matryoshka" and spec.hyper.prefixes == [0.125, 0.25, 64.0] and spec.hyper.k == 8
    assert spec.sae_id == "blocks.1.hook_mlp_out-matryoshka-x4-k8" and default.hyper.prefixes is None
    with pytest.raises(SaekitError, match=r"test.yaml: key 'train.saes\[0\]'.*prefixes entry 2.5"):
        build_dataclass(TrainConfig, {"saes": [{"architecture": "matryoshka", "prefixes": [2.5]}]}, "train",
                        "test.yaml")
    with pytest.raises(SaekitError, match="prefixes"):
        build_dataclass(TrainConfig, {"saes": [{"architecture": "matryoshka", "prefixes": "half"}]}, "train",
                        "test.yaml")


def test_trains_through_the_trainer_on_planted_features():
    """Sparse codes over 48 planted directions, some common, some rare: the trainer cuts the nested loss and the
    FVU and learns the threshold, and the first 16 latents alone reconstruct far more than the first 16 of a
    BatchTopK SAE trained beside it on the same batches (the prefix loss puts the common directions first)."""
    gen = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(48, 16, generator=gen), dim=1)
    on = torch.rand(6144, 48, generator=gen) < 0.08 * torch.linspace(1.0, 0.05, 48)
    acts = (on * (torch.rand(6144, 48, generator=gen) + 0.5)) @ truth
    common = {"hook": HOOK, "expansion": 8, "k": 4, "lr": 3e-3}
    specs = build_dataclass(TrainConfig, {"saes": [{**common, "architecture": "matryoshka", "prefixes": [16, 0.25]},
                                                   {**common, "architecture": "batchtopk"}]}).saes
    jobs = [build_job(spec, acts[:2048], acts[:2048], [HOOK], model_name="tiny") for spec in specs]
    x = acts * jobs[0].sae.input_scale
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    with torch.no_grad():
        before = jobs[0].sae.training_step(x)
    cfg = TrainConfig(batch_size=512, total_tokens=512 * 300, lr_warmup_steps=5, log_every_steps=50,
                      dead_after_tokens=4096)
    matryoshka, batchtopk = (t.sae for t in train(jobs, tensor_batches([acts], cfg.batch_size), cfg, progress=False))

    def first_16_fvu(sae) -> float:
        codes = sae.encode(x)
        return float((codes[:, :16] @ sae.W_dec[:16] + sae.b_dec - x).pow(2).sum(-1).mean() / var)

    with torch.no_grad():
        after = matryoshka.training_step(x)
        fvu = float((matryoshka(x) - x).pow(2).sum(-1).mean() / var)
        l0 = float((matryoshka.encode(x) > 0).sum(1).float().mean())
        small, small_batchtopk = first_16_fvu(matryoshka), first_16_fvu(batchtopk)
    assert after.loss < 0.2 * before.loss and fvu < 0.2, (after.loss, before.loss, fvu)
    assert float(matryoshka.threshold[0]) > 0 and 1 < l0 < 6
    assert small < 0.45 and small < small_batchtopk - 0.05, (small, small_batchtopk)


def trained_like(transcoder: bool) -> torch.nn.Module:
    """A Matryoshka SAE as the trainer leaves it: biases, a learned threshold, activation scales not yet folded."""
    shape = SAEShape(d_in=16, d_sae=64, d_out=12 if transcoder else 0, is_transcoder=transcoder)
    sae = build_sae(shape, MatryoshkaConfig(k=6, prefixes=[8, 0.25]), Provenance("smollm2-135m", HOOK))
    sae.set_scales(3.7, 0.6 if transcoder else None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(64, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(shape.d_out, generator=gen))
        sae.threshold.fill_(0.25)
    return sae


@pytest.mark.parametrize("transcoder", [False, True])
def test_sae_lens_loads_it_as_jumprelu_with_identical_outputs(tmp_path, transcoder):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like(transcoder)
    save_sae(sae, tmp_path, metadata={"context_size": 128, "prepend_bos": True})
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == ("jumprelu_transcoder" if transcoder else "jumprelu")
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2)) * 4
    with torch.no_grad():
        acts = theirs.encode(x)
        torch.testing.assert_close(acts, sae.encode(x * 3.7) / sae.target_scale, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(acts), sae(x * 3.7) / sae.target_scale, rtol=1e-5, atol=1e-5)
        assert (acts > 0).any() and (acts == 0).any()
        ours = load_sae(tmp_path)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert ours.architecture == "matryoshka" and ours.hyper.prefixes == [8, 0.25] and ours.widths == [8, 16, 64]
    assert theirs.cfg.metadata.saekit["hyper"]["prefixes"] == [8, 0.25]
