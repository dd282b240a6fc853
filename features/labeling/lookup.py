"""Where the lookup happens: layer by layer, how well each attribute can be read at the entity's last token,
and how much each MLP layer writes of the attribute's direction.

Fact-recall studies found that early MLP layers turn an entity's tokens into attribute directions and that the
attributes become linearly readable within the first layers. This measures that for any model and entity set,
on the attribute prompts ("Fact: Kenya is located on the continent of"), at the entity's last token:

- **Probe accuracy per layer**, on the residual stream (`blocks.L.hook_resid_post`) and on each MLP's output
  (`blocks.L.hook_mlp_out`), for L = 0 .. `max_layer` (default: the middle of the model), and on the token
  embedding (`blocks.0.hook_resid_pre`), which says how much is readable before any layer ran. The probe is the
  labeler's full probe (L2 logistic regression on standardised activations, `probes.fit_logreg`), trained on a
  deterministic, stratified entity split (`probes.split_train_test`) and scored on the held-out entities, with a
  bootstrap 95% interval over them and the majority-class baseline. Only entities that pass the labeler's
  knowledge filter count: the model cannot be expected to encode what it does not know.
- **Each MLP layer's share of the attribute's direction.** The direction of a value is its class mean minus the
  overall mean of the residual stream at `max_layer`, over the training entities. The residual stream there is
  exactly the sum of the embedding and of every attention and MLP output below it, so a held-out entity's
  projection onto its own value's direction splits exactly into what each writer contributed (each centred on
  its training mean). A layer's share is its mean contribution over the held-out entities divided by the mean
  total; the embedding's, the MLPs' and all attention layers' shares sum to 1. Chosen over probing cumulative sums
  of MLP outputs because it is exact and additive, so the shares say how the readable direction was built, and
  it needs no second probe.

One forward pass per batch captures every layer: the knowledge filter's own full pass on the first template
(the log-probabilities of the answers need the whole model anyway), or, with the filter off, `sae.hooks.run_to`
to `max_layer` only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from features.labeling.activations import answer_logprobs, span_activations
from features.labeling.config import LabelConfig
from features.labeling.entities import EntitySet, too_few_per_value, usable_attributes, value_counts
from features.labeling.knowledge import _known, _settle_values
from features.labeling.labeler import sample_entities
from features.labeling.probes import Split, fit_logreg, split_train_test
from features.labeling.prompts import Encoded, encode_prompt, first_token
from features.labeling.results import AttributeReport
from features.labeling.significance import DEFAULT_RESAMPLES, Interval, bootstrap_ci
from features.labeling.timing import Timer, one_thread
from sae.errors import SaekitError
from sae.hooks import validate_hooks
from sae.io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

LOOKUP_JSON, LOOKUP_MD, LOOKUP_PNG = "lookup.json", "lookup.md", "lookup.png"
NAN = Interval(math.nan, math.nan, math.nan)


@dataclass
class LookupConfig:
    """Which layers and attributes to probe, and the labeler's entity sampling, filter and probe settings."""

    max_layer: int | None = None  # deepest layer probed (inclusive); None: n_layers // 2
    attributes: list[str] | None = None  # "entity_type.attribute" names; None: every usable attribute
    max_entities: int | None = 300  # per entity type, the labeler's deterministic sample; None: all
    templates: int = 1  # attribute prompts the knowledge filter averages over (activations: the first)
    knowledge_filter: bool = True
    start_token: bool = True  # begin prompts with the document separator, as the labeler does
    batch_size: int = 64
    min_class_size: int = 5  # a value needs this many known entities to be probed
    test_fraction: float = 0.25
    probe_l2: float = 1e-2
    probe_steps: int = 200
    resamples: int = DEFAULT_RESAMPLES  # bootstrap resamples of the held-out entities
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("max_entities", "templates", "batch_size", "probe_steps", "resamples"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise SaekitError(f"key 'lookup.{key}' must be a positive integer, got {value!r}")
        if self.max_layer is not None and self.max_layer < 0:
            raise SaekitError(f"key 'lookup.max_layer' must be >= 0 (or omitted for the middle layer), "
                              f"got {self.max_layer}")
        if self.min_class_size < 2:
            raise SaekitError("key 'lookup.min_class_size' must be at least 2 (one to train, one to test)")
        if not 0.0 < self.test_fraction < 1.0:
            raise SaekitError("key 'lookup.test_fraction' must be strictly between 0 and 1")
        if self.probe_l2 < 0:
            raise SaekitError("key 'lookup.probe_l2' must be >= 0")

    @classmethod
    def from_label(cls, cfg: LabelConfig, **changes: Any) -> LookupConfig:
        """The labeler's settings for the fields both have (entity sample, filter, split, probe), then `changes`."""
        mine = {f.name for f in fields(cls)}
        shared = {k: v for k, v in vars(cfg).items() if k in mine}
        return cls(**{**shared, **changes})


@dataclass
class AttributeLookup:
    """One attribute's readability per layer and the MLP layers' shares of its direction (lists by layer)."""

    entity_type: str
    attribute: str
    n_entities: int  # sampled
    n_known: int = 0  # passed the knowledge filter, with a value that has enough known entities
    values: list[tuple[str, int]] = field(default_factory=list)
    skipped: str | None = None
    n_train: int = 0
    n_test: int = 0
    baseline: float = math.nan  # accuracy of always answering the training split's majority value
    embedding: Interval = NAN  # held-out accuracy at blocks.0.hook_resid_pre (the token embedding)
    resid: list[Interval] = field(default_factory=list)  # held-out accuracy at blocks.L.hook_resid_post
    mlp_out: list[Interval] = field(default_factory=list)  # ... at blocks.L.hook_mlp_out
    mlp_share: list[Interval] = field(default_factory=list)  # share of the direction's projection MLP L wrote
    embedding_share: Interval = NAN  # the token embedding's share
    attention_share: Interval = NAN  # all attention layers' share together (the rest)
    projection: float = math.nan  # mean held-out projection onto the entity's own value direction

    @property
    def name(self) -> str:
        return f"{self.entity_type}.{self.attribute}"

    def readable_from(self, site: str = "resid") -> int | None:
        """The first layer whose accuracy interval lies above the majority baseline."""
        scores: list[Interval] = getattr(self, site)
        return next((layer for layer, s in enumerate(scores) if s.lo > self.baseline), None)


@dataclass
class LookupResult:
    """The lookup picture of one model over the entity sets; `to_json` is what lookup.json holds."""

    model_name: str
    n_layers: int
    layers: list[int]
    attributes: list[AttributeLookup]
    settings: dict[str, Any]
    timings: dict[str, float]

    @property
    def scored(self) -> list[AttributeLookup]:
        return [a for a in self.attributes if a.skipped is None]

    def to_json(self) -> dict[str, Any]:
        def one(a: AttributeLookup) -> dict[str, Any]:
            out = asdict(a)
            for key in ("resid", "mlp_out", "mlp_share"):
                out[key] = [_interval_json(s) for s in getattr(a, key)]
            for key in ("embedding", "embedding_share", "attention_share"):
                out[key] = _interval_json(getattr(a, key))
            out["baseline"], out["projection"] = (None if math.isnan(v) else round(v, 4)
                                                  for v in (a.baseline, a.projection))
            out["readable_from"] = {"resid": a.readable_from("resid"), "mlp_out": a.readable_from("mlp_out")}
            return out

        return {"model_name": self.model_name, "n_layers": self.n_layers, "layers": self.layers,
                "direction_hook": f"blocks.{self.layers[-1]}.hook_resid_post", "settings": self.settings,
                "timings": self.timings, "attributes": [one(a) for a in self.attributes]}


def _interval_json(s: Interval) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else round(v, 4)) for k, v in s._asdict().items()}


def site_hooks(layers: list[int]) -> dict[str, list[str]]:
    """The probed hooks per site, in layer order (the order of `_states`' first axis)."""
    return {"embedding": ["blocks.0.hook_resid_pre"], "resid": [f"blocks.{layer}.hook_resid_post" for layer in layers],
            "mlp_out": [f"blocks.{layer}.hook_mlp_out" for layer in layers]}


# ---------------------------------------------------------------------------------------------
# Measures on activations


def probe_hits(x: Tensor, y: Tensor, split: Split, n_classes: int, l2: float = 1e-2, steps: int = 200) -> Tensor:
    """[H, n_test] bool: whether the full probe fitted on each hook's training entities (x [H, N, d]) classifies
    each held-out entity right; the same fit as `probes.full_probe`, kept per entity for the intervals."""
    hits = []
    for xh in x.float():
        train, test = xh[split.train], xh[split.test]
        mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
        w, b = fit_logreg(((train - mean) / std)[None], y[split.train], n_classes, l2, steps)
        hits.append((((test - mean) / std) @ w[0] + b[0]).argmax(-1) == y[split.test])
    return torch.stack(hits)


class Projections(NamedTuple):
    """Held-out entities' projections onto their own value's direction: of each part, and of the whole stream."""

    parts: Tensor  # [P, n_test]
    total: Tensor  # [n_test]


def direction_projections(resid: Tensor, parts: Tensor, y: Tensor, split: Split, n_classes: int) -> Projections:
    """Split the residual stream's projection onto each held-out entity's value direction by what wrote it.

    resid [N, d] is the stream at one layer, parts [P, N, d] outputs that were added into it. A value's direction
    is its class mean minus the overall mean of `resid` over the training entities, at unit length; every part is
    centred on its own training mean, so when the parts add up to the stream they add up to the total."""
    tr, te = split.train, split.test
    resid, parts = resid.float(), parts.float()
    centre = resid[tr].mean(0)
    means = torch.stack([resid[tr][y[tr] == c].mean(0) for c in range(n_classes)])
    unit = torch.nn.functional.normalize(means - centre, dim=-1)[y[te]]  # [n_test, d]
    total = ((resid[te] - centre) * unit).sum(-1)
    own = ((parts[:, te] - parts[:, tr].mean(1, keepdim=True)) * unit).sum(-1)
    return Projections(own, total)


def _ratio_ci(num: Tensor, den: Tensor, resamples: int, seed: int) -> Interval:
    """mean(num) / mean(den) over entities, with a bootstrap interval resampling entities."""
    pairs = torch.stack([num, den], 1).double().numpy()
    return bootstrap_ci(pairs, lambda a: float(a[:, 0].mean() / a[:, 1].mean()), resamples, seed)


# ---------------------------------------------------------------------------------------------
# One attribute


class _Run(NamedTuple):
    """What every attribute of one lookup shares."""

    model: HookedTransformer
    tokenizer: Any
    cfg: LookupConfig
    layers: list[int]
    start_id: int | None
    timer: Timer


def _states(run: _Run, es: EntitySet, attr: str, names: list[str], answer_ids: Tensor) -> tuple[Tensor, Tensor]:
    """([H, n, d] activations at each entity's last token of the first attribute prompt, every probed hook;
    [n, V] answer log-probs summed over the filter's templates, zeros without the filter)."""
    cfg, templates = run.cfg, es.templates[attr].templates
    hooks = [h for hs in site_hooks(run.layers).values() for h in hs]

    def prompts(template: str) -> list[Encoded]:
        return [encode_prompt(run.tokenizer, template, n, run.start_id) for n in names]

    if not cfg.knowledge_filter:
        spans = span_activations(run.model, prompts(templates[0]), hooks, cfg.batch_size, run.timer)
        total = torch.zeros(len(names), len(answer_ids))
    else:  # the filter's own full pass captures every layer
        total, spans = answer_logprobs(run.model, prompts(templates[0]), answer_ids, cfg.batch_size, run.timer,
                                       capture=hooks)
        for template in templates[1:cfg.templates]:
            total += answer_logprobs(run.model, prompts(template), answer_ids, cfg.batch_size, run.timer)[0]
    return torch.stack([torch.stack([s[-1] for s in spans[h]]) for h in hooks]), total



def _lookup_attribute(run: _Run, es: EntitySet, attr: str, rows: list[int]) -> AttributeLookup:
    """The knowledge filter, then probes and direction shares at every layer for one attribute."""
    cfg = run.cfg
    out = AttributeLookup(es.entity_type, attr, len(rows))
    out.skipped = too_few_per_value(value_counts(es, attr, rows), cfg.min_class_size)
    if out.skipped:
        return out
    names = [es.entities[i] for i in rows]
    column = [es.attributes[attr][i] for i in rows]
    all_values = sorted(set(column))
    prefix = es.templates[attr].answer_prefix
    answer_ids = torch.tensor([first_token(run.tokenizer, prefix + v) for v in all_values])
    acts, total = _states(run, es, attr, names, answer_ids)
    correct = torch.tensor([all_values.index(v) for v in column])
    known = _known(total, answer_ids, correct, cfg.knowledge_filter)
    rep = AttributeReport(es.entity_type, attr, len(rows), len(all_values))
    used = _settle_values(rep, column, known, all_values, cfg.min_class_size)
    out.values, out.skipped = rep.values, rep.skipped
    if out.skipped:
        return out
    keep = [i for i in range(len(rows)) if known[i] and column[i] in used]
    labels = torch.tensor([used.index(column[i]) for i in keep])
    split = split_train_test([names[i] for i in keep], labels, cfg.test_fraction)
    _score(run, out, acts[:, keep], labels, split, len(used))
    return out


def _score(run: _Run, out: AttributeLookup, x: Tensor, labels: Tensor, split: Split, n_classes: int) -> None:
    """Fill `out` with accuracies, the baseline and the direction shares from x [1 + 2 * layers, N, d]."""
    cfg, n = run.cfg, len(run.layers)
    out.n_known, out.n_train, out.n_test = len(labels), len(split.train), len(split.test)
    majority = int(torch.bincount(labels[split.train], minlength=n_classes).argmax())
    out.baseline = float((labels[split.test] == majority).float().mean())
    with run.timer("probes"), one_thread():
        hits = probe_hits(x, labels, split, n_classes, cfg.probe_l2, cfg.probe_steps).float().numpy()
    with run.timer("intervals"):
        scores = [bootstrap_ci(h, resamples=cfg.resamples, seed=cfg.seed) for h in hits]
        out.embedding, out.resid, out.mlp_out = scores[0], scores[1:n + 1], scores[n + 1:]
        proj = direction_projections(x[n], x[[0, *range(n + 1, 2 * n + 1)]], labels, split, n_classes)
        out.projection = float(proj.total.mean())
        share = [_ratio_ci(p, proj.total, cfg.resamples, cfg.seed) for p in proj.parts]
        out.embedding_share, out.mlp_share = share[0], share[1:]
        out.attention_share = _ratio_ci(proj.total - proj.parts.sum(0), proj.total, cfg.resamples, cfg.seed)


# ---------------------------------------------------------------------------------------------
# Entry point


def _todo(entity_sets: list[EntitySet], wanted: list[str] | None) -> list[tuple[EntitySet, list[str]]]:
    """Each entity set with the attributes to probe; names in `wanted` that exist nowhere are an error."""
    available = {f"{es.entity_type}.{a}" for es in entity_sets for a in es.attributes}
    missing = sorted(set(wanted or []) - available)
    if missing:
        raise SaekitError(f"lookup.attributes names {', '.join(missing)}, not among the entity sets' attributes: "
                          f"{', '.join(sorted(available))}")
    return [(es, [a for a in es.attributes if wanted is None or f"{es.entity_type}.{a}" in wanted])
            for es in entity_sets]


def _max_layer(model: HookedTransformer, cfg: LookupConfig) -> int:
    n_layers = model.cfg.n_layers
    layer = n_layers // 2 if cfg.max_layer is None else cfg.max_layer
    if layer >= n_layers:
        raise SaekitError(f"lookup.max_layer={layer} is out of range: model '{model.cfg.model_name}' has "
                          f"{n_layers} layers (0..{n_layers - 1})")
    return layer


def lookup_by_layer(model: HookedTransformer, entity_sets: list[EntitySet], cfg: LookupConfig, *,
                    tokenizer: Any = None, log: Callable[[str], None] = print) -> LookupResult:
    """Probe every attribute of `entity_sets` at layers 0..max_layer of `model` (nothing is written)."""
    t0 = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise SaekitError("the model has no tokenizer; the lookup needs one to build entity prompts")
    layers = list(range(_max_layer(model, cfg) + 1))
    validate_hooks(model, [h for hs in site_hooks(layers).values() for h in hs])
    start_id = None
    if cfg.start_token:
        from sae.corpus import default_separator_id

        start_id = default_separator_id(tokenizer)
    run = _Run(model, tokenizer, cfg, layers, start_id, Timer())
    results: list[AttributeLookup] = []
    for es, attrs in _todo(entity_sets, cfg.attributes):
        rows = sample_entities(es, cfg.max_entities)
        usable, skipped = usable_attributes(es, min_values=2, min_entities=cfg.min_class_size * 2)
        for attr in attrs:
            if attr not in usable:
                results.append(AttributeLookup(es.entity_type, attr, len(rows), skipped=skipped[attr]))
            else:
                results.append(_lookup_attribute(run, es, attr, rows))
            log(f"lookup: {_summary(results[-1])}")
    timings = {**run.timer.seconds, "total": time.perf_counter() - t0}
    settings = {"label": "the entity's last token of the first attribute prompt", "start_token": start_id,
                "lookup_config": asdict(cfg)}
    return LookupResult(model.cfg.model_name, model.cfg.n_layers, layers, results, settings, timings)


def _summary(a: AttributeLookup) -> str:
    if a.skipped:
        return f"{a.name}: skipped ({a.skipped})"
    top = len(a.resid) - 1
    where = a.readable_from()
    return (f"{a.name}: {a.n_known}/{a.n_entities} known, {len(a.values)} values; resid accuracy at layer {top} "
            f"{a.resid[-1].value:.0%} vs baseline {a.baseline:.0%}; readable from layer "
            f"{'-' if where is None else where}")


# ---------------------------------------------------------------------------------------------
# Report: Markdown, PNG, JSON


def _pct(s: Interval) -> str:
    if math.isnan(s.value):
        return "-"
    return f"{s.value:.0%} [{s.lo:.0%}, {s.hi:.0%}]"


def _top_mlps(a: AttributeLookup, n: int = 3) -> str:
    order = sorted(range(len(a.mlp_share)), key=lambda layer: -a.mlp_share[layer].value)[:n]
    return ", ".join(f"L{layer} {a.mlp_share[layer].value:.0%}" for layer in order)


def render_markdown(result: LookupResult) -> str:
    """lookup.md: how the numbers were made, a summary row per attribute, and per-layer tables."""
    top = result.layers[-1]
    lines = [f"# Where the lookup happens: `{result.model_name}`, layers 0-{top} of {result.n_layers}", "",
             "Held-out accuracy of a full linear probe at the entity's last token of the attribute prompt, on the "
             "token embedding (`blocks.0.hook_resid_pre`), the residual stream (`hook_resid_post`) and each MLP's "
             "output (`hook_mlp_out`), with bootstrap 95% intervals over held-out entities, against always "
             "answering the majority value (*readable from*: the first layer whose interval lies above it; not "
             "corrected across layers). *Shares*: the parts of the residual stream's projection onto the "
             f"entity's value direction (class mean minus mean at `blocks.{top}.hook_resid_post`) that the "
             "embedding, each MLP layer and the attention layers wrote; they sum to 100%. Only entities the model "
             "knows (knowledge filter) count.", "",
             "| attribute | known (train/test) | values | baseline | embedding | readable from (resid / mlp_out) "
             f"| resid L{top} | best mlp_out | shares: embedding / MLPs / attention | largest MLP shares |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in result.scored:
        best = max(range(len(a.mlp_out)), key=lambda layer: a.mlp_out[layer].value)
        readable = " / ".join("-" if r is None else f"L{r}" for r in (a.readable_from(), a.readable_from("mlp_out")))
        mlps = sum(s.value for s in a.mlp_share)
        lines.append(f"| {a.name} | {a.n_known} ({a.n_train}/{a.n_test}) | {len(a.values)} | {a.baseline:.0%} | "
                     f"{_pct(a.embedding)} | {readable} | {_pct(a.resid[-1])} | L{best}: {_pct(a.mlp_out[best])} | "
                     f"{a.embedding_share.value:.0%} / {mlps:.0%} / {a.attention_share.value:.0%} | {_top_mlps(a)} |")
    if not result.scored:
        lines.append("| (no attribute could be probed: see below) |" + " |" * 9)
    for a in result.scored:
        lines += ["", f"## {a.name}", "", f"Values: {', '.join(f'{v} ({c})' for v, c in a.values)}; "
                  f"majority baseline {a.baseline:.0%}; mean projection {a.projection:.3g}."]
        if not a.resid[-1].lo > a.baseline:
            lines[-1] += (f" Not readable above the baseline at layer {top}: its direction there, and so the "
                          "shares, are mostly noise.")
        lines += ["", "| layer | resid_post accuracy | mlp_out accuracy | share of the direction |",
                  "|---|---|---|---|", f"| embedding | {_pct(a.embedding)} | | {_pct(a.embedding_share)} |"]
        lines += [f"| {layer} | {_pct(a.resid[layer])} | {_pct(a.mlp_out[layer])} | {_pct(a.mlp_share[layer])} |"
                  for layer in result.layers]
        lines.append(f"| attention, all layers | | | {_pct(a.attention_share)} |")
    skipped = [a for a in result.attributes if a.skipped]
    if skipped:
        lines += ["", "## Attributes not probed", ""] + [f"- {a.name}: {a.skipped}" for a in skipped]
    return "\n".join(lines) + "\n"


def _accuracy_panel(ax: Any, a: AttributeLookup, layers: list[int]) -> None:
    """Accuracy vs layer: resid solid, mlp_out dashed, 95% bands, the embedding at x = -1, the baseline dotted."""
    for site, style, color in (("resid", "-", "tab:blue"), ("mlp_out", "--", "tab:orange")):
        s = np.array(getattr(a, site))
        ax.plot(layers, s[:, 0], style, color=color, label=site)
        ax.fill_between(layers, s[:, 1], s[:, 2], alpha=0.15, color=color)
    e = a.embedding
    ax.errorbar([-1], [e.value], yerr=[[e.value - e.lo], [e.hi - e.value]], fmt="D", color="k", ms=4,
                label="embedding")
    ax.axhline(a.baseline, ls=":", color="k", lw=1, label="majority")
    ax.set(title=f"{a.name} (n={a.n_known})", ylim=(0, 1.02), xlabel="layer (-1: embedding)",
           ylabel="held-out accuracy")


def render_plot(result: LookupResult) -> bytes:
    """lookup.png: accuracy vs layer per attribute, and a last panel with each attribute's MLP shares of its
    direction by layer."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = result.scored
    cols = min(4, len(scored) + 1)
    rows = math.ceil((len(scored) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, a in zip(flat, scored, strict=False):
        _accuracy_panel(ax, a, result.layers)
    if scored:
        flat[0].legend(fontsize=7, loc="lower right")
    share_ax = flat[len(scored)]
    for a in scored:
        share_ax.plot(result.layers, [s.value for s in a.mlp_share], marker=".", label=a.name)
    share_ax.axhline(0, color="k", lw=0.5)
    share_ax.set(title="MLP share of the attribute direction", xlabel="layer", ylabel="share of projection")
    if scored:
        share_ax.legend(fontsize=6)
    else:
        share_ax.text(0.5, 0.5, "no attribute could be probed", ha="center", va="center", transform=share_ax.transAxes)
    for ax in flat[len(scored) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_lookup(folder: str | Path, result: LookupResult) -> Path:
    """Write lookup.json, lookup.png and lookup.md (last: its presence means the set is complete) into `folder`;
    returns the Markdown file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / LOOKUP_JSON, result.to_json())
    atomic_write_bytes(folder / LOOKUP_PNG, render_plot(result))
    atomic_write_text(folder / LOOKUP_MD, render_markdown(result))
    return folder / LOOKUP_MD
