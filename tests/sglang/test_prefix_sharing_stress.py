"""Property-style stress test of prefix sharing with KVzap in the real HTTP server (issue #4).

Random shared prefixes, lengths around the window, aborts, a pool small enough to evict, chunked prefill, with
``KVZAP_CHECK_INVARIANTS=1``: SGLang's strict idle check (which raises on a broken ``available + evictable +
protected == total``) then also recounts the whole cell store, so a leaked or double-freed entry stops the scheduler
and fails the test. 200 requests in the suite; ``KVZAP_PREFIX_STRESS_REQUESTS=2000`` runs the full-size version.
Its own module, so no other server is alive (and polling) while it runs.
"""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from kvzap_sglang.plugin.server_process import kvzap_state, wait_until_idle

pytestmark = pytest.mark.engine  # starts the real SGLang server: deselect with -m 'not engine'


def generate(url: str, ids: list[int], max_new_tokens: int, **extra) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}, **extra}
    response = requests.post(f"{url}/generate", json=body, timeout=900)
    response.raise_for_status()
    return response.json()


# ---------------------------------------------------------------------------------------------------- stress

STRESS_REQUESTS = int(os.environ.get("KVZAP_PREFIX_STRESS_REQUESTS", "200"))
WINDOW, POOL_TOKENS = 16, 1024


@pytest.fixture(scope="module")
def stress_server(smollm2_path, server_factory, head0_surrogate):
    """Constant scores (KV head 0 pruned outside the window), window 16, chunked prefill of 64 tokens, a 1,024-token
    pool, and the deep idle self-check."""
    flags = ["--kvzap-threshold", "0.5", "--kvzap-surrogate", str(head0_surrogate), "--kvzap-window", str(WINDOW),
             "--chunked-prefill-size", "64", "--max-total-tokens", str(POOL_TOKENS), "--max-running-requests", "16"]  # fmt: skip
    with server_factory(smollm2_path, flags, deep_checks=True) as url:
        yield url


def _stress_request(url: str, index: int, prefixes: list[list[int]], rng: random.Random) -> dict:
    prefix = rng.choice(prefixes)[: rng.randint(0, 96)]
    ids = prefix + [rng.randrange(1000, 40000) for _ in range(rng.randint(1, 2 * WINDOW))]
    if index % 10 == 0:  # aborted by rid while queued, prefilling or decoding
        rid = f"prefix-stress-{index}"
        timer = threading.Timer(rng.uniform(0.0, 0.5), requests.post, args=(f"{url}/abort_request",),
                                kwargs={"json": {"rid": rid}, "timeout": 60})  # fmt: skip
        timer.start()
        out = generate(url, ids, 8, rid=rid)
        timer.join()
    else:
        out = generate(url, ids, rng.randint(1, 4))
    return out["meta_info"]


def test_stress_shared_prefixes_aborts_evictions_keep_every_invariant(stress_server):
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(96)] for _ in range(12)]
    seeds = [rng.randrange(10**9) for _ in range(STRESS_REQUESTS)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        metas = list(pool.map(lambda i: _stress_request(stress_server, i, prefixes, random.Random(seeds[i])),
                              range(STRESS_REQUESTS)))  # fmt: skip
    assert len(metas) == STRESS_REQUESTS
    assert sum(m["finish_reason"]["type"] == "abort" for m in metas) >= STRESS_REQUESTS // 100, "aborts happened"
    cached = sum(m.get("cached_tokens", 0) for m in metas)  # an aborted request may report none
    prompt = sum(m.get("prompt_tokens", 0) for m in metas)
    assert cached > 0.2 * prompt, "shared prefixes were reused"
    assert prompt > 10 * POOL_TOKENS, "far more tokens than the pool holds: the cache had to evict"
    assert sum(m.get("prompt_tokens", 0) > 64 for m in metas) > STRESS_REQUESTS // 20, "chunked prefill happened"

    state = wait_until_idle(stress_server)
    assert requests.get(f"{stress_server}/health", timeout=60).status_code == 200, "an idle invariant check failed"
    assert state["cells_in_use"] == state["cells_cached"], state
    assert state["idle_checks"] > 0 and state["entries_pruned"] > 0
    # Admission closed on a full pool and pruning reopened it (hooks.admission) while the invariants above held.
    assert state["admissions_reopened"] > 0
    print(f"{STRESS_REQUESTS} requests: {sum(m['finish_reason']['type'] == 'abort' for m in metas)} aborted, "
          f"{prompt} prompt tokens ({prompt / POOL_TOKENS:.0f}x the pool), {cached / prompt:.1%} cached; idle: "
          f"{state['cells_in_use']} cells in use = {state['cells_cached']} cached, {state['idle_checks']} idle checks, "
          f"{state['entries_pruned']} entries pruned, admission reopened {state['admissions_reopened']} times")  # fmt: skip
    requests.post(f"{stress_server}/flush_cache", timeout=60).raise_for_status()
    state = kvzap_state(stress_server)
    assert state["cells_in_use"] == 0 and state["cells_cached"] == 0 and state["slots_cached"] == 0
