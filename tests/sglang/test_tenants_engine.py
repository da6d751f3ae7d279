"""Tenants through the offline ``sglang.Engine`` (``plugin.engine_requests``), on the real engine (CPU, SmolLM2).

The constant surrogate scores 0, 1, 2 on KV heads 0, 1, 2 for every token: a tenant at τ 0.5 frees exactly KV head 0
outside its window, one at τ −10 frees nothing. An Engine's callers could not name a tenant at all (review):
``Engine.generate`` takes no ``extra_key``, and the tenant check meant for HTTP refused the one they built.
"""

from __future__ import annotations

import pytest

from kvzap_sglang.plugin.engine_requests import async_generate_as, generate_as

pytestmark = pytest.mark.engine  # starts the real SGLang engine: deselect with -m 'not engine'

WINDOW, BUDGET_TOKENS = 4, 64
CELLS_PER_TOKEN = 30 * 3
TENANTS_TOML = f"""
[default]
threshold = -10.0

[tenants.prune]
threshold = 0.5
window = {WINDOW}

[tenants.small]
threshold = -10.0
kv_budget_tokens = {BUDGET_TOKENS}
"""
PROMPT = "<|im_start|>user\n" + "The grass is green. The sky is blue. " * 4 + "What colour is the sky?<|im_end|>\n"
GREEDY = {"temperature": 0.0, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def engine(smollm2_path, engine_factory, head0_surrogate, tmp_path_factory):
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    tenants.write_text(TENANTS_TOML)
    with engine_factory(smollm2_path, kvzap_threshold=-10.0, kvzap_surrogate=str(head0_surrogate),
                        kvzap_tenants=str(tenants)) as engine:  # fmt: skip
        yield engine


def tenant_figures(engine) -> dict:
    return engine.get_server_info()["internal_states"][0]["kvzap"]["tenants"]


def test_each_tenant_named_by_an_engine_caller_prunes_at_its_own_tau(engine):
    pruned = generate_as(engine, "prune", text=PROMPT, sampling_params=GREEDY)["meta_info"]["kvzap"]
    kept = generate_as(engine, "small", text=PROMPT, sampling_params=GREEDY)["meta_info"]["kvzap"]
    plain = engine.generate(PROMPT, GREEDY)["meta_info"]["kvzap"]  # no tenant named: default
    # KV head 0 of every layer for every token outside the tenant's window, and nothing else.
    assert pruned["cells_full"] - pruned["cells_held"] == (pruned["tokens"] - WINDOW) * 30
    assert kept["removed_fraction"] == 0.0 and plain["removed_fraction"] == 0.0
    figures = tenant_figures(engine)
    assert figures["prune"]["entries_pruned"] > 0 and figures["small"]["entries_pruned"] == 0


def test_a_batch_a_stream_and_async_calls_run_as_the_tenant(engine):
    batch = generate_as(engine, "prune", text=[PROMPT, PROMPT + "Answer:"], sampling_params=GREEDY)
    assert [out["meta_info"]["kvzap"]["removed_fraction"] > 0 for out in batch] == [True, True]
    chunks = list(generate_as(engine, "prune", text=PROMPT, sampling_params=GREEDY, stream=True))
    assert len(chunks) >= 2 and chunks[-1]["meta_info"]["kvzap"]["removed_fraction"] > 0
    out = engine.loop.run_until_complete(async_generate_as(engine, "prune", salt="user-7", text=PROMPT,
                                                           sampling_params=GREEDY))  # fmt: skip
    assert out["meta_info"]["kvzap"]["removed_fraction"] > 0

    async def stream_async():
        return [chunk async for chunk in await async_generate_as(engine, "prune", text=PROMPT, sampling_params=GREEDY,
                                                                  stream=True)]  # fmt: skip

    chunks = engine.loop.run_until_complete(stream_async())
    assert len(chunks) >= 2 and chunks[-1]["meta_info"]["kvzap"]["removed_fraction"] > 0


def test_a_tenants_budget_holds_for_engine_callers(engine):
    too_long = "word " * (BUDGET_TOKENS + 10)
    with pytest.raises(ValueError, match="exceeds the KV budget of tenant 'small'"):
        generate_as(engine, "small", text=too_long, sampling_params=GREEDY)
    out = generate_as(engine, "small", text="Hi", sampling_params={"temperature": 0.0, "max_new_tokens": 200})
    assert out["meta_info"]["prompt_tokens"] + out["meta_info"]["completion_tokens"] <= BUDGET_TOKENS
    assert tenant_figures(engine)["small"]["refused_requests"] >= 1


def test_an_unknown_tenant_or_a_raw_extra_key_is_refused_before_anything_runs(engine):
    with pytest.raises(ValueError, match=r"unknown tenant 'prnue': this Engine's tenants are \['default', 'prune'"):
        generate_as(engine, "prnue", text=PROMPT, sampling_params=GREEDY)
    with pytest.raises(ValueError, match="as salt="):
        generate_as(engine, "prune", text=PROMPT, sampling_params=GREEDY, extra_key="mine")
