import pytest
import torch

from sae.errors import SaekitError
from sae.hooks import expand_hooks, hook_width, validate_hooks
from sae.models import load_model


@pytest.mark.real
def test_embedded_model_matches_transformers_and_knows_tokyo(real_model):
    from transformers import AutoModelForCausalLM

    from sae.models import gguf_path

    gguf = gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    hf.eval()
    tokens = real_model.to_tokens("Fact: Tokyo is a city in the country of", prepend_bos=False)
    with torch.inference_mode():
        ours = real_model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    assert real_model.to_string(ours[0, -1].argmax()) == " Japan"


def test_local_llama_directory_loads(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = load_model(str(tiny_llama_dir))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokens = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.inference_mode():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
    assert model.cfg.n_layers == 4


def test_unknown_model_lists_accepted_forms():
    with pytest.raises(SaekitError, match="unknown model 'not-a-model'.*smollm2-135m.*TransformerLens.*local"):
        load_model("not-a-model")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(SaekitError, match="config.json"):
        load_model(str(tmp_path))


def test_hook_validation(tiny_model):
    validate_hooks(tiny_model, ["blocks.2.mlp.hook_post", "blocks.0.hook_mlp_out"])
    with pytest.raises(SaekitError, match=r"unknown hook 'blocks.1.mlp.hook_pots'.*blocks.\{0..2\}.mlp.hook_post"):
        validate_hooks(tiny_model, ["blocks.1.mlp.hook_pots"])
    with pytest.raises(SaekitError, match="layer 7 is out of range.*has 3 layers"):
        validate_hooks(tiny_model, ["blocks.7.mlp.hook_post"])
    with pytest.raises(SaekitError, match="not a per-layer"):
        validate_hooks(tiny_model, ["hook_embed"])


def test_expand_hooks_and_widths(tiny_model):
    assert expand_hooks(["blocks.{1..2}.mlp.hook_post", "blocks.1.mlp.hook_post"]) == [
        "blocks.1.mlp.hook_post", "blocks.2.mlp.hook_post"]
    with pytest.raises(SaekitError, match="empty"):
        expand_hooks(["blocks.{3..1}.mlp.hook_post"])
    assert hook_width(tiny_model, "blocks.1.mlp.hook_post") == 64
    assert hook_width(tiny_model, "blocks.1.hook_mlp_out") == 32
