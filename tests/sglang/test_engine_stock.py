"""Bring-up: the real SGLang 0.5.23 engine and HTTP server on CPU with SmolLM2, KVzap off (stock behaviour)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine  # starts the real SGLang engine/server: deselect with -m 'not engine'

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine(smollm2_path, engine_factory):
    with engine_factory(smollm2_path) as engine:
        yield engine


def test_engine_greedy_output_equals_hf_transformers(engine, smollm2_path, hf_greedy, greedy_check):
    tokenizer = engine.tokenizer_manager.tokenizer
    prompt_ids = tokenizer.encode(PROMPT)
    out = engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)
    reference = hf_greedy(smollm2_path, prompt_ids, GREEDY["max_new_tokens"])
    assert (why := greedy_check(smollm2_path, prompt_ids, out["output_ids"], reference)) is None, why
    assert "Paris" in out["text"]
    # The kvzap plugin is installed (entry point) but off: no KVzap figures, no KVzap state in the scheduler.
    assert "kvzap" not in out["meta_info"]
    assert "kvzap" not in engine.get_server_info()["internal_states"][0]


def test_engine_batch_matches_single_requests(engine):
    prompts = [PROMPT, "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"]
    batch = engine.generate(prompts, sampling_params=GREEDY)
    singles = [engine.generate(p, sampling_params=GREEDY) for p in prompts]
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in singles]
