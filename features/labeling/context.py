"""The labeling of one SAE on one model: what every step shares, checked once up front.

Steps take this context rather than a dozen arguments each; building it refuses an SAE that does not fit the
model before any prompt runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from features.labeling.config import LabelConfig
from features.labeling.timing import Timer
from features.store import Kind
from sae.errors import SaekitError
from sae.hooks import check_fit, hook_layer, neuron_hook, sae_hooks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from sae.saes import SAE


@dataclass
class LabelContext:
    """The model and SAE, the hooks where they meet, the settings, and the timer every forward pass reports to."""

    model: HookedTransformer
    sae: SAE
    tokenizer: Any
    cfg: LabelConfig
    in_hook: str  # the SAE reads here
    out_hook: str  # ... and writes here (the same hook unless a transcoder)
    neuron_hook: str | None  # the same block's MLP neurons; None when neurons are not labeled
    start_id: int | None  # the document separator prompts begin with, if cfg.start_token
    W_dec: Tensor  # the SAE's decoder rows on the CPU, float32
    log: Callable[[str], None] = print
    timer: Timer = field(default_factory=Timer)

    @property
    def layer(self) -> int:
        return hook_layer(self.in_hook)

    @property
    def kinds(self) -> list[Kind]:
        return ["feature", "neuron"] if self.neuron_hook else ["feature"]

    @property
    def n_neurons(self) -> int:
        return self.model.cfg.d_mlp


def make_context(model: HookedTransformer, sae: SAE, cfg: LabelConfig, tokenizer: Any, neurons: bool,
                 log: Callable[[str], None]) -> LabelContext:
    """Check that the SAE fits the model and the labeler can work on it (tokenizer, both hooks in one block)."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise SaekitError("the model has no tokenizer; the labeler needs one to build entity prompts")
    check_fit(model, sae)
    sae = sae.cpu().eval()
    in_hook, out_hook = sae_hooks(sae)
    if hook_layer(out_hook) != hook_layer(in_hook):
        raise SaekitError(f"the SAE reads {in_hook} and writes {out_hook}: the labeler needs both in one block")
    start_id = None
    if cfg.start_token:
        from sae.corpus import default_separator_id

        start_id = default_separator_id(tokenizer)
    return LabelContext(model, sae, tokenizer, cfg, in_hook, out_hook, neuron_hook(in_hook) if neurons else None,
                        start_id, sae.W_dec.detach().float().cpu(), log)
