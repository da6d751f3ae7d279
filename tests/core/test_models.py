"""Model resolution: embedded name -> cached safetensors folder; local folders validated; clear errors otherwise."""

import json
import re

import pytest

from kvzap_sglang.cli import main
from kvzap_sglang.models import ModelNotFoundError, resolve_model_path


def test_embedded_model_converts_to_bf16_safetensors(smollm2_path):
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    assert "quantization_config" not in config
    assert (smollm2_path / "model.safetensors").is_file()
    assert (smollm2_path / "tokenizer.json").is_file()
    from safetensors import safe_open

    with safe_open(smollm2_path / "model.safetensors", framework="pt") as weights:
        name = next(iter(weights.keys()))
        assert str(weights.get_slice(name).get_dtype()) == "BF16"


def test_second_resolution_reuses_the_cache(smollm2_path):
    before = (smollm2_path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("smollm2-135m") == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == before


def test_local_folder_is_accepted(smollm2_path):
    assert resolve_model_path(str(smollm2_path)) == smollm2_path.resolve()


def test_unknown_name_names_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="embedded names"):
        resolve_model_path("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelNotFoundError, match="not supported"):
        resolve_model_path(tmp_path)


def test_cli_model_path(smollm2_path, capsys):
    assert main(["model", "path", "smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_path)
    assert main(["model", "path", "nope"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("[1]", "config.json holds a JSON list, not an object"),
        ("{", "config.json is not valid JSON"),
        ('{"architectures": "LlamaForCausalLM"}', "config.json: architectures must be a list, got 'LlamaForCausalLM'"),
        ('{"architectures": [1, null]}', "architecture [1, None] is not supported"),
    ],
)
def test_a_malformed_local_config_is_a_clear_error(tmp_path, capsys, config_text, message):
    (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(ModelNotFoundError, match=re.escape(message)):
        resolve_model_path(tmp_path)
    assert main(["model", "path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}") and message in err and err.count("\n") == 1, err
