"""Architectures: config checks, the fast sparse TopK path against plain dense autograd, scaling folds."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sae.errors import SaekitError
from sae.saes import ARCHITECTURES, SAE, SAEShape, TopKConfig, TrainOutput, build_sae, config_class
from sae.saes import kernels as sparse
from sae.saes.jumprelu import _Step

ARCHS = ["topk", "batchtopk", "jumprelu", "relu", "matryoshka"]


def make(architecture: str = "topk", input_scale: float = 1.0, target_scale: float | None = None,
         **kw) -> SAE:
    """An SAE from flat keyword arguments: shape keys to the shape, the rest to the architecture's config."""
    shape = SAEShape(**{k: kw.pop(k) for k in ("d_in", "d_sae", "d_out", "is_transcoder") if kw.get(k) is not None})
    cls = config_class(architecture)
    names = {f.name for f in dataclasses.fields(cls)}
    sae = build_sae(shape, cls(**{k: v for k, v in kw.items() if k in names}))
    sae.set_scales(input_scale, target_scale)
    return sae


def _randomise(sae: SAE, seed: int = 1) -> SAE:
    """Non-trivial biases and thresholds, so folds and centring are actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=gen))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=gen) * 0.3 + 0.05)
            if sae.architecture == "batchtopk":
                sae.threshold.fill_(0.2)
    return sae


def _pair(arch: str, bf16: bool = False, **kw) -> tuple[SAE, SAE]:
    """The same SAE twice: fast sparse kernels and the plain dense reference."""
    fast = _randomise(make(arch, fast=True, encoder_bf16=bf16, **kw))
    dense = copy.deepcopy(fast)
    dense.hyper = dataclasses.replace(fast.hyper, fast=False)
    return fast, dense


def _grads(sae: SAE, out: TrainOutput) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    out.loss.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def test_registry_and_build():
    assert set(ARCHITECTURES) == set(ARCHS)
    for arch in ARCHS:
        sae = build_sae(SAEShape(d_in=8, d_sae=64), arch)
        assert sae.architecture == arch
        assert sae.W_enc.shape == (8, 64) and sae.W_dec.shape == (64, 8)
        x = torch.randn(5, 8)
        assert sae.encode(x).shape == (5, 64) and sae(x).shape == (5, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(architecture="gated"), "unknown SAE architecture 'gated'"),
    (dict(k=0), "k must be a positive integer"),
    (dict(k=65), "k must be between 1 and d_sae"),
    (dict(d_out=12), "only a transcoder"),
    (dict(target_scale=2.0), "target scale equals its input scale"),
    (dict(d_sae=0), "d_sae must be a positive integer"),
    (dict(dtype="fp8"), "dtype must be one of"),
])
def test_config_errors_name_the_problem(kwargs, match):
    with pytest.raises(SaekitError, match=match):
        make(**{"d_in": 8, "d_sae": 64, **kwargs})


def test_config_defaults_resolved():
    sae = make("relu", d_in=8, d_sae=64, input_scale=2.0)
    assert sae.shape.d_out == 8 and sae.target_scale == 2.0 and sae.hyper.sparsity_coef == 5.0
    assert set(ARCHITECTURES) == {a.architecture for a in (config_class(n) for n in ARCHITECTURES)}
    with pytest.raises(SaekitError, match="needs a TopKConfig"):
        ARCHITECTURES["topk"](SAEShape(8, 64), config_class("relu")(), None)
    assert isinstance(build_sae(SAEShape(8, 64), "topk").hyper, TopKConfig)


def test_training_step_rejects_wrong_width():
    sae = make(d_in=8, d_sae=64)
    with pytest.raises(SaekitError, match=r"expected x \[n, 8\]"):
        sae.training_step(torch.randn(4, 9))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("transcoder", [False, True])
def test_fast_path_equals_dense_fp32(arch, transcoder):
    kw = dict(d_in=32, d_sae=256, k=8, is_transcoder=transcoder, d_out=24 if transcoder else None)
    fast, dense = _pair(arch, **kw)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(96, 32, generator=gen)
    target = torch.randn(96, 24, generator=gen) if transcoder else None
    dead = torch.rand(256, generator=gen) < 0.3
    out_f = fast.training_step(x, target, dead_mask=dead)
    out_d = dense.training_step(x, target, dead_mask=dead)
    assert out_f.aux_loss > 0
    for field in ("loss", "mse", "aux_loss", "l0", "recon"):
        torch.testing.assert_close(getattr(out_f, field), getattr(out_d, field), rtol=1e-5, atol=1e-5)
    assert torch.equal(out_f.fire_counts, out_d.fire_counts)
    g_f, g_d = _grads(fast, out_f), _grads(dense, out_d)
    for name in g_d:
        torch.testing.assert_close(g_f[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)
    if arch == "batchtopk":
        torch.testing.assert_close(fast.threshold, dense.threshold)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fast_path_bf16_selects_but_computes_in_fp32(arch):
    """bf16 only decides which latents fire; with clear margins the selection, loss and gradients match fp32."""
    d_in = d_sae = 64
    k, n = 4, 128
    fast, dense = _pair(arch, bf16=True, d_in=d_in, d_sae=d_sae, k=k)
    gen = torch.Generator().manual_seed(3)
    ortho = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen)).Q  # no interference between latents
    for sae in (fast, dense):
        with torch.no_grad():
            sae.b_dec.zero_()
            sae.W_dec.copy_(ortho)
            sae.W_enc.copy_(ortho.t())
    latents = torch.rand(n, d_sae, generator=gen).argsort(dim=1)[:, :k]
    coef = torch.zeros(n, d_sae).scatter(1, latents, 2 + 2 * torch.rand(n, k, generator=gen))
    x = coef @ fast.W_dec.detach() + 0.01 * torch.randn(n, d_in, generator=gen)
    out_f, out_d = fast.training_step(x), dense.training_step(x)
    assert torch.equal(out_f.fire_counts, out_d.fire_counts)
    torch.testing.assert_close(out_f.loss, out_d.loss, rtol=1e-5, atol=1e-5)
    g_f, g_d = _grads(fast, out_f), _grads(dense, out_d)
    for name in g_d:
        torch.testing.assert_close(g_f[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fast_bf16_on_random_data_is_close():
    fast, dense = _pair("topk", bf16=True, d_in=32, d_sae=256, k=8)
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(4))
    out_f, out_d = fast.training_step(x), dense.training_step(x)
    assert abs(out_f.loss.item() - out_d.loss.item()) < 0.01 * out_d.loss.item()
    g_f, g_d = _grads(fast, out_f), _grads(dense, out_d)
    for name in g_d:
        assert (g_f[name] - g_d[name]).norm() < 0.2 * g_d[name].norm(), name


@pytest.mark.parametrize("n, skew", [(16, "one row"), (1024, "none"), (1024, "sampled rows")])
def test_batchtopk_pattern_is_exact(n, skew):
    gen = torch.Generator().manual_seed(5)
    pre = torch.randn(n, 64, generator=gen)
    if skew == "one row":
        pre[3] += 10  # row 3 owns most of the batch's top n*k
    if skew == "sampled rows":
        pre[::4] += 10  # the rows that estimate the threshold mislead it: the flat fallback must run
    k = 2
    crow, cols = sparse.batchtopk_pattern(pre, k)
    got = torch.zeros_like(pre, dtype=torch.bool)
    got[sparse._rows(crow), cols] = True
    want = torch.zeros(pre.numel(), dtype=torch.bool)
    want[pre.flatten().topk(n * k).indices] = True
    assert torch.equal(got, want.view_as(pre))
    assert crow[-1] == n * k and (cols.view(-1).numel() == n * k)
    for r in range(n):  # latent ids sorted within each row
        row = cols[crow[r]:crow[r + 1]]
        assert torch.equal(row, row.sort().values)


def test_batchtopk_threshold_tracks_smallest_kept_activation():
    sae = _randomise(make("batchtopk", d_in=16, d_sae=64, k=4, encoder_bf16=False))
    with torch.no_grad():
        sae.threshold.zero_()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(6))
    out = sae.training_step(x)
    acts = sae._train_acts_dense(sae.pre_acts(x))
    assert out.l0.item() == pytest.approx(4.0, abs=1e-6)
    torch.testing.assert_close(sae.threshold, torch.full((64,), acts[acts > 0].min().item()))
    assert torch.equal(sae.encode(x) > 0, sae.pre_acts(x) > sae.threshold)


def test_auxk_only_touches_dead_latents():
    sae = _randomise(make(d_in=16, d_sae=64, k=4))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    assert sae.training_step(x, dead_mask=None).aux_loss == 0
    assert sae.training_step(x, dead_mask=torch.zeros(64, dtype=torch.bool)).aux_loss == 0
    assert sae.training_step(x, dead_mask=dead).aux_loss > 0
    residual = (x - sae(x)).detach()
    sae._auxk_loss(x, residual, dead).backward()
    assert sae.W_enc.grad[:, 10:].abs().max() == 0 and sae.W_enc.grad[:, :10].abs().max() > 0
    assert sae.W_dec.grad[10:].abs().max() == 0


def test_jumprelu_threshold_learns_from_l0_and_reconstruction():
    sae = _randomise(make("jumprelu", d_in=16, d_sae=64, bandwidth=0.5, sparsity_coef=1e-3))
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(8))
    _Step.apply(sae.pre_acts(x), sae.threshold, 0.5).sum(-1).mean().backward()
    assert (sae.threshold.grad <= 0).all() and (sae.threshold.grad < 0).any()  # raising it lowers L0
    assert sae.W_enc.grad is None or sae.W_enc.grad.abs().max() == 0  # the step sends nothing to the encoder
    out = sae.training_step(x, sparsity_scale=1.0)
    assert out.l0 == (sae.encode(x) > 0).sum(1).float().mean()
    assert out.sparsity_loss == pytest.approx(1e-3 * out.l0.item(), rel=1e-5)
    grads = _grads(sae, out)
    assert grads["threshold"].abs().max() > 0


def test_relu_l1_is_weighted_by_decoder_norms_and_decoder_norms_are_free():
    sae = _randomise(make("relu", d_in=16, d_sae=32, sparsity_coef=2.0))
    x = torch.randn(20, 16)
    out = sae.training_step(x, sparsity_scale=1.0)
    acts = sae.encode(x)
    want = 2.0 * (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.sparsity_loss, want.detach())
    norms = sae.W_dec.norm(dim=1).clone()
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), norms)


def test_decoder_helpers():
    sae = make(d_in=16, d_sae=32, k=4)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) + 0.5)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    sae.W_dec.grad = torch.randn(32, 16)
    sae.remove_parallel_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(32), atol=1e-6, rtol=0)


def test_init_b_dec_mean_and_geometric_median():
    sae = make(d_in=4, d_sae=8, k=2)
    sample = torch.randn(200, 4, generator=torch.Generator().manual_seed(9)) * 0.1 + 1.0
    sample[0] = 1000.0  # one outlier drags the mean, not the median
    sae.init_b_dec(sample)
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0))
    sae.init_b_dec(sample, geometric_median=True)
    assert (sae.b_dec - 1.0).abs().max() < 0.05
    with pytest.raises(SaekitError, match=r"\[n, 4\]"):
        sae.init_b_dec(torch.randn(3, 5))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("transcoder", [False, True])
def test_fold_scaling_maps_raw_to_raw(arch, transcoder):
    """Trained on x*s_in -> t*s_t, the folded SAE maps raw x to raw t, with activations divided by s_t."""
    s_in, s_t = (2.5, 0.4) if transcoder else (3.7, 3.7)
    trained = _randomise(make(arch, d_in=16, d_sae=64, k=6, is_transcoder=transcoder,
                              d_out=12 if transcoder else None, input_scale=s_in,
                              target_scale=s_t if transcoder else None))
    folded = copy.deepcopy(trained)
    folded.fold_scaling()
    assert folded.input_scale == folded.target_scale == 1.0
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(10)) * 5
    with torch.no_grad():
        torch.testing.assert_close(folded(x), trained(x * s_in) / s_t, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded.encode(x), trained.encode(x * s_in) / s_t, rtol=1e-4, atol=1e-4)
    assert (folded.encode(x) > 0).any()
    if arch != "relu":
        torch.testing.assert_close(folded.W_dec, trained.W_dec)  # unit-norm decoder survives the fold


def test_short_training_run_learns():
    """A few Adam steps on sparse synthetic data cut the loss: the fast path is trainable end to end."""
    torch.manual_seed(11)
    truth = torch.nn.functional.normalize(torch.randn(64, 32), dim=1)
    sae = make(d_in=32, d_sae=128, k=4, encoder_bf16=True)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        codes = torch.zeros(256, 64).scatter(1, torch.randint(0, 64, (256, 3)), torch.rand(256, 3) + 0.5)
        out = sae.training_step(codes @ truth, dead_mask=torch.zeros(128, dtype=torch.bool))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        losses.append(out.mse.item())
    assert losses[-1] < 0.25 * losses[0]
