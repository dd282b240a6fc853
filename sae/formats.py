"""Save and load SAEs: saekit's own format *is* SAE-Lens 6.x's on-disk format; sparsify is read and written.

A saved directory holds `cfg.json`, `sae_weights.safetensors` and optionally `sparsity.safetensors`,
exactly what `sae_lens.SAE.load_from_disk` reads. saekit's own details (architecture, shape and
hyperparameters) ride along in `cfg.json`'s `metadata.saekit`, which SAE-Lens keeps as free-form metadata.
Activation scaling is always folded into the weights before saving, so every reader sees an SAE
that acts on raw model activations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

import sae as saekit
from sae.errors import SaekitError
from sae.io import atomic_save_tensors, atomic_write_json
from sae.saes import SAE, Provenance, SAEShape, TopKConfig, build_sae, config_class, hyper_fields

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"

# saekit architecture -> SAE-Lens architecture, for plain SAEs and for transcoders. BatchTopK and Matryoshka
# BatchTopK (whose prefixes only shape training) become JumpReLU with the global threshold on every latent.
# SAE-Lens has no TopK transcoder class, but its TopK SAE with apply_b_dec_to_input false computes exactly a
# TopK transcoder when d_out == d_in.
SAE_LENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "jumprelu": "jumprelu",
                 "relu": "standard"}
SAE_LENS_TRANSCODER_ARCH = {"topk": "topk", "batchtopk": "jumprelu_transcoder", "matryoshka": "jumprelu_transcoder",
                            "jumprelu": "jumprelu_transcoder", "relu": "transcoder"}
# SAE-Lens architecture -> (saekit architecture, is_transcoder), for directories trained elsewhere.
FROM_SAE_LENS = {"standard": ("relu", False), "topk": ("topk", False), "jumprelu": ("jumprelu", False),
                 "transcoder": ("relu", True), "jumprelu_transcoder": ("jumprelu", True)}
REQUIRED_METADATA = ("model_name", "hook_name", "context_size", "prepend_bos")
SAEKIT_FORMAT = 2  # metadata.saekit layout: 1 had one flat "config"; 2 keeps shape and hyperparameters apart
# Every key of format 1's flat config (shape, hyperparameters, scales and provenance in one mapping).
_V1_FIELDS = {"d_in", "d_sae", "architecture", "k", "aux_k_coef", "sparsity_coef", "bandwidth", "init_threshold",
              "is_transcoder", "d_out", "input_scale", "target_scale", "dtype", "seed", "model_name", "hook_name",
              "hook_name_out", "fast", "encoder_bf16"}
_V1_RENAMED = {"jumprelu_bandwidth": "bandwidth", "jumprelu_init_threshold": "init_threshold"}


def _sae_lens_version() -> str:
    try:
        return version("sae-lens")
    except PackageNotFoundError:  # saekit writes the format whether or not SAE-Lens is installed
        return "6.0.0"


@torch.no_grad()
def _folded(sae: SAE) -> SAE:
    """A float32 CPU copy acting on raw activations; the caller's SAE is left as it is."""
    out = copy.deepcopy(sae).cpu().float()
    out.hyper = dataclasses.replace(out.hyper, dtype="float32")
    out.fold_scaling()
    for name, tensor in out.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise SaekitError(f"SAE weight '{name}' contains NaN or inf; training diverged: lower the learning "
                              "rate or check the activation cache for non-finite values")
    return out


def save_sae(sae: SAE, path: str | Path, sparsity: Tensor | None = None,
             metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` to `path` in SAE-Lens format, scaling folded in.

    `sparsity` is each latent's firing frequency in [0, 1] (stored as log10(freq + 1e-10), as SAE-Lens
    does). `metadata` must give `context_size` and `prepend_bos`; model and hook names default to the
    SAE config's; any other JSON-serialisable keys (e.g. the training config) are kept.
    """
    path = Path(path)
    folded = _folded(sae)
    cfg, prov = folded.shape, folded.provenance
    meta: dict[str, Any] = {"sae_lens_version": _sae_lens_version(), "model_name": prov.model_name,
                            "hook_name": prov.hook_name}
    if cfg.is_transcoder:
        meta["hook_name_out"] = prov.hook_name_out
    meta.update(metadata or {})
    missing = [key for key in REQUIRED_METADATA if meta.get(key) in (None, "")]
    if missing:
        raise SaekitError(f"save_sae: metadata lacks {', '.join(missing)}; pass them in metadata= (or set "
                          "model_name/hook_name in the SAE config) so SAE-Lens users know how to run the SAE")
    meta["saekit"] = {"version": saekit.__version__, "format": SAEKIT_FORMAT, "architecture": folded.architecture,
                      "shape": dataclasses.asdict(cfg), "hyper": hyper_fields(folded.hyper)}
    table = SAE_LENS_TRANSCODER_ARCH if cfg.is_transcoder else SAE_LENS_ARCH
    cfg_json: dict[str, Any] = {
        "architecture": table[folded.architecture], "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": not cfg.is_transcoder, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": meta}
    if folded.architecture == "topk":
        cfg_json.update(k=folded.hyper.k, rescale_acts_by_decoder_norm=False)
    if cfg.is_transcoder:
        cfg_json["d_out"] = cfg.d_out
    try:
        json.dumps(cfg_json)
    except (TypeError, ValueError) as exc:
        raise SaekitError(f"save_sae: metadata must be JSON-serialisable ({exc}); convert paths and tensors "
                          "to strings and lists") from None

    tensors = {name: t.contiguous() for name, t in folded.state_dict().items()}
    atomic_save_tensors(path / WEIGHTS_FILE, tensors)
    if sparsity is not None:
        freq = sparsity.detach().float().cpu().flatten()
        if freq.numel() != cfg.d_sae or not ((freq >= 0) & (freq <= 1)).all():
            raise SaekitError(f"save_sae: sparsity must be {cfg.d_sae} firing frequencies in [0, 1] "
                              "(not log10 values); pass fire counts divided by the number of tokens")
        atomic_save_tensors(path / SPARSITY_FILE, {"sparsity": torch.log10(freq + 1e-10)})
    else:
        (path / SPARSITY_FILE).unlink(missing_ok=True)  # never leave a stale one beside new weights
    atomic_write_json(path / CFG_FILE, cfg_json)  # last: a cfg.json means the directory is complete
    return path


def load_sparsity(path: str | Path) -> Tensor | None:
    """Per-latent firing frequency from `sparsity.safetensors`, or None if the directory has none."""
    file = Path(path) / SPARSITY_FILE
    if not file.is_file():
        return None
    (log_freq,) = _read_tensors(file, {"sparsity": None}).values()
    return (10 ** log_freq.float() - 1e-10).clamp_min(0)


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """Load an SAE saved by saekit, trained by SAE-Lens (standard, topk, jumprelu, transcoders) or by sparsify."""
    path = Path(path)
    if not (path / CFG_FILE).is_file():
        raise SaekitError(f"{path} is not an SAE directory: it has no {CFG_FILE} "
                          f"(expected {CFG_FILE} with {WEIGHTS_FILE}, or sparsify's {SPARSIFY_WEIGHTS_FILE})")
    cfg_json = _read_json(path / CFG_FILE)
    if (path / WEIGHTS_FILE).is_file():
        sae = _load_sae_lens(path, cfg_json)
    elif (path / SPARSIFY_WEIGHTS_FILE).is_file():
        sae = _load_sparsify(path, cfg_json)
    else:
        raise SaekitError(f"{path} has {CFG_FILE} but neither {WEIGHTS_FILE} (SAE-Lens/saekit) nor "
                          f"{SPARSIFY_WEIGHTS_FILE} (sparsify)")
    return sae.to(device)


def export_sparsify(sae: SAE, path: str | Path) -> Path:
    """Write a TopK SAE as sparsify's `cfg.json` + `sae.safetensors` (sparsify has no other activation)."""
    path = Path(path)
    folded = _folded(sae)
    cfg = folded.shape
    if folded.architecture != "topk":
        raise SaekitError(f"export_sparsify: sparsify only runs TopK SAEs, this one is '{folded.architecture}'; "
                          "use save_sae (SAE-Lens format) instead")
    if cfg.d_out != cfg.d_in:
        raise SaekitError(f"export_sparsify: sparsify transcoders need d_out == d_in, got {cfg.d_out} != {cfg.d_in}")
    tensors = {"encoder.weight": folded.W_enc.t().contiguous(), "encoder.bias": folded.b_enc,
               "W_dec": folded.W_dec, "b_dec": folded.b_dec}
    atomic_save_tensors(path / SPARSIFY_WEIGHTS_FILE, {k: v.detach() for k, v in tensors.items()})
    atomic_write_json(path / CFG_FILE, {
        "activation": "topk", "expansion_factor": max(cfg.d_sae // cfg.d_in, 1), "normalize_decoder": True,
        "num_latents": cfg.d_sae, "k": folded.hyper.k, "multi_topk": False, "skip_connection": False,
        "transcode": cfg.is_transcoder, "d_in": cfg.d_in})
    return path


# -- readers ---------------------------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SaekitError(f"{file} is not readable JSON ({exc}); re-export the SAE") from None
    if not isinstance(data, dict):
        raise SaekitError(f"{file} must hold a JSON object")
    return data


def _need(cfg: dict[str, Any], key: str, file: Path) -> Any:
    if key not in cfg:
        raise SaekitError(f"{file}: required key '{key}' is missing")
    return cfg[key]


def _read_tensors(file: Path, expected: dict[str, tuple[int, ...] | None],
                  optional: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Read the named tensors as float32, checking each is present (unless optional) with the expected shape."""
    out: dict[str, Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            keys = set(fh.keys())
            for name, shape in expected.items():
                if name not in keys:
                    if name in optional:
                        continue
                    want = f"; expected shape {list(shape)}" if shape is not None else ""
                    raise SaekitError(f"{file}: tensor '{name}' is missing{want}")
                tensor = fh.get_tensor(name).float()
                if shape is not None and tuple(tensor.shape) != shape:
                    raise SaekitError(f"{file}: tensor '{name}' has shape {list(tensor.shape)}, "
                                      f"expected {list(shape)}")
                out[name] = tensor
    except SafetensorError as exc:
        raise SaekitError(f"{file} is not a readable safetensors file ({exc}); re-export the SAE") from None
    return out


def _load_sae_lens(path: Path, cfg_json: dict[str, Any]) -> SAE:
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    meta = cfg_json.get("metadata") or {}
    own = meta.get("saekit") if isinstance(meta, dict) else None
    if own:
        sae = build_sae(*_own_config(own, meta, cfg_file))
        shapes = _shapes(sae.shape)
        if sae.architecture in ("jumprelu", "batchtopk", "matryoshka"):
            shapes["threshold"] = (sae.shape.d_sae,)
        tensors = _read_tensors(weights_file, shapes)
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(sae, name).copy_(tensor)
        return sae

    # Trained elsewhere: map the architecture, then fold SAE-Lens options saekit has no flag for.
    arch = cfg_json.get("architecture", "standard")
    if cfg_json.get("activation_fn") == "topk" or cfg_json.get("activation_fn_str") == "topk":  # pre-6.0 TopK
        arch = "topk"
        cfg_json.setdefault("k", (cfg_json.get("activation_fn_kwargs") or {}).get("k"))
    if arch not in FROM_SAE_LENS:
        raise SaekitError(f"{cfg_file}: SAE-Lens architecture '{arch}' is not supported; saekit reads "
                          f"{', '.join(FROM_SAE_LENS)} (gated SAEs have a separate gate path saekit cannot represent)")
    ours, is_transcoder = FROM_SAE_LENS[arch]
    norm = cfg_json.get("normalize_activations") or "none"
    if norm != "none":
        raise SaekitError(f"{cfg_file}: normalize_activations is '{norm}', and the scale is not stored with the SAE; "
                          "fold it in SAE-Lens (sae.fold_activation_norm_scaling_factor(s)) and save again")
    if (cfg_json.get("reshape_activations") or "none") != "none":
        raise SaekitError(f"{cfg_file}: reshape_activations '{cfg_json['reshape_activations']}' (attention hook_z "
                          "SAEs) is not supported; saekit SAEs read flat MLP activations")
    d_in, d_sae = int(_need(cfg_json, "d_in", cfg_file)), int(_need(cfg_json, "d_sae", cfg_file))
    d_out = int(cfg_json.get("d_out", d_in)) if is_transcoder else d_in
    k = int(_need(cfg_json, "k", cfg_file)) if ours == "topk" else 32
    shape = SAEShape(d_in=d_in, d_sae=d_sae, d_out=d_out, is_transcoder=is_transcoder)
    hyper = TopKConfig(k=min(k, d_sae)) if ours == "topk" else config_class(ours)()
    prov = Provenance(model_name=str(meta.get("model_name") or cfg_json.get("model_name") or ""),
                      hook_name=str(meta.get("hook_name") or cfg_json.get("hook_name") or cfg_json.get("hook_point")
                                    or ""),
                      hook_name_out=meta.get("hook_name_out"))
    shapes: dict[str, tuple[int, ...] | None] = dict(_shapes(shape))
    optional: tuple[str, ...] = ()
    if ours == "jumprelu":
        shapes["threshold"] = shapes["log_threshold"] = (d_sae,)
        optional = ("threshold", "log_threshold")
    t = _read_tensors(weights_file, shapes, optional)
    if ours == "jumprelu":
        if "threshold" not in t and "log_threshold" not in t:
            raise SaekitError(f"{weights_file}: tensor 'threshold' is missing; expected shape [{d_sae}]")
        t["threshold"] = t["threshold"] if "threshold" in t else t.pop("log_threshold").exp()
        t.pop("log_threshold", None)
        t["threshold"] = t["threshold"].clamp_min(0)  # relu(pre) * (pre > t) is the same for any t <= 0
    if not is_transcoder and not cfg_json.get("apply_b_dec_to_input", True):
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]  # x W + b == (x - b_dec) W + (b + b_dec W)
    if ours == "topk" and cfg_json.get("rescale_acts_by_decoder_norm", False):
        norms = t["W_dec"].norm(dim=1).clamp_min(1e-8)  # pre * |d|, acts / |d|: fold into the weights
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    sae = build_sae(shape, hyper, prov)
    with torch.no_grad():
        for name, tensor in t.items():
            getattr(sae, name).copy_(tensor)
    return sae


def _load_sparsify(path: Path, cfg_json: dict[str, Any]) -> SAE:
    cfg_file, weights_file = path / CFG_FILE, path / SPARSIFY_WEIGHTS_FILE
    activation = cfg_json.get("activation", "topk")
    if activation != "topk":
        raise SaekitError(f"{cfg_file}: sparsify activation '{activation}' is not supported; saekit reads TopK only")
    if cfg_json.get("skip_connection"):
        raise SaekitError(f"{cfg_file}: sparsify skip connections (W_skip) are not supported by saekit's architectures")
    d_in = int(_need(cfg_json, "d_in", cfg_file))
    d_sae = int(cfg_json.get("num_latents") or 0) or d_in * int(_need(cfg_json, "expansion_factor", cfg_file))
    shape = SAEShape(d_in=d_in, d_sae=d_sae, is_transcoder=bool(cfg_json.get("transcode", False)))
    t = _read_tensors(weights_file, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                     "W_dec": (d_sae, d_in), "b_dec": (d_in,)})
    sae = build_sae(shape, TopKConfig(k=int(_need(cfg_json, "k", cfg_file))), Provenance(hook_name=path.name))
    with torch.no_grad():
        sae.W_enc.copy_(t["encoder.weight"].t())
        sae.b_enc.copy_(t["encoder.bias"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
    return sae


def _shapes(cfg: SAEShape) -> dict[str, tuple[int, ...] | None]:
    return {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_out),
            "b_dec": (cfg.d_out,)}


def _own_config(own: dict[str, Any], meta: dict[str, Any],
                cfg_file: Path) -> tuple[SAEShape, Any, Provenance]:
    """Shape, hyperparameters and provenance from `metadata.saekit` (format 2, or format 1's flat config)."""
    arch = own.get("architecture")
    try:
        hyper_cls = config_class(str(arch))
        if own.get("format", 1) >= 2:
            shape, hyper = SAEShape(**own["shape"]), hyper_cls(**own["hyper"])
        else:
            flat = {_V1_RENAMED.get(k, k): v for k, v in own.get("config", {}).items()}
            names = {f.name for f in dataclasses.fields(hyper_cls)}
            unknown = sorted(set(flat) - _V1_FIELDS)
            if unknown:
                raise SaekitError(f"unknown keys {unknown}")
            if flat.get("sparsity_coef") is None:  # format 1 left the architecture's default unresolved
                flat.pop("sparsity_coef", None)
            shape = SAEShape(flat["d_in"], flat["d_sae"], flat.get("d_out") or 0, flat.get("is_transcoder", False))
            hyper = hyper_cls(**{k: v for k, v in flat.items() if k in names})
    except (SaekitError, TypeError, KeyError) as exc:
        raise SaekitError(f"{cfg_file}: metadata.saekit cannot be read ({exc}); it was written by another saekit "
                          "version: re-export the SAE, or retrain it with `saekit train --overwrite`") from None
    prov = Provenance(str(meta.get("model_name") or ""), str(meta.get("hook_name") or ""), meta.get("hook_name_out"))
    return shape, hyper, prov
