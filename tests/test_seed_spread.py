"""scripts/seed_spread.py: mean ± sd over training seeds of the labeler's headline, per kind."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("seed_spread", ROOT / "scripts" / "seed_spread.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["seed_spread"] = module
    spec.loader.exec_module(module)
    return module


def test_spread_is_mean_and_sample_sd_per_kind_and_figure(tmp_path, monkeypatch, capsys):
    script = load_script()
    heads = [{"feature": {"monosemantic_share": m, "tags": t, "probe_k": None},
              "neuron": {"monosemantic_share": 0.01, "tags": 4}} for m, t in ((0.10, 2), (0.20, 4), (0.30, 6))]
    out = script.spread(heads)
    mono = out["feature"]["monosemantic_share"]
    assert mono["values"] == [0.10, 0.20, 0.30] and mono["mean"] == pytest.approx(0.2)
    assert mono["sd"] == pytest.approx(0.1)  # sample sd (n - 1)
    assert out["feature"]["tags"]["sd"] == pytest.approx(2.0) and out["feature"]["probe_k"]["mean"] is None
    assert out["neuron"]["tags"]["sd"] == 0.0 and out["neuron"]["attributes_causal"]["values"] == []
    one = script.spread(heads[:1])
    assert one["feature"]["tags"]["sd"] is None  # one seed has no spread, never a made-up 0

    # the whole script over finished runs: nothing is rerun when each seed's report exists
    config = tmp_path / "c.yaml"
    config.write_text(f"name: toy\nruns_dir: {tmp_path / 'runs'}\nlabel:\n  sae: s\n")
    for seed, head in zip((0, 1, 2), heads, strict=True):
        folder = tmp_path / "runs" / ("toy" if seed == 0 else f"toy_seed{seed}") / "reports" / "s"
        folder.mkdir(parents=True)
        (folder / "label.json").write_text(json.dumps({"headline": head}))
    monkeypatch.setattr(script.subprocess, "run", lambda *a, **k: pytest.fail("a finished seed was rerun"))
    monkeypatch.setattr(sys, "argv", ["seed_spread.py", "--config", str(config), "--json", str(tmp_path / "s.json")])
    script.main()
    assert "0.200 ± 0.100" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["figures"]["feature"]["tags"]["mean"] == 4.0


def test_directions_mode_runs_train_and_directions_per_missing_seed_and_spreads_their_headline(
        tmp_path, monkeypatch, capsys):
    script = load_script()
    config = tmp_path / "c.yaml"
    config.write_text(f"name: dirs\nruns_dir: {tmp_path / 'runs'}\ntrain:\n  source: model\n")

    def report(seed: int) -> dict:
        head = {kind: {"cause_fraction": base + 0.01 * seed, "disentanglement": 0.4, "attributes_causal": seed}
                for kind, base in (("feature", 0.10), ("neuron", 0.05), ("baseline", 0.30))}
        return {"headline": head, "features_minus_neurons": {"cause_fraction_diff": 0.05, "ci": [0.01, 0.09]}}

    ran: list[list[str]] = []

    def fake_run(cmd, check):
        ran.append(cmd)
        if cmd[3] == "directions":  # what `saekit directions` leaves behind
            name = next(x.split("=")[1] for x in cmd if x.startswith("name="))
            seed = int(next(x.split("=")[1] for x in cmd if x.startswith("train.seed=")))
            out = tmp_path / "runs" / name / "reports" / "run"
            out.mkdir(parents=True)
            (out / "label.json").write_text(json.dumps(report(seed)))

    monkeypatch.setattr(script.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["seed_spread.py", "--config", str(config), "--directions", "--seeds", "0", "2",
                                      "--json", str(tmp_path / "d.json")])
    script.main()
    assert [c[3] for c in ran] == ["train", "directions"] * 2  # on the fly: nothing to cache
    assert any("name=dirs_seed2" in c for c in ran[2]) and any("name=dirs" == x.split(" ")[-1] for x in ran[0])
    figures = json.loads((tmp_path / "d.json").read_text())["figures"]
    assert figures["feature"]["cause_fraction"]["values"] == pytest.approx([0.10, 0.12])
    assert figures["features_minus_neurons"]["cause_fraction"]["mean"] == pytest.approx(0.05)
    assert figures["baseline"]["attributes_causal"]["sd"] == pytest.approx(2 ** 0.5)
    assert "cause_fraction" in capsys.readouterr().out
