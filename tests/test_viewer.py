"""The feature browser (features/viewer, served from its APP_FILE) page by page, through Streamlit's AppTest, on
small stores built here: every page renders, searches and filters find what they should, links and buttons lead
to the right unit, and bad input (no store, a wrong file, an id out of range, a model that cannot be loaded) gives
a page that says what is wrong instead of a traceback. Live text and steering run on a tiny local Llama (marked
`real`, since its tokenizer comes from the embedded model). The browser end-to-end test is
tests/test_viewer_browser.py.
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformer_lens import HookedTransformer

from features.analyze import AnalyzeConfig, analyze, vocab_strings, write_analysis
from features.layout import store_in
from features.store import Explanation, FeatureStore, Probe, Semantics, Tag
from features.viewer import APP_FILE
from features.viewer.markup import histogram_html, tokens_html
from sae.formats import save_sae
from sae.saes import Provenance, SAEShape, TopKConfig, build_sae

REPO = Path(__file__).resolve().parent.parent
APP = str(APP_FILE)  # what `saekit view` serves
ROOT_APP = str(REPO / "app_streamlit.py")  # the thin entry for `streamlit run app_streamlit.py`
ENV = ("SAEKIT_VIEW_RUN", "SAEKIT_VIEW_STORE", "SAEKIT_VIEW_SAE", "SAEKIT_VIEW_MODEL")
SMALL = AnalyzeConfig(batch_size=8, top_examples=5, intervals=4, interval_examples=2, window_before=4,
                      window_after=2, n_logits=5, n_related=5)
TEXT = ("Paris is the capital of France and Berlin is the capital of Germany. Madrid is in Spain, Rome is in "
        "Italy, and Lisbon is the capital of Portugal. Tokyo is the capital of Japan, where people speak Japanese. "
        "Iron, copper and zinc are metals; helium and neon are noble gases. The cat sat on the mat. ")


def build_run(root: Path, model: HookedTransformer, model_ref: str, tokens: torch.Tensor, d_sae: int,
              hook: str = "blocks.1.hook_mlp_out", labels: bool = True) -> Path:
    """A run folder `root` with one SAE (random TopK) and its analysed store; with `labels`, tags, semantics,
    probes and an explanation written through the store API, as the labeler would."""
    sae_dir = root / "saes" / "tiny-topk"
    d_in = model.cfg.d_model
    sae = build_sae(SAEShape(d_in=d_in, d_sae=d_sae), TopKConfig(k=4, encoder_bf16=False),
                    Provenance(model_name=model.cfg.model_name, hook_name=hook))
    save_sae(sae, sae_dir, metadata={"context_size": tokens.shape[1], "prepend_bos": False})
    (sae_dir / "eval.json").write_text(json.dumps({"l0": 4.0, "fvu": 0.42, "ce_loss_recovered": 0.81}))
    analysis = analyze(model, sae, tokens, SMALL, progress=False)
    meta = {"sae_id": sae_dir.name, "model_name": model.cfg.model_name, "sae_sha256": "test", "fingerprint": "test",
            "sae": json.loads((sae_dir / "cfg.json").read_text()),
            "eval": json.loads((sae_dir / "eval.json").read_text()),
            "run_config": {"model": {"name": model_ref}, "corpus": {"source": "test"}}}
    write_analysis(store_in(sae_dir), analysis, vocab=vocab_strings(model), meta=meta)
    (root / "config.yaml").write_text(f"name: {root.name}\n")
    if labels:
        with FeatureStore.open(store_in(sae_dir), writable=True) as store:
            best = store.top("max_act", limit=2)
            store.write_tags([
                Tag("feature", best[0].index, "country", "continent", "Europe", 0.9, 0.6, 0.72, 0.93, 12,
                    ["France", "Germany", "Spain"], 0.41, "confirmed"),
                Tag("feature", best[1].index, "element", "block", "d", 0.5, 0.4, 0.44, 0.7, 6, ["iron", "zinc"]),
                Tag("neuron", 2, "country", "continent", "Europe", 0.3, 0.2, 0.24, 0.6, 12, ["France"])])
            store.write_semantics([Semantics(k, i, 0.2 + 0.6 * (i % 2), "monosemantic" if i % 2 else "polysemantic",
                                             [{"concept": "country.continent=Europe", "share": 0.7}])
                                   for k in ("feature", "neuron") for i in range(store.n_units(k))], replace=True)
            store.write_probes([Probe("feature", "country", "continent", "logistic", 0.83, 0.25, 100, 30),
                                Probe("neuron", "country", "continent", "logistic", 0.71, 0.25, 100, 30)])
            store.write_explanations([Explanation("feature", best[0].index, "European capitals", 0.8, "test")])
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: HookedTransformer) -> Path:
    """A labelled run on the random tiny model; its model name ('tiny') cannot be loaded, so live text is off."""
    tokens = torch.randint(0, 500, (24, 16), generator=torch.Generator().manual_seed(0))
    return build_run(tmp_path_factory.mktemp("viewer") / "tiny", tiny_model, "tiny", tokens, d_sae=64)


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: HookedTransformer) -> Path:
    """The same without the labeler's tables."""
    tokens = torch.randint(0, 500, (12, 16), generator=torch.Generator().manual_seed(1))
    return build_run(tmp_path_factory.mktemp("viewer") / "bare", tiny_model, "tiny", tokens, d_sae=48, labels=False)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A run on the tiny local Llama (SmolLM2's tokenizer, so real words) whose model live text can load."""
    from sae.models import load_model

    model = load_model(str(tiny_llama_dir))
    ids = model.tokenizer(TEXT * 6)["input_ids"]
    ctx = 24
    tokens = torch.tensor(ids[:len(ids) // ctx * ctx]).view(-1, ctx)[:16]
    return build_run(tmp_path_factory.mktemp("viewer") / "llama", model, str(tiny_llama_dir), tokens, d_sae=128)


def app(monkeypatch: pytest.MonkeyPatch, script: str = APP, **env: str) -> AppTest:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(f"SAEKIT_VIEW_{name.upper()}", str(value))
    return AppTest.from_file(script, default_timeout=120)


def open_page(at: AppTest, **params: object) -> AppTest:
    at.query_params = {k: str(v) for k, v in params.items()}
    at.run()
    assert not at.exception, at.exception[0].message if at.exception else ""
    return at


def html_of(at: AppTest) -> str:
    return "\n".join(h.value for h in at.html)


def done_tag(at: AppTest) -> str:
    found = re.search(r'class="sk-done" data-page="([^"]+)"', html_of(at))
    assert found, "the page did not reach its end"
    return found.group(1)


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "title", "subheader")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# Pages


def test_overview(monkeypatch, tiny_run):
    at = open_page(app(monkeypatch, run=tiny_run), page="overview")
    assert done_tag(at) == "overview"
    assert at.title[0].value == "Overview · tiny-topk"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["L0"] == "4.0" and metrics["FVU"] == "0.420" and metrics["CE loss recovered"] == "0.810"
    assert int(metrics["live features"].replace(",", "")) + int(metrics["dead features"]) + \
        int(metrics["dense features"]) == 64
    assert {"Firing frequency", "Monosemanticity vs frequency", "Monosemantic share: neurons vs features",
            "Probing: attributes read from units", "Best tagged units"} <= {s.value for s in at.subheader}
    share = next(c.value for c in at.caption if c.value.startswith("Monosemantic share among units"))
    assert "features " in share and "neurons " in share and "% [" in share and "median live feature" in share
    probes, tags = at.dataframe[0].value, at.dataframe[1].value
    assert list(probes["accuracy"]) == [0.83, 0.71]
    assert tags.iloc[0]["value"] == "Europe" and tags.iloc[0]["unit"].startswith("feature ")


def test_pages_without_labels_say_how_to_get_them(monkeypatch, bare_run):
    at = open_page(app(monkeypatch, run=bare_run), page="overview")
    info = texts(at)
    assert "Max activation vs frequency" in info  # the scatter falls back until scores exist
    assert info.count("saekit label --config") >= 3
    assert f"{bare_run}/config.yaml" in info
    at = open_page(at, page="feature", id=0)
    assert html_of(at).count(f"run saekit label --config {bare_run}/config.yaml to fill it") == 2


def test_feature_page(monkeypatch, tiny_run):
    with FeatureStore.open(store_in(tiny_run / "saes" / "tiny-topk")) as store:
        best = store.top("max_act", limit=1)[0].index
        unit = store.feature(best)
    at = open_page(app(monkeypatch, run=tiny_run), page="feature", id=best)
    assert done_tag(at) == f"feature-{best}"
    assert at.title[0].value == f"Feature {best}"
    page = html_of(at)
    # tokens highlighted in proportion to the activation, the value on hover
    top = unit.top_examples[0]
    assert page.count('class="sk-t sk-f"') >= len(unit.top_examples)
    assert "background: rgba(255,120,0,0.85)" in page  # the unit's maximum is fully coloured
    assert html.escape(f"{top.tokens[top.focus]!r}: {top.acts[top.focus]:.3g}", quote=True) in page
    # intervals with their shares, the histogram, logits
    assert f"{unit.intervals[-1].share:.1%} of all" in page
    assert 'class="sk-hb"' in page and "share of firings" in page
    assert "promoted" in page and "suppressed" in page
    # the labeler's tags with their scores and entities, semantics with concepts
    assert "best tag <b>country.continent=Europe (F1 0.72)</b>" in page and "European capitals" in page
    assert "<b>country</b>" not in page and "<b>country.continent</b> = Europe" in page
    assert "0.930" in page and "+0.410 (confirmed)" in page and "France, Germany, Spain" in page
    assert "country.continent=Europe" in page and 'title="share 0.7"' in page
    # related units are links to their pages, the decoder vector can be downloaded or copied
    assert re.search(r'href="\?page=feature&amp;id=\d+"', page) and re.search(r'href="\?page=neuron&amp;id=\d+"', page)
    labels = [b.label for b in at.get("download_button")]
    assert "Decoder vector (JSON)" in labels and "Neuronpedia JSON" in labels
    assert "32 weights, norm 1.0000, written at `blocks.1.hook_mlp_out`" in texts(at)


def test_neuron_page_and_compare(monkeypatch, tiny_run):
    at = open_page(app(monkeypatch, run=tiny_run), page="neuron", id=2)
    assert done_tag(at) == "neuron-2" and at.title[0].value == "Neuron 2"
    assert "blocks.1.mlp.hook_post" in html_of(at)
    assert "Most correlated features" in html_of(at)
    at.button(key="u_cmp").click().run()
    assert done_tag(at) == "compare-neuron-2"
    assert at.query_params["page"] == "compare"
    assert at.title[0].value == "Neuron 2 beside the features that explain it"
    cards = re.findall(r'<b>Feature (\d+)</b>', html_of(at))
    assert 1 <= len(cards) <= 6
    at = open_page(at, page="compare", kind="feature", id=3)
    assert at.title[0].value == "Feature 3 beside the neurons it is spread over"
    assert re.findall(r'<b>Neuron (\d+)</b>', html_of(at))


def test_list_search_filter_sort_and_paging(monkeypatch, tiny_run):
    at = open_page(app(monkeypatch, run=tiny_run), page="list")
    assert done_tag(at) == "list"
    df = at.dataframe[0].value
    assert len(df) == 50 and list(df["max act"]) == sorted(df["max act"], reverse=True)
    assert "**64** features match · page 1 of 2" in texts(at)
    # the second page holds the rest
    at.number_input(key="ls_page_2").set_value(2).run()
    assert len(at.dataframe[0].value) == 14 and at.query_params["p"] == "2"
    # search by a tag value finds the tagged feature, and the tag filter finds the same
    at = open_page(at, page="list", q="Europe")
    hits = at.dataframe[0].value
    assert len(hits) == 1 and hits.iloc[0]["best tag"].startswith("country.continent=Europe")
    at = open_page(app(monkeypatch, run=tiny_run), page="list", etype="country", attr="continent")
    assert list(at.dataframe[0].value["id"]) == list(hits["id"])
    # by class and by frequency, sorted by index ascending
    at = open_page(app(monkeypatch, run=tiny_run), page="list", cls="monosemantic", sort="idx", desc="0")
    ids = list(at.dataframe[0].value["id"])
    assert ids == sorted(ids) and all(i % 2 for i in ids)
    at = open_page(app(monkeypatch, run=tiny_run), page="list", fmin="0.1")
    assert all(f >= 0.1 for f in at.dataframe[0].value["freq"])
    # neurons too; a search for an index finds it
    at = open_page(app(monkeypatch, run=tiny_run), page="list", kind="neuron", q="7")
    assert 7 in list(at.dataframe[0].value["id"])
    at = open_page(app(monkeypatch, run=tiny_run), page="list", q="no such token anywhere")
    assert "Nothing matches" in texts(at)


def test_navigation_buttons_and_open_form(monkeypatch, tiny_run):
    at = open_page(app(monkeypatch, ROOT_APP, run=tiny_run), page="feature", id=5)  # through the thin entry
    at.button(key="u_next").click().run()
    assert at.query_params["id"] == "6" and done_tag(at) == "feature-6"
    at.button(key="u_prev").click().run()
    assert done_tag(at) == "feature-5"
    at.selectbox(key="open_kind").set_value("neuron")
    at.number_input(key="open_id").set_value(9)
    at.sidebar.button[0].click().run()
    assert done_tag(at) == "neuron-9" and at.query_params["page"] == "neuron"
    at.sidebar.radio[0].set_value("overview").run()
    assert done_tag(at) == "overview" and at.query_params["page"] == "overview"


@pytest.mark.parametrize("bad", ["100000", "-1", "abc"])
def test_feature_id_out_of_range_shows_message_and_list(monkeypatch, tiny_run, bad):
    at = open_page(app(monkeypatch, run=tiny_run), page="feature", id=bad)
    assert done_tag(at) == "list"
    warning = at.warning[0].value
    assert "0 to 63" in warning and (bad in warning)
    assert len(at.dataframe[0].value) > 0


def test_missing_store_in(monkeypatch, tmp_path):
    at = open_page(app(monkeypatch, store=tmp_path / "nowhere" / "features.db"))
    assert done_tag(at) == "missing"
    msg = at.error[0].value
    assert "There is no feature store at" in msg and "nowhere/features.db" in msg and "saekit analyze" in msg


def test_missing_run_and_run_without_store(monkeypatch, tmp_path, tiny_run):
    at = open_page(app(monkeypatch, run=tmp_path / "no-run"))
    assert "does not exist" in at.error[0].value and "saekit run" in at.error[0].value
    run = tmp_path / "half"
    (run / "saes" / "x").mkdir(parents=True)
    for name in ("cfg.json", "sae_weights.safetensors"):
        (run / "saes" / "x" / name).write_bytes((tiny_run / "saes" / "tiny-topk" / name).read_bytes())
    (run / "config.yaml").write_text("name: half\n")
    at = open_page(app(monkeypatch, run=run), page="feature", id=1)
    msg = at.error[0].value
    assert "has no feature store yet" in msg and f"saekit analyze --config {run}/config.yaml --sae x" in msg
    at = open_page(app(monkeypatch))
    assert "saekit view --run runs/<name>" in at.error[0].value


def test_wrong_store_file(monkeypatch, tmp_path):
    not_db = tmp_path / "features.db"
    not_db.write_text("hello")
    at = open_page(app(monkeypatch, store=not_db))
    assert "not a saekit feature store" in at.error[0].value
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE meta (key TEXT, value TEXT)").connection.commit()
    at = open_page(app(monkeypatch, store=other))
    assert "not a saekit feature store" in at.error[0].value and "saekit analyze" in at.error[0].value


def test_live_text_off_when_the_model_cannot_load(monkeypatch, tiny_run):
    at = open_page(app(monkeypatch, run=tiny_run), page="live")
    assert "Live text is off" in at.warning[0].value and "cannot load model 'tiny'" in at.warning[0].value
    at = open_page(at, page="steer")
    assert "Live text is off" in at.warning[0].value
    at = open_page(at, page="feature", id=3)  # browsing still works in the same session
    assert done_tag(at) == "feature-3"
    at = open_page(app(monkeypatch, store=tiny_run / "saes" / "tiny-topk" / "features.db", sae=tiny_run / "nowhere"),
                   page="live")
    assert "Live text is off" in at.warning[0].value


def test_export_page(monkeypatch, tiny_run):
    at = open_page(app(monkeypatch, run=tiny_run), page="export")
    assert done_tag(at) == "export"
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download bundle (.zip)", "features (CSV)", "features (Parquet)", "neurons (CSV)",
                      "neurons (Parquet)", "Download Neuronpedia JSON (.zip)"]


def test_export_data(tiny_run, tmp_path):
    """What the export buttons hand out: a zip of the bundle, the table, Neuronpedia batches."""
    import io

    import pandas as pd

    from features import export
    from features.viewer import export_page  # importable without a running Streamlit server

    sae_dir = tiny_run / "saes" / "tiny-topk"
    data = export_page.zip_folder(lambda out: export.export_bundle(sae_dir, store_in(sae_dir), out), "tiny-topk")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert {"tiny-topk/cfg.json", "tiny-topk/sae_weights.safetensors", "tiny-topk/features.db",
            "tiny-topk/README.json"} <= set(names)
    with FeatureStore.open(store_in(sae_dir)) as store:
        df = pd.DataFrame(store.unit_table("feature"))
    assert len(df) == 64 and {"idx", "freq", "semantic_class", "best_f1"} <= set(df.columns)
    assert pd.read_parquet(io.BytesIO(export_page.parquet_bytes(df)))["idx"].tolist() == list(range(64))


def test_view_command(monkeypatch, tiny_run):
    """`saekit view` serves the viewer's APP_FILE with the run, localhost only, no file watcher."""
    import subprocess

    from features import cli

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["view", "--run", str(tiny_run), "--port", "8765"]) == 0
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == APP
    assert cmd[cmd.index("--server.port") + 1] == "8765" and cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--") + 1:] == ["--run", str(tiny_run), "--device", "cpu"]


@pytest.mark.parametrize("script", [APP, ROOT_APP])
def test_command_line_arguments(monkeypatch, tiny_run, script):
    """`streamlit run <script> -- --store S --sae X --device D` (how `saekit view` passes them) reaches the
    viewer, through APP_FILE and through the thin entry at the repository root."""
    sae_dir = tiny_run / "saes" / "tiny-topk"
    at = app(monkeypatch, script)  # no SAEKIT_VIEW_* variables: only the arguments say what to browse
    monkeypatch.setattr(sys, "argv", [script, "--store", str(store_in(sae_dir)), "--sae", str(sae_dir),
                                      "--device", "cpu"])
    at = open_page(at, page="overview")
    assert done_tag(at) == "overview" and at.title[0].value == "Overview · tiny-topk"


def test_app_file_without_streamlit():
    """The CLI reads APP_FILE from `features.viewer` without loading Streamlit."""
    import subprocess

    code = ("import sys; from features.viewer import APP_FILE; assert APP_FILE.is_file(), APP_FILE; "
            "assert 'streamlit' not in sys.modules; print(APP_FILE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == APP


def test_html_pieces():
    line = tokens_html([" Paris", "\n", "<b>"], [2.0, 0.0, -1.0], 2.0, focus=0)
    assert 'title="&#x27; Paris&#x27;: 2">Paris</span>' in line and "background: rgba(255,120,0,0.85)" in line
    assert '"sk-ex"> <span class="sk-t sk-f" style="background: rgba(255,120,0,0.85);"' in line  # space outside
    assert "⏎" in line and "&lt;b&gt;" in line and "rgba(40,110,255,0.42)" in line
    hist = histogram_html([0.0, 0.1, 0.2, float("inf")], [1, 3, 0])
    assert hist.count('class="sk-hb"') == 2 and "75.00% of all" in hist


# ---------------------------------------------------------------------------------------------
# Live text and steering (a model that loads)


@pytest.mark.real
def test_live_text_and_steering(monkeypatch, llama_run):
    at = open_page(app(monkeypatch, run=llama_run), page="live")
    assert done_tag(at) == "live" and not at.warning
    at.text_area(key="live_text_input").input("The capital of France is Paris. " * 3)
    at.main.button[0].click().run()
    assert not at.exception
    page = html_of(at)
    assert "Strongest feature per token" in texts(at)
    assert page.count('class="sk-t') >= 12 and "Paris" in page
    strongest = at.dataframe[0].value
    assert len(strongest) > 0 and strongest["max act"].is_monotonic_decreasing
    # a long text is cut, with a notice
    at.text_area(key="live_text_input").input("word " * 400)
    at.main.button[0].click().run()
    assert "cut to its first 256 tokens" in at.info[0].value
    # steering: two greedy continuations, with and without the feature
    at = open_page(at, page="steer", id=int(strongest.iloc[0]["feature"]))
    at.main.button[0].click().run()
    assert "Without steering" in texts(at) and "With feature" in texts(at)


@pytest.mark.real
def test_live_model_directly(llama_run, tiny_llama_dir):
    from features.viewer.live import load_live

    live = load_live(llama_run / "saes" / "tiny-topk", str(tiny_llama_dir))
    res = live.run("Paris is the capital of France.")
    assert res.tokens and len(res.tokens) == len(res.token_ids) and res.cut == 0
    f, v = res.top(0, 1)[0]
    assert res.of_feature(f)[0] == pytest.approx(v)
    assert [s[0] for s in res.strongest(3)][0] in set(res.feature.tolist())
    plain = live.generate("The capital of France is", 8)
    assert plain == live.generate("The capital of France is", 8)  # greedy: deterministic
    assert live.generate("The capital of France is", 8, feature=f, strength=500.0) != plain
    assert live.run("x" * 2000, limit=10).cut > 0


def test_bench_script_measures_pages(monkeypatch, tiny_run):
    """scripts/bench_viewer.py's server-side part runs on any store (here the tiny one, one run per page)."""
    import importlib.util

    for name in ENV:  # the script sets SAEKIT_VIEW_STORE; setenv records the old state, so it is restored
        monkeypatch.setenv(name, "")

    spec = importlib.util.spec_from_file_location("bench_viewer", REPO / "scripts" / "bench_viewer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    script, apptest = bench.server_side(store_in(tiny_run / "saes" / "tiny-topk"), [3, 4], 1)
    assert set(script) == {"overview", "overview_cold", "feature_page", "feature_page_cold", "filtered_list",
                           "filtered_list_cold"} == set(apptest)
    assert all(0 < script[k] <= apptest[k] for k in script)
