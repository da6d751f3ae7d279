"""Training pipeline on a tiny random Llama: corpus split, cached oracle samples, Ridge/MLP fits, R² metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the suite runs with --import-mode=importlib
from _tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402

from kvzap_sglang.hidden_states import capture_attention_inputs  # noqa: E402
from kvzap_sglang.oracle import build_repeat_prompt, kvzip_plus_scores  # noqa: E402
from kvzap_sglang.scoring import ReferenceModel  # noqa: E402
from kvzap_sglang.surrogate import KVzapSurrogate  # noqa: E402
from kvzap_sglang.training.collect import collect, sample_positions, shard_path  # noqa: E402
from kvzap_sglang.training.corpus import MAX_TOKENS, MIN_TOKENS, corpus_prompts  # noqa: E402
from kvzap_sglang.training.fit import MLPSettings, fit_linear, fit_mlp, predict  # noqa: E402
from kvzap_sglang.training.metrics import r2_report, squared_pearson  # noqa: E402
from kvzap_sglang.training.pipeline import TrainSettings, train_surrogate  # noqa: E402


@pytest.fixture()
def tiny_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("KVZAP_CACHE_DIR", str(tmp_path / "cache"))
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "tiny")  # the cache fingerprint reads config.json and the weight files
    return ReferenceModel(model=model, tokenizer=tokenizer, path=tmp_path / "tiny")


def test_squared_pearson_known_values():
    true = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])
    pred = torch.tensor([[1.0, 1.0], [3.0, 2.0], [2.0, 3.0], [4.0, 4.0]])
    r2 = squared_pearson(pred, true)
    assert r2[0].item() == pytest.approx(0.64)  # r = 0.8
    assert torch.isnan(r2[1])  # constant target: undefined, not flattering
    assert squared_pearson(-3 * true[:, :1] + 2, true[:, :1]).item() == pytest.approx(1.0)


def test_r2_report_shapes():
    true = torch.randn(50, 3, 2)
    report = r2_report(true + 0.1 * torch.randn(50, 3, 2), true)
    assert len(report["r2_per_layer"]) == 3 and all(len(row) == 2 for row in report["r2_per_layer_head"])
    assert report["r2_mean"] == pytest.approx(sum(report["r2_per_layer"]) / 3, abs=1e-3)
    assert report["r2_mean"] > 0.9


def test_corpus_is_deterministic_in_range_and_split_by_prompt():
    tokenizer = tiny_tokenizer()
    train = corpus_prompts(tokenizer, 6, "train", seed=0)
    held = corpus_prompts(tokenizer, 3, "held_out", seed=0)
    assert train == corpus_prompts(tokenizer, 6, "train", seed=0)
    assert corpus_prompts(tokenizer, 2, "held_out", seed=0) == held[:2]  # held-out set independent of its size
    assert not {p.text for p in train} & {p.text for p in held}
    assert all(MIN_TOKENS < p.num_tokens < MAX_TOKENS for p in train + held)
    assert [p.task for p in train] == ["retrieval", "prose", "code", "retrieval", "prose", "code"]


def test_ridge_recovers_a_linear_map():
    torch.manual_seed(0)
    x = torch.randn(3000, 2, 16)
    weight, bias = torch.randn(2, 3, 16), torch.randn(2, 3)
    y = torch.einsum("nld,lhd->nlh", x, weight) + bias + 0.01 * torch.randn(3000, 2, 3)
    surrogate = fit_linear(x, y)
    torch.testing.assert_close(surrogate.layers[1].weight, weight[1], atol=2e-3, rtol=0)
    torch.testing.assert_close(surrogate.layers[0].bias, bias[0], atol=2e-3, rtol=0)


def test_mlp_fits_a_nonlinear_target_that_a_linear_map_cannot():
    torch.manual_seed(0)
    x = torch.randn(2500, 2, 16)
    y = x[..., :3].abs()  # even in x: a linear map explains ~none of it
    settings = MLPSettings(epochs=8, lr=1e-2, batch_size=64, hidden_dim=16)
    mlp, history = fit_mlp(x[:2000], y[:2000], settings)
    linear = fit_linear(x[:2000], y[:2000])
    r2_mlp = r2_report(predict(mlp, x[2000:]), y[2000:])["r2_mean"]
    r2_linear = r2_report(predict(linear, x[2000:]), y[2000:])["r2_mean"]
    assert r2_mlp > 0.6 and r2_linear < 0.1, (r2_mlp, r2_linear)
    assert history[-1]["train_mse"] < history[0]["train_mse"] and "valid_mse" in history[-1]
    assert history[-1]["lr"] < history[0]["lr"]  # cosine schedule


def test_stacked_training_module_computes_the_surrogate_function():
    from kvzap_sglang.surrogate import KVzapConfig
    from kvzap_sglang.training.fit import _StackedMLP

    torch.manual_seed(0)
    surrogate = KVzapSurrogate(KVzapConfig(input_dim=16, output_dim=3, n_modules=4, hidden_dim=8))
    stacked = _StackedMLP(surrogate)
    x = torch.randn(10, 4, 16)
    torch.testing.assert_close(stacked(x), surrogate(x))
    with torch.no_grad():
        for param in stacked.parameters():
            param.add_(torch.randn_like(param))
    stacked.copy_into(surrogate)
    torch.testing.assert_close(surrogate(x), stacked(x))


def test_collected_rows_are_the_oracle_at_shared_positions_and_are_cached(tiny_reference):
    ref = tiny_reference
    prompts = corpus_prompts(ref.tokenizer, 2, "held_out", seed=0)
    dataset = collect(ref, prompts, positions=40, seed=0, desc="test")
    assert dataset.hidden_states.shape == (80, 2, 64) and dataset.scores.shape == (80, 2, 2)
    assert dataset.hidden_states.dtype == torch.bfloat16 and dataset.prompt_index.tolist() == [0] * 40 + [1] * 40

    repeat = build_repeat_prompt(ref.tokenizer, prompts[1].text)
    positions = sample_positions(repeat.num_prompt_tokens, 40, prompts[1], seed=0)
    oracle = kvzip_plus_scores(ref.model, repeat).scores  # [L, H, n_prompt]
    torch.testing.assert_close(dataset.scores[40:], oracle[:, :, positions].permute(2, 0, 1))
    inputs = capture_attention_inputs(ref.model, repeat.input_ids, positions + repeat.prompt.start)  # all layers
    torch.testing.assert_close(dataset.hidden_states[40:], inputs.bfloat16())

    shards = [shard_path(ref, prompt, 40, 0) for prompt in prompts]
    stamps = [path.stat().st_mtime_ns for path in shards]
    again = collect(ref, prompts, positions=40, seed=0, desc="test")
    assert [path.stat().st_mtime_ns for path in shards] == stamps  # served from the cache, not recomputed
    assert torch.equal(again.scores, dataset.scores) and torch.equal(again.hidden_states, dataset.hidden_states)


def test_train_writes_checkpoint_and_metrics_and_reuses_the_oracle_cache(tiny_reference, tmp_path):
    ref = tiny_reference
    common = dict(model="tiny", num_prompts=3, held_out_prompts=2, positions=40, mlp=MLPSettings(epochs=2))
    linear = train_surrogate(TrainSettings(kind="linear", out=tmp_path / "linear", **common), reference=ref)
    shards = sorted((tmp_path / "cache" / "oracle").rglob("*.safetensors"))
    mlp = train_surrogate(TrainSettings(kind="mlp", out=tmp_path / "mlp", **common), reference=ref)
    assert sorted((tmp_path / "cache" / "oracle").rglob("*.safetensors")) == shards and len(shards) == 5

    for kind, metrics in (("linear", linear), ("mlp", mlp)):
        saved = json.loads((tmp_path / kind / "metrics.json").read_text())
        assert saved == metrics and saved["kind"] == kind
        assert len(saved["held_out"]["r2_per_layer"]) == 2 and len(saved["held_out"]["r2_per_layer_head"][0]) == 2
        assert 0.0 <= saved["held_out"]["r2_mean"] <= 1.0
        assert saved["data"]["train_rows"] == 120 and saved["data"]["held_out_rows"] == 80
        assert KVzapSurrogate.from_pretrained(tmp_path / kind).kind == kind
    assert linear["train"]["r2_mean"] > 0.2  # the tiny model's scores are learnable, not noise


def test_bad_training_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown surrogate kind"):
        TrainSettings(model="tiny", kind="tree", out=tmp_path)
    with pytest.raises(ValueError, match="positions must be >= 1"):
        TrainSettings(model="tiny", kind="linear", out=tmp_path, positions=0)
