"""Interchange across layers: run a base prompt with some units, in every layer at once, set to a source entity's
values at the entity's last token, and read the answer's logits.

A unit lives in a `Basis` of one hook: SAE features (coordinates = the SAE's activations, directions = its decoder
rows, so the reconstruction error stays), MLP neurons or the whole MLP output (the coordinates are the activation
itself, set directly), or a rotation of the MLP output. Each edit encodes the activation *as it arrives* in the
patched run (earlier layers are already patched), so interchanging every unit of a basis that reconstructs exactly
copies the source's vector in every layer.

Cost. Every patch touches only the entity's last token and what follows it, so the tokens before it are run once
per base prompt into a key-value cache, and each patched run computes only the remaining tokens (about half of an
attribute prompt); prompts are grouped by those two lengths, so no row is padded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from features.labeling.activations import span_activations
from features.labeling.prompts import Encoded
from features.labeling.timing import Timer
from sae.hooks import Edit, editing

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


class Basis(NamedTuple):
    """Units at one hook: `encode` maps activations [n, d] to unit coordinates [n, U]; `rows` [U, d] are the units'
    directions in activation space, or None when the coordinates are the activation itself. A transcoder's units
    are read at another, earlier hook of the same layer (`read`, its input) and written at `hook` (its output)."""

    hook: str
    encode: Callable[[Tensor], Tensor]
    rows: Tensor | None
    read: str | None = None

    @property
    def read_hook(self) -> str:
        return self.read or self.hook


class Patch(NamedTuple):
    """Patched runs, one per row: prompt `base[i]` with, in each layer l, units `units[l][i]` of `bases[l]` set to
    `values[l][i]` at the entity's last token."""

    bases: list[Basis]
    base: Tensor  # [N] prompt indices
    units: list[Tensor]  # per layer [N, k_l] unit indices (k_l may be 0: that layer is left alone)
    values: list[Tensor]  # per layer [N, k_l] the source's coordinates of those units


def last_token_acts(model: HookedTransformer, prompts: list[Encoded], hooks: list[str], batch_size: int,
                    timer: Timer) -> dict[str, Tensor]:
    """Per hook, [n, d] clean activations at each prompt's entity last token; the model runs to the deepest hook."""
    spans = span_activations(model, prompts, hooks, batch_size, timer)
    return {h: torch.stack([s[-1] for s in spans[h]]) for h in hooks}


def source_values(basis: Basis, acts: Tensor, source: Tensor, units: Tensor) -> Tensor:
    """[N, k]: the coordinates `units` [N, k] of each row's source activation (acts [n, d] at the basis's hook)."""
    with torch.inference_mode():
        return basis.encode(acts[source]).float().cpu().gather(1, units)


def set_units(basis: Basis, units: Tensor, values: Tensor, seen: dict[str, Tensor] | None = None) -> Edit:
    """An edit of [N, s, d] activations whose position 0 is the entity's last token: per row, the chosen units'
    coordinates become `values`, by setting them (rows None) or by adding their directions times the change.
    A basis read elsewhere takes its current coordinates from `seen[basis.read]`, that hook's activation at the
    entity's last token in this same patched run (see `remember`)."""

    def edit(act: Tensor) -> Tensor:
        x = act[:, 0]
        idx, val = units.to(x.device), values.to(x.device, torch.float32)
        if basis.rows is None:
            new = x.scatter(1, idx, val.to(x.dtype))
        else:
            now = basis.encode(x if basis.read is None or seen is None else seen[basis.read])
            change = val - now.gather(1, idx)
            new = x + torch.einsum("nk,nkd->nd", change, basis.rows.to(x.device)[idx]).to(x.dtype)
        out = act.clone()
        out[:, 0] = new
        return out

    return edit


def remember(hook: str, seen: dict[str, Tensor]) -> Edit:
    """An edit that changes nothing and keeps the entity's last-token activation at `hook` for a later edit."""

    def edit(act: Tensor) -> Tensor:
        seen[hook] = act[:, 0]
        return act

    return edit


def _lengths(prompt: Encoded) -> tuple[int, int]:
    """(tokens before the entity's last token, tokens from it to the end)."""
    cut = prompt.span[1] - 1
    return cut, len(prompt.ids) - cut


def _prefix_cache(model: HookedTransformer, prefixes: Tensor) -> Any:
    """A frozen key-value cache of the prefixes [B, p] at every layer (None for empty prefixes)."""
    if prefixes.shape[1] == 0:
        return None
    from transformer_lens import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(prefixes))
    model(prefixes.to(model.cfg.device), past_kv_cache=cache, attention_mask=torch.ones_like(prefixes),
          stop_at_layer=model.cfg.n_layers)
    cache.freeze()
    return cache


def _cache_rows(cache: Any, rows: Tensor) -> Any:
    """The frozen cache's rows `rows`, in that order (repeats allowed)."""
    if cache is None:
        return None
    rows = rows.to(cache.previous_attention_mask.device)
    entries = [dataclasses.replace(e, past_keys=e.past_keys[rows], past_values=e.past_values[rows], frozen=True)
               for e in cache.entries]
    return dataclasses.replace(cache, entries=entries, previous_attention_mask=cache.previous_attention_mask[rows],
                               frozen=True)


def _answer_logits(model: HookedTransformer, resid: Tensor, answer_ids: Tensor) -> Tensor:
    """[B, V] logits of the answers' first tokens after the last position (the unembedding of just those tokens)."""
    final = model.ln_final(resid[:, -1:])[:, 0]
    ids = answer_ids.to(final.device)
    return (final @ model.W_U[:, ids] + model.b_U[ids]).float().cpu()


def _run_rows(model: HookedTransformer, patch: Patch, rows: Tensor, cache: Any, cache_row: Tensor,
              suffix: Tensor, answer_ids: Tensor) -> Tensor:
    """One forward pass of the remaining tokens for `rows` of `patch`, every layer's edit in place."""
    seen: dict[str, Tensor] = {}
    edits = []
    for b, u, v in zip(patch.bases, patch.units, patch.values, strict=True):
        if u.shape[1] > 0:
            edits += [(b.read, remember(b.read, seen))] if b.read else []
            edits.append((b.hook, set_units(b, u[rows], v[rows], seen)))
    tokens = suffix.to(model.cfg.device)
    kv = _cache_rows(cache, cache_row)
    mask = None if kv is None else torch.ones_like(tokens)
    with editing(model, edits):
        resid = model(tokens, past_kv_cache=kv, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
    return _answer_logits(model, resid, answer_ids)


@torch.inference_mode()
def interchanged_logits(model: HookedTransformer, prompts: list[Encoded], answer_ids: Tensor, patches: list[Patch],
                        batch_size: int, timer: Timer) -> list[Tensor]:
    """Per patch, [N, V] logits of `answer_ids` after each patched run (all patches on the same `prompts`, so the
    prefix caches are shared between them)."""
    out = [torch.empty(len(p.base), len(answer_ids)) for p in patches]
    groups: dict[tuple[int, int], list[int]] = {}
    for b in sorted({int(i) for p in patches for i in p.base}):
        groups.setdefault(_lengths(prompts[b]), []).append(b)
    for (cut, _), bases in sorted(groups.items()):
        with timer("prefix"):
            cache = _prefix_cache(model, torch.tensor([prompts[b].ids[:cut] for b in bases]))
        suffix = torch.tensor([prompts[b].ids[cut:] for b in bases])
        slot = torch.full((len(prompts),), -1, dtype=torch.long)
        slot[torch.tensor(bases)] = torch.arange(len(bases))
        for j, patch in enumerate(patches):
            members = (slot[patch.base] >= 0).nonzero().flatten()
            for s in range(0, len(members), batch_size):
                rows = members[s:s + batch_size]
                at = slot[patch.base[rows]]
                with timer("interchange"):
                    out[j][rows] = _run_rows(model, patch, rows, cache, at, suffix[at], answer_ids)
    return out
