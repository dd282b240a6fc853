"""The feature store: pages match the analysis, queries and filters, the labeler's tables, version and range
errors, rebuilds, the three exports (the bundle read by SAE-Lens and plain sqlite3), and the CLI."""

import json
import shutil
import sqlite3

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from features.analyze import AnalyzeConfig, analyze, write_analysis
from features.export import export_bundle, export_neuronpedia, export_parquet
from features.layout import store_in
from features.store import (
    SCHEMA_VERSION,
    Explanation,
    FeatureStore,
    Probe,
    Semantics,
    Tag,
    UnitQuery,
    density_note,
)
from sae.errors import SaekitError
from sae.formats import save_sae
from sae.saes import Provenance, SAEShape, TopKConfig, build_sae

HOOK = "blocks.1.hook_mlp_out"
VOCAB = [f"tok{i}" for i in range(500)]
CFG = AnalyzeConfig(batch_size=6, top_examples=4, intervals=4, interval_examples=3, window_before=3, window_after=2,
                    n_logits=5, n_related=3)


def make_sae():
    sae = build_sae(SAEShape(d_in=32, d_sae=64), TopKConfig(k=4, encoder_bf16=False),
                    Provenance(model_name="tiny", hook_name=HOOK))
    with torch.no_grad():
        sae.b_enc.add_(0.05)
        sae.W_enc[:, 63] = 0  # feature 63 can never win a top-k slot: a dead feature
        sae.b_enc[63] = -10
    return sae


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    """An SAE directory with eval.json and a store analysed over 20 random sequences."""
    folder = tmp_path_factory.mktemp("store") / "tiny-sae"
    sae = make_sae()
    save_sae(sae, folder, metadata={"context_size": 16, "prepend_bos": False})
    (folder / "eval.json").write_text(json.dumps({"l0": 4.0, "fvu": 0.5}))
    toks = torch.randint(0, 500, (20, 16), generator=torch.Generator().manual_seed(0))
    analysis = analyze(tiny_model, sae, toks, CFG, progress=False)
    meta = {"sae_id": folder.name, "model_name": "tiny", "sae_sha256": "s1", "fingerprint": "f1",
            "eval": json.loads((folder / "eval.json").read_text()), "run_config": {"corpus": {"source": "rand"}},
            "sae": json.loads((folder / "cfg.json").read_text())}
    write_analysis(store_in(folder), analysis, vocab=VOCAB, meta=meta)
    return folder, analysis, meta


@pytest.fixture
def db(built, tmp_path):
    """A private copy of the store, free to modify."""
    path = tmp_path / "features.db"
    shutil.copyfile(store_in(built[0]), path)
    return path


def test_feature_page_matches_the_analysis(built):
    folder, analysis, _ = built
    toks = analysis.tokens
    res = analysis.kinds["feature"]
    with FeatureStore.open(store_in(folder)) as store:
        for i in (0, 17, 42):
            u = store.feature(i)
            assert (u.kind, u.index, u.n_fires) == ("feature", i, int(res.n_fires[i]))
            assert u.max_act == pytest.approx(float(res.max_act[i]))
            assert u.freq == pytest.approx(int(res.n_fires[i]) / toks.numel())
            assert [e.seq for e in u.top_examples] == [s for s in res.top["seq"][i].tolist() if s >= 0]
            for e in u.top_examples:
                assert e.tokens[e.focus] == VOCAB[int(toks[e.seq, e.pos])]
                assert e.token_ids == toks[e.seq, e.pos - e.focus:e.pos - e.focus + len(e.acts)].tolist()
                assert e.acts[e.focus] == pytest.approx(e.value, rel=1e-2)
            assert sum(iv.count for iv in u.intervals) == u.n_fires
            assert sum(iv.share for iv in u.intervals) == pytest.approx(1.0, abs=1e-4)
            assert all(iv.min * 0.999 <= e.value <= iv.max * 1.001 for iv in u.intervals for e in iv.examples)
            assert sum(u.hist_counts) == u.n_fires and len(u.hist_edges) == len(u.hist_counts) + 1
            assert [s for s, _ in u.pos_logits] == [VOCAB[t] for t in res.logits["pos_ids"][i].tolist()]
            assert [j for j, _ in u.neighbours] == res.neighbours[0][i].tolist()
            assert len(u.correlated) == 3 and len(u.aligned) == 3
        n = store.neuron(5)
        assert n.kind == "neuron" and n.status == "live" and [j for j, _ in n.correlated]
        t = float(analysis.kinds["neuron"].threshold[5])
        assert n.threshold == pytest.approx(t) and t > 0 and n.intervals[0].min == pytest.approx(t)
        assert all(e.value > t for iv in n.intervals for e in iv.examples + n.top_examples)
        stats = store.unit_stats()
        assert stats["feature"].threshold == [0.0] * 64 and stats["neuron"].threshold[5] == pytest.approx(t)
        assert stats["neuron"].freq[5] == pytest.approx(n.freq)
        assert stats["feature"].mean_act[17] == pytest.approx(store.feature(17).mean_act)
        assert store.unit_table("neuron")["threshold"][5] == pytest.approx(t)
        assert store.feature(63).status == "dead" and store.feature(63).top_examples == []


def test_search_filters_and_rankings(built):
    with FeatureStore.open(store_in(built[0])) as store:
        token = store.feature(7).top_tokens[0]
        hits = store.search(UnitQuery(token), limit=100)
        assert 7 in [h.index for h in hits] and all(token in h.top_tokens + h.pos_tokens for h in hits)
        assert store.count(UnitQuery(token)) == len(hits)
        assert 42 in [h.index for h in store.search(UnitQuery("42"), limit=100)]  # a number also matches the index
        live = store.search(UnitQuery(status="live"), limit=1000)
        assert live and all(h.status == "live" for h in live)
        assert 63 not in [h.index for h in store.search(UnitQuery(include_dead=False), limit=1000)]
        rare = store.search(UnitQuery(max_freq=0.02, order_by="freq", descending=True), limit=1000)
        assert all(h.freq <= 0.02 for h in rare) and [h.freq for h in rare] == sorted((h.freq for h in rare),
                                                                                      reverse=True)
        top = store.top("max_act", limit=5)
        assert [h.max_act for h in top] == sorted((h.max_act for h in store.search(limit=1000)), reverse=True)[:5]
        assert len(store.top("freq", kind="neuron", limit=3)) == 3
        assert store.count() == 64 and store.count(UnitQuery(kind="neuron")) == 64
        assert store.search(UnitQuery("100%_"), limit=5) == []  # LIKE wildcards are matched literally
        tagged_as = store.search(UnitQuery(tag=("city", None, None)), limit=1000)
        assert tagged_as == [] and store.count(UnitQuery(tag=("city", None, None))) == 0
        with pytest.raises(SaekitError, match="cannot order by 'loudness'"):
            store.search(UnitQuery(order_by="loudness"))
        with pytest.raises(SaekitError, match="unknown unit kind 'latent'"):
            store.search(UnitQuery(kind="latent"))
        with pytest.raises(SaekitError, match="unknown status 'asleep'"):
            store.count(UnitQuery(status="asleep"))


def test_summary_counts_and_metadata(built):
    folder, analysis, meta = built
    with FeatureStore.open(store_in(folder)) as store:
        s = store.summary()
    feats = s["units"]["feature"]
    assert feats["total"] == 64 and feats["live"] + feats["dead"] + feats["dense"] == 64 and feats["dead"] >= 1
    assert s["units"]["neuron"]["total"] == 64
    # one on rule: every neuron is on about as often as a typical feature, none dense, none dead
    assert s["units"]["neuron"]["live"] == 64 and density_note(s["units"]["neuron"]) == ""
    assert s["eval"] == {"l0": 4.0, "fvu": 0.5} and s["sae"]["d_sae"] == 64 and s["n_tokens"] == 320
    assert s["hook"] == HOOK and s["config"] == meta["run_config"]


def test_out_of_range_indices_name_the_valid_range(built):
    with FeatureStore.open(store_in(built[0])) as store:
        with pytest.raises(SaekitError, match=r"feature index 64 is out of range: this store has features 0\.\.63"):
            store.feature(64)
        with pytest.raises(SaekitError, match=r"neuron index -1 is out of range: this store has neurons 0\.\.63"):
            store.neuron(-1)
        with pytest.raises(SaekitError, match="out of range"):
            store.feature("3")  # type: ignore[arg-type]


def test_labeler_tables_roundtrip_and_show_on_pages(db):
    with FeatureStore.open(db, writable=True) as store:
        store.write_tags([Tag("feature", 3, "city", "country", "France", 0.9, 0.8, 0.85, 0.97, 40, ["Paris", "Lyon"],
                              1.2, "confirmed"),
                          Tag("neuron", 5, "city", "country", "Japan", f1=0.4)])
        store.write_semantics([Semantics("feature", 3, 0.91, "monosemantic", ["French cities"]),
                               Semantics("feature", 63, None, "dead")])
        store.write_probes([Probe("feature", "city", "country", "logistic", 0.93, 0.2, 400, 100, {"C": 1.0})])
        store.write_explanations([Explanation("feature", 3, "French city names", 0.8, "labeler")])
        u = store.feature(3)
        assert u.tags[0].entities == ["Paris", "Lyon"] and u.tags[0].causal_status == "confirmed"
        assert u.semantics == Semantics("feature", 3, 0.91, "monosemantic", ["French cities"])
        assert u.explanation == "French city names" and u.explanations[0].source == "labeler"
        assert [t.value for t in store.find_tags(entity_type="city")] == ["France", "Japan"]  # best f1 first
        assert store.find_tags(min_f1=0.5, kind="feature")[0].index == 3
        assert store.probes("city")[0].details == {"C": 1.0}
        assert [h.index for h in store.search(UnitQuery("France"))] == [3]
        assert [h.index for h in store.search(UnitQuery("french"))] == [3]  # explanations, case-insensitive
        assert [h.index for h in store.search(UnitQuery(semantic_class="monosemantic"))] == [3]
        assert [h.index for h in store.search(UnitQuery(tagged=True))] == [3]
        assert [h.index for h in store.search(UnitQuery(tag=("city", "country", "France")))] == [3]
        assert [h.index for h in store.search(UnitQuery(kind="neuron", tag=(None, None, "Japan")))] == [5]
        assert store.top("f1", limit=1)[0].index == 3
        store.write_semantics([Semantics("feature", 3, 0.2, "polysemantic")])  # replaces the unit's row
        assert store.semantics_for("feature", 3).cls == "polysemantic"
        with pytest.raises(SaekitError, match="rejected"):
            store.write_semantics([Semantics("feature", 4, 0.5, "bilingual")])
        with pytest.raises(SaekitError, match=r"feature index 99 is out of range: this store has features 0\.\.63"):
            store.write_tags([Tag("feature", 99, "city", "country", "France")])
    with FeatureStore.open(db) as store, pytest.raises(SaekitError, match="writable=True"):
        store.write_tags([Tag("feature", 1, "city", "country", "Peru")])


def test_unknown_or_older_schema_versions_are_refused(db, tmp_path):
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA user_version = 1")  # before the on thresholds: neurons counted with "> 0"
    with pytest.raises(SaekitError, match=f"schema version 1, older than the version {SCHEMA_VERSION}.*saekit analyze "
                                          "--config <your config> --overwrite"):
        FeatureStore.open(db)
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(SaekitError, match="schema version 99, newer.*upgrade saekit"):
        FeatureStore.open(db)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(SaekitError, match="not a saekit feature store"):
        FeatureStore.open(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE meta (key TEXT, value TEXT)").connection.commit()
    with pytest.raises(SaekitError, match="not a saekit feature store"):
        FeatureStore.open(other)
    with pytest.raises(SaekitError, match="no feature store at .*saekit analyze"):
        FeatureStore.open(tmp_path / "missing.db")
    with pytest.raises(SaekitError, match="is a folder; pass the path of the feature store file inside it"):
        FeatureStore.open(tmp_path)


def test_rebuild_keeps_labels_only_for_the_same_sae(built, tmp_path):
    _, analysis, meta = built
    path = tmp_path / "features.db"
    write_analysis(path, analysis, vocab=VOCAB, meta=meta)
    with FeatureStore.open(path, writable=True) as store:
        store.write_tags([Tag("feature", 1, "animal", "class", "mammal", f1=0.7)])
    write_analysis(path, analysis, vocab=VOCAB, meta=meta)
    with FeatureStore.open(path) as store:
        assert [t.value for t in store.tags_for("feature", 1)] == ["mammal"]
        assert store.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    write_analysis(path, analysis, vocab=VOCAB, meta={**meta, "sae_sha256": "another SAE"})
    with FeatureStore.open(path) as store:
        assert store.tags_for("feature", 1) == []


def test_parquet_and_neuronpedia_exports(built, tmp_path):
    folder, analysis, _ = built
    files = export_parquet(store_in(folder), tmp_path / "pq")
    tables = {f.stem: pq.read_table(f) for f in files}
    assert tables["units"].num_rows == 128
    ex = tables["examples"].to_pylist()
    top0 = [e for e in ex if e["kind"] == "feature" and e["index"] == 0 and e["group"] == "top"]
    assert [e["seq"] for e in top0] == [s for s in analysis.kinds["feature"].top["seq"][0].tolist() if s >= 0]
    assert all(len(e["tokens"]) == len(e["acts"]) == len(e["token_ids"]) for e in ex)
    assert {"logits", "related", "intervals", "tags", "meta"} <= set(tables)

    batches = export_neuronpedia(store_in(folder), tmp_path / "np")
    feats = [f for b in batches for f in json.loads(b.read_text())["features"]]
    assert len(feats) == 64 and json.loads(batches[0].read_text())["layer"] == 1
    f = feats[0]
    for key in ("pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero", "freq_hist_data_bar_heights",
                "logits_hist_data_bar_heights", "correlated_neurons_indices", "explanations"):
        assert key in f
    bins = [a for a in f["activations"] if a["bin_min"] != -1]
    assert bins and all({"bin_min", "bin_max", "bin_contains", "tokens", "values"} <= set(a) for a in bins)
    assert all(0 < a["bin_contains"] <= 1 and a["bin_min"] < a["bin_max"] for a in bins)
    neurons = export_neuronpedia(store_in(folder), tmp_path / "npn", kind="neuron", batch_size=50)
    assert len(neurons) == 2


def test_bundle_loads_with_sae_lens_and_plain_sqlite(built, tmp_path):
    from sae_lens import SAE

    folder, _, _ = built
    out = export_bundle(folder, store_in(folder), tmp_path / "bundle")
    readme = json.loads((out / "README.json").read_text())
    assert readme["features_db"]["schema_version"] == SCHEMA_VERSION and "units" in readme["features_db"]["tables"]
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.d_sae == 64 and sae.cfg.metadata.hook_name == HOOK
    con = sqlite3.connect(f"file:{out / 'features.db'}?mode=ro", uri=True)
    rows = con.execute(readme["features_db"]["example_query"]).fetchall()
    assert rows and rows[0][2] >= rows[-1][2]
    layout = json.loads(con.execute("SELECT value FROM meta WHERE key = 'example_layout'").fetchone()[0])
    top = json.loads(con.execute("SELECT top_examples FROM unit_details WHERE kind = 'feature' AND idx = 0")
                     .fetchone()[0])
    assert layout == ["seq", "pos", "value", "start", "acts"] and len(top[0]) == 5
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
    con.close()
    with pytest.raises(SaekitError, match="already exists"):
        export_bundle(folder, store_in(folder), out)
    export_bundle(folder, store_in(folder), out, overwrite=True)
    assert FeatureStore.open(out / "features.db").feature(2).index == 2


def test_cli_analyze_and_export(tmp_path, tiny_llama_dir, capsys):
    from features.cli import main

    config = {"name": "cli", "runs_dir": str(tmp_path / "runs"),
              "model": {"name": str(tiny_llama_dir), "device": "cpu"},
              "corpus": {"max_sequences": 30, "context_size": 32},
              "train": {"saes": [{"hook": "blocks.2.hook_mlp_out", "expansion": 2, "k": 8}]},
              "analyze": {"batch_size": 8, "top_examples": 5}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    folder = tmp_path / "runs" / "cli" / "saes" / "blocks.2.hook_mlp_out-topk-x2-k8"
    sae = build_sae(SAEShape(d_in=64, d_sae=128), TopKConfig(k=8),
                    Provenance(model_name=tiny_llama_dir.name, hook_name="blocks.2.hook_mlp_out"))
    save_sae(sae, folder, metadata={"context_size": 32, "prepend_bos": False})
    assert main(["analyze", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"feature store {folder / 'features.db'}" in out and "features: " in out and "neurons: " in out
    assert main(["analyze", "--config", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    for fmt in ("parquet", "neuronpedia", "bundle"):
        assert main(["export", "--config", str(path), "--format", fmt]) == 0
    exports = tmp_path / "runs" / "cli" / "exports"
    assert sorted(p.name for p in exports.iterdir()) == [f"{folder.name}-{f}" for f in ("bundle", "neuronpedia",
                                                                                        "parquet")]
    with FeatureStore.open(folder / "features.db") as store:
        page = store.feature(int(store.top("max_act", limit=1)[0].index))
        assert page.top_examples and all(isinstance(t, str) for t in page.top_examples[0].tokens)

    other = build_sae(SAEShape(d_in=64, d_sae=128), TopKConfig(k=8),
                      Provenance(model_name="gpt2", hook_name="blocks.2.hook_mlp_out"))
    save_sae(other, tmp_path / "foreign", metadata={"context_size": 32, "prepend_bos": False})
    assert main(["analyze", "--config", str(path), "--sae", str(tmp_path / "foreign")]) == 2
    assert "model mismatch" in capsys.readouterr().err


def test_density_note_only_when_every_unit_is_dense():
    assert "monosemanticity" in density_note({"total": 4, "live": 0, "dead": 0, "dense": 4})
    assert density_note({"total": 4, "live": 3, "dead": 0, "dense": 1}) == ""
    assert density_note({"total": 0, "live": 0, "dead": 0, "dense": 0}) == ""
