"""Shared fixtures: a tiny random model for speed, a tiny on-disk Llama for CLI runs, the real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model() -> HookedTransformer:
    """A 3-layer random gated-MLP model: the same hook names as SmolLM2, milliseconds per pass."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=500, n_ctx=64, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, model_name="tiny",
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def real_model() -> HookedTransformer:
    from sae.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, real_model: HookedTransformer) -> Path:
    """A random 4-layer Llama saved as a local HF directory with SmolLM2's tokenizer, for CLI runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=real_model.cfg.d_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    real_model.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny workloads: on a shared 2-core machine one thread is several times faster than two. A module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def identity_sae():
    """A factory of ReLU SAEs that reconstruct exactly (relu(x) - relu(-x) = x), so every metric and every
    interchange through them has a known value: identity_sae(d, hook)."""
    from sae.saes import Provenance, SAEShape, build_sae

    def make(d: int, hook: str):
        sae = build_sae(SAEShape(d_in=d, d_sae=2 * d), "relu", Provenance(model_name="tiny", hook_name=hook))
        eye = torch.eye(d)
        with torch.no_grad():
            sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
            sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        return sae

    return make
