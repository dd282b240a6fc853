import subprocess
import sys

import pytest

from features.run_config import load_config
from sae.errors import SaekitError


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_default_config_loads():
    cfg = load_config("configs/smollm2_mlp.yaml")
    assert cfg.model.name == "smollm2-135m"
    assert cfg.cache.hooks == ["blocks.6.hook_mlp_out"]


def test_overrides_apply():
    cfg = load_config("configs/smollm2_mlp.yaml", ["corpus.max_sequences=10", "cache.dtype=float16"])
    assert cfg.corpus.max_sequences == 10 and cfg.cache.dtype == "float16"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "cache:\n  hook: [blocks.6.hook_mlp_out]\n")
    with pytest.raises(SaekitError) as err:
        load_config(path)
    msg = str(err.value)
    assert "cache.hook" in msg and str(path) in msg and "did you mean 'hooks'" in msg


def test_wrong_type_names_expected_type(tmp_path):
    path = write(tmp_path, "corpus:\n  context_size: long\n")
    with pytest.raises(SaekitError, match=r"cfg.yaml: key 'corpus.context_size' must be int, got 'long'"):
        load_config(path)


def test_bad_literal_and_range(tmp_path):
    with pytest.raises(SaekitError, match=r"cache.dtype.*'float32' \| 'float16' \| 'bfloat16'"):
        load_config(write(tmp_path, "cache:\n  dtype: float64\n"))
    with pytest.raises(SaekitError, match="held_out_fraction"):
        load_config(write(tmp_path, "corpus:\n  held_out_fraction: 1.5\n"))
    with pytest.raises(SaekitError, match="positive"):
        load_config(write(tmp_path, "cache:\n  batch_size: 0\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SaekitError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(SaekitError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    path = write(tmp_path, "modle:\n  name: gpt2\n")
    proc = subprocess.run([sys.executable, "-m", "features.cli", "cache", "--config", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "unknown config key 'modle'" in proc.stderr


def test_cli_help_explains_commands():
    proc = subprocess.run([sys.executable, "-m", "features.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "cache" in proc.stdout and "run" in proc.stdout


def test_hook_ranges_expand_to_one_hook_per_layer():
    cfg = load_config("configs/smollm2_directions.yaml")
    assert cfg.cache.hooks == [f"blocks.{i}.hook_mlp_out" for i in range(7)]
    assert [s.hook for s in cfg.train.saes] == cfg.cache.hooks


def test_directions_configs_label_one_of_their_own_saes():
    for path in ("configs/smollm2_directions.yaml", "configs/smollm2_directions_transcoders.yaml"):
        cfg = load_config(path)
        assert cfg.label.sae in [s.sae_id for s in cfg.train.saes], path
        assert len(cfg.train.saes) == 7 and cfg.directions.unit_rule == "output_variance"
    tc = load_config("configs/smollm2_directions_transcoders.yaml")
    assert tc.train.source == "model" and all(s.target_hook == f"blocks.{i}.hook_mlp_out"
                                              for i, s in enumerate(tc.train.saes))
