"""KVzap surrogate: architecture, kvpress checkpoint layout, loud failures on bad checkpoints, dtype behaviour."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvzap_sglang.surrogate import CheckpointError, KVzapConfig, KVzapSurrogate

SMOLLM2 = dict(input_dim=576, output_dim=3, n_modules=30)


def random_surrogate(hidden_dim=None, input_dim=16, output_dim=3, n_modules=4, seed=0) -> KVzapSurrogate:
    torch.manual_seed(seed)
    surrogate = KVzapSurrogate(KVzapConfig(input_dim, output_dim, n_modules, hidden_dim))
    with torch.no_grad():
        for param in surrogate.parameters():
            param.normal_()
    return surrogate.eval()


def test_parameter_counts_match_the_method_notes_for_smollm2():
    count = lambda s: sum(p.numel() for p in s.parameters())  # noqa: E731
    assert count(KVzapSurrogate(KVzapConfig(**SMOLLM2))) == 51_930
    assert count(KVzapSurrogate(KVzapConfig(**SMOLLM2, hidden_dim=72))) == 1_252_890


@pytest.mark.parametrize("hidden_dim", [None, 8], ids=["linear", "mlp"])
def test_round_trip_writes_the_kvpress_layout_and_reloads_identically(tmp_path, hidden_dim):
    surrogate = random_surrogate(hidden_dim)
    surrogate.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "kvzap"
    assert (config["input_dim"], config["output_dim"], config["n_modules"], config["hidden_dim"]) == (16, 3, 4, hidden_dim)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    if hidden_dim is None:
        assert set(tensors) == {f"layers.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
        assert tensors["layers.2.weight"].shape == (3, 16)
    else:
        assert set(tensors) == {f"layers.{i}.{j}.{p}" for i in range(4) for j in (0, 2) for p in ("weight", "bias")}
        assert tensors["layers.1.0.weight"].shape == (8, 16) and tensors["layers.1.2.weight"].shape == (3, 8)
    assert all(t.dtype == torch.float32 for t in tensors.values())

    loaded = KVzapSurrogate.from_pretrained(tmp_path)
    x = torch.randn(5, 4, 16)
    torch.testing.assert_close(loaded(x), surrogate(x), rtol=0, atol=0)
    assert loaded.kind == ("linear" if hidden_dim is None else "mlp")


def test_mlp_uses_exact_erf_gelu():
    surrogate = random_surrogate(hidden_dim=8)
    first, _, second = surrogate.layers[1]
    x = torch.randn(6, 16)
    h = first(x)
    exact = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    torch.testing.assert_close(surrogate.score(x, 1), second(exact))
    tanh_approx = torch.nn.functional.gelu(h, approximate="tanh")
    assert not torch.allclose(surrogate.score(x, 1), second(tanh_approx), atol=1e-6)


def test_forward_applies_layer_l_to_column_l():
    surrogate = random_surrogate(hidden_dim=8)
    x = torch.randn(7, 4, 16)
    out = surrogate(x)
    assert out.shape == (7, 4, 3)
    for layer in range(4):
        torch.testing.assert_close(out[:, layer], surrogate.score(x[:, layer], layer))


def test_score_runs_in_the_hidden_states_dtype():
    surrogate = random_surrogate()
    x = torch.randn(9, 16)
    full = surrogate.score(x, 0)
    half = surrogate.score(x.bfloat16(), 0)
    assert half.dtype == torch.bfloat16 and half.shape == (9, 3)
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.3)
    assert next(surrogate.parameters()).dtype == torch.float32  # scoring does not cast the module itself


def test_bf16_checkpoints_load(tmp_path):
    surrogate = random_surrogate(hidden_dim=8)
    surrogate.save_pretrained(tmp_path)
    tensors = {k: v.bfloat16() for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = KVzapSurrogate.from_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(loaded.layers[0][0].weight, surrogate.layers[0][0].weight.bfloat16().float())


def test_wrong_key_layout_fails_loudly(tmp_path):
    random_surrogate().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    renamed = {k.replace("layers.", "modules."): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="do not match a linear KVzap layout"):
        KVzapSurrogate.from_pretrained(tmp_path)


def test_linear_weights_under_an_mlp_config_fail_loudly(tmp_path):
    random_surrogate().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_dim": 8}))
    with pytest.raises(CheckpointError, match="mlp KVzap layout"):
        KVzapSurrogate.from_pretrained(tmp_path)


def test_wrong_shapes_and_model_type_fail_loudly(tmp_path):
    random_surrogate().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "input_dim": 32}))
    with pytest.raises(CheckpointError, match=r"layers.0.weight has shape \(3, 16\), expected \(3, 32\)"):
        KVzapSurrogate.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="expected 'kvzap'"):
        KVzapSurrogate.from_pretrained(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a KVzap checkpoint folder"):
        KVzapSurrogate.from_pretrained(tmp_path)


def test_a_checkpoint_for_another_model_is_rejected_with_both_shapes():
    surrogate = KVzapSurrogate(KVzapConfig(**SMOLLM2))
    surrogate.check_fits(30, 576, 3)
    with pytest.raises(CheckpointError, match=r"\(30, 576, 3\) does not fit the model \(32, 4096, 8\)"):
        surrogate.check_fits(32, 4096, 8)


def test_package_exports_the_surrogate_without_importing_torch_eagerly():
    code = "import sys, kvzap_sglang; assert 'torch' not in sys.modules; print(kvzap_sglang.KVzapSurrogate.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "KVzapSurrogate"


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def _replace(name, content):
    def edit(folder):
        (folder / name).write_bytes(content)

    return edit


def _poison_weight(value):
    def edit(folder):
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["layers.1.bias"][0] = value
        save_file(tensors, str(folder / "model.safetensors"))

    return edit


# Each one used to escape as TypeError, AttributeError, RuntimeError or SafetensorError, or (NaN/inf) load silently.
MALFORMED = {
    "null input_dim": (_edit_config(input_dim=None), "config.json: input_dim must be an integer >= 1, got None"),
    "config is a list": (_replace("config.json", b"[1]"), "config.json: expected a JSON object, got list"),
    "negative output_dim": (_edit_config(output_dim=-2), "config.json: output_dim must be an integer >= 1, got -2"),
    "fractional input_dim": (_edit_config(input_dim=16.5), "config.json: input_dim must be an integer >= 1, got 16.5"),
    "boolean n_modules": (_edit_config(n_modules=True), "config.json: n_modules must be an integer >= 1, got True"),
    "absurd sizes": (_edit_config(input_dim=10**12, output_dim=10**12), "config.json: dimensions"),
    "config not JSON": (_replace("config.json", b"{"), "config.json: not valid JSON"),
    "garbage weights": (_replace("model.safetensors", b"garbage!" * 8), "model.safetensors: not a readable safetensors"),
    "empty weights": (_replace("model.safetensors", b""), "model.safetensors: not a readable safetensors"),
    "NaN weight": (_poison_weight(float("nan")), "model.safetensors: layers.1.bias holds NaN or infinite values"),
    "inf weight": (_poison_weight(float("inf")), "model.safetensors: layers.1.bias holds NaN or infinite values"),
}
# What KVzapConfig.from_json refuses; the settings check reads config.json with it (and does not load weights).
CONFIG_DEFECTS = ["null input_dim", "config is a list", "negative output_dim", "fractional input_dim", "boolean n_modules"]


@pytest.mark.parametrize("defect", MALFORMED)
def test_malformed_checkpoints_raise_a_value_error_naming_the_file(tmp_path, defect):
    edit, message = MALFORMED[defect]
    random_surrogate().save_pretrained(tmp_path)
    edit(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}/{message}")) as raised:
        KVzapSurrogate.from_pretrained(tmp_path)
    assert isinstance(raised.value, ValueError)  # what the CLI and the server's settings check report


@pytest.mark.parametrize("defect", CONFIG_DEFECTS)
def test_malformed_checkpoint_configs_fail_the_servers_settings_check(tmp_path, defect):
    """``--kvzap-surrogate DIR`` is checked by ``resolve_surrogate`` before the server starts (it reads config.json)."""
    from kvzap_sglang.plugin.settings import KVzapConfigError, resolve_surrogate

    edit, message = MALFORMED[defect]
    random_surrogate().save_pretrained(tmp_path)
    edit(tmp_path)
    with pytest.raises(KVzapConfigError, match=re.escape(f"kvzap surrogate '{tmp_path}': {tmp_path}/{message}")):
        resolve_surrogate(str(tmp_path), None)
