"""SAE evaluation on held-out tokens: sparsity, reconstruction, and what splicing it in costs the model.

Two passes, because they need different depths of the model:
- statistics (L0, FVU, dead and dense fractions) over every held-out sequence, the model run only
  to the SAE's layer;
- CE loss recovered and KL divergence over the first `sequences`, the full model run three ways
  (clean, SAE spliced in at its hook, hook zero-ablated).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae.errors import SaekitError
from sae.hooks import check_fit, editing, run_to, sae_hooks, splice, zero
from sae.io import atomic_write_json
from sae.saes import SAE

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens counts as dense


@torch.inference_mode()
def activation_stats(model: HookedTransformer, sae: SAE, tokens: torch.Tensor, batch_size: int = 16) -> dict[str, Any]:
    """L0, FVU, dead and dense fractions of the SAE over `tokens` [n, ctx]."""
    hook, target = sae_hooks(sae)
    device = model.cfg.device
    sae = sae.to(device)
    fires = torch.zeros(sae.shape.d_sae, dtype=torch.int64, device=device)
    n = 0
    l0_sum = sse = 0.0
    t_sum = torch.zeros(sae.shape.d_out, dtype=torch.float64, device=device)
    t_sq = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        cache = run_to(model, batch, [hook, target])
        x = cache[hook].reshape(-1, sae.shape.d_in)
        t = cache[target].reshape(-1, sae.shape.d_out)
        acts = sae.encode(x)
        recon = sae.decode(acts)
        active = acts > 0
        fires += active.sum(0)
        l0_sum += active.sum().item()
        sse += (recon - t).double().pow(2).sum().item()
        t_sum += t.double().sum(0)
        t_sq += t.double().pow(2).sum().item()
        n += x.shape[0]
    if n == 0:
        raise SaekitError("no held-out tokens to evaluate on; raise corpus.held_out_fraction or max_sequences")
    total_var = t_sq - (t_sum.pow(2).sum().item() / n)
    freq = fires.double() / n
    return {"tokens": n, "l0": l0_sum / n, "fvu": sse / max(total_var, 1e-12),
            "dead_fraction": (fires == 0).double().mean().item(),
            "dense_fraction": (freq > DENSE_THRESHOLD).double().mean().item(),
            "firing_frequency": freq.cpu()}


@torch.inference_mode()
def splice_metrics(model: HookedTransformer, sae: SAE, tokens: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """CE loss clean / with the SAE / with the hook zeroed, CE loss recovered, and KL(clean || SAE)."""
    target = sae_hooks(sae)[1]
    device = model.cfg.device
    sae = sae.to(device)
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    n = n_kl = 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        clean = model(batch).log_softmax(-1)
        with editing(model, splice(sae)):
            with_sae = model(batch).log_softmax(-1)
        with editing(model, [(target, zero())]):
            zeroed = model(batch).log_softmax(-1)
        nxt = batch[:, 1:, None]
        for name, logp in (("clean", clean), ("sae", with_sae), ("zero", zeroed)):
            totals[name] -= logp[:, :-1].gather(-1, nxt).sum().item()
        totals["kl"] += (clean.exp() * (clean - with_sae)).sum().item()
        n += nxt.numel()
        n_kl += batch.numel()
    totals["kl"] *= n / max(n_kl, 1)  # per-token KL after the division below
    ce = {k: v / n for k, v in totals.items()}
    denom = ce["zero"] - ce["clean"]
    return {"ce_loss_clean": ce["clean"], "ce_loss_sae": ce["sae"], "ce_loss_zero_ablation": ce["zero"],
            "ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if abs(denom) > 1e-12 else float("nan"),
            "kl_div": ce["kl"], "ce_tokens": n}


def evaluate_sae(model: HookedTransformer, sae: SAE, held_out: torch.Tensor, ce_sequences: int = 64,
             batch_size: int = 16, out_path: Path | None = None) -> dict[str, Any]:
    """All metrics for one exported SAE; written as JSON next to it when `out_path` is given."""
    hook, target = sae_hooks(sae)
    check_fit(model, sae)
    stats = activation_stats(model, sae, held_out, batch_size)
    freq = stats.pop("firing_frequency")
    result = {**stats, **splice_metrics(model, sae, held_out[:ce_sequences], batch_size),
              "hook_name": hook, "target_hook": target, "architecture": sae.architecture,
              "d_sae": sae.shape.d_sae, "held_out_sequences": len(held_out)}
    if out_path is not None:
        atomic_write_json(out_path, result)
    result["firing_frequency"] = freq
    return result
