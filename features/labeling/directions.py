"""Attribute directions across the early MLP layers: which units carry an attribute, chosen on training entities.

The lookup from an entity to its attributes is spread over several early MLP layers (DESIGN.md, "Measuring the
science"), so a direction is a group of units in every layer at once: SAE features of each layer's `hook_mlp_out`,
the same layers' MLP neurons (`mlp.hook_post`), or a baseline basis of `hook_mlp_out` (PCA of the training
entities' activations, or a random rotation). All three are chosen by one rule at one budget (`choose_units`), per
attribute (not per value), so interchanging them should carry the source's value, whatever it is.

Entities are split once per entity type by a hash of their name: the training half chooses the units, and only the
held-out half is ever paired and scored (`split_entities`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from features.labeling.interchange import Basis
from features.labeling.probes import stable_hash
from sae.errors import SaekitError
from sae.hooks import check_fit, hook_layer, sae_hooks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from sae.saes import SAE

DirKind = Literal["feature", "neuron", "baseline"]
DIR_KINDS: tuple[DirKind, ...] = ("feature", "neuron", "baseline")
UnitRule = Literal["anova", "output_variance"]
UNIT_RULES: dict[str, str] = {
    "anova": "per layer, the units with the largest one-way ANOVA F of their activation across the attribute's "
             "values on the training entities (F > 0)",
    "output_variance": "per layer, the units whose contribution to hook_mlp_out varies most across the attribute's "
                       "values on the training entities: the between-value sum of squares of the activation times "
                       "the squared norm of the unit's output direction (> 0)",
}
_RANK_TOL = 1e-5  # PCA components below this share of the largest singular value carry no training variance
MIN_PAIRS = 10  # fewer held-out pairs than this cannot say anything about an attribute


@dataclass
class DirectionsConfig:
    """Attribute directions tested by interchange (features/labeling/directions.py); the entities, knowledge
    filter and prompt batch size come from the `label` section."""

    units_per_layer: int = 16  # at most this many units per layer and attribute, for every kind
    pairs: int = 80  # held-out (base, source) pairs per attribute, sampled among pairs with different values
    random_groups: int = 1  # per pair and kind, size-matched random groups drawn afresh (the test's controls)
    train_fraction: float = 0.5  # share of each entity type's entities (by name hash) used to choose units
    seed: int = 0  # split salt, pair sampling, random groups, bootstrap and permutation draws
    batch_size: int = 256  # patched runs per forward pass (each runs only the tokens from the entity's last one)
    baseline: Literal["pca", "random"] = "pca"  # the non-SAE basis of hook_mlp_out the features are compared to
    isolation: bool = True  # also test whether the other attributes of the base entity stay as they were
    unit_rule: UnitRule = "output_variance"  # how units are ranked on training entities (UNIT_RULES has each)

    def __post_init__(self) -> None:
        for key in ("units_per_layer", "random_groups", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise SaekitError(f"key 'directions.{key}' must be a whole number >= 1, got {getattr(self, key)!r}")
        if not isinstance(self.pairs, int) or self.pairs < MIN_PAIRS:
            raise SaekitError(f"key 'directions.pairs' must be a whole number >= {MIN_PAIRS} (fewer pairs cannot "
                              f"tell a direction from chance), got {self.pairs!r}")
        if not 0.0 < self.train_fraction < 1.0:
            raise SaekitError(f"key 'directions.train_fraction' must be strictly between 0 and 1 (entities to "
                              f"choose units on vs entities to score), got {self.train_fraction}")
        if self.unit_rule not in UNIT_RULES:
            raise SaekitError(f"key 'directions.unit_rule' must be one of {', '.join(UNIT_RULES)}, "
                              f"got {self.unit_rule!r}")
        if self.baseline not in ("pca", "random"):
            raise SaekitError(f"key 'directions.baseline' must be 'pca' or 'random', got {self.baseline!r}")


@dataclass
class AttributeOutcomes:
    """One attribute's interchange outcomes, per held-out pair (1 = the model's choice moved to the source's value)
    and per (pair, other attribute) for isolation (1 = the base entity's other attribute stayed its value)."""

    entity_type: str
    attribute: str
    values: list[str] = field(default_factory=list)
    n_known: int = 0
    train: list[str] = field(default_factory=list)  # entities that chose the units (never scored)
    heldout: list[str] = field(default_factory=list)  # entities the pairs are drawn from
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (base, source)
    upper: Any = None  # np.ndarray [P]: the whole MLP outputs of every layer interchanged
    all_features: Any = None  # np.ndarray [P]: every SAE feature of every layer interchanged (the SAEs' ceiling)
    chosen: dict[str, Any] = field(default_factory=dict)  # kind -> np.ndarray [P]
    random: dict[str, Any] = field(default_factory=dict)  # kind -> np.ndarray [random_groups, P]
    isolation: dict[str, Any] = field(default_factory=dict)  # kind -> np.ndarray [Q]; empty: no other attribute
    other_attributes: list[str] = field(default_factory=list)  # those isolation was measured on
    units: dict[str, list[list[int]]] = field(default_factory=dict)  # kind -> per layer, the chosen units
    moved: dict[str, float] = field(default_factory=dict)  # kind -> mean over pairs of chosen units whose value differs
    skipped: str | None = None

    @property
    def name(self) -> str:
        return f"{self.entity_type}.{self.attribute}"


@dataclass
class DirectionsResult:
    """Everything one run of the directions produced, in memory; `directions_stats.summarize` turns it into figures."""

    attributes: list[AttributeOutcomes]
    layers: list[dict[str, Any]]  # per patched layer: its hook and SAE
    settings: dict[str, Any]
    timings: dict[str, float]
    seeds: list[int]  # SAE training seeds the result covers


# ---------------------------------------------------------------------------------------------- layers and bases


def check_layer_saes(model: HookedTransformer, saes: list[SAE]) -> list[SAE]:
    """The SAEs sorted by layer, refused unless each reads and writes one layer's `hook_mlp_out` of this model."""
    if not saes:
        raise SaekitError("directions need at least one SAE on a blocks.L.hook_mlp_out; train one per early layer "
                          "(e.g. train.saes with hook: blocks.{0..6}.hook_mlp_out)")
    layers: dict[int, SAE] = {}
    for sae in saes:
        check_fit(model, sae)
        read, write = sae_hooks(sae)
        layer = hook_layer(read)
        if write != mlp_out(layer) or read not in (mlp_out(layer), mlp_in(layer)):
            raise SaekitError(f"directions interchange SAE features at hook_mlp_out, but an SAE reads {read} and "
                              f"writes {write}; pass SAEs trained on blocks.L.hook_mlp_out, or transcoders from "
                              f"blocks.L.hook_resid_mid (the MLP's input) to blocks.L.hook_mlp_out")
        if layer in layers:
            raise SaekitError(f"two SAEs read {read}; pass one SAE per layer")
        layers[layer] = sae
    return [layers[k] for k in sorted(layers)]


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def mlp_in(layer: int) -> str:
    """The MLP's input (the residual stream before the MLP's norm): where a transcoder of the layer reads."""
    return f"blocks.{layer}.hook_resid_mid"


def mlp_post(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def feature_basis(sae: SAE, layer: int) -> Basis:
    """SAE features: coordinates are the SAE's activations, directions its decoder rows (the error term stays).
    A transcoder's coordinates come from the MLP's input, its decoder rows are added to the MLP's output."""

    def encode(x: Tensor) -> Tensor:
        return sae.encode(x.to(sae.W_enc.device)).float()

    read = sae_hooks(sae)[0]
    return Basis(mlp_out(layer), encode, sae.W_dec.detach().float(), None if read == mlp_out(layer) else read)


def neuron_basis(layer: int) -> Basis:
    """MLP neurons: the coordinates are `mlp.hook_post` itself, so interchanging sets the neurons' values."""
    return Basis(mlp_post(layer), _identity, None)


def whole_output_basis(layer: int) -> Basis:
    """The whole `hook_mlp_out` vector (the upper bound interchanges every coordinate)."""
    return Basis(mlp_out(layer), _identity, None)


def _identity(x: Tensor) -> Tensor:
    return x.float()


def rotation_basis(layer: int, train_acts: Tensor, kind: Literal["pca", "random"], seed: int) -> tuple[Basis, Tensor]:
    """An orthonormal basis of `hook_mlp_out` [d, d] (rows are units) and which units may be chosen: the principal
    components of the training entities' activations (those with variance), or a seeded random rotation (all)."""
    d = train_acts.shape[1]
    if kind == "pca":
        centred = train_acts.double() - train_acts.double().mean(0)
        _, s, vh = torch.linalg.svd(centred, full_matrices=True)
        allowed = torch.zeros(d, dtype=torch.bool)
        if len(s) and float(s.max()) > 0:
            allowed[: len(s)] = s > _RANK_TOL * float(s.max())
        rows = vh.float()
    else:
        gen = torch.Generator().manual_seed(seed * 1009 + layer)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        rows = (q * torch.sign(torch.diagonal(r))).T.float()
        allowed = torch.ones(d, dtype=torch.bool)
    basis_rows = rows.contiguous()

    def encode(x: Tensor) -> Tensor:
        return x.float() @ basis_rows.T.to(x.device)

    return Basis(mlp_out(layer), encode, basis_rows), allowed


# ---------------------------------------------------------------------------------------------- entities and pairs


def split_entities(entity_type: str, names: list[str], train_fraction: float, seed: int) -> Tensor:
    """[n] bool, True for training entities: a hash of (entity type, name, seed), so the split is the same for every
    attribute of the type and for every kind, and an entity that chose units is never scored."""
    cut = int(train_fraction * 2 ** 32)
    return torch.tensor([stable_hash(f"{entity_type}\x00{n}\x00{seed}") % 2 ** 32 < cut for n in names],
                        dtype=torch.bool)


def sample_pairs(labels: Tensor, answer_ids: Tensor, n_pairs: int, seed: int) -> Tensor:
    """[P, 2] (base, source) positions into `labels`: ordered pairs whose values differ and whose answers differ in
    their first token (else "moved to the source's value" cannot be read), `n_pairs` of them drawn without
    replacement, or all when there are fewer."""
    tokens = answer_ids[labels]
    n = len(labels)
    base, source = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    ok = tokens[:, None] != tokens[None, :]
    pairs = torch.stack([base[ok], source[ok]], 1)
    if len(pairs) > n_pairs:
        pick = np.random.default_rng(seed).choice(len(pairs), size=n_pairs, replace=False)
        pairs = pairs[torch.from_numpy(np.sort(pick))]
    return pairs


# ---------------------------------------------------------------------------------------------- unit choice


def _sums(acts: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """Between-value and within-value sums of squares per unit ([n, U] -> [U], [U]), the value count and n."""
    x = acts.double()
    present = torch.unique(labels)
    grand = x.mean(0)
    ssb = torch.zeros(x.shape[1], dtype=torch.float64)
    ssw = torch.zeros(x.shape[1], dtype=torch.float64)
    for v in present:
        group = x[labels == v]
        mean = group.mean(0)
        ssb += len(group) * (mean - grand) ** 2
        ssw += ((group - mean) ** 2).sum(0)
    return ssb, ssw, len(present), len(labels)


def anova_f(acts: Tensor, labels: Tensor) -> Tensor:
    """One-way ANOVA F statistic of each unit's activation across the values ([n, U], labels [n] -> [U]):
    between-value variance over within-value variance. 0 for a unit that is constant or has no within-value
    spread to compare against and no between-value difference; NaN-free."""
    ssb, ssw, k, n = _sums(acts, labels)
    if k < 2 or n <= k:
        return torch.zeros(acts.shape[1], dtype=torch.float64)
    msb, msw = ssb / (k - 1), ssw / (n - k)
    scale = float(acts.double().var(0).max()) if n > 1 else 0.0
    return torch.where(msb > 0, msb / msw.clamp_min(1e-12 * max(scale, 1e-30)), torch.zeros_like(msb))


def output_variance(acts: Tensor, labels: Tensor, out_norms: Tensor) -> Tensor:
    """Between-value sum of squares of each unit's contribution to the layer's output ([n, U], [n], [U] -> [U]):
    a unit that separates the values perfectly but writes almost nothing cannot carry them, so size counts."""
    ssb, _, k, _ = _sums(acts, labels)
    if k < 2:
        return torch.zeros(acts.shape[1], dtype=torch.float64)
    return ssb * out_norms.double().cpu() ** 2


def choose_units(acts: list[Tensor], labels: Tensor, budget: int, allowed: list[Tensor] | None = None,
                 out_norms: list[Tensor] | None = None) -> list[Tensor]:
    """Per layer, the <= `budget` units with the largest score on the training entities (acts: per layer [n, U]):
    ANOVA F, or with `out_norms` (per layer [U], each unit's output-direction norm) the output variance. Units
    scoring 0 (no separation at all) or not `allowed` are never chosen. Ties go to the lower index."""
    chosen = []
    for i, a in enumerate(acts):
        f = anova_f(a, labels) if out_norms is None else output_variance(a, labels, out_norms[i])
        if allowed is not None:
            f = torch.where(allowed[i], f, torch.zeros_like(f))
        order = torch.argsort(-f, stable=True)[:budget]
        chosen.append(order[f[order] > 0].sort().values)
    return chosen


def random_groups(chosen: list[Tensor], widths: list[int], n_groups: int, seed: int) -> list[list[Tensor]]:
    """`n_groups` random groups, each the same size as `chosen` in every layer, drawn uniformly from all of that
    layer's units (widths) of the same kind; seeded, so a report is reproducible. The caller draws fresh groups for
    every pair, so the controls cover many groups rather than a lucky or unlucky few."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randperm(w, generator=gen)[: len(c)].sort().values for c, w in zip(chosen, widths, strict=True)]
            for _ in range(n_groups)]
