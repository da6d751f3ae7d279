"""KVzip+ oracle vs an independent dense computation from HF eager attention maps (tiny random models)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the suite runs with --import-mode=importlib
from _tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402

from kvzap_sglang.hidden_states import capture_attention_inputs
from kvzap_sglang.oracle import build_repeat_prompt, kvzip_plus_scores

PROMPT = (
    "  The grass is green. The sky is blue. One of the special magic numbers for calm-river is: 1234567. "
    "Here we go. There and back again. def f(x):\n    return x + 1\n  "
)


def dense_kvzip_plus(model, repeat, pre_norm=False, value_norm=True, x_norm=True):
    """The paper's formula written densely from eager attention probabilities, the KV cache and hidden states.

    Shares no code with the oracle: probabilities come from ``output_attentions``, values from the cache,
    attention inputs from ``output_hidden_states`` + the layer's ``input_layernorm``.
    """
    out = model.model(
        repeat.input_ids[None], output_attentions=True, output_hidden_states=True, use_cache=True
    )
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.head_dim
    per_layer = []
    for idx, layer in enumerate(model.model.layers):
        probs = out.attentions[idx][0]  # [H_q, T, T]
        residual = out.hidden_states[idx][0]
        x = residual if pre_norm else layer.input_layernorm(residual)  # [T, D]
        values = out.past_key_values.layers[idx].values[0]  # [H_kv, T, d]
        o_weight = layer.self_attn.o_proj.weight  # [D, H_q * d]
        scores = []
        for qh in range(config.num_attention_heads):
            v_out = values[qh // group] @ o_weight[:, qh * head_dim : (qh + 1) * head_dim].T  # [T, D]
            s = probs[qh]
            if value_norm:
                s = s * v_out.norm(dim=-1)[None, :]
            if x_norm:
                s = s / x.norm(dim=-1)[:, None]
            scores.append(s[repeat.copy, repeat.prompt].amax(dim=0))
        stacked = torch.stack(scores).view(config.num_key_value_heads, group, -1).amax(dim=1)
        per_layer.append(stacked.log())
    return torch.stack(per_layer)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    return model, tokenizer, build_repeat_prompt(tokenizer, PROMPT)


def test_repeat_prompt_spans_cover_the_stripped_prompt_twice(setup):
    _, tokenizer, repeat = setup
    assert tokenizer.decode(repeat.input_ids[repeat.prompt]) == PROMPT.strip()
    assert tokenizer.decode(repeat.input_ids[repeat.copy]) == PROMPT.strip()
    between = tokenizer.decode(repeat.input_ids[repeat.prompt.stop : repeat.copy.start])
    assert between == "\n\nRepeat the previous context exactly.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(repeat.input_ids[repeat.copy.stop :]) == "<|im_end|>\n"


def test_oracle_matches_dense_eager_computation(setup):
    model, _, repeat = setup
    with torch.no_grad():
        expected = dense_kvzip_plus(model, repeat)
    result = kvzip_plus_scores(model, repeat, query_chunk=7)
    assert result.scores.shape == (2, 2, repeat.num_prompt_tokens)
    torch.testing.assert_close(result.scores, expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    "variant", [dict(pre_norm=True), dict(value_norm=False), dict(x_norm=False)], ids=["pre-norm-x", "no-WoV", "no-x"]
)
def test_the_comparison_detects_formula_variants(setup, variant):
    """The dense check above would fail on a wrong formula: each variant moves scores far beyond its tolerance."""
    model, _, repeat = setup
    with torch.no_grad():
        wrong = dense_kvzip_plus(model, repeat, **variant)
    scores = kvzip_plus_scores(model, repeat).scores
    assert (scores - wrong).abs().max() > 0.05


def test_scores_do_not_depend_on_the_query_chunk(setup):
    model, _, repeat = setup
    whole = kvzip_plus_scores(model, repeat, query_chunk=10_000).scores
    single_rows = kvzip_plus_scores(model, repeat, query_chunk=1).scores
    torch.testing.assert_close(single_rows, whole, atol=1e-5, rtol=0)


def test_captured_hidden_states_are_the_attention_inputs_at_those_positions(setup):
    model, _, repeat = setup
    positions = torch.tensor([0, 3, 5, repeat.num_prompt_tokens - 1])
    result = kvzip_plus_scores(model, repeat, capture_positions=positions)
    direct = capture_attention_inputs(model, repeat.input_ids, positions + repeat.prompt.start)
    assert result.hidden_states.shape == (4, 2, model.config.hidden_size)
    torch.testing.assert_close(result.hidden_states, direct)
    with torch.no_grad():
        layer1 = model.model.layers[1]
        hidden = model.model(repeat.input_ids[None], output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(direct[:, 1], layer1.input_layernorm(hidden)[positions + repeat.prompt.start])


def test_qwen3_query_key_norms_are_applied():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    tokenizer = tiny_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="eager",
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 2.0)
    repeat = build_repeat_prompt(tokenizer, PROMPT)
    with torch.no_grad():
        expected = dense_kvzip_plus(model, repeat)
    torch.testing.assert_close(kvzip_plus_scores(model, repeat).scores, expected, atol=2e-4, rtol=0)


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        build_repeat_prompt(tiny_tokenizer(), "   ")
