import json
import subprocess
import sys

import pytest
import torch

from sae.evaluate import evaluate_sae as evaluate
from sae.formats import load_sae


def test_perfect_sae_recovers_everything(tiny_model, identity_sae):
    tokens = torch.randint(0, 500, (12, 16), generator=torch.Generator().manual_seed(0))
    res = evaluate(tiny_model, identity_sae(32, "blocks.1.hook_mlp_out"), tokens, ce_sequences=8, batch_size=4)
    assert res["fvu"] < 1e-10
    assert res["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert res["kl_div"] == pytest.approx(0.0, abs=1e-5)
    assert res["ce_loss_zero_ablation"] != pytest.approx(res["ce_loss_clean"])
    assert 0 < res["l0"] <= 32 and res["tokens"] == 12 * 16


def test_zero_sae_recovers_nothing(tiny_model, identity_sae):
    sae = identity_sae(32, "blocks.1.hook_mlp_out")
    with torch.no_grad():
        sae.W_dec.zero_()
    tokens = torch.randint(0, 500, (8, 16), generator=torch.Generator().manual_seed(1))
    res = evaluate(tiny_model, sae, tokens, ce_sequences=8, batch_size=4)
    assert res["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert res["fvu"] > 0.99


@pytest.mark.real
def test_default_pipeline_on_the_real_model(tmp_path):
    """`saekit run` on the embedded model and corpus: every stage, on small budgets."""
    cmd = [sys.executable, "-m", "features.cli", "run", "--set", f"runs_dir={tmp_path}", "--set", "name=real",
           "--set", "corpus.max_sequences=240", "--set", "train.total_tokens=122880", "--set", "train.wandb=false",
           "--set", "eval.sequences=8", "--set", "analyze.sequences=32", "--set", "label.max_entities=40",
           "--set", "label.entity_types=[country]"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CE loss recovered" in proc.stdout
    folder = tmp_path / "real" / "saes" / "blocks.6.hook_mlp_out-topk-x8-k32"
    sae = load_sae(folder)
    assert sae.provenance.model_name == "smollm2-135m" and sae.shape.d_in == 576
    res = json.loads((folder / "eval.json").read_text())
    assert res["l0"] <= 32.0 + 1e-6
    assert res["fvu"] < 0.9
    assert res["ce_loss_sae"] < res["ce_loss_zero_ablation"]
