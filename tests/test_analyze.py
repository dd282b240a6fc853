"""The analysis pass against brute force on the tiny model: statistics, top contexts and their windows, interval
samples, co-firing, correlations, logit effects, neighbours; the cache source; refusals; SIGKILL safety."""

import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from features.analyze import (
    HIST_BINS,
    AnalyzeConfig,
    IntervalSampler,
    Reservoirs,
    analyze,
    hist_edges,
    run_analysis,
)
from features.layout import RunLayout
from features.store import FeatureStore
from sae.cache import write_cache
from sae.corpus import token_fingerprint
from sae.errors import SaekitError
from sae.formats import save_sae
from sae.hooks import check_fit, neuron_hook, run_to
from sae.saes import Provenance, SAEShape, TopKConfig, build_sae

HOOK, POST = "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_post"
CFG = AnalyzeConfig(batch_size=5, top_examples=4, intervals=4, interval_examples=3, window_before=3, window_after=2,
                    n_logits=5, n_related=3)


def tiny_sae(d_in: int = 32, d_sae: int = 64, k: int = 4, hook: str = HOOK, model_name: str = "tiny", seed: int = 0):
    sae = build_sae(SAEShape(d_in=d_in, d_sae=d_sae), TopKConfig(k=k, encoder_bf16=False),
                    Provenance(model_name=model_name, hook_name=hook), seed=seed)
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    return sae


def tokens(n: int = 23, ctx: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 500, (n, ctx), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def case(tiny_model):
    """One analysis (23 sequences: the last batch is partial) and the brute-force activations it must match."""
    sae, toks = tiny_sae(), tokens()
    result = analyze(tiny_model, sae, toks, CFG, progress=False)
    with torch.no_grad():
        cache = run_to(tiny_model, toks, [HOOK, POST])
        feats = sae.encode(cache[HOOK].reshape(-1, 32))
    dense = {"feature": feats, "neuron": cache[POST].reshape(-1, 64)}
    return result, dense, sae, toks


@pytest.mark.parametrize("kind", ["feature", "neuron"])
def test_statistics_match_brute_force(case, kind):
    result, dense, _, toks = case
    acts, res = dense[kind], result.kinds[kind]
    fires = acts > res.threshold
    assert torch.equal(res.n_fires, fires.sum(0))
    assert torch.allclose(res.max_act, torch.where(fires, acts, 0).max(0).values, atol=1e-5)
    assert torch.allclose(res.sum_act, (acts * fires).sum(0).double(), rtol=1e-4, atol=1e-4)
    edges = torch.tensor(hist_edges()[1:-1])
    for u in range(0, acts.shape[1], 7):
        vals = acts[fires[:, u], u]
        expected = torch.bincount(torch.bucketize(vals, edges, right=True), minlength=HIST_BINS)
        assert torch.equal(res.hist[u], expected), u
    assert result.n_tokens == toks.numel() and (res.n_fires > 0).sum() > acts.shape[1] // 2


def test_one_on_rule_for_features_and_neurons(case, tiny_model, monkeypatch):
    """Features are on above 0; each neuron above its own quantile at the features' median firing rate, set on the
    first CALIBRATION_TOKENS tokens: here all 368 (every neuron on for the same count), then only the first
    batch's 80 (the rest of the pass counts with those thresholds)."""
    import features.analyze.analysis as A

    result, dense, sae, toks = case
    assert torch.equal(result.kinds["feature"].threshold, torch.zeros(64))
    f_fires = (dense["feature"] > 0).sum(0)
    rate = float((f_fires[f_fires > 0].double() / toks.numel()).median())
    assert result.settings["on_rule"]["neuron_rate"] == pytest.approx(rate)
    neurons = result.kinds["neuron"]
    m = round(rate * toks.numel())
    assert torch.equal(neurons.n_fires, torch.full((64,), m))  # the quantile of all the tokens analysed
    assert 0 < m < toks.numel() // 10 and bool((neurons.threshold > 0).all())
    monkeypatch.setattr(A, "CALIBRATION_TOKENS", 80)
    part = analyze(tiny_model, sae, toks, CFG, progress=False)
    first = dense["neuron"][:80]
    f_first = (dense["feature"][:80] > 0).sum(0)
    rate = float((f_first[f_first > 0].double() / 80).median())
    want = first.topk(max(1, round(rate * 80)) + 1, dim=0).values[-1].clamp_min(0)
    got = part.kinds["neuron"].threshold
    assert torch.allclose(got, want) and part.settings["on_rule"]["calibration_tokens"] == 80
    assert torch.equal(part.kinds["neuron"].n_fires, (dense["neuron"] > got).sum(0))
    assert torch.equal(part.kinds["feature"].n_fires, result.kinds["feature"].n_fires)


@pytest.mark.parametrize("kind", ["feature", "neuron"])
def test_top_examples_are_per_sequence_maxima_with_exact_windows(case, kind):
    result, dense, _, toks = case
    n_seq, ctx = toks.shape
    acts = dense[kind].view(n_seq, ctx, -1)
    res = result.kinds[kind]
    best, arg = acts.max(dim=1)  # [n_seq, U]
    for u in range(0, acts.shape[2], 5):
        order = best[:, u].argsort(descending=True)
        expected = [s for s in order.tolist() if best[s, u] > res.threshold[u]][:CFG.top_examples]
        got = [s for s in res.top["seq"][u].tolist() if s >= 0]
        assert sorted(best[got, u].tolist(), reverse=True) == pytest.approx(best[expected, u].tolist(), abs=1e-6)
        for slot, s in enumerate(got):
            p = int(res.top["pos"][u, slot])
            assert p == int(arg[s, u]) and float(res.top["value"][u, slot]) == pytest.approx(float(best[s, u]))
            window = res.top["window"][u, slot].float()
            for j, q in enumerate(range(p - CFG.window_before, p + CFG.window_after + 1)):
                if 0 <= q < ctx:
                    assert float(window[j]) == pytest.approx(float(acts[s, q, u]), rel=2e-3, abs=2e-3)
                else:
                    assert math.isnan(float(window[j]))


@pytest.mark.parametrize("kind", ["feature", "neuron"])
def test_interval_counts_and_samples(case, kind):
    result, dense, _, toks = case
    acts, res = dense[kind], result.kinds[kind]
    n_int = CFG.intervals
    for u in range(acts.shape[1]):
        base = float(res.threshold[u])
        vals = acts[acts[:, u] > base, u]
        if len(vals) == 0:
            assert res.interval_counts[u].sum() == 0
            continue
        w = float(res.interval_width[u])
        assert n_int * w / 2 < float(vals.max()) - base <= n_int * w  # the top populated interval holds the max
        expected = torch.bincount(((vals - base) / w).floor().long().clamp(max=n_int - 1), minlength=n_int)
        assert torch.equal(res.interval_counts[u], expected)
        for j in range(n_int):
            seqs = res.intervals["seq"][u, j]
            taken = seqs >= 0
            assert int(taken.sum()) == min(CFG.interval_examples, int(expected[j]))
            for s, p, v in zip(seqs[taken], res.intervals["pos"][u, j][taken], res.intervals["value"][u, j][taken],
                               strict=True):
                assert j * w <= float(v) - base < (j + 1) * w or (j == n_int - 1 and float(v) - base <= n_int * w)
                assert float(v) == pytest.approx(float(acts[int(s) * toks.shape[1] + int(p), u]))


def test_reservoir_merges_are_exact():
    """Offering a stream batch by batch keeps exactly the bottom-k of everything offered, per group."""
    gen = torch.Generator().manual_seed(0)
    res = Reservoirs(groups=7, size=3, window=2)
    groups, keys = torch.randint(0, 7, (400,), generator=gen), torch.rand(400, generator=gen)
    for lo in range(0, 400, 37):
        g, k = groups[lo:lo + 37], keys[lo:lo + 37]

        def fill(i, lo=lo):
            return {"seq": lo + i, "pos": i, "value": keys[lo + i], "window": torch.zeros(len(i), 2)}

        res.offer(g, k, fill)
    for g in range(7):
        expected = keys[groups == g].sort().values[:3]
        assert torch.equal(res.data["key"][g].sort().values, expected)
        assert torch.equal(keys[res.data["seq"][g].long()].sort().values, expected)  # payload moved with keys


def test_interval_doubling_equals_sampling_the_final_intervals():
    """Merging intervals when the max grows gives the bottom-k sample of each final interval, as if its width
    had been known from the start."""
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(600, generator=gen) * torch.linspace(0.01, 9.0, 600)  # the max keeps growing
    keys = torch.rand(600, generator=gen)
    sampler = IntervalSampler(n_units=1, n_intervals=4, size=3, window=1, cofire=0)
    unit = torch.zeros(600, dtype=torch.int64)
    for lo in range(0, 600, 50):
        v, k = values[lo:lo + 50], keys[lo:lo + 50]
        sampler.widen(values[:lo + 50].max().view(1))
        g = sampler.bins(unit[:50][:len(v)], v)
        sampler.counts += torch.bincount(g, minlength=4)

        def fill(i, lo=lo):
            return {"seq": lo + i, "pos": i, "value": values[lo + i], "window": torch.zeros(len(i), 1)}

        sampler.samples.offer(g, k, fill)
    w = float(sampler.width[0])
    final = (values / w).floor().long().clamp(max=3)
    assert torch.equal(sampler.counts, torch.bincount(final, minlength=4))
    for j in range(4):
        expected = keys[final == j].sort().values[:3]
        assert torch.equal(sampler.samples.data["key"][j].sort().values[:len(expected)], expected)


def test_cofiring_is_exact_when_every_firing_is_sampled(tiny_model):
    sae, toks = tiny_sae(), tokens(n=6)
    cfg = AnalyzeConfig(batch_size=4, intervals=2, interval_examples=100, n_related=3, neurons=False)
    res = analyze(tiny_model, sae, toks, cfg, progress=False).kinds["feature"]
    with torch.no_grad():
        cache = run_to(tiny_model, toks, [HOOK])
        fires = (sae.encode(cache[HOOK].reshape(-1, 32)) > 0).float()
    both = fires.t() @ fires  # k=4 of 64 fire per token, all within the 32 tracked per token
    for u in range(64):
        if fires[:, u].sum() == 0:
            continue
        share = both[u] / fires[:, u].sum()
        share[u] = -1
        ids, got = res.cofiring[0][u], res.cofiring[1][u]
        assert got.tolist() == pytest.approx(share.sort(descending=True).values[:3].tolist(), abs=1e-5)
        assert torch.allclose(share[ids], got, atol=1e-5)


def test_correlations_logits_and_neighbours_match_brute_force(case, tiny_model):
    result, dense, sae, _ = case
    f, n = dense["feature"].double(), dense["neuron"].double()
    r = torch.corrcoef(torch.cat([f, n], dim=1).t())[:64, 64:]
    r = torch.where(torch.isfinite(r), r, -math.inf)
    feats = result.kinds["feature"]
    ids, vals = feats.correlated
    for u in range(64):
        if f[:, u].std() > 0:
            assert vals[u].tolist() == pytest.approx(r[u].topk(3).values.tolist(), abs=1e-4)
    neuron_ids, neuron_vals = result.kinds["neuron"].correlated
    assert neuron_vals[:, 0].tolist() == pytest.approx(r.max(dim=0).values.tolist(), abs=1e-4)

    effect = (sae.W_dec.detach() * tiny_model.ln_final.w.detach()) @ tiny_model.W_U.detach()
    assert torch.equal(feats.logits["pos_ids"], effect.topk(5, dim=1).indices)
    assert torch.allclose(feats.logits["neg_values"], effect.topk(5, dim=1, largest=False).values, atol=1e-5)
    assert torch.equal(feats.logits["hist"].sum(1), torch.full((64,), 500))

    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = unit @ unit.t()
    cos.fill_diagonal_(-2)
    assert torch.allclose(feats.neighbours[1], cos.topk(3, dim=1).values, atol=1e-5)
    W_out = tiny_model.blocks[1].mlp.W_out.detach()
    neuron_effect = (W_out * tiny_model.ln_final.w.detach()) @ tiny_model.W_U.detach()
    assert torch.equal(result.kinds["neuron"].logits["pos_ids"], neuron_effect.topk(5, dim=1).indices)


def test_non_topk_sae_and_mlp_post_sae(tiny_model):
    """A JumpReLU SAE goes through the dense path; an SAE on mlp.hook_post gets logits through W_out."""
    sae = build_sae(SAEShape(d_in=64, d_sae=96), "jumprelu", Provenance(model_name="tiny", hook_name=POST))
    toks = tokens(n=7)
    res = analyze(tiny_model, sae, toks, CFG, progress=False)
    with torch.no_grad():
        cache = run_to(tiny_model, toks, [POST])
        acts = sae.encode(cache[POST].reshape(-1, 64))
    assert torch.equal(res.kinds["feature"].n_fires, (acts > 0).sum(0))
    effect = (sae.W_dec.detach() @ tiny_model.blocks[1].mlp.W_out.detach() * tiny_model.ln_final.w.detach()) \
        @ tiny_model.W_U.detach()
    assert torch.equal(res.kinds["feature"].logits["pos_ids"], effect.topk(5, dim=1).indices)


def test_model_and_width_mismatches_are_refused(tiny_model):
    with pytest.raises(SaekitError, match="model mismatch.*'gpt2'.*'tiny'"):
        check_fit(tiny_model, tiny_sae(model_name="gpt2"))
    with pytest.raises(SaekitError, match="width mismatch.*48.*blocks.1.hook_mlp_out.*32"):
        check_fit(tiny_model, tiny_sae(d_in=48))
    with pytest.raises(SaekitError, match="layer 7 is out of range"):
        check_fit(tiny_model, tiny_sae(hook="blocks.7.hook_mlp_out"))
    assert check_fit(tiny_model, tiny_sae()) is None and neuron_hook(HOOK) == POST


def run_setup(tmp_path, **analyze_overrides):
    """A run directory holding a saved tiny SAE and its token splits, as the pipeline leaves them."""
    cfg = AnalyzeConfig(batch_size=4, sequences=12, top_examples=4, intervals=4, interval_examples=3,
                        **analyze_overrides)
    layout = RunLayout(tmp_path / "runs" / "an")
    save_sae(tiny_sae(), layout.sae("tiny-sae"), metadata={"context_size": 16, "prepend_bos": False})
    splits = {"train": tokens(n=20, seed=1), "held_out": tokens(n=5, seed=2)}
    return cfg, layout, splits


def analyse(model, cfg, layout, splits, **kwargs):
    """run_analysis on the run's SAE, with the paths the pipeline takes from the run layout."""
    return run_analysis(model, layout.sae("tiny-sae"), layout.store("tiny-sae"), splits, cfg,
                        cache_dir=layout.cache_dir, progress=False, **kwargs)


def test_cache_source_gives_the_same_store(tmp_path, tiny_model):
    cfg, layout, splits = run_setup(tmp_path, split="train", source="cache")
    write_cache(tiny_model, splits["train"], [HOOK, POST], layout.cache_dir, progress=False,
                corpus_fingerprint=token_fingerprint(splits["train"]), shard_sequences=6)
    path, built = analyse(tiny_model, cfg, layout, splits)
    with FeatureStore.open(path) as store:
        assert store.meta["analysis"]["source"] == "cache"
        from_cache = [store.feature(i) for i in range(0, 64, 9)]
    cfg.source = "model"
    analyse(tiny_model, cfg, layout, splits, overwrite=True)
    with FeatureStore.open(path) as store:
        assert store.meta["analysis"]["source"] == "model"
        from_model = [store.feature(i) for i in range(0, 64, 9)]
    for a, b in zip(from_cache, from_model, strict=True):
        assert (a.n_fires, [e.seq for e in a.top_examples]) == (b.n_fires, [e.seq for e in b.top_examples])
        assert a.max_act == pytest.approx(b.max_act, rel=1e-5)

    cfg.split, cfg.source = "held_out+train", "cache"
    with pytest.raises(SaekitError, match="held-out"):
        analyse(tiny_model, cfg, layout, splits)


def test_cache_source_auto_falls_back_to_the_model(tmp_path, tiny_model):
    cfg, layout, splits = run_setup(tmp_path, split="train", source="auto")
    path, built = analyse(tiny_model, cfg, layout, splits)  # no cache was written
    with FeatureStore.open(path) as store:
        assert built and store.meta["analysis"]["source"] == "model"
    cfg.source = "cache"
    with pytest.raises(SaekitError, match="analyze.source is 'cache' but the cache has no blocks.1.hook_mlp_out"):
        analyse(tiny_model, cfg, layout, splits, overwrite=True)


def test_up_to_date_store_is_skipped(tmp_path, tiny_model):
    cfg, layout, splits = run_setup(tmp_path, neurons=False)
    path, built = analyse(tiny_model, cfg, layout, splits, meta={"eval": None})
    assert built and path == layout.store("tiny-sae")
    # evaluated after the analysis: refreshed, not rebuilt
    assert analyse(tiny_model, cfg, layout, splits, meta={"eval": {"l0": 4.0}}) == (path, False)
    with FeatureStore.open(path) as store:
        assert store.summary()["eval"] == {"l0": 4.0}
    cfg.top_examples = 5  # another setting: rebuilt
    assert analyse(tiny_model, cfg, layout, splits)[1]


KILL_SCRIPT = """
import sys, time, torch
from pathlib import Path
from transformer_lens import HookedTransformer, HookedTransformerConfig
import features.analyze as A
import features.store.writer as W
from features.layout import RunLayout
torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=500, n_ctx=64,
    act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
    model_name="tiny", default_prepend_bos=False)
model = HookedTransformer(cfg).eval()
where = sys.argv[2]
def stall(*args, **kwargs):
    print("STALLED", flush=True)
    time.sleep(600)
if where == "pass":
    A.UnitAccumulator.update = stall
elif where == "write":
    W._unit_rows = stall
layout = RunLayout(Path(sys.argv[1]) / "an")
splits = {{"train": torch.randint(0, 500, (20, 16)), "held_out": torch.randint(0, 500, (5, 16))}}
A.run_analysis(model, layout.sae("tiny-sae"), layout.store("tiny-sae"), splits,
               A.AnalyzeConfig(batch_size=4, sequences=12), overwrite=True, progress=False)
"""


def run_and_kill(tmp_path, where):
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format()))
    cmd = [sys.executable, str(script), str(tmp_path / "runs"), where]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STALLED", line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sigkill_never_leaves_a_half_written_store(tmp_path, tiny_model):
    cfg, layout, splits = run_setup(tmp_path)
    db = layout.store("tiny-sae")
    run_and_kill(tmp_path, "pass")  # killed during the pass: no store at all
    assert not db.exists()
    analyse(tiny_model, cfg, layout, splits)
    good = db.read_bytes()
    run_and_kill(tmp_path, "write")  # killed while writing a new store: the previous one is intact
    assert db.read_bytes() == good
    assert [p.name for p in db.parent.glob(f".{db.name}.*")]  # the killed writer's temporary file
    analyse(tiny_model, cfg, layout, splits, overwrite=True)  # a rerun completes
    with FeatureStore.open(db) as store:
        assert store.feature(3).index == 3 and store.summary()["units"]["feature"]["total"] == 64
    assert not list(db.parent.glob(f".{db.name}.*"))  # and clears the leftovers


def test_select_tokens_takes_held_out_first(tmp_path, tiny_model):
    from features.analyze import select_tokens

    splits = {"train": tokens(n=20, seed=1), "held_out": tokens(n=5, seed=2)}
    toks, sources = select_tokens(splits, AnalyzeConfig(sequences=8))
    assert torch.equal(toks[:5], splits["held_out"]) and torch.equal(toks[5:], splits["train"][:3])
    assert sources[4] == ("held_out", 4) and sources[5] == ("train", 0)
    with pytest.raises(SaekitError, match="split 'held_out' is empty"):
        select_tokens({"train": splits["train"], "held_out": splits["held_out"][:0]}, AnalyzeConfig(split="held_out"))
    assert np.array_equal(select_tokens(splits, AnalyzeConfig(sequences=None, split="train"))[0], splits["train"])


@pytest.mark.real
def test_real_model_feature_and_neuron_pages(real_model, tmp_path):
    """SmolLM2 layer 6: a random TopK SAE on hook_mlp_out and the layer's 1536 neurons over 24 real sequences."""
    from features.analyze import vocab_strings, write_analysis
    from sae import corpus

    toks = corpus.tokenize_sequences(corpus.iter_documents("embedded"), real_model.tokenizer, 64, max_sequences=24)
    sae = build_sae(SAEShape(d_in=576, d_sae=1152), TopKConfig(k=32),
                    Provenance(model_name="smollm2-135m", hook_name="blocks.6.hook_mlp_out"))
    analysis = analyze(real_model, sae, toks, AnalyzeConfig(batch_size=12), progress=False)
    path = write_analysis(tmp_path / "features.db", analysis, vocab=vocab_strings(real_model),
                          meta={"sae_id": "random", "model_name": "smollm2-135m"})
    with FeatureStore.open(path) as store:
        units = store.summary()["units"]
        assert units["feature"]["total"] == 1152 and units["neuron"]["total"] == 1536
        assert units["feature"]["live"] + units["feature"]["dense"] > 1000
        # one on rule: a neuron is on as often as the median feature, so neurons are live, not all dense
        rate = store.meta["analysis"]["on_rule"]["neuron_rate"]
        assert units["neuron"]["dense"] == 0 and units["neuron"]["live"] > 1400 and 0 < rate < 0.1
        assert "ln_final.w applied" in store.meta["analysis"]["logit_effect"]
        for page in (store.feature(store.top("max_act", limit=1)[0].index), store.neuron(100)):
            example = page.top_examples[0]
            text = real_model.tokenizer.decode(example.token_ids)
            assert "".join(example.tokens) == text and len(example.tokens) == len(example.acts)
            assert example.acts[example.focus] == pytest.approx(page.max_act, rel=1e-2)
            assert len(page.pos_logits) == 10 and all(isinstance(s, str) for s, _ in page.neg_logits)
            assert page.pos_logits[0][1] >= page.pos_logits[-1][1] > page.neg_logits[-1][1] >= page.neg_logits[0][1]
            assert page.intervals and page.cofiring and page.correlated


def test_analyze_config_refuses_odd_intervals_and_negative_windows():
    with pytest.raises(SaekitError, match="'analyze.intervals' must be even.*got 5"):
        AnalyzeConfig(intervals=5)
    with pytest.raises(SaekitError, match="'analyze.window_before' and 'analyze.window_after' must be >= 0"):
        AnalyzeConfig(window_after=-1)
