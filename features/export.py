"""Exports of a feature store for other tools: Parquet tables, Neuronpedia-style JSON batches, and a portable
"feature dictionary" bundle (the SAE-Lens directory + the store file + README.json) that SAE-Lens and sqlite3
alone can read. Every export takes the store file's path; where it lies is the caller's business.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from features.store import KINDS, LABELER_TABLES, TABLE_DOCS, FeatureStore, Kind, Unit
from sae.errors import SaekitError
from sae.formats import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE
from sae.hooks import hook_layer
from sae.io import atomic_write, atomic_write_json

FORMATS = ("parquet", "neuronpedia", "bundle")
BUNDLE_FORMAT = "saekit-feature-dictionary"
BUNDLE_VERSION = 1
SAE_FILES = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, "eval.json")  # eval.json: the run's metrics, if any


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))
    return path


_LIST_STR, _LIST_INT, _LIST_F = pa.list_(pa.string()), pa.list_(pa.int64()), pa.list_(pa.float64())
PARQUET_SCHEMAS = {
    "units": pa.schema([("kind", pa.string()), ("index", pa.int64()), ("status", pa.string()),
                        ("n_fires", pa.int64()), ("freq", pa.float64()), ("mean_act", pa.float64()),
                        ("max_act", pa.float64()), ("top_tokens", _LIST_STR), ("pos_tokens", _LIST_STR),
                        ("explanation", pa.string()), ("hist_edges", _LIST_F), ("hist_counts", _LIST_INT)]),
    "examples": pa.schema([("kind", pa.string()), ("index", pa.int64()), ("group", pa.string()),
                           ("interval", pa.int64()), ("rank", pa.int64()), ("seq", pa.int64()), ("pos", pa.int64()),
                           ("value", pa.float64()), ("focus", pa.int64()), ("tokens", _LIST_STR),
                           ("token_ids", _LIST_INT), ("acts", _LIST_F)]),
    "intervals": pa.schema([("kind", pa.string()), ("index", pa.int64()), ("interval", pa.int64()),
                            ("min", pa.float64()), ("max", pa.float64()), ("count", pa.int64()),
                            ("share", pa.float64())]),
    "logits": pa.schema([("kind", pa.string()), ("index", pa.int64()), ("sign", pa.string()), ("rank", pa.int64()),
                         ("token", pa.string()), ("value", pa.float64())]),
    "related": pa.schema([("kind", pa.string()), ("index", pa.int64()), ("relation", pa.string()),
                          ("rank", pa.int64()), ("other_kind", pa.string()), ("other_index", pa.int64()),
                          ("value", pa.float64())]),
}


def _unit_rows(u: Unit, out: dict[str, list[dict[str, Any]]]) -> None:
    base = {"kind": u.kind, "index": u.index}
    out["units"].append({**base, "status": u.status, "n_fires": u.n_fires, "freq": u.freq, "mean_act": u.mean_act,
                         "max_act": u.max_act, "top_tokens": u.top_tokens, "pos_tokens": u.pos_tokens,
                         "explanation": u.explanation,
                         "hist_edges": [e if math.isfinite(e) else None for e in u.hist_edges],
                         "hist_counts": u.hist_counts})
    groups = [("top", -1, u.top_examples)] + [("interval", j, iv.examples) for j, iv in enumerate(u.intervals)]
    for group, j, examples in groups:
        for rank, e in enumerate(examples):
            out["examples"].append({**base, "group": group, "interval": j, "rank": rank, "seq": e.seq, "pos": e.pos,
                                    "value": e.value, "focus": e.focus, "tokens": e.tokens, "token_ids": e.token_ids,
                                    "acts": e.acts})
    for j, iv in enumerate(u.intervals):
        out["intervals"].append({**base, "interval": j, "min": iv.min, "max": iv.max, "count": iv.count,
                                 "share": iv.share})
    for sign, pairs in (("pos", u.pos_logits), ("neg", u.neg_logits)):
        for rank, (tok, value) in enumerate(pairs):
            out["logits"].append({**base, "sign": sign, "rank": rank, "token": tok, "value": value})
    other = "neuron" if u.kind == "feature" else "feature"
    for relation, pairs, kind in (("neighbours", u.neighbours, u.kind), ("cofiring", u.cofiring, u.kind),
                                  ("correlated", u.correlated, other), ("aligned", u.aligned, "neuron")):
        for rank, (idx, value) in enumerate(pairs):
            out["related"].append({**base, "relation": relation, "rank": rank, "other_kind": kind,
                                   "other_index": idx, "value": value})


def export_parquet(store: Path, out_dir: Path) -> list[Path]:
    """One Parquet file per table: units, examples, intervals, logits, related, plus the labeler's tables and
    meta (key, JSON value). Lists stay lists (tokens, acts), so pandas/polars/DuckDB read them directly."""
    out_dir = Path(out_dir)
    written = []
    with FeatureStore.open(store) as fs:
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in PARQUET_SCHEMAS}
        for kind in KINDS:
            if fs.n_units(kind):
                for u in fs.iter_units(kind):
                    _unit_rows(u, rows)
        for name, schema in PARQUET_SCHEMAS.items():
            written.append(_write_parquet(out_dir / f"{name}.parquet", rows[name], schema))
        for table in LABELER_TABLES:
            cur = fs.con.execute(f"SELECT * FROM {table}")
            cols = [c[0] for c in cur.description]
            data = [dict(zip(cols, r, strict=True)) for r in cur]
            written.append(_write_parquet(out_dir / f"{table}.parquet", data, _sql_schema(fs, table)))
        meta = [{"key": k, "value": json.dumps(v)} for k, v in fs.meta.items()]
        written.append(_write_parquet(out_dir / "meta.parquet", meta,
                                      pa.schema([("key", pa.string()), ("value", pa.string())])))
    return written


def _sql_schema(store: FeatureStore, table: str) -> pa.Schema:
    types = {"TEXT": pa.string(), "INTEGER": pa.int64(), "REAL": pa.float64()}
    return pa.schema([(name, types[decl]) for _, name, decl, *_ in
                      store.con.execute(f"PRAGMA table_info({table})")])


def _hist_centres(edges: list[float]) -> list[float]:
    """Bar positions for the log-spaced activation histogram (geometric centres; the open ends get a near edge)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        out.append(hi / 2 if lo == 0 else (lo if not math.isfinite(hi) else math.sqrt(lo * hi)))
    return out


def neuronpedia_feature(u: Unit, n_tokens: int, n_sequences: int, context_size: int, dataset: str) -> dict[str, Any]:
    """One unit in the layout of Neuronpedia's dashboard batches (SAEDashboard's NeuronpediaDashboardFeature)."""
    def r3(values: list[float]) -> list[float]:
        return [round(float(v), 3) for v in values]

    activations = [{"bin_min": -1, "bin_max": u.max_act, "bin_contains": -1, "tokens": e.tokens,
                    "values": r3(e.acts)} for e in u.top_examples]
    for iv in u.intervals:
        activations += [{"bin_min": iv.min, "bin_max": iv.max, "bin_contains": iv.share, "tokens": e.tokens,
                         "values": r3(e.acts)} for e in iv.examples]
    logit_values, logit_heights = [], []
    if u.logit_hist is not None:
        lo, hi, counts = u.logit_hist
        step = (hi - lo) / max(len(counts), 1)
        logit_values, logit_heights = [round(lo + (i + 0.5) * step, 4) for i in range(len(counts))], counts
    frac = u.n_fires / max(n_tokens, 1)
    is_feature = u.kind == "feature"
    return {
        "feature_index": u.index,
        "neuron_alignment_indices": [i for i, _ in u.aligned], "neuron_alignment_values": r3([v for _, v in u.aligned]),
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [i for i, _ in u.correlated] if is_feature else [],
        "correlated_neurons_pearson": r3([v for _, v in u.correlated]) if is_feature else [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [] if is_feature else [i for i, _ in u.correlated],
        "correlated_features_pearson": [] if is_feature else r3([v for _, v in u.correlated]),
        "correlated_features_l1": [],
        "neg_str": [s for s, _ in u.neg_logits], "neg_values": r3([v for _, v in u.neg_logits]),
        "pos_str": [s for s, _ in u.pos_logits], "pos_values": r3([v for _, v in u.pos_logits]),
        "frac_nonzero": frac,
        "freq_hist_data_bar_values": r3(_hist_centres(u.hist_edges)), "freq_hist_data_bar_heights": u.hist_counts,
        "logits_hist_data_bar_values": logit_values, "logits_hist_data_bar_heights": logit_heights,
        "n_prompts_total": n_sequences, "n_tokens_in_prompt": context_size, "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": activations,
        "explanations": [{"description": e.text, "score": e.score, "source": e.source} for e in u.explanations],
        "saekit": {"kind": u.kind, "status": u.status, "max_act": u.max_act, "mean_act": u.mean_act,
                   "cofiring": u.cofiring, "neighbours": u.neighbours,
                   "tags": [{"entity_type": t.entity_type, "attribute": t.attribute, "value": t.value, "f1": t.f1}
                            for t in u.tags]},
    }


def export_neuronpedia(store: Path, out_dir: Path, kind: Kind = "feature", batch_size: int = 128) -> list[Path]:
    """Neuronpedia-style JSON batches (`batch-N.json`, `batch_size` units each): per unit top activations and
    interval examples (bin_min / bin_max / bin_contains; top activations use bin_min = bin_contains = -1),
    positive/negative logits, frequency and logit histograms, frac_nonzero, correlated neurons, explanations."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    with FeatureStore.open(store) as fs:
        if not fs.n_units(kind):
            raise SaekitError(f"this store has no {kind}s to export")
        m = fs.meta
        a = m["analysis"]
        dataset = (m.get("run_config") or {}).get("corpus", {}).get("source", "")
        header = {"model_id": m.get("model_name"), "layer": hook_layer(a["sae_hook"]),
                  "sae_set": m.get("sae_id") if kind == "feature" else f"{a['neuron_hook']}-neurons"}
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            path = out_dir / f"batch-{len(written)}.json"
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps({**header, "features": batch})))
            written.append(path)

        for u in fs.iter_units(kind):
            batch.append(neuronpedia_feature(u, m["n_tokens"], m["n_sequences"], a["context_size"], dataset))
            if len(batch) == batch_size:
                flush()
                batch = []
        if batch:
            flush()
    return written


def _copy_db(src: Path, dst: Path) -> None:
    """A consistent single-file copy (the backup API sees committed WAL content), in rollback-journal mode so
    it opens read-only anywhere, even from read-only media."""
    source, target = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True), sqlite3.connect(dst)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode = DELETE")
    finally:
        source.close()
        target.close()


def export_bundle(sae_dir: Path, store: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write the portable feature dictionary at `out_dir`: the SAE-Lens files of `sae_dir`, the store (under its
    own file name) and README.json, one flat folder that `sae_lens.SAE.load_from_disk(out_dir)` and
    `sqlite3.connect(out_dir / store.name)` read directly. Built in a temporary folder and renamed into place."""
    sae_dir, store, out_dir = Path(sae_dir), Path(store), Path(out_dir)
    with FeatureStore.open(store) as fs:
        summary = fs.summary()
        schema_version = fs.meta["schema_version"]
    if out_dir.exists() and not overwrite:
        raise SaekitError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files = []
        for name in SAE_FILES:
            if (sae_dir / name).is_file():
                shutil.copyfile(sae_dir / name, tmp / name)
                files.append(name)
        _copy_db(store, tmp / store.name)
        sae_cfg = json.loads((sae_dir / CFG_FILE).read_text())
        atomic_write_json(tmp / "README.json", _readme(sae_cfg, files, store.name, schema_version, summary))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _readme(sae_cfg: dict[str, Any], files: list[str], db_name: str, schema_version: int,
            summary: dict[str, Any]) -> dict[str, Any]:
    """README.json: what the bundle holds and how to open it without saekit."""
    meta = sae_cfg.get("metadata", {})
    return {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sae": {"files": files, "architecture": sae_cfg.get("architecture"), "d_in": sae_cfg.get("d_in"),
                "d_sae": sae_cfg.get("d_sae"), "model_name": meta.get("model_name"),
                "hook_name": meta.get("hook_name"),
                "load_with_sae_lens": "from sae_lens import SAE; sae = SAE.load_from_disk('<this folder>')",
                "load_with_saekit": "from sae.formats import load_sae; sae = load_sae('<this folder>')"},
        "features_db": {"file": db_name, "schema_version": schema_version, "tables": TABLE_DOCS,
                        "open_with_sqlite3": f"sqlite3.connect('<this folder>/{db_name}')",
                        "open_with_saekit": "from features.store import FeatureStore; "
                                            f"FeatureStore.open('<this folder>/{db_name}')",
                        "example_query": "SELECT idx, freq, max_act, top_tokens FROM units WHERE kind = "
                                         "'feature' AND status = 'live' ORDER BY max_act DESC LIMIT 10"},
        "summary": {k: summary[k] for k in ("units", "n_tokens", "n_sequences", "sae_id", "model_name", "hook",
                                            "eval")},
    }


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder `tmp` to `out_dir`, moving an existing one aside first and then deleting it."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
