"""KVzap on with τ below every score (nothing pruned) gives stock SGLang's greedy outputs (token for token, up to
an exact bf16 tie in the reference's own log-probs: conftest.greedy_mismatch), through the whole KVzap path: cell pool, scoring after every layer, DMS decisions, the kvzap_torch backend, chunked prefill
and decode. The reference is HF transformers greedy, which equals stock SGLang (test_engine_stock.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine  # starts the real SGLang engine/server: deselect with -m 'not engine'

GREEDY = {"temperature": 0.0, "max_new_tokens": 10}
PROMPTS = [
    "<|im_start|>user\n" + "The grass is green. The sky is blue. The sun is yellow. " * 18
    + "What colour is the grass?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]  # fmt: skip


@pytest.fixture(scope="module")
def engine(smollm2_path, engine_factory, tmp_path_factory, surrogate_factory):
    above_tau = surrogate_factory(tmp_path_factory.mktemp("surrogate") / "ones", [1.0, 1.0, 1.0])
    with engine_factory(smollm2_path, kvzap_threshold=0.5, kvzap_surrogate=str(above_tau), kvzap_window=16,
                        chunked_prefill_size=64) as engine:  # fmt: skip
        yield engine


def test_nothing_pruned_equals_stock_outputs(engine, smollm2_path, hf_greedy, greedy_check):
    tokenizer = engine.tokenizer_manager.tokenizer
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        out = engine.generate(input_ids=ids, sampling_params=GREEDY)
        reference = hf_greedy(smollm2_path, ids, GREEDY["max_new_tokens"])
        assert (why := greedy_check(smollm2_path, ids, out["output_ids"], reference)) is None, why
        assert out["meta_info"]["kvzap"]["removed_fraction"] == 0.0
    state = engine.get_server_info()["internal_states"][0]["kvzap"]
    assert state["cells_in_use"] == state["cells_cached"]  # the rest belongs to the prefix cache
    assert engine.flush_cache().success
    assert engine.get_server_info()["internal_states"][0]["kvzap"]["cells_in_use"] == 0
