"""Forward passes on entity prompts: activations at the entity's tokens, next-token log-probabilities of the
answers, and the same log-probabilities with activations patched at the entity's tokens.

All hooking goes through `sae.hooks`; the model runs only as deep as each question needs (to the SAE's layer for
activations, from the SAE's block on a stored residual stream for patched runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from features.labeling.prompts import Encoded, length_batches, padded_batch
from features.labeling.timing import Timer
from sae.hooks import add_at, capturing, editing, run_to

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

RESID_PRE = "resid_pre"  # the key of the whole prompts' residual stream in `answer_logprobs`' captures


def _keep(act: Tensor, prompts: list[Encoded], idx: list[int], into: list[Tensor], whole: bool = False) -> None:
    """Copy each batch row's entity-span activations (or the whole prompt's) to the CPU, by prompt index."""
    act = act.float().cpu()
    for row, i in enumerate(idx):
        a, b = (0, len(prompts[i].ids)) if whole else prompts[i].span
        into[i] = act[row, a:b].clone()


@torch.inference_mode()
def span_activations(model: HookedTransformer, prompts: list[Encoded], hooks: list[str], batch_size: int,
                     timer: Timer) -> dict[str, list[Tensor]]:
    """Per hook, per prompt, the activations at the entity's tokens [span, d]; the model runs to the last
    needed layer only."""
    out: dict[str, list[Tensor]] = {h: [torch.empty(0)] * len(prompts) for h in hooks}
    for idx in length_batches(prompts, batch_size):
        with timer("forward"):
            acts = run_to(model, padded_batch(prompts, idx, model.cfg.device)[0], hooks)
        for h in hooks:
            _keep(acts[h], prompts, idx, out[h])
    return out


def _last_logprobs(model: HookedTransformer, resid: Tensor, last: Tensor, token_ids: Tensor) -> Tensor:
    """log-softmax over the vocabulary at each row's position `last`, read at `token_ids` -> [batch, V]."""
    final = model.ln_final(resid[torch.arange(len(last)), last.to(resid.device)][:, None])
    logits = model.unembed(final)[:, 0].float()
    return logits.log_softmax(-1)[:, token_ids.to(logits.device)].cpu()


@torch.inference_mode()
def answer_logprobs(model: HookedTransformer, prompts: list[Encoded], token_ids: Tensor, batch_size: int,
                    timer: Timer, capture: list[str] | None = None,
                    keep_resid_pre: int | None = None) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Log-probabilities of `token_ids` as the next token after each prompt [P, V]; optionally also each
    prompt's entity-span activations at the `capture` hooks and the whole prompt's `blocks.<keep_resid_pre>
    .hook_resid_pre` (key 'resid_pre', [T, d_model]) for later patched runs."""
    capture = list(capture or [])
    resid_hook = None if keep_resid_pre is None else f"blocks.{keep_resid_pre}.hook_resid_pre"
    hooks = list(dict.fromkeys(capture + ([resid_hook] if resid_hook else [])))
    spans: dict[str, list[Tensor]] = {h: [torch.empty(0)] * len(prompts) for h in capture}
    if resid_hook:
        spans[RESID_PRE] = [torch.empty(0)] * len(prompts)
    out = torch.empty(len(prompts), len(token_ids))
    with capturing(model, hooks) as captured:
        for idx in length_batches(prompts, batch_size):
            with timer("forward"):
                tokens, last = padded_batch(prompts, idx, model.cfg.device)
                resid = model(tokens, stop_at_layer=model.cfg.n_layers)
                out[idx] = _last_logprobs(model, resid, last, token_ids)
            for h in capture:
                _keep(captured[h], prompts, idx, spans[h])
            if resid_hook:
                _keep(captured[resid_hook], prompts, idx, spans[RESID_PRE], whole=True)
    return out, spans


class Patch(NamedTuple):
    """Add `delta` [span, width] to the activations at `hook` on prompt `prompt`'s entity tokens."""

    prompt: int
    hook: str
    delta: Tensor


def _patch_batch(prompts: list[Encoded], resid_pre: list[Tensor], patches: list[Patch],
                 chunk: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(clean residual stream [B, T, d], deltas at the entity tokens [B, T, width], last positions [B]) of a
    chunk of patches, right-padded: causal attention keeps the padding out of each prompt."""
    lengths = [len(prompts[patches[j].prompt].ids) for j in chunk]
    longest = max(lengths)
    resid = torch.zeros(len(chunk), longest, resid_pre[0].shape[-1])
    delta = torch.zeros(len(chunk), longest, patches[chunk[0]].delta.shape[-1])
    for row, j in enumerate(chunk):
        resid[row, :lengths[row]] = resid_pre[patches[j].prompt]
        a, b = prompts[patches[j].prompt].span
        delta[row, a:b] = patches[j].delta
    return resid, delta, torch.tensor(lengths) - 1


@torch.inference_mode()
def patched_logprobs(model: HookedTransformer, layer: int, prompts: list[Encoded], resid_pre: list[Tensor],
                     patches: list[Patch], token_ids: Tensor, batch_size: int, timer: Timer) -> Tensor:
    """[len(patches), V]: next-token log-probabilities of `token_ids` with each patch applied, the model run from
    block `layer` on the stored clean residual stream (every patched hook lies in that block), right-padded."""
    out = torch.empty(len(patches), len(token_ids))
    by_hook: dict[str, list[int]] = {}
    for j, p in enumerate(patches):
        by_hook.setdefault(p.hook, []).append(j)
    for hook, members in sorted(by_hook.items()):
        members = sorted(members, key=lambda j: (len(prompts[patches[j].prompt].ids), j))
        for s in range(0, len(members), batch_size):
            chunk = members[s:s + batch_size]
            resid, delta, last = _patch_batch(prompts, resid_pre, patches, chunk)
            resid, delta = resid.to(model.cfg.device), delta.to(model.cfg.device)
            with timer("forward"), editing(model, [(hook, add_at(delta))]):
                res = model(resid, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
                out[chunk] = _last_logprobs(model, res, last, token_ids)
    return out
