"""KVzap on inside the real `sglang.Engine` (CPU, SmolLM2), with a constant surrogate whose outcome is known exactly.

The surrogate scores 0, 1, 2 on KV heads 0, 1, 2 for every token; with τ = 0.5 and the default 128-token window,
exactly KV head 0 of every layer is freed for every position that left the window, and nothing else. A small
chunked-prefill size makes long prompts go through chunked prefill.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine  # starts the real SGLang engine/server: deselect with -m 'not engine'

LAYERS, KV_HEADS, WINDOW = 30, 3, 128
GREEDY = {"temperature": 0.0, "max_new_tokens": 8}
SHORT_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n",
]
LONG_PROMPT = (
    "<|im_start|>user\n" + "The grass is green. The sky is blue. The sun is yellow. " * 20
    + "What colour is the sky?<|im_end|>\n<|im_start|>assistant\n"
)  # fmt: skip


@pytest.fixture(scope="module")
def engine(smollm2_path, engine_factory, head0_surrogate):
    with engine_factory(smollm2_path, kvzap_threshold=0.5, kvzap_surrogate=str(head0_surrogate),
                        chunked_prefill_size=64) as engine:  # fmt: skip
        yield engine


def kvzap_state(engine) -> dict:
    return engine.get_server_info()["internal_states"][0]["kvzap"]


def test_requests_inside_the_window_are_untouched_and_equal_stock_outputs(engine, smollm2_path, hf_greedy,
                                                                        greedy_check):
    tokenizer = engine.tokenizer_manager.tokenizer
    for prompt in SHORT_PROMPTS:
        ids = tokenizer.encode(prompt)
        out = engine.generate(input_ids=ids, sampling_params=GREEDY)
        # HF greedy == stock SGLang greedy (test_engine_stock.py), so this is "KVzap removing nothing == stock".
        reference = hf_greedy(smollm2_path, ids, GREEDY["max_new_tokens"])
        assert (why := greedy_check(smollm2_path, ids, out["output_ids"], reference)) is None, why
        figures = out["meta_info"]["kvzap"]
        assert figures["removed_fraction"] == 0.0
        assert figures["cells_held"] == figures["cells_full"] == figures["tokens"] * LAYERS * KV_HEADS


def test_long_chunked_prompt_frees_exactly_head0_outside_the_window(engine):
    before = kvzap_state(engine)
    out = engine.generate(LONG_PROMPT, sampling_params=GREEDY)
    figures = out["meta_info"]["kvzap"]
    prompt_tokens = out["meta_info"]["prompt_tokens"]
    assert prompt_tokens > 2 * 64  # really went through chunked prefill
    tokens = figures["tokens"]
    assert tokens in (prompt_tokens + GREEDY["max_new_tokens"] - 1, prompt_tokens + GREEDY["max_new_tokens"])
    pruned = (tokens - WINDOW) * LAYERS  # one KV head per layer, every position that left the window
    assert figures["cells_full"] == tokens * LAYERS * KV_HEADS
    assert figures["cells_held"] == figures["cells_full"] - pruned
    assert figures["removed_fraction"] == pytest.approx(pruned / figures["cells_full"])
    after = kvzap_state(engine)
    assert after["entries_pruned"] - before["entries_pruned"] == pruned
    assert after["cells_in_use"] == after["cells_cached"]  # what the request still holds belongs to the prefix cache


def test_batch_of_mixed_requests_leaves_no_cells_behind(engine):
    outs = engine.generate([*SHORT_PROMPTS, LONG_PROMPT] * 2, sampling_params=GREEDY)
    assert all(o["meta_info"]["kvzap"]["cells_held"] > 0 for o in outs)
    state = kvzap_state(engine)
    assert state["cells_in_use"] == state["cells_cached"] > 0  # finished requests' KV stays for prefix sharing
    assert state["cells_total"] == 8192 * LAYERS * KV_HEADS  # the stock pool's memory, in cells
    assert engine.flush_cache().success
    state = kvzap_state(engine)
    assert state["cells_in_use"] == 0 and state["cells_cached"] == 0  # every cell came back


def test_a_prompt_that_would_crash_the_scheduler_raises_in_the_caller_and_the_engine_serves_on(engine):
    """``sglang.Engine`` shares the HTTP server's request checks (plugin/prompt_checks.py): the error reaches the
    caller, and the scheduler never sees the request."""
    for bad in (dict(input_ids=[1, 2, 10**9]), dict(prompt="")):
        with pytest.raises(ValueError, match="outside the model's vocabulary|the prompt has no tokens"):
            engine.generate(**bad, sampling_params=GREEDY)
    assert engine.generate(SHORT_PROMPTS[0], sampling_params=GREEDY)["meta_info"]["completion_tokens"] == 8


def test_engines_built_later_in_the_process_leave_this_ones_checks_on(engine, smollm2_path):
    """The checks read the ``KVZAP_*`` environment per request. Another ``sglang.Engine(...)`` built in the same
    process rewrote it, even one whose constructor failed, and the running KVzap Engine lost them: its next empty
    prompt stopped its scheduler (review). Each engine now keeps what it was built with."""
    import sglang

    from kvzap_sglang.plugin.prompt_checks import KVZAP_ON_ATTR
    from kvzap_sglang.plugin.settings import KVzapSettings

    with pytest.raises(TypeError, match="not_a_field"):
        sglang.Engine(model_path=str(smollm2_path), kvzap_threshold=None, not_a_field=1)
    assert KVzapSettings.from_env() is None  # the environment no longer says KVzap is on
    # Checked first: without it the empty prompt below stops the scheduler, and the test hangs instead of failing.
    assert getattr(engine.tokenizer_manager, KVZAP_ON_ATTR) is True
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        engine.generate(prompt="", sampling_params=GREEDY)
    out = engine.generate(SHORT_PROMPTS[0], sampling_params=GREEDY)
    assert out["meta_info"]["completion_tokens"] == 8 and "kvzap" in out["meta_info"]
