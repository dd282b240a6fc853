"""The analysis pass's settings (the `analyze:` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae.errors import SaekitError


@dataclass
class AnalyzeConfig:
    """The feature analysis pass (features/analyze): which tokens, and how much to keep per unit."""

    split: Literal["held_out", "train", "held_out+train"] = "held_out+train"  # held-out sequences first
    sequences: int | None = 256  # cap on analysed sequences; None: the whole split
    source: Literal["auto", "model", "cache"] = "auto"  # auto: the activation cache when it holds every needed
    # hook for exactly these (train) sequences, else run the model to the SAE's layer
    batch_size: int = 32  # sequences per forward pass
    neurons: bool = True  # also analyse the MLP neurons (blocks.L.mlp.hook_post) of the SAE's layer
    top_examples: int = 20  # top activating contexts per unit, at most one per sequence
    intervals: int = 10  # equal-width activation intervals per unit (even: they merge pairwise)
    interval_examples: int = 5  # uniformly sampled examples per interval
    window_before: int = 16  # context tokens stored before an example's token
    window_after: int = 6  # ... and after it
    n_logits: int = 10  # top and bottom output tokens per unit
    n_related: int = 10  # neighbours, co-firing and correlated units kept per unit
    seed: int = 0

    def __post_init__(self) -> None:
        if self.intervals % 2:
            raise SaekitError("key 'analyze.intervals' must be even (intervals merge pairwise when a larger "
                              f"activation appears), got {self.intervals}")
        if self.window_before < 0 or self.window_after < 0:
            raise SaekitError("keys 'analyze.window_before' and 'analyze.window_after' must be >= 0")
