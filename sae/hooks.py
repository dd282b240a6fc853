"""The one seam to the model: hook names, capturing activations, and editing them in a forward pass.

Every stage that reads or changes activations inside a model (cache, evaluation, analysis, labeler,
live text, steering) comes through here, so the hook vocabulary (TransformerLens names such as
`blocks.6.mlp.hook_post`) and the "run only as deep as needed" rule live in one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from sae.errors import SaekitError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# Hooks whose activations are one vector per token, so they can be cached and given to an SAE.
CACHEABLE_HOOK_KINDS = ("mlp.hook_post", "hook_mlp_out", "mlp.hook_pre", "mlp.hook_pre_linear", "hook_mlp_in",
                        "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_RANGE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")

Edit = Callable[[Tensor], Tensor]  # activation in, activation out (same shape)


# ---------------------------------------------------------------------------------------------
# Names


def expand_hooks(patterns: list[str]) -> list[str]:
    """Expand `blocks.{2..8}.mlp.hook_post` into one name per layer, keeping order, dropping repeats."""
    out: list[str] = []
    for pattern in patterns:
        match = _RANGE_RE.search(pattern)
        if match is None:
            names = [pattern]
        else:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise SaekitError(f"hook pattern '{pattern}': range {{{lo}..{hi}}} is empty; write {{low..high}}")
            names = expand_hooks([pattern[: match.start()] + str(i) + pattern[match.end():]
                                  for i in range(lo, hi + 1)])
        out.extend(n for n in names if n not in out)
    return out


def hook_layer(hook: str) -> int:
    match = _HOOK_RE.match(hook)
    if match is None:
        raise SaekitError(f"hook '{hook}' is not a per-layer TransformerLens hook; expected a name like "
                          "'blocks.6.mlp.hook_post' or 'blocks.6.hook_mlp_out'")
    return int(match.group(1))


def neuron_hook(hook: str) -> str:
    """The MLP neurons (`blocks.L.mlp.hook_post`) of the layer a hook belongs to."""
    return f"blocks.{hook_layer(hook)}.mlp.hook_post"


def stop_layer(hooks: list[str]) -> int:
    """The `stop_at_layer` that runs the model just far enough to reach every hook."""
    return max(hook_layer(h) for h in hooks) + 1


def validate_hooks(model: HookedTransformer, hooks: list[str]) -> None:
    """Check every hook exists on this model, with errors that list what would have been valid."""
    n_layers = model.cfg.n_layers
    for hook in hooks:
        layer = hook_layer(hook)
        if layer >= n_layers:
            raise SaekitError(f"hook '{hook}': layer {layer} is out of range; model "
                              f"'{model.cfg.model_name}' has {n_layers} layers (0..{n_layers - 1})")
        kind = hook.split(".", 2)[2]
        if kind not in CACHEABLE_HOOK_KINDS or hook not in model.hook_dict:
            valid = ", ".join(f"blocks.{{0..{n_layers - 1}}}.{k}" for k in CACHEABLE_HOOK_KINDS
                              if f"blocks.0.{k}" in model.hook_dict)
            raise SaekitError(f"unknown hook '{hook}' for model '{model.cfg.model_name}'. Valid hook "
                              f"names include: {valid}")


def hook_width(model: HookedTransformer, hook: str) -> int:
    """Width of the activation at a hook (d_mlp inside the MLP, d_model on the residual stream)."""
    return model.cfg.d_mlp if ".mlp.hook_" in hook else model.cfg.d_model


# ---------------------------------------------------------------------------------------------
# Does this SAE fit this model?


class FitsModel(Protocol):
    """What `check_fit` reads of an SAE (duck-typed, so this seam does not import the SAE classes)."""

    shape: Any  # .d_in, .d_out
    provenance: Any  # .model_name, .hook_name, .hook_name_out
    input_scale: float


def sae_hooks(sae: FitsModel) -> tuple[str, str]:
    """(the hook an SAE reads, the hook its reconstruction belongs to)."""
    return sae.provenance.hook_name, sae.provenance.hook_name_out or sae.provenance.hook_name


def check_fit(model: HookedTransformer, sae: FitsModel) -> None:
    """Refuse an SAE that does not belong to this model, naming what differs and the fix."""
    prov = sae.provenance
    if prov.model_name and prov.model_name != model.cfg.model_name:
        raise SaekitError(f"model mismatch: the SAE was trained on '{prov.model_name}' (cfg.json metadata."
                          f"model_name) but the loaded model is '{model.cfg.model_name}'; set model.name to the "
                          "SAE's model or use an SAE trained on this one")
    if not prov.hook_name:
        raise SaekitError("the SAE does not say which hook it reads (cfg.json metadata.hook_name is empty); add it, "
                          "e.g. \"hook_name\": \"blocks.6.hook_mlp_out\"")
    read, write = sae_hooks(sae)
    validate_hooks(model, [read, write])
    for hook, width in ((read, sae.shape.d_in), (write, sae.shape.d_out)):
        if hook_width(model, hook) != width:
            raise SaekitError(f"width mismatch: the SAE expects {width}-wide activations at {hook}, but model "
                              f"'{model.cfg.model_name}' has {hook_width(model, hook)} there; the SAE was trained "
                              "on another model or hook")
    if sae.input_scale != 1.0:
        raise SaekitError("use an exported SAE (scaling folded into the weights), not a training-time one")


# ---------------------------------------------------------------------------------------------
# Capturing and editing


@contextmanager
def capturing(model: HookedTransformer, hooks: list[str],
              sink: Callable[[str, Tensor], None] | None = None) -> Iterator[dict[str, Tensor]]:
    """While open, every forward pass hands each hook's activation to `sink(name, act)`, or (without a sink)
    leaves it in the yielded dict under the hook's name, replacing the previous pass's."""
    captured: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        if sink is None:
            captured[hook.name] = act
        else:
            sink(hook.name, act)

    with model.hooks(fwd_hooks=[(h, keep) for h in hooks]):
        yield captured


@contextmanager
def editing(model: HookedTransformer, edits: list[tuple[str, Edit]]) -> Iterator[None]:
    """While open, each forward pass replaces the activation at each named hook by `edit(activation)`."""

    def wrap(edit: Edit) -> Callable[[Tensor, Any], Tensor]:
        return lambda act, hook: edit(act)

    with model.hooks(fwd_hooks=[(h, wrap(e)) for h, e in edits]):
        yield


@torch.inference_mode()
def run_to(model: HookedTransformer, tokens: Tensor, hooks: list[str]) -> dict[str, Tensor]:
    """Activations [batch, pos, d] at `hooks` for one batch, the model run only to the deepest hook's layer."""
    with capturing(model, hooks) as captured:
        model(tokens.to(model.cfg.device), stop_at_layer=stop_layer(hooks))
    return {h: captured[h] for h in hooks}


def add_at(delta: Tensor) -> Edit:
    """An edit that adds `delta` (broadcast over the activation): steering and interchange."""
    return lambda act: act + delta.to(act.device, act.dtype)


def zero() -> Edit:
    return torch.zeros_like


def splice(sae: Any) -> list[tuple[str, Edit]]:
    """Edits that replace the SAE's output hook by its reconstruction (of the input hook, for a transcoder)."""
    read, write = sae_hooks(sae)
    if read == write:
        return [(write, lambda act: sae(act.reshape(-1, act.shape[-1])).reshape(act.shape).to(act.dtype))]
    seen: dict[str, Tensor] = {}

    def keep(act: Tensor) -> Tensor:
        seen["x"] = act
        return act

    def replace(act: Tensor) -> Tensor:
        x = seen["x"]
        return sae(x.reshape(-1, x.shape[-1])).reshape(act.shape).to(act.dtype)

    return [(read, keep), (write, replace)]
