"""Multi-tenant serving without an engine. The HTTP edge: ``TenantMiddleware`` resolves the tenant and writes it
into ``extra_key`` (SGLang's radix-cache namespace); refused identities get 401/403 with a reason and never reach
the server. The scheduler's tenant table: what it reports about budgets against the pool."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from kvzap_sglang.plugin.tenants import TenantMiddleware
from kvzap_sglang.tenants import TenantsConfig

EXAMPLE = Path(__file__).parents[2] / "configs" / "tenants.example.toml"


@pytest.fixture
def client():
    app = FastAPI()
    seen = []

    @app.post("/generate")
    @app.post("/v1/chat/completions")
    async def echo(request: Request):
        body = await request.json()
        seen.append(body)
        return body

    @app.post("/flush_cache")
    async def other(request: Request):
        return {"ok": True}

    app.add_middleware(TenantMiddleware, config=TenantsConfig.load(EXAMPLE))
    test_client = TestClient(app)
    test_client.seen = seen
    return test_client


SERVER_INFO = {"admin_api_key": "<redacted>", "internal_states": [{
    "kvzap": {"threshold": -4.0, "tenants": {"acme": {"budget_cells": 90}, "globex": {"budget_cells": None}}},
    "kvzap_calibration": {"tau": -4.0, "tenants": {"acme": {"tau": -3.5}}},
}]}  # fmt: skip


@pytest.fixture
def info_client():
    app = FastAPI()

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return SERVER_INFO

    app.add_middleware(TenantMiddleware, config=TenantsConfig.load(EXAMPLE), admin_api_key="the-admin-key")
    return TestClient(app)


@pytest.mark.parametrize("path", ["/server_info", "/get_server_info"])
@pytest.mark.parametrize(
    "authorization", [None, "Bearer change-me-acme-0001", "Bearer the-admin-key2", "Basic the-admin-key"]
)
def test_server_info_shows_tenants_to_the_admin_key_only(info_client, path, authorization):
    """With tenants SGLang has no --api-key, so /server_info is open: one tenant's key (or none) read every tenant's
    name, τ, budget and load there (review)."""
    headers = {"Authorization": authorization} if authorization else {}
    response = info_client.get(path, headers=headers)
    assert response.status_code == 200
    assert "acme" not in response.text and "globex" not in response.text
    body = response.json()
    state = body["internal_states"][0]
    for section in ("kvzap", "kvzap_calibration"):
        assert "tenants" not in state[section] and "admin API key" in state[section]["tenants_hidden"]
    assert state["kvzap"]["threshold"] == -4.0 and body["admin_api_key"] == "<redacted>"  # the rest is unchanged
    assert int(response.headers["content-length"]) == len(response.content)
    admin = info_client.get(path, headers={"Authorization": "Bearer the-admin-key"})
    assert admin.status_code == 200 and admin.json() == SERVER_INFO


def test_the_key_decides_the_tenant_namespace(client):
    body = client.post("/generate", json={"text": "hi"}, headers={"Authorization": "Bearer change-me-acme-0001"}).json()
    assert body == {"text": "hi", "extra_key": "kvzap-tenant:acme|"}
    body = client.post("/v1/chat/completions", json={"messages": [], "extra_key": "user-1"}).json()
    assert body["extra_key"] == "kvzap-tenant:default|user-1"  # no key: default tenant, the client's salt kept
    body = client.post("/generate", json={"text": ["a", "b"], "extra_key": ["u1", None]},
                       headers={"Authorization": "Bearer change-me-globex-01"}).json()  # fmt: skip
    assert body["extra_key"] == ["kvzap-tenant:globex|u1", "kvzap-tenant:globex|"]


@pytest.mark.parametrize(
    "headers, body, status, reason",
    [
        ({"Authorization": "Bearer change-me-acme-0001", "X-KVzap-Tenant": "globex"}, {}, 403, "belongs to tenant"),
        ({"X-KVzap-Tenant": "globex"}, {}, 401, "needs its API key"),
        ({"Authorization": "Bearer not-a-key-123"}, {}, 401, "unknown API key"),
        ({}, {"extra_key": "kvzap-tenant:acme"}, 403, "tenant namespace"),
        ({}, {"extra_key": 5}, 400, "extra_key must be"),
        ({}, {"extra_key": "kvzap-group:docs|"}, 403, "tenant namespace"),
        # With keys configured, an Authorization header that is not "Bearer KEY" ran as the default tenant (review).
        ({"Authorization": "Bearer\tchange-me-acme-0001"}, {}, 401, "must be 'Bearer API_KEY'"),
        ({"Authorization": "Basic YWNtZTpzZWNyZXQ="}, {}, 401, "must be 'Bearer API_KEY'"),
        ({"Authorization": "Bearer"}, {}, 401, "must be 'Bearer API_KEY'"),
    ],
)
def test_refused_identities_get_a_reason_and_never_reach_the_server(client, headers, body, status, reason):
    response = client.post("/generate", json={"text": "hi", **body}, headers=headers)
    assert response.status_code == status and reason in response.json()["error"]["message"]
    assert client.seen == []


def test_bad_json_is_a_400_and_other_paths_pass_untouched(client):
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "invalid JSON" in response.json()["error"]["message"]
    # Not UTF-8 (latin-1 text, a gzip body): json.loads raised UnicodeDecodeError, a 500 (review).
    for body in ('{"text": "café"}'.encode("latin-1"), b"\x1f\x8b\x08\x00\x00\x00\x00\x00"):
        response = client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "invalid JSON" in response.json()["error"]["message"]
    assert client.seen == []
    lower = client.post("/generate", json={"text": "hi"}, headers={"Authorization": "bearer  change-me-acme-0001 "})
    assert lower.json()["extra_key"] == "kvzap-tenant:acme|"
    assert client.post("/flush_cache", headers={"X-KVzap-Tenant": "globex"}).json() == {"ok": True}


def test_only_the_middleware_may_put_a_tenant_namespace_into_extra_key(monkeypatch):
    """What SGLang's tokenizer manager asks of every request (prompt_checks): an extra_key naming a tenant passes
    only when the middleware wrote it for this HTTP request; a route it does not cover cannot smuggle one in."""
    from types import SimpleNamespace

    from fastapi.responses import JSONResponse

    from kvzap_sglang.plugin import tenants

    monkeypatch.setattr(tenants, "_edge_installed", True)  # as install_http_middleware does in the server process
    app = FastAPI()

    @app.post("/generate")
    @app.post("/v1/messages")  # a generation route the middleware does not cover
    async def tokenize(request: Request):
        body = await request.json()
        try:
            tenants.refuse_unvouched_tenant_keys(SimpleNamespace(extra_key=body.get("extra_key")))
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return body

    app.add_middleware(TenantMiddleware, config=TenantsConfig.load(EXAMPLE))
    client = TestClient(app)
    acme = {"Authorization": "Bearer change-me-acme-0001"}
    assert client.post("/generate", json={"extra_key": ["u1", "u2"]}, headers=acme).status_code == 200
    forged = client.post("/v1/messages", json={"extra_key": "kvzap-tenant:acme"}, headers=acme)
    assert forged.status_code == 400 and "tenant or prefix-cache group namespace" in forged.json()["error"]
    # A group's namespace is the radix cache's own key for its tenants' prefixes: named raw on a route the middleware
    # does not cover (SGLang's /invocations, /vertex_generate), it read the group's cache without any key (review).
    forged = client.post("/v1/messages", json={"extra_key": "kvzap-group:docs|"})
    assert forged.status_code == 400 and "prefix-cache group" in forged.json()["error"]
    forged = client.post("/v1/messages", json={"extra_key": ["user-1", "kvzap-tenant:acme|user-2"]})
    assert forged.status_code == 400
    assert client.post("/v1/messages", json={"extra_key": "user-1"}).status_code == 200  # a plain salt is the client's
    assert client.post("/v1/messages", json={}).status_code == 200
    assert tenants._vouched_extra_keys.get() is None  # nothing left vouched outside a request


def test_budgets_larger_than_the_pool_or_adding_up_past_it_are_reported():
    import torch

    from kvzap_sglang.plugin.tenants import TenantTable

    per_token = 90
    table = TenantTable.build(TenantsConfig.load(EXAMPLE), threshold=-4.3, window=128, cells_per_token=per_token,
                              num_rows=4, device=torch.device("cpu"))  # fmt: skip
    assert table.budget_warnings(20_000 * per_token, per_token) == []  # 2,048 + 8,192 + 4,096 fit
    (added_up,) = table.budget_warnings(8_192 * per_token, per_token)
    assert "add up to 14336 tokens, more than the pool's 8192" in added_up
    too_big, added_up = table.budget_warnings(4_096 * per_token, per_token)
    assert "'acme': kv_budget_tokens 8192 is more than the whole KV pool (4096 tokens)" in too_big
    assert "add up to 14336" in added_up


def test_a_lora_request_keeps_its_tenant_in_the_scheduler(client):
    """SGLang's ``Req`` appends a LoRA request's ``lora_id`` to its ``extra_key``: the tenant the middleware wrote must
    still be the one the scheduler reads (it ran as ``default`` when the id ran into the tenant's name), and the
    adapter must still separate cached prefixes inside a prefix-cache group."""
    from array import array

    import torch
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from kvzap_sglang.plugin.tenants import TenantTable
    from kvzap_sglang.tenants import cache_namespace

    config = TenantsConfig.load(EXAMPLE)
    table = TenantTable.build(config, threshold=-4.3, window=128, cells_per_token=90, num_rows=4,
                              device=torch.device("cpu"))  # fmt: skip
    acme = {"Authorization": "Bearer change-me-acme-0001"}
    for salt in (None, "user-7"):
        extra_key = client.post("/generate", json={"text": "hi", "extra_key": salt}, headers=acme).json()["extra_key"]
        reqs = [Req(f"r-{lora}", "hi", array("q", [1, 2]), SamplingParams(max_new_tokens=2), lora_id=lora,
                    extra_key=extra_key) for lora in ("0a1b2c", "3d4e5f", None)]  # fmt: skip
        assert [table.names[table.index_of_request(req)] for req in reqs] == ["acme"] * 3
        groups = {"acme": "docs"}
        namespaces = {cache_namespace(req.extra_key, groups) for req in reqs}
        assert len(namespaces) == 3 and all(n.startswith("kvzap-group:docs|") for n in namespaces)


def test_held_back_requests_keep_their_places_in_the_waiting_queue():
    """After an admission round: what SGLang left waiting plus the requests held for their budget, in the order the
    round started from (they went to the back before: FCFS lost against every later arrival); a request SGLang
    queued during the round (a preempted one) follows."""
    from kvzap_sglang.plugin.tenants import requeue

    a, b, c, d, e, preempted = (object() for _ in range(6))
    before = [a, b, c, d, e]  # b and d held back; c admitted; a and e left waiting by SGLang
    assert requeue(before, [a, e, preempted], [b, d]) == [a, b, d, e, preempted]
    assert requeue(before, [e, a], [d, b]) == [a, b, d, e]
    assert requeue(before, [], []) == []


def test_a_retracted_request_prefilled_again_in_chunks_counts_its_output_too():
    """A request retracted (or preempted) after 40 new tokens keeps them and prefills prompt + output again; in
    chunks, the rest of that fill is growth its tenant's budget must hold. Counted from the prompt alone, 40 tokens
    went missing and the tenant's next request got in over its budget."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from kvzap_sglang.plugin.tenants import still_to_write

    req = Req("r", "", array("q", range(1, 21)), SamplingParams(max_new_tokens=70))
    assert still_to_write(req, 70, chunked=False) == 70
    req.kv.kv_allocated_len = 16  # first chunk of a fresh prompt written
    assert still_to_write(req, 70, chunked=True) == 70 + 4
    req.output_ids = array("q", range(100, 140))
    req.kv.kv_allocated_len = 0
    req.reset_for_retract()  # SGLang's own retraction: the output stays
    assert len(req.output_ids) == 40
    req.kv.kv_allocated_len = 16  # its first chunk prefilled again
    assert still_to_write(req, 70, chunked=True) == 30 + (20 + 40 - 16)
    assert still_to_write(req, 70, chunked=False) == 30


def _scheduler_with(policy: str, priority_scheduling: bool, queue: list):
    from types import SimpleNamespace

    from sglang.srt.managers.schedule_policy import SchedulePolicy

    sort = SchedulePolicy(policy, SimpleNamespace(disable=True), enable_hierarchical_cache=False,
                          enable_priority_scheduling=priority_scheduling, schedule_low_priority_values_first=True)  # fmt: skip
    return SimpleNamespace(policy=sort, enable_priority_scheduling=priority_scheduling, waiting_queue=queue)


def test_a_tenants_requests_take_their_turns_in_sglangs_order():
    """Budgets judge a tenant's requests in the order SGLang's admission takes them (``calc_priority``): under
    ``--schedule-policy lof`` the longest output first (priority first with priority scheduling); with priority
    scheduling alone by priority, then arrival time. In queue order, a later request with a longer output waited
    behind a held one SGLang would have taken after it."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from kvzap_sglang.plugin.tenants import _in_turn_order

    def req(rid: str, max_new_tokens: int, priority: int, arrived: float) -> Req:
        made = Req(rid, "", array("q", [1, 2, 3]), SamplingParams(max_new_tokens=max_new_tokens), priority=priority)
        made.time_stats.wait_queue_entry_time = arrived
        return made

    queue = [req("a", 10, 1, 3.0), req("b", 50, 2, 1.0), req("c", 30, 1, 2.0), req("d", 40, 1, 4.0)]
    order = lambda policy, by_priority: [r.rid for r in _in_turn_order(_scheduler_with(policy, by_priority, queue))]
    assert order("lof", False) == ["b", "d", "c", "a"]
    assert order("lof", True) == ["d", "c", "a", "b"]
    assert order("fcfs", True) == ["c", "a", "d", "b"]
    assert order("fcfs", False) == ["a", "b", "c", "d"]
    assert [r.rid for r in queue] == ["a", "b", "c", "d"]  # the scheduler's queue itself is never reordered
