"""The viewer's model-side logic, kept apart from the Streamlit pages so it can be tested and timed alone:
run the model and the SAE on typed text (which features fire on which token), and steer the model's greedy
continuation by adding a feature's decoder direction at the hook the SAE writes to. The model is only touched
through `sae.hooks`.

Nothing here touches the feature store; the pages combine both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformer_lens import HookedTransformer

from sae.errors import SaekitError
from sae.hooks import Edit, add_at, editing, hook_width, run_to, sae_hooks, validate_hooks
from sae.saes import SAE

MAX_LIVE_TOKENS = 256  # live text longer than this is cut (the page says so)
TOP_PER_TOKEN = 8  # features kept per token


@dataclass(frozen=True)
class LiveText:
    """The SAE's activations on a text: `tokens[t]`, and its firing features as a sparse list (token, feature,
    value) sorted by token then value descending. `cut` is how many tokens past the limit were dropped."""

    tokens: list[str]
    token_ids: list[int]
    token: np.ndarray  # [nnz] int
    feature: np.ndarray  # [nnz] int
    value: np.ndarray  # [nnz] float32
    cut: int

    def top(self, t: int, n: int = TOP_PER_TOKEN) -> list[tuple[int, float]]:
        """The n strongest (feature, value) pairs at token t."""
        sel = self.token == t
        return list(zip(self.feature[sel][:n].tolist(), self.value[sel][:n].tolist(), strict=True))

    def of_feature(self, feature: int) -> np.ndarray:
        """One feature's activation at every token (0 where it does not fire)."""
        out = np.zeros(len(self.tokens), dtype=np.float32)
        sel = self.feature == feature
        out[self.token[sel]] = self.value[sel]
        return out

    def strongest(self, n: int = 20) -> list[tuple[int, float, int]]:
        """Features ranked by their largest activation on the text: (feature, max value, tokens fired on)."""
        best: dict[int, tuple[float, int]] = {}
        for f, v in zip(self.feature.tolist(), self.value.tolist(), strict=True):
            m, c = best.get(f, (0.0, 0))
            best[f] = (max(m, v), c + 1)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:n]
        return [(f, m, c) for f, (m, c) in ranked]


class LiveModel:
    """A model and an SAE that fit it, ready for live text and steering."""

    def __init__(self, model: HookedTransformer, sae: SAE) -> None:
        if model.tokenizer is None:
            raise SaekitError(f"model '{model.cfg.model_name}' has no tokenizer, so typed text cannot be run")
        self.read_hook, self.write_hook = sae_hooks(sae)  # the write hook: where the decoder's output lands
        validate_hooks(model, list(dict.fromkeys([self.read_hook, self.write_hook])))
        self.model, self.sae = model, sae.eval()

    def tokenize(self, text: str, limit: int = MAX_LIVE_TOKENS) -> tuple[torch.Tensor, int]:
        """Token ids [1, n] of `text` cut to `limit`, and how many tokens were cut."""
        ids = self.model.to_tokens(text, truncate=False)
        n = ids.shape[1]
        return ids[:, :limit], max(n - limit, 0)

    def token_strings(self, ids: list[int]) -> list[str]:
        return list(self.model.tokenizer.batch_decode([[i] for i in ids]))

    @torch.inference_mode()
    def run(self, text: str, limit: int = MAX_LIVE_TOKENS, top: int = TOP_PER_TOKEN) -> LiveText:
        """The SAE's features on every token of `text`, running the model only up to the SAE's layer."""
        ids, cut = self.tokenize(text, limit)
        if ids.shape[1] == 0:
            return LiveText([], [], np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32), cut)
        x = run_to(self.model, ids, [self.read_hook])[self.read_hook][0].float()
        acts = self.sae.encode(x.to(self.sae.W_enc.device)).float().cpu()
        k = min(top, acts.shape[1])
        vals, feats = acts.topk(k, dim=1)
        keep = vals > 0
        token = torch.arange(len(acts))[:, None].expand_as(feats)[keep]
        id_list = ids[0].tolist()
        return LiveText(self.token_strings(id_list), id_list, token.numpy(), feats[keep].numpy(),
                        vals[keep].numpy(), cut)

    @torch.inference_mode()
    def generate(self, prompt: str, n_tokens: int, feature: int | None = None, strength: float = 0.0,
                 limit: int = MAX_LIVE_TOKENS) -> str:
        """Greedy continuation of `prompt`; with `feature`, `strength` x its decoder row is added at the SAE's
        output hook at every position (the prompt's and the generated ones)."""
        ids, _ = self.tokenize(prompt, limit)
        if ids.shape[1] == 0:
            raise SaekitError("type a prompt first: steering continues a prompt")
        edits: list[tuple[str, Edit]] = []
        if feature is not None and strength != 0.0:
            if not 0 <= feature < self.sae.shape.d_sae:
                raise SaekitError(f"feature {feature} is out of range: this SAE has features "
                                  f"0..{self.sae.shape.d_sae - 1}")
            direction = (strength * self.sae.W_dec[feature].detach().float()).to(self.model.cfg.device)
            edits.append((self.write_hook, add_at(direction)))
        eos = getattr(self.model.tokenizer, "eos_token_id", None)
        with editing(self.model, edits):
            out = self.model.generate(ids.to(self.model.cfg.device), max_new_tokens=n_tokens, do_sample=False,
                                      stop_at_eos=eos is not None, eos_token_id=eos, verbose=False,
                                      use_past_kv_cache=True)
        return self.model.tokenizer.decode(out[0, ids.shape[1]:].tolist())


def load_live(sae_dir: str | Path | None, model_name: str | None, device: str = "cpu") -> LiveModel:
    """Load the SAE and its model for live text; raises SaekitError saying what is missing or does not fit."""
    from sae.formats import load_sae
    from sae.models import load_model

    if sae_dir is None:
        raise SaekitError("no SAE directory was given (start the viewer with --run or --sae), so there is no SAE "
                          "to run")
    sae = load_sae(sae_dir, device=device)
    if not model_name:
        raise SaekitError(f"the SAE in {sae_dir} does not name its model (cfg.json metadata.model_name); start the "
                          "viewer with --model <name or local HF directory>")
    try:
        model = load_model(model_name, device)
    except SaekitError as exc:
        raise SaekitError(f"cannot load model '{model_name}': {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any loader failure disables live text; the page says why
        raise SaekitError(f"cannot load model '{model_name}': {type(exc).__name__}: {exc}") from None
    live = LiveModel(model, sae)
    width = hook_width(model, live.read_hook)
    if width != sae.shape.d_in:
        raise SaekitError(f"the SAE expects {sae.shape.d_in}-wide activations at {live.read_hook} but model "
                          f"'{model_name}' has {width} there; pass the SAE's own model with --model")
    return live
