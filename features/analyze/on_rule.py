"""When a unit is "on": one rule for SAE features and MLP neurons, used by the analysis pass (density, live / dead
/ dense, top and interval examples), the monosemanticity score and the labeler (tags, causal checks).

A unit i is on at a token when its activation a_i exceeds its threshold t_i:

- SAE feature: t_i = 0. The SAE's activation (TopK, BatchTopK, JumpReLU, ReLU) is exactly 0 when the feature is
  off, so "> 0" is already a per-unit on/off decision made by the SAE itself.
- MLP neuron (`blocks.L.mlp.hook_post`): SiLU-gated neurons are signed and above 0 on about half of all tokens,
  so "> 0" would make every neuron dense and no neuron could be as specific as a feature. A neuron has no off
  state of its own, so it gets one matched to the features':

      t_i = max(0, Q_{1-p}(a_i)),   p = median over live features of their firing rate

  Q_{1-p}(a_i) is the value that exactly round(p * T) of neuron i's values over the calibration tokens exceed
  (T tokens), and "live" means firing at least once there. So each neuron is on for the same share of tokens
  as the typical feature of the SAE analysed alongside; the negative side of a neuron (it then writes -W_out, a
  different direction) is never "on", and a neuron positive on fewer than p of the tokens keeps t_i = 0.

The thresholds are estimated once, on the first CALIBRATION_TOKENS tokens of the pass (exact quantiles of those
tokens, the rows already in memory); the pass keeps running per-unit state after that, never a tokens x units
matrix. The store records each unit's t_i (`units.threshold`) and the rule (`meta.analysis.on_rule`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

RULE_NAME = "matched-quantile-v1"
CALIBRATION_TOKENS = 8192
RULE_TEXT = ("on = activation > the unit's threshold: 0 for SAE features; for MLP neurons (signed blocks.L.mlp."
             "hook_post) max(0, the (1 - p) quantile of the neuron's values over the pass's first tokens), p = the "
             "median firing rate of the SAE's live features there, so a neuron is on as often as a typical feature")


def matched_rate(feature_fires: Tensor, n_tokens: int) -> float:
    """p: the median firing rate of the features that fire at least once among `n_tokens` tokens (feature_fires
    [F] counts); 1 / n_tokens when none fires (a neuron is then on for its single highest token)."""
    live = feature_fires[feature_fires > 0].double() / max(n_tokens, 1)
    return float(live.median()) if len(live) else 1.0 / max(n_tokens, 1)


def quantile_thresholds(acts: Tensor, rate: float) -> Tensor:
    """t [U] for each column of acts [T, U]: max(0, the value exactly round(rate * T) values exceed, at least 1)."""
    n = acts.shape[0]
    if n < 2:
        return torch.zeros(acts.shape[1])
    m = min(max(1, round(rate * n)), n - 1)
    return acts.float().topk(m + 1, dim=0).values[-1].clamp_min(0.0)


def neuron_thresholds(feature_fires: Tensor, neuron_acts: Tensor) -> tuple[Tensor, float]:
    """The neurons' thresholds [N] and the matched rate p, from the same tokens' feature firing counts [F] and
    neuron values [T, N]."""
    rate = matched_rate(feature_fires, neuron_acts.shape[0])
    return quantile_thresholds(neuron_acts, rate), rate


def rule_settings(rate: float | None, calibration_tokens: int) -> dict[str, Any]:
    """What the store records about the rule (`meta.analysis.on_rule`)."""
    return {"name": RULE_NAME, "rule": RULE_TEXT, "neuron_rate": rate, "calibration_tokens": calibration_tokens}
