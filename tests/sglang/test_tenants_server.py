"""Multi-tenant serving in the real HTTP server (CPU, SmolLM2, issue #8), with the real Redis and calibration service.

One server with ``--kvzap-tenants`` (constant surrogate: KV head 0 scores 0 < τ = 0.5, heads 1-2 kept; window 16):
tenant ``keep`` runs at τ = -10 (nothing pruned), ``small`` has a 200-token KV budget, ``tight`` the same budget
with the tighten-before-queueing policy (τ within [0.5, 1.5]: under pressure head 1, scoring 1, goes too), ``acme``
follows the calibration service, ``narrow`` has its own window, ``strict`` a 200-token budget with nothing pruned,
``grp-a`` (200-token budget) and ``grp-b`` (none) share a prefix-cache group with nothing pruned,
``[default]`` sets its τ in the file; every finished request is sampled into Redis; prompts over 64 tokens are
prefilled in chunks. Checked: per-tenant τ in the forward; cached prefixes never served across tenants; a flooding
tenant queues instead of exceeding its budget (sampled all along); a τ a tenant sets through the service applies
to its new requests within seconds and to no other tenant; refused identities get 401/403.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fastapi.testclient import TestClient

from calibrator.sample_store import SampleStore
from calibrator.series import SeriesKey
from calibrator.summary import removed_fraction_at
from kvzap_sglang.plugin.server_process import kvzap_state
from service.app import create_app
from service.core.config import Settings

pytestmark = pytest.mark.engine  # starts the real SGLang server: deselect with -m 'not engine'

REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN_KEY = "sglang-admin-test-key"  # --admin-api-key: required with tenants (SGLang's admin routes)
MODEL, TASK, WINDOW = "smollm2-135m", "tenants-test", 16
KEYS = {"acme": "acme-test-key-1", "keep": "keep-test-key-1", "small": "small-test-key-1", "tight": "tight-test-key-1",
        "docs-a": "docs-a-test-key", "docs-b": "docs-b-test-key", "narrow": "narrow-test-key-1",
        "strict": "strict-test-key-1", "grp-a": "grp-a-test-key-1", "grp-b": "grp-b-test-key-1"}
CHUNK = 64  # --chunked-prefill-size: prompts longer than this are prefilled in chunks
NARROW_WINDOW = 4
SMALL_BUDGET_TOKENS = 200
CELLS_PER_TOKEN = 30 * 3
FILLER = "The grass is green. The sky is blue. The sun is yellow. "

TENANTS_TOML = f"""
[default]
threshold = 0.5

[tenants.acme]
api_key = "{KEYS['acme']}"

[tenants.keep]
api_key = "{KEYS['keep']}"
threshold = -10.0

[tenants.small]
api_key = "{KEYS['small']}"
kv_budget_tokens = {SMALL_BUDGET_TOKENS}

[tenants.tight]
api_key = "{KEYS['tight']}"
kv_budget_tokens = {SMALL_BUDGET_TOKENS}
threshold_range = [0.5, 1.5]

[tenants.docs-a]
api_key = "{KEYS['docs-a']}"
prefix_cache_group = "docs"

[tenants.docs-b]
api_key = "{KEYS['docs-b']}"
prefix_cache_group = "docs"

[tenants.narrow]
api_key = "{KEYS['narrow']}"
window = {NARROW_WINDOW}

[tenants.strict]
api_key = "{KEYS['strict']}"
threshold = -10.0
kv_budget_tokens = {SMALL_BUDGET_TOKENS}

[tenants.grp-a]
api_key = "{KEYS['grp-a']}"
threshold = -10.0
kv_budget_tokens = {SMALL_BUDGET_TOKENS}
prefix_cache_group = "shared"

[tenants.grp-b]
api_key = "{KEYS['grp-b']}"
threshold = -10.0
prefix_cache_group = "shared"
"""


@pytest.fixture(scope="module")
def server(smollm2_path, server_factory, head0_surrogate, tmp_path_factory, module_prefix):
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    tenants.write_text(TENANTS_TOML)
    flags = ["--kvzap-threshold", "0.5", "--kvzap-surrogate", str(head0_surrogate), "--kvzap-window", str(WINDOW),
             "--kvzap-tenants", str(tenants), "--admin-api-key", ADMIN_KEY,
             "--kvzap-redis-url", REDIS_URL, "--kvzap-redis-prefix", module_prefix,
             "--kvzap-task", TASK, "--kvzap-model-id", MODEL, "--kvzap-tau-poll-s", "0.5",
             "--kvzap-sample-rate", "1", "--max-total-tokens", "4096",
             "--chunked-prefill-size", str(CHUNK)]  # fmt: skip
    with server_factory(smollm2_path, flags, deep_checks=True) as url:  # idle recount: tenant rounds lock prefixes
        yield url


@pytest.fixture(scope="module")
def service(module_prefix):
    settings = Settings(redis_url=REDIS_URL, redis_prefix=module_prefix, admin_api_keys=["test-admin-key"],
                        tenant_api_keys={"svc-acme-key": "acme", "svc-keep-key": "keep"},
                        known_models=[MODEL])  # fmt: skip
    with TestClient(create_app(settings)) as client:
        yield client


def generate(url: str, text: str, tenant: str | None, max_new_tokens: int = 4) -> requests.Response:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    body = {"text": text, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}
    return requests.post(f"{url}/generate", json=body, headers=headers, timeout=900)


def tenants_state(url: str) -> dict:
    return kvzap_state(url, api_key=ADMIN_KEY)["tenants"]  # per-tenant figures: the admin key only


def wait_for(predicate, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)
    return value


def prompt(tag: str, fillers: int = 4) -> str:
    return f"<|im_start|>user\n{tag}: " + FILLER * fillers + "What colour is the sun?<|im_end|>\n"


def test_each_tenant_prunes_at_its_own_tau(server):
    pruned = generate(server, prompt("tau-a"), "acme").json()["meta_info"]
    kept = generate(server, prompt("tau-k"), "keep").json()["meta_info"]
    tokens = pruned["kvzap"]["tokens"]
    assert pruned["kvzap"]["removed_fraction"] == pytest.approx((tokens - WINDOW) / (3 * tokens))
    assert kept["kvzap"]["removed_fraction"] == 0.0
    state = tenants_state(server)
    assert state["keep"]["threshold"] == -10.0 and state["acme"]["threshold"] == 0.5
    assert state["acme"]["entries_pruned"] > 0 and state["keep"]["entries_pruned"] == 0


def test_cached_prefixes_are_not_served_across_tenants(server):
    text = "Shared document: " + FILLER * 6 + "Which colours are named?"  # starts unlike every other prompt here
    first = generate(server, text, "acme").json()["meta_info"]
    again = generate(server, text, "acme").json()["meta_info"]
    other = generate(server, text, "keep").json()["meta_info"]
    anonymous = generate(server, text, None).json()["meta_info"]
    assert first["cached_tokens"] == 0 and again["cached_tokens"] > first["prompt_tokens"] // 2
    assert other["cached_tokens"] == 0 and anonymous["cached_tokens"] == 0


def test_tenants_of_one_prefix_cache_group_share_cached_prefixes_and_no_one_else_does(server):
    text = "Group document: " + FILLER * 6 + "Which colours are named?"
    first = generate(server, text, "docs-a").json()["meta_info"]
    member = generate(server, text, "docs-b").json()["meta_info"]
    outsider = generate(server, text, "acme").json()["meta_info"]
    assert first["cached_tokens"] == 0 and member["cached_tokens"] > first["prompt_tokens"] // 2
    assert outsider["cached_tokens"] == 0
    # The shared cells count against the tenant whose request wrote them; docs-b's own share is its question tail.
    state = tenants_state(server)
    assert state["docs-a"]["cells_held"] > state["docs-b"]["cells_held"] >= 0


def flood(server: str, tenant: str, requests_: int = 8) -> tuple[list[requests.Response], list[dict]]:
    """``requests_`` concurrent requests of ``tenant`` (~86 tokens worst case each); its figures sampled every 50 ms."""
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(tenants_state(server)[tenant])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=requests_) as pool:
            outs = list(pool.map(lambda i: generate(server, prompt(f"{tenant}-flood-{i}"), tenant, 16), range(requests_)))
    finally:
        stop.set()
        sampler.join()
    return outs, samples


def test_a_flooding_tenant_queues_within_its_budget(server):
    budget = SMALL_BUDGET_TOKENS * CELLS_PER_TOKEN
    outs, samples = flood(server, "small")
    assert all(out.status_code == 200 for out in outs)
    assert all(s["budget_cells"] == budget for s in samples)
    assert max(s["cells_held"] for s in samples) <= budget, "held cells exceeded the budget"
    assert max(s["cells_held"] for s in samples) > 0 and len(samples) > 5
    assert max(s["running_requests"] for s in samples) >= 1 and max(s["queued_requests"] for s in samples) >= 1
    assert tenants_state(server)["small"]["held_back_rounds"] > 0, "requests really waited for the budget"


def held_cells_while(server: str, tenant: str, send, figure: str = "cells_held") -> tuple[requests.Response, list]:
    """``send()``'s response and ``tenant``'s held cells (or another of its ``figure``s) sampled every 20 ms while it
    ran."""
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(tenants_state(server)[tenant][figure])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = send()
    finally:
        stop.set()
        sampler.join()
    return response, samples + [tenants_state(server)[tenant][figure]]


def send_batch(server: str, tenant: str, prompts: list[list[int]], new_tokens: list[int], **more) -> requests.Response:
    """One /generate batch (its prompts reach the waiting queue together, in order), nothing pruned (τ -10); ``more``
    sampling parameters for each request."""
    params = [{"max_new_tokens": n, "ignore_eos": True, "temperature": 0.0, **more} for n in new_tokens]
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    return requests.post(f"{server}/generate", json={"input_ids": prompts, "sampling_params": params},
                         headers=headers, timeout=900)  # fmt: skip


def test_a_request_prefilled_in_the_last_step_counts_against_its_tenants_budget(server):
    """Two requests of 20 + 100 tokens against a 200-token budget: the second must wait for the first. Admission
    once read the scheduler's running batch from before the last prefill was merged into it, so the second got in
    one step later and the tenant held up to 238 tokens' worth of cells."""
    budget = SMALL_BUDGET_TOKENS * CELLS_PER_TOKEN
    before = tenants_state(server)["strict"]["held_back_rounds"]
    prompts = [[1000 + i for i in range(20)], [2000 + i for i in range(20)]]
    response, held = held_cells_while(server, "strict", lambda: send_batch(server, "strict", prompts, [100, 100]))
    assert response.status_code == 200, response.text
    assert [out["meta_info"]["completion_tokens"] for out in response.json()] == [100, 100]
    assert max(held) <= budget, f"held {max(held) / CELLS_PER_TOKEN:.0f} tokens' worth, budget {SMALL_BUDGET_TOKENS}"
    assert tenants_state(server)["strict"]["held_back_rounds"] > before, "the second request really waited"


def test_structured_output_requests_count_against_their_tenants_budget(server):
    """The same 20 + 100 and 20 + 100 tokens, constrained by a regex: such requests wait in SGLang's grammar queue
    and reach the waiting queue inside SGLang's admission, after the budgets were applied, so both once ran side by
    side (up to 240 tokens' worth on a 200-token budget)."""
    budget = SMALL_BUDGET_TOKENS * CELLS_PER_TOKEN
    before = tenants_state(server)["strict"]["held_back_rounds"]
    prompts = [[1100 + i for i in range(20)], [2100 + i for i in range(20)]]
    send = lambda: send_batch(server, "strict", prompts, [100, 100], regex="[a-z ]+")  # noqa: E731
    response, held = held_cells_while(server, "strict", send)
    assert response.status_code == 200, response.text
    outs = response.json()
    assert [out["meta_info"]["completion_tokens"] for out in outs] == [100, 100]
    assert all(set(out["text"]) <= set("abcdefghijklmnopqrstuvwxyz ") for out in outs), "the regex was applied"
    assert max(held) <= budget, f"held {max(held) / CELLS_PER_TOKEN:.0f} tokens' worth, budget {SMALL_BUDGET_TOKENS}"
    assert tenants_state(server)["strict"]["held_back_rounds"] > before, "the second request really waited"


def test_a_question_on_a_document_the_tenant_cached_reuses_it_within_the_budget(server):
    """``strict`` (200-token budget) caches a 150-token document, then asks a 10-token question on it with 20 new
    tokens: 180 tokens at most, so the document's cells stay and serve the question. Admission once counted the
    document twice (its cells held + the whole 160-token prompt = 330), evicted it to make room for itself and
    prefilled it again (0 cached tokens)."""
    budget = SMALL_BUDGET_TOKENS * CELLS_PER_TOKEN
    document = [7700 + i for i in range(150)]
    assert send_batch(server, "strict", [document], [1]).status_code == 200
    ask = lambda: send_batch(server, "strict", [document + [7900 + i for i in range(10)]], [20])  # noqa: E731
    response, held = held_cells_while(server, "strict", ask)
    assert response.status_code == 200, response.text
    meta = response.json()[0]["meta_info"]
    assert (meta["prompt_tokens"], meta["cached_tokens"], meta["completion_tokens"]) == (160, 150, 20)
    assert max(held) <= budget, f"held {max(held) / CELLS_PER_TOKEN:.0f} tokens' worth, budget {SMALL_BUDGET_TOKENS}"


def test_the_rest_of_a_chunked_prompt_counts_against_its_tenants_budget(server):
    """150 + 30 tokens (prefilled in chunks of 64) and 10 + 15 tokens: 205 > 200, so the short request must wait.
    Admission once counted only the chunks already written (64 + 30 + 25 = 119) and let it in alongside."""
    budget = SMALL_BUDGET_TOKENS * CELLS_PER_TOKEN
    prompts = [[3000 + i for i in range(150)], [5000 + i for i in range(10)]]
    assert len(prompts[0]) > 2 * CHUNK
    response, held = held_cells_while(server, "strict", lambda: send_batch(server, "strict", prompts, [30, 15]))
    assert response.status_code == 200, response.text
    assert [out["meta_info"]["completion_tokens"] for out in response.json()] == [30, 15]
    assert max(held) <= budget, f"held {max(held) / CELLS_PER_TOKEN:.0f} tokens' worth, budget {SMALL_BUDGET_TOKENS}"


def test_a_tenants_later_request_never_overtakes_one_held_for_its_budget(server):
    """20 + 100, then 100 + 90, then 10 + 20 tokens against a 200-token budget: the second waits for the first, and
    the third, which would fit beside the first, waits for the second (first come, first served within a tenant).
    Admission once let the third in beside the first, so a stream of small requests could starve a large one."""
    prompts = [[6000 + i for i in range(20)], [7000 + i for i in range(100)], [8000 + i for i in range(10)]]
    send = lambda: send_batch(server, "strict", prompts, [100, 90, 20])  # noqa: E731
    response, running = held_cells_while(server, "strict", send, figure="running_requests")
    assert response.status_code == 200, response.text
    assert [out["meta_info"]["completion_tokens"] for out in response.json()] == [100, 90, 20]
    assert len(running) > 10 and max(running) == 1, f"requests of 'strict' ran side by side: {max(running)}"


def test_a_tenant_waiting_on_cells_another_tenant_holds_still_runs_what_fits(server):
    """``grp-a`` cached a 150-token document that ``grp-b`` (same prefix-cache group) is decoding on, so those cells
    count against ``grp-a``'s 200-token budget and cannot be evicted. ``grp-a``'s 60 + 60-token request cannot run
    until ``grp-b`` is done, and ``grp-a`` has nothing running of its own that would free room: its later 10 + 10-token
    request, which fits, runs meanwhile instead of waiting in line behind it. Once ``grp-b`` is done, its cached
    continuation is evicted with the document so that the large request runs (it was no leaf of ``grp-a``'s, so the
    document held ``grp-a``'s budget and the request waited for ever)."""
    document = [9000 + i for i in range(150)]
    assert send_batch(server, "grp-a", [document], [1]).status_code == 200  # cached, counted against grp-a
    pool = ThreadPoolExecutor(max_workers=3)
    try:  # bounded waits: a request that never gets in fails the test (TimeoutError) instead of hanging it
        reader = pool.submit(send_batch, server, "grp-b", [document + [9500 + i for i in range(5)]], [150])
        wait_for(lambda: tenants_state(server)["grp-b"]["running_requests"] == 1, "grp-b decoding on the document")
        large = pool.submit(send_batch, server, "grp-a", [[9600 + i for i in range(60)]], [60])
        wait_for(lambda: tenants_state(server)["grp-a"]["queued_requests"] == 1, "grp-a's large request held")
        small = pool.submit(send_batch, server, "grp-a", [[9700 + i for i in range(10)]], [10]).result(timeout=60)
        assert small.status_code == 200 and not reader.done(), "the small request waited for grp-b's request"
        assert reader.result(timeout=120).status_code == 200
        large_response = large.result(timeout=120)
    finally:
        pool.shutdown(wait=False)
    assert large_response.status_code == 200 and large_response.json()[0]["meta_info"]["completion_tokens"] == 60


def test_put_generate_is_a_tenants_request_and_no_route_lets_a_body_name_a_tenant(server):
    """SGLang serves /generate for PUT too, and /v1/responses takes an extra_key: a body naming a tenant's namespace
    there ran as that tenant (its cache, τ and budget) without its key."""
    keep_before = tenants_state(server)["keep"]["entries_reserved"]
    body = {"input_ids": [7, 8, 9, 10], "extra_key": "kvzap-tenant:keep", "sampling_params": {"max_new_tokens": 2}}
    forged = requests.put(f"{server}/generate", json=body, timeout=120)
    assert forged.status_code == 403 and "tenant namespace" in forged.text, forged.text
    forged = requests.post(f"{server}/v1/responses", timeout=120, json={
        "model": "default", "input": "hi", "max_output_tokens": 2, "extra_key": "kvzap-tenant:keep"})  # fmt: skip
    assert forged.status_code == 403 and "tenant namespace" in forged.text, forged.text
    assert tenants_state(server)["keep"]["entries_reserved"] == keep_before
    # With its key, PUT runs as the tenant.
    body = {"input_ids": [7, 8, 9, 10], "sampling_params": {"max_new_tokens": 2}}
    served = requests.put(f"{server}/generate", json=body, headers={"Authorization": f"Bearer {KEYS['keep']}"},
                          timeout=120)  # fmt: skip
    assert served.status_code == 200, served.text
    assert tenants_state(server)["keep"]["entries_reserved"] > keep_before


def test_routes_the_middleware_does_not_cover_reach_no_groups_cache_and_admin_routes_need_the_admin_key(server):
    """Review findings on the real server: SGLang's /vertex_generate passes a raw extra_key, so naming a group's
    namespace there read that group's cached prompts without any key (cached_tokens 69 of 70); and with no SGLang
    key an anonymous /abort_request aborted a tenant's request by id."""
    body = {"instances": [{"text": "The grass is green."}],
            "parameters": {"extra_key": "kvzap-group:docs|", "sampling_params": {"max_new_tokens": 1}}}  # fmt: skip
    forged = requests.post(f"{server}/vertex_generate", json=body, timeout=120)
    assert forged.status_code == 400 and "prefix-cache group" in forged.text, forged.text
    abort = {"rid": "someone-elses-request"}
    assert requests.post(f"{server}/abort_request", json=abort, timeout=60).status_code == 401
    tenant_key = {"Authorization": f"Bearer {KEYS['acme']}"}
    assert requests.post(f"{server}/abort_request", json=abort, headers=tenant_key, timeout=60).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert requests.post(f"{server}/abort_request", json=abort, headers=admin, timeout=60).status_code == 200
    assert requests.get(f"{server}/health", timeout=60).status_code == 200
    # SGLang's /server_info (open: tenants replace --api-key) listed admin_api_key and the launch command verbatim.
    info = requests.get(f"{server}/server_info", timeout=60)
    assert info.status_code == 200 and ADMIN_KEY not in info.text
    assert info.json()["admin_api_key"] == "<redacted>" and "--admin-api-key <redacted>" in info.json()["launch_command"]
    # And every tenant's name, τ, budget and load, to anyone: those go to the admin key only.
    for headers in ({}, tenant_key):
        state = requests.get(f"{server}/server_info", headers=headers, timeout=60).json()["internal_states"][0]
        assert "tenants" not in state["kvzap"] and "admin API key" in state["kvzap"]["tenants_hidden"]
        assert not any(f'"{name}"' in json.dumps(state) for name in KEYS)
    assert set(tenants_state(server)) >= set(KEYS)


def test_a_tenants_budget_clips_new_tokens_and_refuses_a_prompt_that_cannot_fit(server, tokenizer):
    """A tenant's budget is its pool: as SGLang clips max_new_tokens to the pool and refuses a prompt it cannot hold,
    a request of ``small`` gets at most budget - prompt new tokens, and a prompt of the budget's size is refused."""
    before = tenants_state(server)["small"]["refused_requests"]
    text = prompt("clip", fillers=11)
    prompt_tokens = len(tokenizer(text)["input_ids"])
    assert 120 < prompt_tokens < SMALL_BUDGET_TOKENS - 16
    body = {"text": text, "sampling_params": {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}}
    headers = {"Authorization": f"Bearer {KEYS['small']}"}
    clipped = requests.post(f"{server}/generate", json=body, headers=headers, timeout=900)
    assert clipped.status_code == 200, clipped.text
    meta = clipped.json()["meta_info"]
    assert meta["prompt_tokens"] == prompt_tokens
    assert meta["completion_tokens"] == SMALL_BUDGET_TOKENS - prompt_tokens
    assert meta["finish_reason"]["type"] == "length"

    too_long = prompt("too-long", fillers=20)
    assert len(tokenizer(too_long)["input_ids"]) >= SMALL_BUDGET_TOKENS
    refused = generate(server, too_long, "small")
    assert refused.status_code == 400
    assert "exceeds the KV budget of tenant 'small'" in refused.text and "kv_budget_tokens=200" in refused.text
    chat = requests.post(f"{server}/v1/chat/completions", headers=headers, timeout=60,
                         json={"model": "default", "messages": [{"role": "user", "content": FILLER * 20}]})
    assert chat.status_code == 400 and "exceeds the KV budget of tenant 'small'" in chat.json()["message"], chat.text
    # Other tenants are untouched by small's budget, and the refusals left nothing behind.
    assert generate(server, too_long, "acme").status_code == 200
    state = tenants_state(server)
    assert state["small"]["refused_requests"] == before + 2
    assert state["small"]["queued_requests"] == 0 and state["small"]["running_requests"] == 0


def test_refusals_answer_at_once_while_the_tenant_is_busy(server):
    """SGLang queues a request it refuses (a prompt over the tenant's budget, a regex that does not compile) as a
    one-token prompt, only to send its error. Counted with its new tokens, a structured-output request refused once its
    grammar failed (budget-checked since the grammar queue is) was held, its error waiting for the running one."""
    budget = SMALL_BUDGET_TOKENS * CELLS_PER_TOKEN
    too_long_prompt, prompt = [4300 + i for i in range(SMALL_BUDGET_TOKENS)], [4500 + i for i in range(150)]
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        running = pool.submit(send_batch, server, "strict", [[4100 + i for i in range(20)]], [150])
        wait_for(lambda: tenants_state(server)["strict"]["running_requests"] == 1, "strict's request running")
        refuse = lambda: send_batch(server, "strict", [too_long_prompt], [4])  # noqa: E731
        too_long, held = held_cells_while(server, "strict", refuse)
        uncompiled = send_batch(server, "strict", [prompt], [40], regex="[a-z")
        assert not running.done(), "a refusal waited for the tenant's running request"
        assert running.result(timeout=600).status_code == 200
    finally:
        pool.shutdown(wait=False)
    assert too_long.status_code == 400 and "exceeds the KV budget of tenant 'strict'" in too_long.text, too_long.text
    assert uncompiled.status_code == 400 and "Failed to compile regex grammar" in uncompiled.text, uncompiled.text
    assert max(held) <= budget, f"held {max(held) / CELLS_PER_TOKEN:.0f} tokens' worth, budget {SMALL_BUDGET_TOKENS}"


def test_a_tenant_with_a_threshold_range_tightens_before_queueing_and_relaxes_after(server):
    budget = SMALL_BUDGET_TOKENS * CELLS_PER_TOKEN
    outs, samples = flood(server, "tight")
    assert all(out.status_code == 200 for out in outs)
    assert max(s["cells_held"] for s in samples) <= budget, "held cells exceeded the budget"
    state = tenants_state(server)["tight"]
    # Head 1 scores exactly 1.0: the lowest τ that frees any of it is the float just above 1.0, within [0.5, 1.5].
    assert state["tightenings"] > 0 and state["entries_pruned_tightening"] > 0
    assert 1.0 < max(s["threshold"] for s in samples) <= 1.5 and state["threshold_base"] == 0.5
    # Re-judged entries: more than head 0 alone (1/3 of the out-of-window entries) went.
    plain = generate(server, prompt("plain-check"), "small").json()["meta_info"]["kvzap"]["removed_fraction"]
    assert state["removed_fraction"] > plain
    # Nothing of tight's waits any more: the next admission round (any tenant's request) brings τ back to its base.
    generate(server, prompt("relax"), "acme")
    assert tenants_state(server)["tight"]["threshold"] == 0.5


def test_a_tenants_tau_set_through_the_service_applies_live_to_that_tenant_only(server, service):
    assert service.put(f"/thresholds/{MODEL}/{TASK}", json={"tau": -10.0}, params={"tenant": "keep"},
                       headers={"X-API-Key": "svc-acme-key"}).status_code == 403  # acme's key cannot touch keep  # fmt: skip
    response = service.put(f"/thresholds/{MODEL}/{TASK}", json={"tau": -10.0}, headers={"X-API-Key": "svc-acme-key"})
    assert response.status_code == 200 and response.json()["tenant"] == "acme"
    stored = time.monotonic()
    deadline = stored + 10
    while tenants_state(server)["acme"]["threshold"] != -10.0:
        assert time.monotonic() < deadline, "acme's τ was not applied within 10 s"
        time.sleep(0.05)
    print(f"acme's τ from the service was in use {time.monotonic() - stored:.2f} s after the PUT returned")
    assert generate(server, prompt("after-change"), "acme").json()["meta_info"]["kvzap"]["removed_fraction"] == 0.0
    state = tenants_state(server)
    assert state["default"]["threshold"] == 0.5 and state["small"]["threshold"] == 0.5


def test_a_model_task_tau_reaches_open_tenants_but_not_a_tau_the_tenants_file_sets(server, service):
    """``[default]`` and ``keep`` set τ in the file; ``small`` leaves it open (a (model, task) τ once replaced the
    default tenant's τ from the file)."""
    admin = {"X-API-Key": "test-admin-key"}
    assert service.put(f"/thresholds/{MODEL}/{TASK}", json={"tau": 0.75}, headers=admin).status_code == 200
    wait_for(lambda: tenants_state(server)["small"]["threshold"] == 0.75, "small to follow the (model, task) τ")
    state = tenants_state(server)
    assert state["default"]["threshold"] == 0.5 and state["keep"]["threshold"] == -10.0
    assert state["acme"]["threshold"] == -10.0  # its own record (previous test) still wins over (model, task)'s
    # The default tenant's own record does replace the file's τ.
    response = service.put(f"/thresholds/{MODEL}/{TASK}", json={"tau": 0.6}, params={"tenant": "default"},
                           headers=admin)  # fmt: skip
    assert response.status_code == 200
    wait_for(lambda: tenants_state(server)["default"]["threshold"] == 0.6, "default to follow its own τ")
    assert tenants_state(server)["small"]["threshold"] == 0.75


def test_a_tenants_summaries_carry_its_window_and_predict_what_it_removed(server, module_prefix, redis_client):
    """Summaries are filed under the request's tenant with the window its entries were decided with (they once
    carried the server's window, so the service fitted τ for a tenant's own window on the wrong eligible set)."""
    figures = generate(server, prompt("narrow-sampled"), "narrow").json()["meta_info"]["kvzap"]
    store = SampleStore(redis_client, module_prefix)
    summaries = wait_for(lambda: store.raw(SeriesKey(MODEL, TASK, "narrow"), count=10), "narrow's summary in Redis")
    assert len(summaries) == 1 and summaries[0].window == NARROW_WINDOW
    assert summaries[0].num_tokens == figures["tokens"]
    tau = tenants_state(server)["narrow"]["threshold"]
    assert removed_fraction_at(summaries[0], tau) == pytest.approx(figures["removed_fraction"], abs=1e-12)
    assert figures["removed_fraction"] == pytest.approx((figures["tokens"] - NARROW_WINDOW) / figures["tokens"] / 3)


def test_the_status_command_prints_every_tenants_row(server, capsys, monkeypatch):
    from kvzap_sglang.cli import main

    monkeypatch.delenv("KVZAP_ADMIN_API_KEY", raising=False)
    assert main(["status", "--url", server]) == 0
    assert "tenants: hidden without the admin key" in capsys.readouterr().out  # per-tenant rows: the admin's
    monkeypatch.setenv("KVZAP_ADMIN_API_KEY", ADMIN_KEY)
    assert main(["status", "--url", server]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"default", "acme", "keep", "small", "tight", "docs-a", "docs-b", "narrow", "strict", "grp-a",
                         "grp-b"}
    assert rows["keep"][1:3] == ["-10.000", "-10.000"] and rows["small"][5] == str(SMALL_BUDGET_TOKENS * CELLS_PER_TOKEN)


def test_refused_identities_never_reach_the_scheduler(server):
    assert generate(server, "hi", None).status_code == 200
    response = requests.post(f"{server}/generate", json={"text": "hi"}, headers={"Authorization": "Bearer nope-nope-1"},
                             timeout=60)  # fmt: skip
    assert response.status_code == 401
    response = requests.post(f"{server}/v1/chat/completions",
                             json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                             headers={"Authorization": f"Bearer {KEYS['acme']}", "X-KVzap-Tenant": "keep"},
                             timeout=60)  # fmt: skip
    assert response.status_code == 403 and "belongs to tenant 'acme'" in response.json()["error"]["message"]


def test_sessions_are_refused_because_they_are_not_tenant_scoped(server):
    """SGLang builds a session request's prompt from the session's history, whoever sends it, and ``replace``
    clears it: with sessions open, a tenant knowing another's session id ran on its history."""
    acme = {"Authorization": f"Bearer {KEYS['acme']}"}
    opened = requests.post(f"{server}/open_session", json={"capacity_of_str_len": 1000}, headers=acme, timeout=60)
    assert opened.status_code == 400 and "not tenant-scoped" in opened.text, opened.text
    body = {"text": "hi", "session_params": {"id": "0123abcd", "rid": None}, "sampling_params": {"max_new_tokens": 2}}
    continued = requests.post(f"{server}/generate", json=body, headers=acme, timeout=60)
    assert continued.status_code == 400 and "not tenant-scoped" in continued.text, continued.text
    assert requests.post(f"{server}/close_session", json={"session_id": "0123abcd"}, timeout=60).status_code == 400
    assert generate(server, "hi", "acme").status_code == 200
