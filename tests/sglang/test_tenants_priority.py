"""Tenants' KV budgets with SGLang's priority scheduling (real HTTP server, CPU, SmolLM2): within a tenant, requests
take their turns by priority as SGLang's admission orders them, so a high-priority request that fits the budget
never waits behind a held low-priority one of the same tenant."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from kvzap_sglang.plugin.server_process import kvzap_state

pytestmark = pytest.mark.engine  # starts the real SGLang server: deselect with -m 'not engine'

API_KEY = "solo-test-key-1"
ADMIN_KEY = "sglang-admin-test-key"  # --admin-api-key: required with tenants (SGLang's admin routes)
BUDGET_TOKENS = 200
TENANTS_TOML = f"""
[tenants.solo]
api_key = "{API_KEY}"
threshold = -10.0
kv_budget_tokens = {BUDGET_TOKENS}
"""


@pytest.fixture(scope="module")
def server(smollm2_path, server_factory, head0_surrogate, tmp_path_factory):
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    tenants.write_text(TENANTS_TOML)
    flags = ["--kvzap-threshold", "0.5", "--kvzap-surrogate", str(head0_surrogate), "--kvzap-tenants", str(tenants),
             "--admin-api-key", ADMIN_KEY, "--enable-priority-scheduling", "--max-total-tokens", "4096"]  # fmt: skip
    with server_factory(smollm2_path, flags, deep_checks=True) as url:  # idle recount: tenant rounds lock prefixes
        yield url


def send(url: str, prompt_len: int, first_id: int, new_tokens: int, priority: int) -> requests.Response:
    body = {"input_ids": list(range(first_id, first_id + prompt_len)), "priority": priority,
            "sampling_params": {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0.0}}  # fmt: skip
    return requests.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def solo(url: str) -> dict:
    return kvzap_state(url, api_key=ADMIN_KEY)["tenants"]["solo"]  # per-tenant figures: the admin key only


def wait_for(predicate, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_a_tenants_higher_priority_request_that_fits_never_waits_behind_its_held_one(server):
    """20 + 150 tokens run; 100 + 90 at the same priority must wait (360 > 200); then 10 + 20 at a higher priority
    fits beside the first (200) and runs beside it. Taking turns in the queue's arrival order, it waited behind the
    held one, so the tenant never ran two requests at once."""
    pool = ThreadPoolExecutor(max_workers=4)  # first, held, the sampler and urgent at once
    running, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            running.append(solo(server)["running_requests"])
            time.sleep(0.02)

    try:  # bounded waits: a request that never gets in fails the test instead of hanging it
        first = pool.submit(send, server, 20, 1000, 150, 0)
        wait_for(lambda: solo(server)["running_requests"] == 1, "the first request running")
        held = pool.submit(send, server, 100, 2000, 90, 0)
        wait_for(lambda: solo(server)["queued_requests"] == 1, "the second request held for the budget")
        sampler = pool.submit(sample)
        urgent = pool.submit(send, server, 10, 3000, 20, 10).result(timeout=60)
        stop.set()
        sampler.result(timeout=10)
        assert urgent.status_code == 200 and urgent.json()["meta_info"]["completion_tokens"] == 20, urgent.text
        assert first.result(timeout=60).status_code == 200
        assert held.result(timeout=60).status_code == 200
    finally:
        stop.set()
        pool.shutdown(wait=False)
    assert max(running) == 2, f"the higher-priority request never ran beside the first: running {running}"
    assert solo(server)["running_requests"] == 0 and solo(server)["queued_requests"] == 0
